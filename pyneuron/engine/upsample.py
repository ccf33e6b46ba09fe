"""From low-resolution activation maps to unit masks on the concept grid.

Each unit map is resized to the grid, then thresholded strictly (``value > threshold``,
or ``lo < value < hi`` for activation ranges, compared in float64), image block by image
block, so a whole layer never exists as dense full-resolution masks. Two resizes:

- ``"pillow"`` (the default; compexp, NetDissect-Lite): exactly Pillow's
  ``Image.resize(BILINEAR)`` on float ("F") images, in C++.
- ``"torch"`` (OVCE): exactly ``torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False)`` on float32 maps on the CPU, as OVCE's ``compute_bitmaps`` does.
  Pillow's bilinear filter widens its support when it shrinks a map and places samples
  differently, so the two differ on some pixels near edges and thresholds; torch is
  imported only for this path.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import PyneuronError
from ..progress import progress_bar
from . import _native
from .batches import image_batches
from .grid import Grid, check_image_size
from .units import UnitMasks

#: How unit maps are resized to the grid (``unit_masks_from_activations(upsample=...)``).
UPSAMPLE_METHODS = ("pillow", "torch")

#: Upsampled values the torch path holds at once (float32, about 64 MiB).
TORCH_CHUNK_VALUES = 2**24


def bilinear_resize(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize float maps (..., h, w) to (..., height, width) like Pillow's BILINEAR on mode F.

    Examples
    --------
    >>> import numpy as np
    >>> bilinear_resize(np.array([[0.0, 1.0]], dtype=np.float32), 1, 4).round(3).tolist()
    [[0.0, 0.25, 0.75, 1.0]]
    """
    maps = np.asarray(maps)
    if maps.ndim < 2:
        raise PyneuronError(f"maps must have at least 2 dimensions (h, w), got shape {maps.shape}")
    lead, (h, w) = maps.shape[:-2], maps.shape[-2:]
    flat = np.ascontiguousarray(maps, dtype=np.float32).reshape(-1, h, w)
    return _native.bilinear_resize(flat, int(height), int(width)).reshape(*lead, height, width)


def _check_finite(batch: np.ndarray, first_image: int) -> None:
    if not np.isfinite(batch).all():
        image, unit = np.argwhere(~np.isfinite(batch))[0][:2]
        raise PyneuronError(
            f"activation of unit {unit} in image {first_image + image} is "
            f"{batch[image, unit][~np.isfinite(batch[image, unit])][0]}; NaN/inf activations "
            "cannot be thresholded — check the model's inputs and numerical precision"
        )


def _real_array(values: object, name: str) -> np.ndarray:
    """``values`` as float64, refusing what is not real numbers (complex, objects, text)."""
    array = np.asarray(values)
    if array.dtype.kind not in "fiu":
        raise PyneuronError(f"{name} must be real numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.float64)


def check_upsample(upsample: object) -> str:
    """``upsample`` if it names a resize of :data:`UPSAMPLE_METHODS`, else a clear error.

    Examples
    --------
    >>> check_upsample("torch")
    'torch'
    """
    if not (isinstance(upsample, str) and upsample in UPSAMPLE_METHODS):
        raise PyneuronError(
            f"unknown upsample {upsample!r}; use 'pillow' (Pillow's bilinear resize, as "
            "compexp) or 'torch' (torch's bilinear interpolate, as OVCE)"
        )
    return upsample


def _torch_threshold(
    maps: np.ndarray, lo: np.ndarray, hi: np.ndarray | None, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """What ``_native.upsample_threshold`` gives, with torch's bilinear interpolate.

    ``maps`` (B, U, h, w) float32; returns the packed masks (B, U, words per map, uint64;
    bit ``p`` of word ``p // 64`` is pixel ``p``) and their pixel counts (B, U, int32).
    Each map is resized as OVCE resizes a unit, ``interpolate(maps[:, u:u+1], (H, W),
    mode="bilinear", align_corners=False)``, a few maps at a time (the result of a map
    does not depend on the other maps of the call).
    """
    try:
        import torch
        from torch.nn import functional
    except ImportError:
        raise PyneuronError(
            "upsample='torch' needs PyTorch; install it (pip install torch) or use "
            "upsample='pillow'"
        ) from None
    n_images, n_units, h, w = maps.shape
    pixels = height * width
    words_per_map = (pixels + 63) // 64
    flat = torch.from_numpy(maps).reshape(n_images * n_units, 1, h, w)
    units = np.tile(np.arange(n_units), n_images)
    low = lo[units][:, None]
    high = None if hi is None else hi[units][:, None]
    packed = np.zeros((flat.shape[0], words_per_map * 8), dtype=np.uint8)
    counts = np.empty(flat.shape[0], dtype=np.int32)
    step = max(1, TORCH_CHUNK_VALUES // pixels)
    for start in range(0, flat.shape[0], step):
        stop = min(start + step, flat.shape[0])
        up = functional.interpolate(
            flat[start:stop], size=(height, width), mode="bilinear", align_corners=False
        )
        values = up.numpy().reshape(stop - start, pixels)
        on = values > low[start:stop]  # float32 against float64: compared in float64
        if high is not None:
            on &= values < high[start:stop]
        counts[start:stop] = np.count_nonzero(on, axis=1)
        bits = np.packbits(on, axis=1, bitorder="little")
        packed[start:stop, : bits.shape[1]] = bits
    words = packed.view(np.dtype("<u8")).astype(np.uint64, copy=False)
    return words.reshape(n_images, n_units, words_per_map), counts.reshape(n_images, n_units)


def unit_masks_from_activations(
    activations: np.ndarray,
    thresholds: np.ndarray,
    size: tuple[int, int],
    *,
    upper: np.ndarray | None = None,
    upsample: str = "pillow",
    batch_images: int = 64,
    path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> UnitMasks:
    """Turn activations (images, units, h, w) into :class:`UnitMasks` on a (H, W) grid.

    Parameters
    ----------
    activations
        Array (or memory-mapped array, for layers larger than memory) of shape
        (N, U, h, w).
    thresholds
        Per-unit lower thresholds (U,): a pixel is on when ``value > threshold``.
    size
        Grid (height, width), e.g. (112, 112).
    upper
        Optional per-unit upper bounds (U,) for activation ranges: ``lo < value < hi``.
    upsample
        How each map is resized to the grid: ``"pillow"`` (default), exactly Pillow's
        ``Image.resize(BILINEAR)`` on float images, as compexp and NetDissect-Lite; or
        ``"torch"``, exactly ``torch.nn.functional.interpolate(mode="bilinear",
        align_corners=False)`` on float32 maps on the CPU, as OVCE. Either way the
        upsampled float32 values are compared with the float64 thresholds in float64,
        and memory stays bounded (``batch_images`` images, and for torch at most about
        64 MiB of upsampled values, at a time).
    batch_images
        Images per C++ call when ``activations`` is an array.
    path
        Stream the masks to this directory (atomic) instead of keeping them in memory.

    Examples
    --------
    >>> import numpy as np
    >>> acts = np.zeros((2, 1, 2, 2), dtype=np.float32); acts[1, 0, 0, 0] = 1.0
    >>> masks = unit_masks_from_activations(acts, np.array([0.5]), (4, 4), progress=False)
    >>> masks.image_counts.tolist(), int(masks.pixel_counts[0])
    ([1], 4)
    >>> torch_masks = unit_masks_from_activations(
    ...     acts, np.array([0.5]), (4, 4), upsample="torch", progress=False)
    >>> int(torch_masks.pixel_counts[0])
    4
    """
    upsample = check_upsample(upsample)
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise PyneuronError(f"size must be (height, width), got {size!r}") from None
    if height < 1 or width < 1:
        raise PyneuronError(f"grid size must be positive, got {size!r}")
    check_image_size(height, width)
    if isinstance(batch_images, bool) or not isinstance(batch_images, int) or batch_images < 1:
        raise PyneuronError(f"batch_images must be a positive integer, got {batch_images!r}")
    lo = _real_array(thresholds, "thresholds").reshape(-1)
    hi = None if upper is None else _real_array(upper, "upper bounds").reshape(-1)
    n_units = lo.shape[0]
    if hi is not None and hi.shape != lo.shape:
        raise PyneuronError(f"{hi.shape[0]} upper bounds for {n_units} thresholds")
    for name, values in (("thresholds", lo), ("upper bounds", hi)):
        if values is not None and np.isnan(values).any():
            unit = int(np.flatnonzero(np.isnan(values))[0])
            raise PyneuronError(f"the {name} of unit {unit} is NaN; give a number for every unit")
    if isinstance(activations, np.ndarray):
        _real_array(activations[:0], "activations")
        if activations.ndim != 4 or 0 in activations.shape[2:]:
            raise PyneuronError(
                f"activations must have shape (images, units, h, w) with h, w >= 1, got "
                f"{activations.shape}"
            )
        n_images = activations.shape[0]
    else:
        raise PyneuronError(
            "activations must be an array (images, units, h, w); for data larger than memory "
            "pass a numpy memmap"
        )
    if n_images == 0:
        raise PyneuronError("no images: the activations are empty")
    if activations.shape[1] != n_units:
        raise PyneuronError(
            f"{n_units} thresholds for {activations.shape[1]} units; give one per unit"
        )
    grid = Grid(n_images, height, width)
    threshold = _native.upsample_threshold if upsample == "pillow" else _torch_threshold
    writer = UnitMasks.writer(grid, n_units, path, overwrite=overwrite)
    with (
        writer,
        progress_bar(total=n_images, desc="unit masks", unit="img", enabled=progress) as bar,
    ):
        for first, batch in image_batches(activations, batch_images):
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            _check_finite(batch, first)
            words, counts = threshold(batch, lo, hi, height, width)
            b = batch.shape[0]
            images = np.repeat(np.arange(first, first + b), n_units)
            units = np.tile(np.arange(n_units), b)
            writer.writer.add_packed(units, images, words, counts)
            bar.update(b)
    assert writer.result is not None
    return writer.result
