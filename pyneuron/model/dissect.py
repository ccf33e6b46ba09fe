"""One call from a model layer to its explanations: capture, thresholds, masks, search."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..engine.heldout import evaluate, split_images
from ..engine.settings import SearchSettings
from ..engine.store import ConceptStore
from ..engine.units import UnitMasks
from ..engine.upsample import check_upsample, unit_masks_from_activations
from ..errors import GridMismatchError
from ..presets import Preset, get_preset
from ..scale import explain, resolve_backend
from .activations import LayerFormat, capture, image_files
from .layer_units import range_unit_masks, unit_thresholds
from .thresholds import activation_ranges, check_ranges_method

Thresholds = float | Sequence[float] | np.ndarray


def _check_image_files(images: Any, store: ConceptStore) -> None:
    """Refuse image files that are not the store's probing images in its order."""
    from ..concepts.sources import check_image_order

    files = image_files(images)
    if files is not None:
        check_image_order(store, files)


def dissect(
    model: Any,
    layer: str,
    images: Any,
    store: ConceptStore,
    *,
    quantile: float = 0.005,
    thresholds: str | Thresholds = "auto",
    ranges: int | None = None,
    ranges_method: str = "pyneuron",
    upsample: str = "pillow",
    preset: str | Preset | None = None,
    batch_size: int = 32,
    device: Any = None,
    dtype: Any = None,
    transform: Callable[..., Any] | None = None,
    layer_format: LayerFormat | None = None,
    units: Callable[[Any], Any] | None = None,
    workers: int = 0,
    activations_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    holdout: float | None = None,
    holdout_seed: int = 0,
    **search_options: Any,
) -> pd.DataFrame:
    """Explain every unit of ``layer``: capture → thresholds → unit masks → :func:`explain`.

    Activations are streamed to memory-mapped files and read back block by block, so
    memory stays flat whatever the number of images (the files go to
    ``activations_dir``, or to a temporary directory removed afterwards).

    Parameters
    ----------
    model, layer, images
        As in :func:`pyneuron.capture`; ``images`` must be the store's probing images,
        in the store's image order (a folder or a list of files is checked against the
        images the store records, see :func:`pyneuron.concepts.sources.check_image_order`).
    store
        The concepts; its grid sets the resolution unit maps are upsampled to.
    quantile
        Top quantile per unit (compexp/NetDissect: 0.005, read at level 994/999;
        OVCE: 0.01). Ignored when ``thresholds`` holds values or ``ranges`` is given.
    thresholds
        How to threshold each unit at ``quantile``: ``"exact"`` (the exact quantile),
        ``"compexp"`` (compexp's streaming estimator, fixed memory), ``"auto"``
        (exact unless that needs more than 1 GiB, see
        :func:`~pyneuron.model.layer_units.layer_units`); or the thresholds themselves:
        one number for all units or one per unit.
    ranges
        Explain activation ranges instead: KMeans with this many clusters over each
        unit's activations (Clustered CompExp / OVCE use 5; see ``ranges_method``); a
        row per (unit, range) with ``range``, ``lower`` and ``upper`` columns.
    ranges_method
        How ``ranges`` are clustered: ``"pyneuron"`` (deterministic Lloyd's) or
        ``"sklearn"`` (OVCE's scikit-learn KMeans, bit for bit; needs the ``ovce``
        extra); see :func:`~pyneuron.model.thresholds.activation_ranges`.
    upsample
        How unit maps are resized to the store's grid: ``"pillow"`` (compexp's) or
        ``"torch"`` (OVCE's ``interpolate(mode="bilinear")``); see
        :func:`~pyneuron.engine.upsample.unit_masks_from_activations`.
    preset
        The settings of a published method (:mod:`pyneuron.presets`: ``"ovce"``,
        ``"ovce-classic"``) in place of every option above and search field left at its
        default; an option given explicitly wins (listed in ``table.attrs["preset"]``
        as an override). The store is not rebuilt: a warning says when its grid or its
        segmentation semantics are not the preset's (build it with
        ``segment(..., semantics="ovce", grid=112)``).
    device, dtype, transform, units, workers
        As in :func:`pyneuron.capture`: where the model runs, what to explain instead
        of the layer's channels (e.g. a sparse autoencoder's encoder), worker processes
        decoding image files.
    activations_dir
        Keep the captured activations there (``<layer>.npy``); a rerun resumes an
        interrupted capture.
    holdout
        Hold out this share of the images (drawn with ``holdout_seed``): thresholds and
        formulas come from the rest, and every metric is scored again on the held-out
        images (:func:`pyneuron.evaluate`: ``iou_heldout``, ..., ``iou_drop``).
    **search_options
        What :func:`pyneuron.explain` takes: ``settings`` (a
        :class:`~pyneuron.SearchSettings`) or its fields (``length``, ``beam_size``,
        ``operators``, ``penalty``, ``search``, ...), ``full_beam`` and ``backend``
        (``"ray"`` or a :class:`RayBackend`: the search on a Ray cluster).

    Returns
    -------
    pandas.DataFrame
        The :func:`explain` table with ``layer`` and ``threshold`` columns added
        (and the held-out columns with ``holdout``); with a preset, ``attrs["preset"]``
        records it (name, settings, overrides).

    Examples
    --------
    A sparse autoencoder's latents instead of the layer's channels:

    >>> import numpy as np, torch
    >>> from pyneuron.concepts.synthetic import DemoConfig, make_data
    >>> data = make_data(DemoConfig(n_images=40, size=16), progress=False)
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    >>> encoder = torch.nn.Conv2d(8, 16, 1)  # an SAE's encoder, as a 1x1 convolution
    >>> table = dissect(model, "1", data.images, data.store, progress=False,
    ...                 units=lambda maps: torch.relu(encoder(maps)))
    >>> table["unit"].nunique()
    16
    """
    record = None
    if preset is not None:
        chosen = get_preset(preset)
        values, search_options, overrides = _preset_options(
            chosen,
            {
                "quantile": quantile,
                "thresholds": thresholds,
                "ranges": ranges,
                "ranges_method": ranges_method,
                "upsample": upsample,
            },
            search_options,
        )
        quantile, thresholds, ranges = values["quantile"], values["thresholds"], values["ranges"]
        ranges_method, upsample = values["ranges_method"], values["upsample"]
        _check_store_for_preset(chosen, store)
        record = chosen.summary(overrides)
    check_ranges_method(ranges_method)  # bad options fail before the capture
    check_upsample(upsample)
    _check_image_files(images, store)
    if "backend" in search_options:  # an unknown backend fails before the capture
        search_options["backend"] = resolve_backend(search_options["backend"])
    with contextlib.ExitStack() as stack:
        if activations_dir is None:
            activations_dir = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="pyneuron-activations-")
            )
        activations = capture(
            model,
            layer,
            images,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            transform=transform,
            formats=layer_format,
            units=units,
            workers=workers,
            out=activations_dir,
            progress=progress,
        )[layer]
        options = dict(
            layer=layer,
            quantile=quantile,
            thresholds=thresholds,
            ranges=ranges,
            ranges_method=ranges_method,
            upsample=upsample,
            progress=progress,
            **search_options,
        )
        if holdout is not None:
            table = explain_activations_split(
                activations, store, holdout=holdout, seed=holdout_seed, **options
            )
        else:
            table = explain_activations(activations, store, **options)[0]
    if record is not None:
        table.attrs["preset"] = record
    return table


def _preset_options(
    preset: Preset, values: dict[str, Any], search_options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """:func:`dissect`'s ``values`` and search options with ``preset``'s settings in place
    of those left at their defaults, and the overrides (see :meth:`Preset.apply`)."""
    defaults = inspect.signature(dissect).parameters
    explicit = {
        name
        for name, value in values.items()
        if not (type(value) is type(defaults[name].default) and value == defaults[name].default)
    }
    fields = [f.name for f in dataclasses.fields(SearchSettings)]
    settings = search_options.get("settings")
    if settings is not None:  # a settings object fixes the whole search
        given = {name: getattr(settings, name) for name in fields}
        explicit |= set(fields)
    else:
        given = {name: search_options[name] for name in fields if name in search_options}
        explicit |= set(given)
    resolved, overrides = preset.apply({**values, **given}, explicit)
    search = dict(search_options)
    if settings is None:
        search.update({name: resolved[name] for name in fields if name in resolved})
    return {name: resolved[name] for name in values}, search, overrides


def _check_store_for_preset(preset: Preset, store: ConceptStore) -> None:
    """Warn when ``store`` was not made the way ``preset`` makes concept masks."""
    grid = preset.settings.get("grid")
    if grid is not None and (store.grid.height, store.grid.width) != (grid, grid):
        warnings.warn(
            f"preset {preset.name!r} uses a {grid}x{grid} concept grid; this store's is "
            f"{store.grid.height}x{store.grid.width}",
            stacklevel=3,
        )
    semantics = preset.settings.get("semantics")
    segmented = store.metadata.get("segment")
    if semantics is not None and isinstance(segmented, dict):
        used = segmented.get("semantics", "pyneuron")
        if used != semantics:
            warnings.warn(
                f"preset {preset.name!r} segments with semantics={semantics!r}; this store "
                f"was segmented with semantics={used!r} (rebuild it with "
                f"segment(..., semantics={semantics!r}))",
                stacklevel=3,
            )


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
    thresholds: str | Thresholds = "auto",
    ranges: int | None = None,
    ranges_method: str = "pyneuron",
    upsample: str = "pillow",
    progress: bool = True,
    **search_options: Any,
) -> tuple[pd.DataFrame, list[UnitMasks]]:
    """Thresholds → unit masks → :func:`explain` for captured activations (N, U, h, w).

    The options are :func:`dissect`'s. Returns the table (with ``layer`` and
    ``threshold``, and for ``ranges`` also ``range``, ``lower``, ``upper``) and the unit
    masks (one set per range index).
    """
    check_ranges_method(ranges_method)
    check_upsample(upsample)
    check_image_count(activations.shape[0], store)
    size = (store.grid.height, store.grid.width)
    if ranges is None:
        values, _ = unit_thresholds(activations, quantile, thresholds)
        masks = unit_masks_from_activations(
            activations, values, size, upsample=upsample, progress=progress
        )
        table = explain(masks, store, progress=progress, **search_options)
        table.insert(0, "layer", layer)
        table["threshold"] = values[table["unit"].to_numpy()]
        return table, [masks]
    bounds = activation_ranges(activations, ranges, method=ranges_method)  # NaN: no range
    all_masks = range_unit_masks(activations, bounds, size, upsample=upsample, progress=progress)
    result = explain_ranges(all_masks, bounds, store, progress=progress, **search_options)
    result.insert(0, "layer", layer)
    return result, all_masks


def explain_ranges(
    masks: Sequence[UnitMasks], ranges: np.ndarray, store: ConceptStore, **explain_options: Any
) -> pd.DataFrame:
    """:func:`explain` range by range: ``masks[k]`` holds every unit's range ``k`` of the
    (U, K, 2) ``ranges``. The tables are joined by unit, then range (then ``rank`` for
    ``full_beam=True``), with ``range``, ``lower``, ``upper`` and ``threshold`` (=
    ``lower``) columns; ranges a unit does not have (NaN rows) are left out. Each range's
    memory-mapped masks give their pages back once searched."""
    tables = []
    for k, range_masks in enumerate(masks):
        table = explain(range_masks, store, **explain_options)
        range_masks.release_pages()
        lower, upper = ranges[table["unit"].to_numpy(), k].T
        table.insert(1, "range", k)
        table["lower"], table["upper"], table["threshold"] = lower, upper, lower
        tables.append(table[np.isfinite(lower)])
    result = pd.concat(tables)
    order = ["unit", "range", *(["rank"] if "rank" in result.columns else [])]
    return result.sort_values(order, kind="stable").reset_index(drop=True)


def explain_split(
    units: UnitMasks,
    store: ConceptStore,
    *,
    holdout: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    **search_options: Any,
) -> pd.DataFrame:
    """Explain saved unit masks on part of the images and :func:`evaluate` on the rest.

    The thresholds behind ``units`` were set on all images; with a model, prefer
    ``dissect(..., holdout=...)``, which sets them on the explaining part only.
    Returns the :func:`evaluate` table of the explaining part's formulas.
    """
    store.grid.require_same(units.grid, "unit masks vs concept store")
    fit, held = split_images(store.grid.n_images, holdout, seed)
    table = explain(
        units.take_images(fit), store.take_images(fit), progress=progress, **search_options
    )
    return evaluate(table, units.take_images(held), store.take_images(held))


def explain_activations_split(
    activations: np.ndarray,
    store: ConceptStore,
    *,
    holdout: float,
    seed: int = 0,
    ranges_method: str = "pyneuron",
    upsample: str = "pillow",
    progress: bool = True,
    **options: Any,
) -> pd.DataFrame:
    """``dissect(..., holdout=...)``: thresholds and formulas from the explaining part of
    the images, metrics again on the held-out part (:func:`evaluate`); the held-out unit
    masks are upsampled the same way (``upsample``)."""
    check_ranges_method(ranges_method)
    check_upsample(upsample)
    check_image_count(activations.shape[0], store)
    fit, held = split_images(activations.shape[0], holdout, seed)
    table, _ = explain_activations(
        activations[fit],
        store.take_images(fit),
        ranges_method=ranges_method,
        upsample=upsample,
        progress=progress,
        **options,
    )
    held_activations = activations[held]
    size = (store.grid.height, store.grid.width)
    n_units = held_activations.shape[1]
    if "range" not in table.columns:
        thresholds = np.full(n_units, np.inf)
        thresholds[table["unit"].to_numpy()] = table["threshold"].to_numpy()
        masks: UnitMasks | list[UnitMasks] = unit_masks_from_activations(
            held_activations, thresholds, size, upsample=upsample, progress=progress
        )
    else:
        bounds = np.full((n_units, int(table["range"].max()) + 1, 2), np.nan)
        units, ranges = table["unit"].to_numpy(), table["range"].to_numpy()
        bounds[units, ranges] = table[["lower", "upper"]].to_numpy()
        masks = range_unit_masks(
            held_activations, bounds, size, upsample=upsample, progress=progress
        )
    return evaluate(table, masks, store.take_images(held))
