"""Null baselines: how well do explanations fit units that detect nothing?

A *control unit* copies a real unit's mask image by image, moves each image's mask to
another image at random (shuffled across images) and rolls it by a random offset inside
that image (a circular shift), so its per-image pixel counts stay those of the unit while
any link to the image content is broken. The controls are explained with the same search
settings as the units; the IoU of each unit's formula is then compared with the
distribution of the controls' IoUs (pooled over the layer): an empirical p-value and a
z-score. Quantile thresholds give every unit of a layer about the same number of pixels,
which is what makes one pooled distribution per layer a fair reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import PyneuronError
from .checks import positive_int
from .grid import pack_bits
from .masks import MaskSetWriter
from .search import explain
from .store import ConceptStore
from .units import UnitMasks

#: Columns :func:`significance` adds.
NULL_COLUMNS = ("null_mean_iou", "z_score", "p_value", "above_null")
#: Control units per layer unless told otherwise (p-values down to about 0.001).
DEFAULT_CONTROLS = 1000
#: Controls built and explained per engine call.
CHUNK = 64


def roll_masks(masks: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Roll each of K masks (K, H, W) by its own offset: ``out[k] = np.roll(masks[k],
    (dy[k], dx[k]), axis=(0, 1))``.

    Examples
    --------
    >>> m = np.zeros((1, 3, 3), dtype=bool); m[0, 0, 0] = True
    >>> np.argwhere(roll_masks(m, np.array([1]), np.array([2])))[:, 1:].tolist()
    [[1, 2]]
    """
    k, h, w = masks.shape
    picks = np.arange(k)
    # A roll is a window of the mask repeated twice: gather whole rows, then whole columns.
    twice = np.concatenate([masks, masks], axis=1)
    windows = sliding_window_view(twice, h, axis=1)  # (k, h + 1, w, h)
    rolled = np.swapaxes(windows[picks, (h - np.asarray(dy)) % h], 1, 2)
    twice = np.concatenate([rolled, rolled], axis=2)
    windows = sliding_window_view(twice, w, axis=2)  # (k, h, w + 1, w)
    return windows[picks, :, (w - np.asarray(dx)) % w]


def control_units(
    units: UnitMasks, n_controls: int = DEFAULT_CONTROLS, *, seed: int = 0, chunk: int = CHUNK
) -> tuple[np.ndarray, Iterator[UnitMasks]]:
    """Control units built from ``units`` (see the module docstring).

    Control ``k`` copies unit ``sources[k]``; the sources cycle through the units that
    fire at all, so every such unit contributes about equally.

    Returns
    -------
    sources, chunks
        The source unit of each control (int64), and the controls as consecutive
        :class:`UnitMasks` chunks of at most ``chunk`` units (built lazily, so a large
        null needs little memory).

    Examples
    --------
    >>> dense = np.zeros((2, 4, 3, 3), dtype=bool); dense[0, 1, 0, :2] = True
    >>> sources, chunks = control_units(UnitMasks.from_masks(dense), 3)
    >>> controls = next(chunks)
    >>> sources.tolist(), controls.pixel_counts.tolist(), controls.image_counts.tolist()
    ([0, 0, 0], [2, 2, 2], [1, 1, 1])
    """
    if not isinstance(units, UnitMasks):
        raise PyneuronError(f"expected UnitMasks, got {type(units).__name__}")
    n_controls = positive_int(n_controls, "n_controls")
    chunk = positive_int(chunk, "chunk")
    active = np.flatnonzero(units.pixel_counts > 0)
    if active.size == 0:
        raise PyneuronError("no unit fires on any image: there is nothing to build controls from")
    sources = active[np.arange(n_controls) % active.size]
    rng = np.random.default_rng(seed)

    def build() -> Iterator[UnitMasks]:
        grid = units.grid
        for start in range(0, n_controls, chunk):
            batch = sources[start : start + chunk]
            writer = MaskSetWriter(grid, n_masks=batch.shape[0])
            for k, unit in enumerate(batch):
                _, masks = units._entries(int(unit))
                n = masks.shape[0]
                images = rng.choice(grid.n_images, size=n, replace=False)
                dy = rng.integers(0, grid.height, size=n)
                dx = rng.integers(0, grid.width, size=n)
                rolled = roll_masks(masks, dy, dx).reshape(n, grid.pixels)
                writer.add_packed(
                    np.full(n, k, dtype=np.int64),
                    images.astype(np.int64),
                    pack_bits(rolled, grid.pixels),
                    rolled.sum(axis=1),
                )
            yield UnitMasks(grid, *writer.finish())

    return sources, build()


def null_baseline(
    units: UnitMasks,
    store: ConceptStore,
    *,
    controls: int = DEFAULT_CONTROLS,
    seed: int = 0,
    progress: bool = True,
    **search_options: Any,
) -> pd.DataFrame:
    """Explain control units of a layer with the same search settings as its units.

    Parameters
    ----------
    units
        The layer's unit masks (those the explanations were searched on).
    store
        The concepts.
    controls
        Number of control units (the null distribution's size; the smallest p-value
        is 1 / (controls + 1)). Cost: about that many units' searches.
    seed
        Seed of the shuffles and rolls.
    **search_options
        ``length``, ``beam_size``, ``operators``, ``penalty`` — as used for the units.

    Returns
    -------
    pandas.DataFrame
        The :func:`pyneuron.explain` table of the controls (``unit`` numbers the
        controls) with a ``source_unit`` column.

    Examples
    --------
    >>> import numpy as np, pyneuron
    >>> rng = np.random.default_rng(0)
    >>> concepts = rng.random((3, 30, 8, 8)) < 0.2
    >>> store = pyneuron.ConceptStore.from_masks(concepts, ["a", "b", "c"])
    >>> units = pyneuron.UnitMasks.from_masks(concepts[:1])
    >>> table = pyneuron.explain(units, store, length=1, progress=False)
    >>> null = pyneuron.null_baseline(units, store, controls=50, length=1, progress=False)
    >>> out = pyneuron.significance(table, null)
    >>> float(out.loc[0, "p_value"]) == 1 / 51, bool(out.loc[0, "above_null"])
    (True, True)
    """
    if search_options.get("full_beam"):
        raise PyneuronError("null_baseline keeps one row per control; drop full_beam")
    sources, chunks = control_units(units, controls, seed=seed)
    table = explain(chunks, store, progress=progress, **search_options)
    table.insert(1, "source_unit", sources[table["unit"].to_numpy()])
    return table


def significance(table: pd.DataFrame, null: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """Compare each row's IoU with a layer's null distribution (:func:`null_baseline`).

    Adds ``null_mean_iou`` (the controls' mean IoU), ``z_score`` ((IoU − mean) / standard
    deviation of the controls), ``p_value`` ((1 + controls with IoU ≥ the unit's) /
    (1 + controls)) and ``above_null`` (``p_value < alpha``; no correction for testing
    many units: about ``alpha`` of units that detect nothing still pass).
    """
    from .checks import check_table

    check_table(table, ("iou",))
    if not isinstance(null, pd.DataFrame) or "iou" not in null.columns or null.empty:
        raise PyneuronError("null must be a non-empty null_baseline table (with an 'iou' column)")
    if not (isinstance(alpha, float) and 0.0 < alpha < 1.0):
        raise PyneuronError(f"alpha must be a float in (0, 1), got {alpha!r}")
    reference = np.sort(null["iou"].to_numpy(dtype=np.float64))
    ious = table["iou"].to_numpy(dtype=np.float64)
    at_least = reference.shape[0] - np.searchsorted(reference, ious, side="left")
    mean = float(reference.mean())
    spread = float(reference.std(ddof=1)) if reference.shape[0] > 1 else 0.0
    result = table.copy()
    result["null_mean_iou"] = mean
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (ious - mean) / spread if spread > 0 else np.sign(ious - mean) * np.inf
    result["z_score"] = np.where(ious == mean, 0.0, z)
    result["p_value"] = (1.0 + at_least) / (1.0 + reference.shape[0])
    result["above_null"] = result["p_value"] < alpha
    return result
