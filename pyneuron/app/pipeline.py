"""The dissection pipeline of a run: capture, explain every layer, write the run."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..engine.search import best_of_beam
from ..engine.settings import SearchSettings
from ..engine.store import ConceptStore
from ..engine.units import UnitMasks
from ..model.activations import capture
from ..model.dissect import check_image_count
from ..model.layer_units import layer_units
from ..scale import explain, resolve_backend
from .rundir import (
    ACTIVATIONS,
    MODEL_FILE,
    TOP_IMAGES,
    UNITS,
    layer_dir_name,
    refuse_existing,
    versions,
    work_dir,
    write_run,
)


@dataclass
class _Layers:
    """What explaining every layer gave: best and full-beam tables, unit masks, top images
    and per-layer figures (all by layer name)."""

    tables: list[pd.DataFrame] = field(default_factory=list)
    beams: list[pd.DataFrame] = field(default_factory=list)
    masks: dict[str, UnitMasks] = field(default_factory=dict)
    tops: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)


def dissect_run(
    model: Any,
    layers: Sequence[str],
    images: Any,
    store: ConceptStore,
    out: str | os.PathLike[str],
    *,
    settings: SearchSettings = SearchSettings(),
    image_source: Callable[[int], np.ndarray] | None = None,
    quantile: float = 0.005,
    thresholds: str = "auto",
    batch_size: int = 32,
    transform: Callable[..., Any] | None = None,
    device: Any = None,
    workers: int = 0,
    units: Callable[[Any], Any] | None = None,
    keep_activations: bool = False,
    config: Mapping[str, Any] | None = None,
    extra_summary: Mapping[str, Any] | None = None,
    top_k: int = 8,
    report: bool = True,
    save_store: bool = False,
    save_model: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    backend: Any = "local",
) -> dict[str, Any]:
    """Dissect ``layers`` of ``model`` on ``store`` and write a run directory (see
    :mod:`pyneuron.app.rundir`).

    Memory stays flat whatever the number of images and units: activations are
    streamed to memory-mapped files in the run's work directory (``OUT.partial``, next
    to ``out``), thresholds are computed from them block by block (``thresholds``: see
    :func:`~pyneuron.model.layer_units.layer_units`; the method used is in the summary),
    and unit masks are written to disk image block by image block. An interrupted run
    resumes its capture from the work directory when rerun with the same model, images
    and options; the work directory is removed once the run is written
    (``keep_activations`` moves the activations into the run as ``activations/``).

    ``settings`` is the search (:class:`~pyneuron.SearchSettings`; ``mode="netdissect"``
    with ``length=1`` ranks concepts by NetDissect-Lite's category-restricted IoU);
    ``device``, ``workers`` and ``units`` are :func:`~pyneuron.capture`'s;
    ``image_source(i)`` returns image ``i`` as uint8 (H, W, 3) for the report; without
    it (or with ``report=False``) no report is written; ``save_model`` writes the model's
    state dict to ``model.pt`` (name it in ``config`` as ``weights = "model.pt"`` so
    ``pyneuron evaluate`` can load it); ``save_store`` copies the concept store into the
    run (for stores built from a Broden folder or by segmentation); ``backend`` is
    :func:`pyneuron.explain`'s (``"ray"`` or a ``RayBackend``). The directory appears
    only when everything succeeded; an existing one is kept unless ``overwrite``.
    Returns the summary.
    """
    out = Path(out)
    refuse_existing(out, overwrite)
    backend = resolve_backend(backend)  # an unknown backend fails before any work
    work = work_dir(out)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    activations = capture(
        model,
        list(layers),
        images,
        batch_size=batch_size,
        transform=transform,
        device=device,
        workers=workers,
        units=units,
        out=work / ACTIVATIONS,
        progress=progress,
    )
    check_image_count(next(iter(activations.values())).shape[0], store)
    timings["capture"] = time.perf_counter() - started
    done = _explain_layers(
        activations, work, store, settings, quantile, thresholds, top_k, timings, progress, backend
    )
    del activations  # the memory maps, before the files move or go
    results = pd.concat(done.tables, ignore_index=True)
    beam_table = pd.concat(done.beams, ignore_index=True)
    summary: dict[str, Any] = {
        "versions": versions(),
        "grid": list(store.grid.shape),
        "concepts": len(store),
        "concept_source": dict(store.metadata) or str(getattr(store, "path", None)),
        "layers": done.stats,
        "search": {**settings.to_dict(), "quantile": quantile, "thresholds": thresholds},
        "timings_seconds": timings,
        **(extra_summary or {}),
    }

    def extra(staging: Path) -> None:
        if report and image_source is not None:
            t0 = time.perf_counter()
            _write_report(
                staging, results, beam_table, store, done, image_source, settings, progress
            )
            timings["report"] = time.perf_counter() - t0
            summary["report"] = str(out / "report" / "index.html")
        _write_layers(staging, work, done, store if save_store else None)
        if keep_activations:
            os.replace(work / ACTIVATIONS, staging / ACTIVATIONS)
        if save_model:
            import torch

            torch.save(model.state_dict(), staging / MODEL_FILE)
        timings["total"] = time.perf_counter() - started

    write_run(
        out,
        results,
        summary=summary,
        config=dict(config or {}),
        beam=beam_table,
        extra=extra,
        overwrite=overwrite,
    )
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _explain_layers(
    activations: Mapping[str, np.ndarray],
    work: Path,
    store: ConceptStore,
    settings: SearchSettings,
    quantile: float,
    thresholds: str,
    top_k: int,
    timings: dict[str, float],
    progress: bool,
    backend: Any,
) -> _Layers:
    """Explain every layer's units (the whole final beam), with their top images; unit
    masks are written under ``work``."""
    done = _Layers()
    size = (store.grid.height, store.grid.width)
    for layer, layer_activations in activations.items():
        t0 = time.perf_counter()
        units = layer_units(
            layer_activations,
            size,
            quantile=quantile,
            thresholds=thresholds,
            top_k=top_k,
            path=work / UNITS / layer_dir_name(layer),
            progress=progress,
        )
        timings[f"units {layer}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        beam = explain(
            units.masks, store, settings, full_beam=True, progress=progress, backend=backend
        )
        beam.insert(0, "layer", layer)
        beam["threshold"] = units.thresholds[beam["unit"].to_numpy()]
        timings[f"explain {layer}"] = time.perf_counter() - t0
        best = best_of_beam(beam)
        done.tables.append(best)
        done.beams.append(beam)
        done.masks[layer] = units.masks
        done.tops[layer] = units.top_images
        done.stats[layer] = {
            "units": int(layer_activations.shape[1]),
            "map_size": list(layer_activations.shape[2:]),
            "threshold_method": units.threshold_method,
            "mean_iou": float(best["iou"].mean()),
            "explained_units": int(best["formula"].notna().sum()),
        }
    return done


def _write_layers(staging: Path, work: Path, done: _Layers, store: ConceptStore | None) -> None:
    """The unit masks (moved from the work directory) and top images of every layer (and
    the store, when given)."""
    (staging / UNITS).mkdir()
    for layer in done.masks:
        os.replace(work / UNITS / layer_dir_name(layer), staging / UNITS / layer_dir_name(layer))
    if store is not None:
        store.save(staging / "concepts")
    np.savez(staging / TOP_IMAGES, **{layer_dir_name(k): v for k, v in done.tops.items()})


def _write_report(
    staging: Path,
    results: pd.DataFrame,
    beam: pd.DataFrame,
    store: ConceptStore,
    done: _Layers,
    image_source: Callable[[int], np.ndarray],
    settings: SearchSettings,
    progress: bool,
) -> None:
    from ..report import write_report

    write_report(
        staging / "report",
        results,
        store,
        unit_masks=done.masks,
        images=image_source,
        top_images=done.tops,
        beam=beam,
        progress=progress,
        iou=settings.mode,
    )
