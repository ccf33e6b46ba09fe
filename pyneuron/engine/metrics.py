"""Explanation metrics (compexp / Clustered CompExp / OVCE) from overlap counts."""

from __future__ import annotations

import numpy as np

EPSILON = 1e-10
METRIC_COLUMNS = (
    "iou",
    "detection_accuracy",
    "activation_coverage",
    "samples_coverage",
    "explanation_coverage",
)


def iou(intersection: np.ndarray, size: np.ndarray, unit_size: np.ndarray) -> np.ndarray:
    """|F∧A| / (|F| + |A| - |F∧A| + 1e-10), in float64, from integer counts."""
    intersection = np.asarray(intersection, dtype=np.int64)
    union = np.asarray(size, dtype=np.int64) + np.asarray(unit_size, dtype=np.int64) - intersection
    return intersection / (union + EPSILON)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def metrics(
    intersection: np.ndarray,
    size: np.ndarray,
    unit_size: np.ndarray,
    intersection_images: np.ndarray,
    size_images: np.ndarray,
    unit_images: np.ndarray,
) -> dict[str, np.ndarray]:
    """All metrics of formulas F against unit masks A, from counts.

    - ``iou``: |F∧A| / (|F| + |A| - |F∧A| + 1e-10)
    - ``detection_accuracy``: |F∧A| / |A|
    - ``activation_coverage``: |F∧A| / |F|
    - ``samples_coverage``: images with F∧A / images with A
    - ``explanation_coverage``: images with F∧A / images with F

    Ratios with a zero denominator are NaN.
    """
    return {
        "iou": iou(intersection, size, unit_size),
        "detection_accuracy": _ratio(intersection, unit_size),
        "activation_coverage": _ratio(intersection, size),
        "samples_coverage": _ratio(intersection_images, unit_images),
        "explanation_coverage": _ratio(intersection_images, size_images),
    }
