"""Thumbnails and mask overlays for the report (numpy + Pillow, no display needed).

An overlay marks, on a thumbnail of an image, the pixels where only the unit fires
(:data:`UNIT_COLOR`), where only the formula holds (:data:`FORMULA_COLOR`) and where both
do (:data:`OVERLAP_COLOR`), over a grey version of the thumbnail so that the image's own
colours cannot be mistaken for the markings: with ``g = (299 R + 587 G + 114 B + 500) //
1000`` the grey level of a pixel, a marked pixel of colour ``c`` becomes, per channel,
``(2 * g + 3 * c + 2) // 5`` (60 % colour); the other pixels become ``g``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..errors import PyneuronError

#: RGB of pixels in the unit mask only (vermillion).
UNIT_COLOR = (213, 94, 0)
#: RGB of pixels in the formula mask only (blue).
FORMULA_COLOR = (0, 114, 178)
#: RGB of pixels in both masks (yellow).
OVERLAP_COLOR = (240, 228, 66)
#: Thumbnails are the grid scaled up by a whole factor until the longer side reaches this.
THUMBNAIL_SIZE = 112


def thumbnail_scale(height: int, width: int, size: int = THUMBNAIL_SIZE) -> int:
    """Whole upscaling factor from a ``height`` x ``width`` grid to its thumbnail.

    Examples
    --------
    >>> thumbnail_scale(112, 112), thumbnail_scale(8, 8), thumbnail_scale(7, 10)
    (1, 14, 12)
    """
    return max(1, math.ceil(size / max(height, width)))


def as_rgb(image: object, what: str = "image") -> np.ndarray:
    """An image as uint8 RGB (H, W, 3); accepts gray (H, W), RGB and RGBA arrays."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise PyneuronError(f"{what} must be an RGB array (height, width, 3), got {array.shape}")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and float(array.max()) <= 1.0:
            array = array * 255.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def thumbnail(image: object, height: int, width: int, scale: int) -> np.ndarray:
    """``image`` resized to the thumbnail of a ``height`` x ``width`` grid.

    The thumbnail is (height * scale, width * scale, 3) uint8. An image whose size
    divides the thumbnail's is scaled up with nearest neighbours (pixel-exact);
    any other is resampled with Pillow's bilinear filter (antialiased when shrinking).
    """
    rgb = as_rgb(image)
    out_h, out_w = height * scale, width * scale
    in_h, in_w = rgb.shape[:2]
    if (in_h, in_w) == (out_h, out_w):
        return rgb
    if out_h % in_h == 0 and out_w % in_w == 0:
        return np.repeat(np.repeat(rgb, out_h // in_h, axis=0), out_w // in_w, axis=1)
    resized = Image.fromarray(rgb).resize((out_w, out_h), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def overlay(
    base: np.ndarray, unit_mask: np.ndarray | None, formula_mask: np.ndarray | None
) -> np.ndarray:
    """Draw a unit mask and a formula mask over a thumbnail.

    Parameters
    ----------
    base
        The thumbnail, uint8 (H * s, W * s, 3) for a whole factor ``s``.
    unit_mask, formula_mask
        Bool (H, W) masks on the grid, or ``None`` for none.

    Returns
    -------
    numpy.ndarray
        A new uint8 array: see the module docstring for the colours.

    Examples
    --------
    >>> base = np.full((2, 2, 3), 100, dtype=np.uint8)
    >>> unit = np.array([[True, True], [False, False]])
    >>> formula = np.array([[False, True], [True, False]])
    >>> overlay(base, unit, formula)[:, :, 0].tolist()
    [[168, 184], [40, 100]]
    >>> overlay(np.full((1, 1, 3), (255, 0, 0), dtype=np.uint8), None, None).tolist()
    [[[76, 76, 76]]]
    """
    height, width = _mask_shape(unit_mask, formula_mask, base)
    scale = base.shape[0] // height
    if base.shape[:2] != (height * scale, width * scale):
        raise PyneuronError(
            f"a thumbnail of shape {base.shape[:2]} is not a whole multiple of the "
            f"{height}x{width} grid"
        )
    unit = _bool(unit_mask, height, width)
    formula = _bool(formula_mask, height, width)
    state = unit.astype(np.uint8) | (formula.astype(np.uint8) << 1)  # 1 unit, 2 formula, 3 both
    if scale > 1:
        state = np.repeat(np.repeat(state, scale, axis=0), scale, axis=1)
    rgb = base.astype(np.int32)
    grey = (rgb[:, :, 0] * 299 + rgb[:, :, 1] * 587 + rgb[:, :, 2] * 114 + 500) // 1000
    return _BLEND[state, grey]


def _blend_table() -> np.ndarray:
    """(state, grey level) -> RGB of an overlay pixel, uint8 (4, 256, 3)."""
    palette = np.array([(0, 0, 0), UNIT_COLOR, FORMULA_COLOR, OVERLAP_COLOR], dtype=np.int32)
    grey = np.arange(256, dtype=np.int32)[None, :, None]
    table = (2 * grey + 3 * palette[:, None, :] + 2) // 5
    table[0] = np.broadcast_to(grey[0], (256, 3))
    return table.astype(np.uint8)


_BLEND = _blend_table()


def _mask_shape(
    unit_mask: np.ndarray | None, formula_mask: np.ndarray | None, base: np.ndarray
) -> tuple[int, int]:
    for mask in (unit_mask, formula_mask):
        if mask is not None:
            return tuple(np.shape(mask))  # type: ignore[return-value]
    return base.shape[0], base.shape[1]


def _bool(mask: np.ndarray | None, height: int, width: int) -> np.ndarray:
    if mask is None:
        return np.zeros((height, width), dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (height, width):
        raise PyneuronError(f"masks must both be {height}x{width}, got {mask.shape}")
    return mask


def save_png(array: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write a uint8 (H, W, 3) array as a PNG file."""
    Image.fromarray(array).save(path, format="PNG", compress_level=3)


def image_iou(unit_mask: np.ndarray | None, formula_mask: np.ndarray | None) -> float:
    """IoU of two bool masks in one image (NaN when both are empty or one is missing)."""
    if unit_mask is None or formula_mask is None:
        return math.nan
    union = int(np.count_nonzero(unit_mask | formula_mask))
    if union == 0:
        return math.nan
    return int(np.count_nonzero(unit_mask & formula_mask)) / union


def colors_css() -> Sequence[tuple[str, str, str]]:
    """(key, label, CSS colour) of the overlay legend."""
    return [
        ("unit", "unit mask only", "rgb({}, {}, {})".format(*UNIT_COLOR)),
        ("formula", "formula mask only", "rgb({}, {}, {})".format(*FORMULA_COLOR)),
        ("both", "both", "rgb({}, {}, {})".format(*OVERLAP_COLOR)),
    ]
