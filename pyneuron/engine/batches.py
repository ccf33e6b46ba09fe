"""Reading activations (N images, U units, ...) in blocks of whole images.

Memory-mapped arrays larger than memory are read block by block; the pages of a block
are handed back to the kernel once the block has been copied out, so reading a whole
file does not grow the process's resident memory with it.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator

import numpy as np

from .checks import positive_int

#: Bytes of activations per block when the block size is not given.
DEFAULT_BLOCK_BYTES = 64 * 2**20


def block_images(array: np.ndarray, batch_images: int | None = None) -> int:
    """Images per block: ``batch_images``, or as many as fit in about 64 MiB."""
    if batch_images is not None:
        return positive_int(batch_images, "batch_images")
    per_image = max(1, math.prod(array.shape[1:]) * array.dtype.itemsize)
    return max(1, DEFAULT_BLOCK_BYTES // per_image)


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages of a memory-mapped ``array`` (a no-op for other arrays);
    the data stay in the file and are read again if touched."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "_mmap", None) or getattr(base, "base", None)
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        try:
            base.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed map, or a platform without madvise
            pass


def image_batches(
    array: np.ndarray, batch_images: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """``(first image, block)`` over blocks of whole images of ``array``, each block an
    in-memory copy; a memory-mapped ``array`` gives its pages back after each block.

    Examples
    --------
    >>> import numpy as np
    >>> [(start, block.shape) for start, block in image_batches(np.zeros((5, 2)), 2)]
    [(0, (2, 2)), (2, (2, 2)), (4, (1, 2))]
    """
    size = block_images(array, batch_images)
    for start in range(0, array.shape[0], size):
        block = np.array(array[start : start + size])
        release_pages(array)
        yield start, block
