"""What a layer's activations give the search: thresholds, unit masks and top images,
read from the activations image block by image block (memory-mapped arrays larger
than memory work; their pages are released after each block)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.batches import image_batches
from ..engine.checks import positive_int
from ..engine.units import UnitMasks


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
    """

    thresholds: np.ndarray
    masks: UnitMasks
    top_images: np.ndarray
    threshold_method: str


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
