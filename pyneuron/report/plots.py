"""Plots of the report, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

#: NetDissect's cut-off: a unit counts as detecting its label when IoU >= this.
INTERPRETABLE_IOU = 0.04
UNIT_BLUE = "#0072b2"
NULL_GREY = "#999999"
CUTOFF_RED = "#d55e00"


def _axes(size: tuple[float, float] = (5.6, 2.6)) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Any, axes: Any, path: str | os.PathLike[str], title: str) -> None:
    if title:
        axes.set_title(title.replace("$", r"\$"), fontsize=10)  # no mathtext
    axes.spines[["top", "right"]].set_visible(False)
    figure.savefig(path, format="png")


def _finite(values: Any) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def _iou_top(*arrays: np.ndarray) -> float:
    peak = max(float(a.max(initial=0.0)) for a in arrays)
    return max(0.05, math.ceil(peak * 20 - 1e-9) / 20)


def iou_histogram(values: np.ndarray, path: str | os.PathLike[str], title: str = "") -> None:
    """Write a histogram of IoU values as a PNG file.

    Parameters
    ----------
    values
        IoU per unit (NaN ignored).
    path
        Where to write the PNG.
    title
        Plot title (the layer name).
    """
    values = _finite(values)
    top = _iou_top(values)
    figure, axes = _axes()
    axes.hist(values, bins=np.linspace(0.0, top, 31), color=UNIT_BLUE, edgecolor="white")
    axes.axvline(INTERPRETABLE_IOU, color=CUTOFF_RED, linestyle="--", linewidth=1)
    axes.text(
        INTERPRETABLE_IOU,
        1.0,
        f" IoU {INTERPRETABLE_IOU}",
        color=CUTOFF_RED,
        fontsize=8,
        transform=axes.get_xaxis_transform(),
        va="top",
    )
    axes.set_xlim(0.0, top)
    axes.set_xlabel("IoU of the best formula")
    axes.set_ylabel("units")
    _save(figure, axes, path, title)


def iou_vs_null(
    values: np.ndarray, null: np.ndarray, path: str | os.PathLike[str], title: str = ""
) -> None:
    """Write the IoU distribution of the units over that of their control units (PNG).

    Both are drawn as densities (the null usually has many more members), with the
    null's 95th percentile marked.
    """
    values, null = _finite(values), _finite(null)
    top = _iou_top(values, null)
    bins = np.linspace(0.0, top, 31)
    figure, axes = _axes()
    axes.hist(null, bins=bins, density=True, color=NULL_GREY, alpha=0.6, label="control units")
    axes.hist(
        values,
        bins=bins,
        density=True,
        histtype="step",
        color=UNIT_BLUE,
        linewidth=1.5,
        label="units",
    )
    if null.size:
        cut = float(np.quantile(null, 0.95))
        axes.axvline(cut, color=CUTOFF_RED, linestyle="--", linewidth=1, label="null 95%")
    axes.set_xlim(0.0, top)
    axes.set_xlabel("IoU of the best formula")
    axes.set_ylabel("density")
    axes.legend(fontsize=8, frameon=False)
    _save(figure, axes, path, title)


def heldout_scatter(
    in_sample: np.ndarray, heldout: np.ndarray, path: str | os.PathLike[str], title: str = ""
) -> None:
    """Write a scatter of each unit's held-out IoU against its in-sample IoU (PNG)."""
    x, y = np.asarray(in_sample, dtype=np.float64), np.asarray(heldout, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    top = _iou_top(x[keep], y[keep])
    figure, axes = _axes((3.4, 3.2))
    axes.plot([0.0, top], [0.0, top], color=NULL_GREY, linewidth=1, linestyle="--")
    axes.scatter(x[keep], y[keep], s=10, color=UNIT_BLUE, alpha=0.7, linewidths=0)
    axes.set_xlim(0.0, top)
    axes.set_ylim(0.0, top)
    axes.set_aspect("equal")
    axes.set_xlabel("IoU, images searched on")
    axes.set_ylabel("IoU, held-out images")
    _save(figure, axes, path, title)
