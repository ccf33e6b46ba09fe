"""Plots of the report, drawn with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import math
import os

import numpy as np

#: NetDissect's cut-off: a unit counts as detecting its label when IoU >= this.
INTERPRETABLE_IOU = 0.04


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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    top = max(0.05, math.ceil(float(values.max(initial=0.0)) * 20 - 1e-9) / 20)
    figure = Figure(figsize=(5.6, 2.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(values, bins=np.linspace(0.0, top, 31), color="#0072b2", edgecolor="white")
    axes.axvline(INTERPRETABLE_IOU, color="#d55e00", linestyle="--", linewidth=1)
    axes.text(
        INTERPRETABLE_IOU,
        1.0,
        f" IoU {INTERPRETABLE_IOU}",
        color="#d55e00",
        fontsize=8,
        transform=axes.get_xaxis_transform(),
        va="top",
    )
    axes.set_xlim(0.0, top)
    axes.set_xlabel("IoU of the best formula")
    axes.set_ylabel("units")
    if title:
        axes.set_title(title.replace("$", r"\$"), fontsize=10)  # no mathtext
    axes.spines[["top", "right"]].set_visible(False)
    figure.savefig(path, format="png")
