"""The pixel grid every mask lives on, and bit packing to and from it.

A mask over the probing set is N images x H x W bits, image-major and row-major
inside an image. Each image is packed into ``ceil(H * W / 64)`` little-endian
64-bit words; the padding bits of an image's last word are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import GridMismatchError, PyneuronError

#: Largest grid: image ids and per-image pixel counts are int32 on disk and in the engine.
MAX_IMAGES = 2**31 - 1
MAX_IMAGE_PIXELS = 2**31 - 1


def check_image_size(height: int, width: int) -> None:
    """Raise :class:`PyneuronError` unless ``height * width`` is within :data:`MAX_IMAGE_PIXELS`."""
    if height * width > MAX_IMAGE_PIXELS:
        raise PyneuronError(
            f"an image of the grid holds at most 2**31 - 1 pixels, got {height}x{width} = "
            f"{height * width}; use a smaller grid (concept masks are compared at grid "
            "resolution, 112x112 in compexp)"
        )


@dataclass(frozen=True)
class Grid:
    """N images of H x W pixels: at most :data:`MAX_IMAGES` images of at most
    :data:`MAX_IMAGE_PIXELS` pixels each (2**31 - 1 both).

    Examples
    --------
    >>> g = Grid(n_images=10, height=7, width=7)
    >>> g.pixels, g.words_per_image
    (49, 1)
    """

    n_images: int
    height: int
    width: int

    def __post_init__(self) -> None:
        for field in ("n_images", "height", "width"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise PyneuronError(f"grid {field} must be a positive integer, got {value!r}")
            object.__setattr__(self, field, int(value))
        if self.n_images > MAX_IMAGES:
            raise PyneuronError(
                f"a grid holds at most 2**31 - 1 images, got {self.n_images}; split the probing set"
            )
        check_image_size(self.height, self.width)

    @classmethod
    def of(cls, grid: Grid | tuple[int, int, int]) -> Grid:
        """Accept a Grid or an (n_images, height, width) tuple."""
        if isinstance(grid, Grid):
            return grid
        try:
            n, h, w = grid
        except (TypeError, ValueError):
            raise PyneuronError(f"a grid is (n_images, height, width), got {grid!r}") from None
        return cls(n, h, w)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_images, height, width)."""
        return (self.n_images, self.height, self.width)

    @property
    def pixels(self) -> int:
        """Pixels per image (H * W)."""
        return self.height * self.width

    @property
    def words_per_image(self) -> int:
        """64-bit words per packed image."""
        return (self.pixels + 63) // 64

    @property
    def total_pixels(self) -> int:
        """Pixels over all images."""
        return self.n_images * self.pixels

    def require_same(self, other: Grid, what: str) -> None:
        """Raise :class:`GridMismatchError` unless ``other`` equals this grid."""
        if self != other:
            raise GridMismatchError(
                f"{what}: grid {other.shape} does not match {self.shape} (n_images, height, "
                "width); build both on the same probing images at the same resolution"
            )

    def __str__(self) -> str:
        return f"{self.n_images} images x {self.height}x{self.width}"


def pack_bits(bits: np.ndarray, pixels: int) -> np.ndarray:
    """Pack boolean rows of ``pixels`` bits, shape (K, pixels), into (K, words) uint64."""
    rows = bits.reshape(-1, pixels)
    words_per_row = (pixels + 63) // 64
    padded = np.zeros((rows.shape[0], words_per_row * 64), dtype=bool)
    padded[:, :pixels] = rows
    packed = np.packbits(padded, axis=1, bitorder="little")
    return packed.view("<u8").astype(np.uint64, copy=False).reshape(rows.shape[0], words_per_row)


def unpack_bits(words: np.ndarray, pixels: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: (K, words) uint64 to (K, pixels) bool."""
    words = np.ascontiguousarray(words, dtype="<u8")
    as_bytes = words.reshape(words.shape[0], -1).view(np.uint8)
    return np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :pixels].astype(bool)
