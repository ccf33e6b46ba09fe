"""Probing images as a lazy sequence of PIL images (for CLIP, occlusion and crops)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PyneuronError
from ..image_files import list_images, open_image


class ImageList(Sequence[Any]):
    """Read-only sequence of RGB PIL images from a folder, image paths, PIL images, or a
    uint8 array (N, H, W, 3); images are opened on access.

    It also works as the ``images`` argument of :func:`pyneuron.capture` (a sized,
    indexable dataset of PIL images).

    Examples
    --------
    >>> images = ImageList.of(np.zeros((2, 4, 6, 3), dtype=np.uint8))
    >>> len(images), images[1].size
    (2, (6, 4))
    """

    def __init__(self, items: Sequence[Any], paths: list[Path] | None = None) -> None:
        self._items = items
        self.paths = paths

    @classmethod
    def of(cls, images: Any) -> ImageList:
        """Wrap ``images`` (see the class docstring); an :class:`ImageList` is returned as is."""
        if isinstance(images, ImageList):
            return images
        if isinstance(images, (str, os.PathLike)):
            files = list_images(images)
            return cls(files, files)
        if isinstance(images, np.ndarray):
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise PyneuronError(
                    "an image array for the describers must be uint8 (N, H, W, 3), got "
                    f"{images.dtype} {images.shape}"
                )
            return cls(images)
        if isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
            if len(images) == 0:
                raise PyneuronError("no images: the image list is empty")
            first = images[0]
            if isinstance(first, (str, os.PathLike)):
                paths = [Path(p) for p in images]
                return cls(paths, paths)
            if hasattr(first, "convert"):
                return cls(images)
        raise PyneuronError(
            f"unsupported images of type {type(images).__name__} for the describers: give a "
            "folder, a list of image paths, a list of PIL images or a uint8 (N, H, W, 3) array"
        )

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        from PIL import Image

        item = self._items[int(index)]
        if isinstance(item, (str, os.PathLike)):
            image = open_image(Path(item))
        elif isinstance(item, np.ndarray):
            image = Image.fromarray(item)
        else:
            image = item
        return image if image.mode == "RGB" else image.convert("RGB")

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self[i]

    def names(self) -> list[str]:
        """A name per image: the file path when known, else ``#index``."""
        if self.paths is not None:
            return [str(p) for p in self.paths]
        return [f"#{i}" for i in range(len(self))]


def grey_box(image: Any, box: tuple[float, float, float, float], value: int = 128) -> Any:
    """A copy of ``image`` with ``box`` (left, top, right, bottom as fractions of the
    width and height) filled with grey ``value``.

    Examples
    --------
    >>> from PIL import Image
    >>> out = grey_box(Image.new("RGB", (4, 4)), (0.0, 0.0, 0.5, 0.5))
    >>> out.getpixel((0, 0)), out.getpixel((3, 3))
    ((128, 128, 128), (0, 0, 0))
    """
    out = image.copy()
    out.paste((value, value, value), _pixel_box(image.size, box))
    return out


def crop_box(image: Any, box: tuple[float, float, float, float]) -> Any:
    """The region ``box`` (fractions, as in :func:`grey_box`) of ``image``."""
    return image.crop(_pixel_box(image.size, box))


def _pixel_box(size: tuple[int, int], box: tuple[float, float, float, float]) -> tuple[int, ...]:
    width, height = size
    left, top, right, bottom = box
    x0, y0 = int(round(left * width)), int(round(top * height))
    x1 = max(x0 + 1, int(round(right * width)))
    y1 = max(y0 + 1, int(round(bottom * height)))
    return (x0, y0, min(x1, width), min(y1, height))


def occlusion_boxes(patch: float, stride: float) -> list[tuple[float, float, float, float]]:
    """Sliding-window boxes (fractions) of side ``patch`` every ``stride``, row-major, the
    last row and column flush with the border.

    Examples
    --------
    >>> len(occlusion_boxes(0.5, 0.25)), occlusion_boxes(0.5, 0.25)[-1]
    (9, (0.5, 0.5, 1.0, 1.0))
    """
    if not 0 < patch <= 1 or not 0 < stride <= 1:
        raise PyneuronError(
            f"patch and stride are fractions of the image side in (0, 1], got {patch}, {stride}"
        )
    starts = list(np.arange(0.0, 1.0 - patch + 1e-9, stride))
    if starts[-1] < 1.0 - patch - 1e-9:
        starts.append(1.0 - patch)
    starts = [round(float(s), 6) for s in starts]
    return [(x, y, round(x + patch, 6), round(y + patch, 6)) for y in starts for x in starts]


def expand_box(
    box: tuple[float, float, float, float], scale: float
) -> tuple[float, float, float, float]:
    """``box`` scaled by ``scale`` about its centre, clipped to the image.

    Examples
    --------
    >>> expand_box((0.25, 0.25, 0.5, 0.5), 2.0)
    (0.125, 0.125, 0.625, 0.625)
    """
    left, top, right, bottom = box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    hw, hh = (right - left) * scale / 2, (bottom - top) * scale / 2
    return (max(0.0, cx - hw), max(0.0, cy - hh), min(1.0, cx + hw), min(1.0, cy + hh))
