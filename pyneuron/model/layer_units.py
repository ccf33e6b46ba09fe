"""What a layer's activations give the search: thresholds (or activation ranges), unit
masks and top images, read from the activations image block by image block
(memory-mapped arrays larger than memory work; their pages are released after each
block)."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..engine.batches import image_batches
from ..engine.checks import positive_int
from ..engine.units import UnitMasks
from ..engine.upsample import check_upsample, unit_masks_from_activations
from ..errors import PyneuronError
from .thresholds import (
    activation_ranges,
    check_ranges_method,
    compexp_level,
    quantile_thresholds,
    user_thresholds,
)


@dataclass(frozen=True)
class LayerUnits:
    """One layer's units, ready to explain.

    Attributes
    ----------
    thresholds
        (U,) float64: a unit's mask is ``activation > threshold``.
    masks
        The unit masks on the concept grid.
    top_images
        (U, k) int64: the images with the highest maximum activation of each unit, best
        first (ties: lower image index first).
    threshold_method
        How the thresholds were computed: ``"exact"`` (the exact quantile), ``"compexp"``
        (compexp's streaming estimator) or ``"user"``.
    map_size
        The (h, w) of the layer's activation maps.
    """

    thresholds: np.ndarray
    masks: UnitMasks
    top_images: np.ndarray
    threshold_method: str
    map_size: tuple[int, ...]


@dataclass(frozen=True)
class LayerRanges:
    """One layer's units as activation ranges, ready to explain range by range.

    Attributes
    ----------
    ranges
        (U, K, 2) float64: ``ranges[u, k] = (lower, upper)``; unit ``u``'s mask for range
        ``k`` is ``lower < activation < upper``. NaN rows: ranges the unit does not have
        (their masks are empty).
    masks
        Per range index ``k``, the unit masks of range ``k`` of every unit on the concept
        grid.
    top_images
        (U, k) int64: as :attr:`LayerUnits.top_images`.
    ranges_method
        How the ranges were clustered: ``"pyneuron"`` or ``"sklearn"``.
    map_size
        The (h, w) of the layer's activation maps.
    """

    ranges: np.ndarray
    masks: tuple[UnitMasks, ...]
    top_images: np.ndarray
    ranges_method: str
    map_size: tuple[int, ...]


def top_activating_images(
    activations: np.ndarray, k: int, *, batch_images: int | None = None
) -> np.ndarray:
    """(U, k) ids of the images with the highest maximum activation of each unit, best
    first; ties go to the lower image index. Reads ``activations`` (N, U, h, w) block
    by block and keeps only the best ``k`` per unit.

    Examples
    --------
    >>> import numpy as np
    >>> acts = np.array([1.0, 3.0, 2.0, 3.0]).reshape(4, 1, 1, 1)
    >>> top_activating_images(acts, 3).tolist()
    [[1, 3, 2]]
    """
    k = positive_int(k, "k")
    n_units = activations.shape[1]
    best_peaks = np.empty((0, n_units))
    best_images = np.empty((0, n_units), dtype=np.int64)
    for start, batch in image_batches(activations, batch_images):
        peaks = batch.reshape(batch.shape[0], n_units, -1).max(axis=2).astype(np.float64)
        images = np.broadcast_to(
            np.arange(start, start + batch.shape[0], dtype=np.int64)[:, None], peaks.shape
        )
        # Earlier images first, so a stable sort keeps the lower index ahead on ties.
        peaks = np.concatenate([best_peaks, peaks])
        images = np.concatenate([best_images, images])
        order = np.argsort(-peaks, axis=0, kind="stable")[:k]
        best_peaks = np.take_along_axis(peaks, order, axis=0)
        best_images = np.take_along_axis(images, order, axis=0)
    return best_images.T.copy()


#: How thresholds are computed (``layer_units(thresholds=...)``, ``--thresholds``).
THRESHOLD_METHODS = ("auto", "exact", "compexp")

#: With ``thresholds="auto"``, the exact quantile is used while the values it keeps in
#: memory stay within this many bytes; beyond, compexp's streaming estimator.
EXACT_THRESHOLD_MEMORY = 2**30


def exact_threshold_bytes(shape: tuple[int, ...], quantile: float) -> int:
    """About the memory the exact quantile thresholds of activations of ``shape``
    (N, U, h, w) keep: twice (while merging) the top ``quantile`` share of every unit's
    values, in float32."""
    per_unit = math.prod(shape[:1] + shape[2:])
    kept = min(per_unit, math.ceil((1 - compexp_level(quantile)) * per_unit) + 1)
    return 2 * shape[1] * kept * 4


def threshold_method(shape: tuple[int, ...], quantile: float, method: str = "auto") -> str:
    """``"exact"`` or ``"compexp"``: ``method`` itself, or for ``"auto"`` the exact
    quantile when it fits in :data:`EXACT_THRESHOLD_MEMORY`.

    Examples
    --------
    >>> threshold_method((1000, 64, 7, 7), 0.005)
    'exact'
    >>> threshold_method((10**6, 2048, 56, 56), 0.005)
    'compexp'
    """
    if method not in THRESHOLD_METHODS:
        raise PyneuronError(
            f"unknown threshold method {method!r}; use one of {', '.join(THRESHOLD_METHODS)}"
        )
    if method != "auto":
        return method
    fits = exact_threshold_bytes(shape, quantile) <= EXACT_THRESHOLD_MEMORY
    return "exact" if fits else "compexp"


def unit_thresholds(
    activations: np.ndarray, quantile: float, thresholds: str | npt.ArrayLike = "auto"
) -> tuple[np.ndarray, str]:
    """(thresholds (U,), method) of activations (N, U, h, w): ``thresholds`` is a method
    (``"auto"``, ``"exact"``, ``"compexp"``, see :func:`layer_units`) or the user's
    values (one, or one per unit; method ``"user"``).

    Examples
    --------
    >>> import numpy as np
    >>> acts = np.arange(200, dtype=np.float32).reshape(2, 1, 10, 10)
    >>> unit_thresholds(acts, 0.01)
    (array([197.00800801]), 'exact')
    >>> unit_thresholds(acts, 0.01, 150)
    (array([150.]), 'user')
    """
    if not isinstance(thresholds, str):
        return user_thresholds(thresholds, activations.shape[1]), "user"
    method = threshold_method(activations.shape, quantile, thresholds)
    if method == "compexp" and thresholds == "auto":
        warnings.warn(
            f"exact thresholds would keep about "
            f"{exact_threshold_bytes(activations.shape, quantile) / 2**30:.1f} GiB in "
            "memory; using compexp's streaming estimator instead (not exact; choose "
            "with thresholds='exact' / --thresholds exact)",
            stacklevel=3,
        )
    return quantile_thresholds(activations, quantile, method=method), method


def layer_units(
    activations: np.ndarray,
    size: tuple[int, int],
    *,
    quantile: float = 0.005,
    thresholds: str | npt.ArrayLike = "auto",
    top_k: int = 8,
    upsample: str = "pillow",
    path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> LayerUnits:
    """Thresholds, unit masks on a (height, width) grid and top images of a layer's
    activations (N, U, h, w), read block by block (a memory-mapped array larger than
    memory works). Activation ranges instead of thresholds: :func:`layer_ranges`.

    Parameters
    ----------
    activations
        The layer's activations (an array or a ``numpy.memmap``).
    size
        The concept grid's (height, width).
    quantile
        Top share of each unit's activations above its threshold.
    thresholds
        ``"exact"``: the exact quantile (:func:`~pyneuron.model.thresholds.quantile_thresholds`,
        memory about twice the top ``quantile`` share of every unit's values);
        ``"compexp"``: compexp's streaming estimator (fixed memory, about 0.6 MB a
        unit; not exact); ``"auto"``: exact while that needs at most
        :data:`EXACT_THRESHOLD_MEMORY`, else compexp's (said in a warning); or the
        thresholds themselves, one per unit.
    top_k
        Top images kept per unit.
    upsample
        How unit maps are resized to the grid: ``"pillow"`` (compexp's) or ``"torch"``
        (OVCE's); see :func:`~pyneuron.engine.upsample.unit_masks_from_activations`.
    path
        Write the unit masks to this directory (replacing earlier unit masks there)
        instead of keeping them in memory.

    Examples
    --------
    >>> import numpy as np
    >>> acts = np.random.default_rng(0).random((20, 3, 4, 4), dtype=np.float32)
    >>> units = layer_units(acts, (8, 8), quantile=0.05, top_k=2, progress=False)
    >>> units.threshold_method, len(units.masks), units.top_images.shape
    ('exact', 3, (3, 2))
    """
    upsample = check_upsample(upsample)
    values, method = unit_thresholds(activations, quantile, thresholds)
    masks = unit_masks_from_activations(
        activations, values, size, upsample=upsample, path=path, overwrite=True, progress=progress
    )
    tops = top_activating_images(activations, top_k)
    return LayerUnits(values, masks, tops, method, tuple(activations.shape[2:]))


def range_unit_masks(
    activations: np.ndarray,
    ranges: np.ndarray,
    size: tuple[int, int],
    *,
    upsample: str = "pillow",
    path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[UnitMasks]:
    """Unit masks of activation ranges: for each range index ``k``, unit ``u``'s mask
    is ``ranges[u, k, 0] < activation < ranges[u, k, 1]`` (empty for a NaN row).

    Parameters
    ----------
    activations
        The layer's activations (N, U, h, w).
    ranges
        (U, K, 2) bounds, e.g. :func:`~pyneuron.model.thresholds.activation_ranges`.
    size, upsample
        As for :func:`~pyneuron.engine.upsample.unit_masks_from_activations`.
    path
        Write range ``k``'s masks to ``path/range<k>`` (replacing earlier unit masks
        there) instead of keeping them in memory.

    Returns
    -------
    list of UnitMasks
        One per range index.

    Examples
    --------
    >>> import numpy as np
    >>> acts = np.array([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1)
    >>> ranges = np.array([[[0.5, 1.5], [np.nan, np.nan]]])
    >>> [m.image_counts.tolist() for m in range_unit_masks(acts, ranges, (2, 2), progress=False)]
    [[1], [0]]
    """
    found = []
    for k in range(ranges.shape[1]):
        lower, upper = ranges[:, k, 0], ranges[:, k, 1]
        usable = np.isfinite(lower) & np.isfinite(upper)
        found.append(
            unit_masks_from_activations(
                activations,
                np.where(usable, lower, np.inf),
                size,
                upper=np.where(usable, upper, -np.inf),
                upsample=upsample,
                path=None if path is None else Path(path) / f"range{k}",
                overwrite=True,
                progress=progress,
            )
        )
    return found


def layer_ranges(
    activations: np.ndarray,
    size: tuple[int, int],
    n_ranges: int = 5,
    *,
    ranges_method: str = "pyneuron",
    upsample: str = "pillow",
    top_k: int = 8,
    path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> LayerRanges:
    """Activation ranges (Clustered CompExp / OVCE), their unit masks on a (height,
    width) grid and the top images of a layer's activations (N, U, h, w), read block by
    block.

    Parameters
    ----------
    activations
        The layer's activations (an array or a ``numpy.memmap``).
    size
        The concept grid's (height, width).
    n_ranges
        KMeans clusters per unit (OVCE: 5).
    ranges_method
        ``"pyneuron"`` or ``"sklearn"`` (OVCE's); see
        :func:`~pyneuron.model.thresholds.activation_ranges`.
    upsample
        ``"pillow"`` or ``"torch"`` (OVCE's); see
        :func:`~pyneuron.engine.upsample.unit_masks_from_activations`.
    top_k
        Top images kept per unit.
    path
        Write range ``k``'s unit masks to ``path/range<k>`` instead of keeping them in
        memory.

    Examples
    --------
    >>> import numpy as np
    >>> acts = np.random.default_rng(0).random((20, 3, 4, 4), dtype=np.float32)
    >>> found = layer_ranges(acts, (8, 8), 2, top_k=2, progress=False)
    >>> found.ranges.shape, len(found.masks), found.top_images.shape
    ((3, 2, 2), 2, (3, 2))
    """
    ranges_method = check_ranges_method(ranges_method)
    upsample = check_upsample(upsample)
    positive_int(top_k, "top_k")
    bounds = activation_ranges(activations, n_ranges, method=ranges_method)
    masks = range_unit_masks(
        activations, bounds, size, upsample=upsample, path=path, progress=progress
    )
    tops = top_activating_images(activations, top_k)
    return LayerRanges(bounds, tuple(masks), tops, ranges_method, tuple(activations.shape[2:]))
