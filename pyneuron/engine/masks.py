"""Block-sparse mask sets: the common core of :class:`ConceptStore` and :class:`UnitMasks`.

Each mask is stored per image as an *empty* container (absent), a *full* container
(slot ``-1``) or a *bitset* of the image's packed words, in CSR arrays:

``offsets`` (n_masks + 1), then per entry ``images``, ``slots``, ``counts``, and the
``words`` pool of bitsets (n_slots x words_per_image uint64).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import pandas as pd

from ..errors import GridMismatchError, OutOfRangeError, PyneuronError
from . import _native, storage
from .batches import release_pages
from .grid import Grid, pack_bits, unpack_bits
from .storage import pixel_counts

FULL_SLOT = -1


class MaskArrays(NamedTuple):
    """The containers of a mask set as its CSR arrays (see the module docstring)."""

    offsets: np.ndarray
    images: np.ndarray
    slots: np.ndarray
    counts: np.ndarray
    words: np.ndarray


class MaskSet:
    """Masks on one :class:`Grid`, block-sparse (see the module docstring).

    Not built directly: use :class:`ConceptStore` or :class:`UnitMasks`.
    """

    def __init__(
        self,
        grid: Grid,
        offsets: np.ndarray,
        images: np.ndarray,
        slots: np.ndarray,
        counts: np.ndarray,
        words: np.ndarray,
    ) -> None:
        self._grid = grid
        self._offsets = offsets
        self._images = images
        self._slots = slots
        self._counts = counts
        self._words = words
        self._metadata: dict[str, Any] = {}
        self._pixel_counts: np.ndarray | None = None
        # The C++ view validates the structure and keeps the arrays alive.
        self._native = _native.NativeMaskSet(
            grid.n_images, grid.pixels, offsets, images, slots, counts, words.reshape(-1)
        )

    # -- construction helpers shared by subclasses ------------------------------------
    @staticmethod
    def _arrays_from_dense(masks: np.ndarray, grid: Grid) -> tuple[np.ndarray, ...]:
        writer = MaskSetWriter(grid, n_masks=masks.shape[0])
        for m in range(masks.shape[0]):
            writer.add_mask(m, masks[m])
        return writer.finish()

    # -- persistence -------------------------------------------------------------------
    KIND = ""

    @property
    def arrays(self) -> MaskArrays:
        """The containers as arrays (read-only views; for transport, e.g. to Ray workers)."""
        return MaskArrays(self._offsets, self._images, self._slots, self._counts, self._words)

    def release_pages(self) -> None:
        """Hand the resident pages of memory-mapped bitsets back to the kernel (they are
        read again from the file when next used): after a layer is searched, so that
        the process does not keep every layer's masks resident. A no-op in memory."""
        release_pages(self._words)

    def block(self, start: int, stop: int) -> MaskArrays:
        """The containers of masks ``[start, stop)`` alone, as the arrays of a new mask
        set on the same grid (bitsets copied, slots renumbered)."""
        begin, end = int(self._offsets[start]), int(self._offsets[stop])
        slots = self._slots[begin:end]
        bitsets = slots != FULL_SLOT
        words = self._words.reshape(-1, self._grid.words_per_image)[slots[bitsets]]
        new_slots = np.full(slots.shape, FULL_SLOT, dtype=slots.dtype)
        new_slots[bitsets] = np.arange(int(bitsets.sum()), dtype=slots.dtype)
        offsets = self._offsets[start : stop + 1] - begin
        return MaskArrays(
            offsets, self._images[begin:end], new_slots, self._counts[begin:end], words
        )

    @property
    def metadata(self) -> dict[str, Any]:
        """Free-form provenance saved with the set (JSON-serializable values)."""
        return self._metadata

    def table(self) -> pd.DataFrame:
        """One row per mask with its pixel and image counts."""
        return pd.DataFrame({"pixels": self.pixel_counts, "images": self.image_counts})

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write to a directory atomically (a temporary directory, then a rename).

        Raises
        ------
        FileExistsError
            If ``path`` exists and ``overwrite`` is false.
        """
        return storage.save(
            path,
            kind=self.KIND,
            grid=self._grid,
            index=(self._offsets, self._images, self._slots, self._counts),
            words=self._words,
            table=self.table(),
            metadata=self._metadata,
            overwrite=overwrite,
        )

    # -- shape -------------------------------------------------------------------------
    @property
    def grid(self) -> Grid:
        """The grid (n_images x height x width) of every mask."""
        return self._grid

    def __len__(self) -> int:
        return int(self._offsets.shape[0] - 1)

    @property
    def pixel_counts(self) -> np.ndarray:
        """Set pixels per mask, int64 (n_masks,), read-only (computed once)."""
        if self._pixel_counts is None:
            counts = pixel_counts(self._offsets, self._counts)
            counts.setflags(write=False)
            self._pixel_counts = counts
        return self._pixel_counts

    @property
    def image_counts(self) -> np.ndarray:
        """Images where each mask is not empty, int64 (n_masks,)."""
        return np.diff(self._offsets).astype(np.int64)

    @property
    def nbytes(self) -> int:
        """Bytes held by the containers (index and bitsets)."""
        arrays = (self._offsets, self._images, self._slots, self._counts, self._words)
        return int(sum(a.nbytes for a in arrays))

    def _check_index(self, m: int) -> int:
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 0 <= m < len(self):
            raise OutOfRangeError(
                f"index {m!r} out of range: this set holds {len(self)} masks, numbered 0 to "
                f"{len(self) - 1} (concepts can also be looked up by name)"
            )
        return int(m)

    def _dense(self, m: int) -> np.ndarray:
        """Mask m as a dense bool array of shape (n_images, height, width)."""
        m = self._check_index(m)
        grid = self._grid
        try:
            out = np.zeros((grid.n_images, grid.pixels), dtype=bool)
        except MemoryError:
            size = f"{grid.n_images * grid.pixels / 2**30:.1f} GiB"
            raise _native.memory_error(
                f"a dense mask of every image ({size}; image_mask, images_with and sample "
                "decode only some images)",
                grid.n_images,
                grid.pixels,
            ) from None
        begin, end = self._offsets[m], self._offsets[m + 1]
        images = self._images[begin:end]
        slots = self._slots[begin:end]
        full = slots == FULL_SLOT
        out[images[full]] = True
        if (~full).any():
            words = self._words.reshape(-1, grid.words_per_image)[slots[~full]]
            out[images[~full]] = unpack_bits(words, grid.pixels)
        return out.reshape(grid.shape)

    def _image_mask(self, m: int, image: int) -> np.ndarray:
        """Mask m in one image: dense bool (height, width)."""
        m = self._check_index(m)
        grid = self._grid
        if isinstance(image, bool) or not isinstance(image, (int, np.integer)):
            raise OutOfRangeError(f"image id must be an integer, got {image!r}")
        if not 0 <= image < grid.n_images:
            raise OutOfRangeError(
                f"image {image} out of range: the grid holds images 0 to {grid.n_images - 1}"
            )
        begin, end = self._offsets[m], self._offsets[m + 1]
        k = begin + int(np.searchsorted(self._images[begin:end], image))
        if k == end or self._images[k] != image:
            return np.zeros((grid.height, grid.width), dtype=bool)
        if self._slots[k] == FULL_SLOT:
            return np.ones((grid.height, grid.width), dtype=bool)
        words = self._words.reshape(-1, grid.words_per_image)[self._slots[k]][None]
        return unpack_bits(words, grid.pixels).reshape(grid.height, grid.width)

    def _entries(self, m: int, picked: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mask m's non-empty images (int64) and its masks there, bool (K, height, width);
        ``picked``: positions among those images to decode (default all)."""
        m = self._check_index(m)
        entry = np.arange(self._offsets[m], self._offsets[m + 1])
        if picked is not None:
            entry = entry[picked]
        grid = self._grid
        slots = self._slots[entry]
        masks = np.zeros((entry.shape[0], grid.pixels), dtype=bool)
        full = slots == FULL_SLOT
        masks[full] = True
        if (~full).any():
            words = self._words.reshape(-1, grid.words_per_image)[slots[~full]]
            masks[~full] = unpack_bits(words, grid.pixels)
        images = self._images[entry].astype(np.int64)
        return images, masks.reshape(-1, grid.height, grid.width)

    def _images_with(self, m: int) -> np.ndarray:
        m = self._check_index(m)
        return self._images[self._offsets[m] : self._offsets[m + 1]].astype(np.int64)

    def _subset(
        self, masks: np.ndarray | None = None, images: np.ndarray | None = None
    ) -> tuple[Grid, tuple[np.ndarray, ...], np.ndarray]:
        """(grid, (offsets, images, slots, counts), words) of some masks on some images.

        ``masks``: mask ids, in the order wanted (default all); ``images``: distinct
        image ids, renumbered 0, 1, ... in the order given (default all). Only the
        containers of the kept (mask, image) pairs are copied; nothing is decoded.
        """
        grid = self._grid
        mask_ids = np.arange(len(self)) if masks is None else _ids(masks, len(self), "mask")
        begins, ends = self._offsets[mask_ids], self._offsets[mask_ids + 1]
        lengths = ends - begins
        owner = np.repeat(np.arange(mask_ids.shape[0]), lengths)
        entry = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        entry = entry + np.repeat(begins, lengths)
        new_images = self._images[entry].astype(np.int64)
        if images is not None:
            image_ids = _ids(images, grid.n_images, "image")
            if np.unique(image_ids).shape[0] != image_ids.shape[0]:
                raise PyneuronError("image ids must be distinct to take a subset of images")
            # New id of each entry's image by binary search: no array over all images.
            if image_ids.size:
                order = np.argsort(image_ids)
                ranked = image_ids[order]
                at = np.minimum(np.searchsorted(ranked, new_images), ranked.shape[0] - 1)
                new_images = np.where(ranked[at] == new_images, order[at], -1)
            else:
                new_images = np.full(new_images.shape[0], -1, dtype=np.int64)
            keep = new_images >= 0
            entry, owner, new_images = entry[keep], owner[keep], new_images[keep]
            order = np.lexsort((new_images, owner))
            entry, owner, new_images = entry[order], owner[order], new_images[order]
            grid = Grid(image_ids.shape[0], grid.height, grid.width)
        old_slots = self._slots[entry]
        partial = old_slots != FULL_SLOT
        slots = np.full(entry.shape[0], FULL_SLOT, dtype=np.int64)
        slots[partial] = np.arange(int(partial.sum()))
        words = np.ascontiguousarray(
            self._words.reshape(-1, grid.words_per_image)[old_slots[partial]]
        )
        offsets = np.zeros(mask_ids.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(owner, minlength=mask_ids.shape[0]), out=offsets[1:])
        index = (offsets, new_images.astype(np.int32), slots, self._counts[entry].copy())
        return grid, index, words

    def verify(self) -> None:
        """Read every bitset and check it against its stored pixel count.

        Raises
        ------
        PyneuronError
            If a count or padding bit is inconsistent (a corrupt store).
        """
        try:
            self._native.verify_words()
        except ValueError as error:
            raise PyneuronError(str(error)) from None


def stacked_grid(parts: Sequence[MaskSet], kind: type[MaskSet]) -> Grid:
    """The grid of ``parts`` put one after the other along images, once checked that they
    can be: at least one part, each a ``kind``, all on images of one height and width,
    all with the same number of masks."""
    if not parts:
        raise PyneuronError("nothing to concatenate: give at least one part")
    first = parts[0]
    for k, part in enumerate(parts):
        if not isinstance(part, kind):
            raise PyneuronError(f"part {k} is a {type(part).__name__}, not a {kind.__name__}")
        if (part.grid.height, part.grid.width) != (first.grid.height, first.grid.width):
            raise GridMismatchError(
                f"part {k} has {part.grid.height}x{part.grid.width} images, part 0 "
                f"{first.grid.height}x{first.grid.width}; concatenated parts share one image size"
            )
        if len(part) != len(first):
            raise PyneuronError(
                f"part {k} holds {len(part)} masks, part 0 {len(first)}; concatenated parts "
                "hold the same masks"
            )
    n_images = sum(part.grid.n_images for part in parts)
    return Grid(n_images, first.grid.height, first.grid.width)


def _ids(values: np.ndarray | Sequence[int], bound: int, what: str) -> np.ndarray:
    """Validated int64 ids in [0, bound)."""
    ids = np.asarray(values)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise PyneuronError(f"{what} ids must be a 1-D sequence of integers, got {values!r}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= bound):
        raise PyneuronError(f"{what} ids must lie in [0, {bound}), got {ids.min()}..{ids.max()}")
    return ids


class MaskSetWriter:
    """Collects masks image by image or mask by mask, never densely.

    Bitsets go to memory, or to ``words_file`` (an open binary file) when given, so a
    store larger than RAM can be written. ``finish()`` returns the CSR arrays.
    """

    def __init__(self, grid: Grid, n_masks: int | None = None, words_file: BinaryIO | None = None):
        self.grid = grid
        self.n_masks = n_masks
        self._words_file = words_file
        self._word_chunks: list[np.ndarray] = []
        self._n_slots = 0
        self.words_crc32 = 0
        self._entries: list[tuple[np.ndarray, ...]] = []  # (mask ids, images, slots, counts)

    def _check_mask_ids(self, mask_ids: np.ndarray) -> None:
        if (
            self.n_masks is not None
            and mask_ids.size
            and (mask_ids.min() < 0 or mask_ids.max() >= self.n_masks)
        ):
            raise PyneuronError(f"mask ids must lie in [0, {self.n_masks}), got {mask_ids}")

    def _store_words(self, words: np.ndarray) -> np.ndarray:
        """Append bitsets; return their slots."""
        slots = np.arange(self._n_slots, self._n_slots + words.shape[0], dtype=np.int64)
        self._n_slots += words.shape[0]
        data = np.ascontiguousarray(words, dtype="<u8")
        if self._words_file is not None:
            buffer = data.tobytes()
            self._words_file.write(buffer)
            self.words_crc32 = zlib.crc32(buffer, self.words_crc32)
        else:
            self._word_chunks.append(data.astype(np.uint64, copy=False))
        return slots

    def _add(self, mask_ids: np.ndarray, images: np.ndarray, bits: np.ndarray) -> None:
        """Add rows of bits (K, pixels) for (mask_ids[k], images[k])."""
        pixels = self.grid.pixels
        bits = bits.reshape(-1, pixels)
        counts = np.count_nonzero(bits, axis=1)
        partial = (counts > 0) & (counts < pixels)
        words = np.zeros((counts.shape[0], self.grid.words_per_image), dtype=np.uint64)
        if partial.any():
            words[partial] = pack_bits(bits[partial], pixels)
        self.add_packed(mask_ids, images, words, counts)

    def add_packed(
        self, mask_ids: np.ndarray, images: np.ndarray, words: np.ndarray, counts: np.ndarray
    ) -> None:
        """Add packed rows: ``words`` (K, words_per_image) with their popcounts ``counts``.

        Rows with count 0 are dropped, rows with count == pixels become full containers.
        """
        counts = np.asarray(counts).reshape(-1)
        nonempty = counts > 0
        mask_ids, images, counts = mask_ids[nonempty], images[nonempty], counts[nonempty]
        words = words.reshape(-1, self.grid.words_per_image)[nonempty]
        self.add_containers(mask_ids, images, counts, words[counts < self.grid.pixels])

    def add_containers(
        self, mask_ids: np.ndarray, images: np.ndarray, counts: np.ndarray, bitsets: np.ndarray
    ) -> None:
        """Add non-empty containers: row ``k`` is mask ``mask_ids[k]`` in image
        ``images[k]`` with ``counts[k]`` pixels set (``1 <= counts[k] <= pixels``). Rows
        with ``counts[k] == pixels`` are full containers; the others take, in order, the
        rows of ``bitsets`` (one per such row, words_per_image words each). Bitsets are
        stored in the order they are added.
        """
        counts = np.asarray(counts).reshape(-1)
        slots = np.full(counts.shape[0], FULL_SLOT, dtype=np.int64)
        partial = counts < self.grid.pixels
        if partial.any():
            slots[partial] = self._store_words(bitsets)
        self._entries.append((mask_ids, images, slots, counts.astype(np.int32)))

    def add_set(self, masks: MaskSet, first_image: int, chunk_bytes: int = 64 * 2**20) -> None:
        """Add every container of ``masks`` (a set on the same height and width, mask
        ``m`` to mask ``m``) with its images shifted by ``first_image``.

        Its bitsets are copied in its own slot order, ``chunk_bytes`` at a time (a
        memory-mapped set is read sequentially, never whole), so sets written image by
        image in image order and added in image order give the bitsets the order a single
        writer would have given them.
        """
        grid = masks.grid
        if (grid.height, grid.width) != (self.grid.height, self.grid.width):
            raise PyneuronError(
                f"cannot add masks of {grid.height}x{grid.width} images to a set of "
                f"{self.grid.height}x{self.grid.width} images"
            )
        if not 0 <= first_image <= self.grid.n_images - grid.n_images:
            raise PyneuronError(
                f"{grid.n_images} images from image {first_image} do not fit in a set of "
                f"{self.grid.n_images} images"
            )
        if self.n_masks is not None and len(masks) > self.n_masks:
            raise PyneuronError(f"cannot add a set of {len(masks)} masks to {self.n_masks} masks")
        offsets, images, slots, counts, words = masks.arrays
        owners = np.repeat(np.arange(offsets.shape[0] - 1, dtype=np.int64), np.diff(offsets))
        images = images.astype(np.int64) + int(first_image)
        full = slots == FULL_SLOT
        self.add_containers(owners[full], images[full], counts[full], words[:0])
        order = np.flatnonzero(~full)[np.argsort(slots[~full], kind="stable")]
        pool = words.reshape(-1, self.grid.words_per_image)
        rows = max(1, chunk_bytes // (8 * self.grid.words_per_image))
        for begin in range(0, order.shape[0], rows):
            chosen = order[begin : begin + rows]
            self.add_containers(owners[chosen], images[chosen], counts[chosen], pool[slots[chosen]])

    def _as_bits(self, array: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
        array = np.asarray(array)
        if array.shape != shape:
            raise PyneuronError(f"{what} must have shape {shape}, got {array.shape}")
        if array.dtype != bool:
            raise PyneuronError(
                f"{what} must be a bool array, got dtype {array.dtype}; threshold it first "
                "(e.g. `activations > t`)"
            )
        return array

    def _check_image(self, image: int) -> int:
        if isinstance(image, bool) or not isinstance(image, (int, np.integer)):
            raise PyneuronError(f"image id must be an integer, got {image!r}")
        if not 0 <= image < self.grid.n_images:
            raise PyneuronError(f"image id {image} out of range for {self.grid.n_images} images")
        return int(image)

    def add_mask(self, mask_id: int, mask: np.ndarray) -> None:
        """Add mask ``mask_id`` over all images: bool (n_images, height, width)."""
        mask = self._as_bits(mask, self.grid.shape, f"mask {mask_id}")
        ids = np.full(self.grid.n_images, mask_id, dtype=np.int64)
        self._check_mask_ids(ids[:1])
        self._add(ids, np.arange(self.grid.n_images, dtype=np.int64), mask)

    def add_image(
        self, image: int, mask_ids: Sequence[int] | np.ndarray, masks: np.ndarray
    ) -> None:
        """Add the masks of one image: ``masks`` bool (K, height, width) for ``mask_ids``."""
        image = self._check_image(image)
        ids = np.asarray(mask_ids, dtype=np.int64).reshape(-1)
        masks = self._as_bits(masks, (ids.shape[0], self.grid.height, self.grid.width), "masks")
        self._check_mask_ids(ids)
        self._add(ids, np.full(ids.shape[0], image, dtype=np.int64), masks)

    def add_full(self, image: int, mask_ids: Sequence[int] | np.ndarray) -> None:
        """Mark masks ``mask_ids`` as covering the whole of ``image`` (image-level labels)."""
        image = self._check_image(image)
        ids = np.asarray(mask_ids, dtype=np.int64).reshape(-1)
        self._check_mask_ids(ids)
        self._entries.append(
            (
                ids,
                np.full(ids.shape[0], image, dtype=np.int64),
                np.full(ids.shape[0], FULL_SLOT, dtype=np.int64),
                np.full(ids.shape[0], self.grid.pixels, dtype=np.int32),
            )
        )

    def finish(self, n_masks: int | None = None) -> tuple[np.ndarray, ...]:
        """Return (offsets, images, slots, counts, words); words is None if written to a file."""
        n_masks = n_masks if n_masks is not None else self.n_masks
        if self._entries:
            mask_ids, images, slots, counts = (np.concatenate(c) for c in zip(*self._entries))
        else:
            mask_ids = images = slots = np.zeros(0, dtype=np.int64)
            counts = np.zeros(0, dtype=np.int32)
        if n_masks is None:
            n_masks = int(mask_ids.max()) + 1 if mask_ids.size else 0
        order = np.lexsort((images, mask_ids))
        mask_ids, images, slots, counts = (
            mask_ids[order],
            images[order],
            slots[order],
            counts[order],
        )
        repeated = (np.diff(mask_ids) == 0) & (np.diff(images) == 0)
        if repeated.any():
            k = int(np.argmax(repeated))
            raise PyneuronError(
                f"mask {mask_ids[k]} was given twice for image {images[k]}; give each "
                "(mask, image) pair once (merge the masks first)"
            )
        offsets = np.zeros(n_masks + 1, dtype=np.int64)
        np.cumsum(np.bincount(mask_ids, minlength=n_masks), out=offsets[1:])
        if self._words_file is not None:
            words = None
        elif self._word_chunks:
            words = np.concatenate(self._word_chunks)
        else:
            words = np.zeros((0, self.grid.words_per_image), dtype=np.uint64)
        self._entries, self._word_chunks = [], []
        return offsets, images.astype(np.int32), slots, counts.astype(np.int32), words
