"""One call from a model layer to its explanations: capture, thresholds, masks, search."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .activations import LayerFormat, capture
from .errors import GridMismatchError
from .search import explain
from .store import ConceptStore
from .thresholds import activation_ranges, quantile_thresholds, user_thresholds
from .units import UnitMasks
from .upsample import unit_masks_from_activations

Thresholds = float | Sequence[float] | np.ndarray


def _check_image_files(images: Any, store: ConceptStore) -> None:
    """Refuse image files that are not the store's probing images in its order."""
    from .activations import list_images
    from .sources import check_image_order

    if isinstance(images, (str, os.PathLike)) and os.path.isdir(images):
        check_image_order(store, list_images(images))
    elif isinstance(images, (list, tuple)) and all(
        isinstance(item, (str, os.PathLike)) for item in images
    ):
        check_image_order(store, [Path(item) for item in images])


def dissect(
    model: Any,
    layer: str,
    images: Any,
    store: ConceptStore,
    *,
    quantile: float = 0.005,
    thresholds: Thresholds | None = None,
    ranges: int | None = None,
    batch_size: int = 32,
    device: Any = None,
    dtype: Any = None,
    transform: Callable[..., Any] | None = None,
    layer_format: LayerFormat | None = None,
    activations_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    holdout: float | None = None,
    holdout_seed: int = 0,
    **search_options: Any,
) -> pd.DataFrame:
    """Explain every unit of ``layer``: capture → thresholds → unit masks → :func:`explain`.

    Parameters
    ----------
    model, layer, images
        As in :func:`pyneuron.capture`; ``images`` must be the store's probing images,
        in the store's image order (a folder or a list of files is checked against the
        images the store records, see :func:`pyneuron.sources.check_image_order`).
    store
        The concepts; its grid sets the resolution unit maps are upsampled to.
    quantile
        Top quantile per unit (compexp/NetDissect: 0.005, read at level 994/999;
        OVCE: 0.01). Ignored when ``thresholds`` or ``ranges`` is given.
    thresholds
        User thresholds: one for all units or one per unit.
    ranges
        Explain activation ranges instead: KMeans with this many clusters over each
        unit's non-zero activations (Clustered CompExp / OVCE use 5); a row per
        (unit, range) with ``range``, ``lower`` and ``upper`` columns.
    activations_dir
        Stream captured activations there (resumable), for layers larger than memory.
    holdout
        Hold out this share of the images (drawn with ``holdout_seed``): thresholds and
        formulas come from the rest, and every metric is scored again on the held-out
        images (:func:`pyneuron.evaluate`: ``iou_heldout``, ..., ``iou_drop``).
    **search_options
        ``length``, ``beam_size``, ``operators``, ``penalty``, ``full_beam`` and
        ``backend`` (``"ray"`` or a :class:`RayBackend`: the search on a Ray cluster) of
        :func:`explain`.

    Returns
    -------
    pandas.DataFrame
        The :func:`explain` table with ``layer`` and ``threshold`` columns added
        (and the held-out columns with ``holdout``).
    """
    _check_image_files(images, store)
    activations = capture(
        model,
        layer,
        images,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        transform=transform,
        formats=layer_format,
        out=activations_dir,
        progress=progress,
    )[layer]
    if holdout is not None:
        from .evaluate import explain_activations_split

        return explain_activations_split(
            activations,
            store,
            holdout=holdout,
            seed=holdout_seed,
            layer=layer,
            quantile=quantile,
            thresholds=thresholds,
            ranges=ranges,
            progress=progress,
            **search_options,
        )
    table, _ = explain_activations(
        activations,
        store,
        layer=layer,
        quantile=quantile,
        thresholds=thresholds,
        ranges=ranges,
        progress=progress,
        **search_options,
    )
    return table


def check_image_count(n_images: int, store: ConceptStore) -> None:
    """Raise :class:`GridMismatchError` unless activations cover the store's images."""
    if n_images != store.grid.n_images:
        raise GridMismatchError(
            f"captured {n_images} images but the concept store covers "
            f"{store.grid.n_images}; pass the store's probing images, in its order"
        )


def explain_activations(
    activations: np.ndarray,
    store: ConceptStore,
    *,
    layer: str,
    quantile: float = 0.005,
    thresholds: Thresholds | None = None,
    ranges: int | None = None,
    progress: bool = True,
    **search_options: Any,
) -> tuple[pd.DataFrame, list[UnitMasks]]:
    """Thresholds → unit masks → :func:`explain` for captured activations (N, U, h, w).

    Returns the table (with ``layer`` and ``threshold``, and for ``ranges`` also
    ``range``, ``lower``, ``upper``) and the unit masks (one set per range index).
    """
    check_image_count(activations.shape[0], store)
    size = (store.grid.height, store.grid.width)
    if ranges is None:
        if thresholds is not None:
            values = user_thresholds(thresholds, activations.shape[1])
        else:
            values = quantile_thresholds(activations, quantile)
        masks = unit_masks_from_activations(activations, values, size, progress=progress)
        table = explain(masks, store, progress=progress, **search_options)
        table.insert(0, "layer", layer)
        table["threshold"] = values[table["unit"].to_numpy()]
        return table, [masks]
    bounds = activation_ranges(activations, ranges)  # (U, K, 2), NaN rows for missing ranges
    tables, all_masks = [], []
    for k in range(bounds.shape[1]):
        lower, upper = bounds[:, k, 0], bounds[:, k, 1]
        usable = np.isfinite(lower) & np.isfinite(upper)
        masks = unit_masks_from_activations(
            activations,
            np.where(usable, lower, np.inf),
            size,
            upper=np.where(usable, upper, -np.inf),
            progress=progress,
        )
        table = explain(masks, store, progress=progress, **search_options)
        units = table["unit"].to_numpy()
        table.insert(1, "range", k)
        table["lower"], table["upper"] = lower[units], upper[units]
        tables.append(table[usable[units]])
        all_masks.append(masks)
    result = pd.concat(tables).sort_values(["unit", "range"], kind="stable")
    result = result.reset_index(drop=True)
    result.insert(0, "layer", layer)
    result["threshold"] = result["lower"]
    return result, all_masks
