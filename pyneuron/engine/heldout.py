"""Held-out scoring: explanations found on one part of the probing images, scored on the
other part, so an IoU that only fits the images it was searched on shows up as a drop."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import PyneuronError
from .checks import check_table
from .metrics import METRIC_COLUMNS
from .search import score
from .store import ConceptStore
from .units import UnitMasks

#: Columns :func:`evaluate` adds: every metric on the held-out images, and the IoU drop.
HELDOUT_COLUMNS = (*(f"{m}_heldout" for m in METRIC_COLUMNS), "iou_drop")


def split_images(n_images: int, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split image ids 0..n_images-1 at random into (explain, held-out), both ascending.

    Parameters
    ----------
    n_images
        Images in the probing set.
    holdout
        Share of the images held out, in (0, 1); at least one image lands on each side.
    seed
        Seed of ``numpy.random.default_rng``.

    Examples
    --------
    >>> explain_ids, heldout_ids = split_images(10, 0.2)
    >>> len(explain_ids), len(heldout_ids), sorted([*explain_ids, *heldout_ids]) == list(range(10))
    (8, 2, True)
    """
    if (
        isinstance(holdout, bool)
        or not isinstance(holdout, (int, float))
        or not (0.0 < holdout < 1.0)
    ):
        raise PyneuronError(f"holdout must be a share of the images in (0, 1), got {holdout!r}")
    if n_images < 2:
        raise PyneuronError(f"holding out images needs at least 2 images, got {n_images}")
    n_held = min(max(1, round(n_images * holdout)), n_images - 1)
    order = np.random.default_rng(seed).permutation(n_images)
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def evaluate(
    table: pd.DataFrame,
    units_heldout: UnitMasks | Sequence[UnitMasks],
    store_heldout: ConceptStore,
) -> pd.DataFrame:
    """Score each row's formula on held-out unit masks and concepts.

    Parameters
    ----------
    table
        An :func:`pyneuron.explain` / :func:`pyneuron.dissect` table of one layer
        (columns ``unit``, ``formula``, ``iou``; ``range`` for activation ranges).
    units_heldout
        The same units' masks on the held-out images (thresholded as for the table);
        for a table with ``range``, one :class:`UnitMasks` per range index.
    store_heldout
        The concepts on the held-out images (e.g. :meth:`ConceptStore.take_images`).

    Returns
    -------
    pandas.DataFrame
        A copy of ``table`` with ``iou_heldout``, ``detection_accuracy_heldout``,
        ``activation_coverage_heldout``, ``samples_coverage_heldout``,
        ``explanation_coverage_heldout`` and ``iou_drop`` (``iou - iou_heldout``). A row
        without a formula scores IoU 0 and NaN for the other metrics, as in ``explain``.

    Examples
    --------
    >>> import numpy as np, pyneuron
    >>> rng = np.random.default_rng(0)
    >>> concepts = rng.random((3, 40, 8, 8)) < 0.3
    >>> store = pyneuron.ConceptStore.from_masks(concepts, ["a", "b", "c"])
    >>> units = pyneuron.UnitMasks.from_masks((concepts[0] & ~concepts[2])[None])
    >>> fit, held = pyneuron.split_images(40, 0.25)
    >>> table = pyneuron.explain(units.take_images(fit), store.take_images(fit), progress=False)
    >>> out = pyneuron.evaluate(table, units.take_images(held), store.take_images(held))
    >>> row = out.loc[0]
    >>> row["formula"], [round(float(row[c]), 6) for c in ("iou", "iou_heldout", "iou_drop")]
    ('(a AND NOT c)', [1.0, 1.0, 0.0])
    """
    check_table(table, ("unit", "formula", "iou"))
    by_range = "range" in table.columns
    if isinstance(units_heldout, UnitMasks):
        if by_range:
            raise PyneuronError(
                "the table explains activation ranges: pass one UnitMasks per range index"
            )
        masks_of = {None: units_heldout}
    elif isinstance(units_heldout, Sequence) and all(
        isinstance(m, UnitMasks) for m in units_heldout
    ):
        if not by_range:
            raise PyneuronError("pass one UnitMasks for a table without a 'range' column")
        masks_of = dict(enumerate(units_heldout))
    else:
        raise PyneuronError(
            "units_heldout must be UnitMasks (or one per range), got "
            f"{type(units_heldout).__name__}"
        )
    result = table.reset_index(drop=True).copy()
    values = {m: np.full(len(result), np.nan) for m in METRIC_COLUMNS}
    values["iou"][:] = 0.0
    ranges = result["range"] if by_range else pd.Series([None] * len(result))
    keys = pd.DataFrame({"range": ranges, "formula": result["formula"]})
    for (range_, formula), rows in (
        keys.dropna(subset=["formula"])
        .groupby(["range", "formula"], dropna=False, sort=False)
        .groups.items()
    ):
        range_ = None if not by_range else int(range_)
        if range_ not in masks_of:
            raise PyneuronError(f"no held-out unit masks for range {range_}")
        masks = masks_of[range_]
        units = result.loc[rows, "unit"].to_numpy(dtype=np.int64)
        if units.max() >= len(masks):
            raise PyneuronError(
                f"the table names unit {units.max()} but the held-out masks hold {len(masks)} units"
            )
        scores = score(formula, masks.take_units(units), store_heldout)
        for m in METRIC_COLUMNS:
            values[m][rows] = scores[m].to_numpy()
    for m in METRIC_COLUMNS:
        result[f"{m}_heldout"] = values[m]
    result["iou_drop"] = result["iou"] - result["iou_heldout"]
    return result
