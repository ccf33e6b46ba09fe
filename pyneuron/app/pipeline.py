"""The dissection pipeline of a run: capture, explain every layer, write the run."""

from __future__ import annotations

import os
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
from ..model.dissect import explain_activations
from .rundir import MODEL_FILE, TOP_IMAGES, layer_dir_name, refuse_existing, versions, write_run


def top_activating_images(activations: np.ndarray, k: int) -> np.ndarray:
    """(units, k) ids of the images with the highest maximum activation, best first."""
    peaks = activations.reshape(activations.shape[0], activations.shape[1], -1).max(axis=2)
    k = min(k, peaks.shape[0])
    order = np.argsort(-peaks, axis=0, kind="stable")[:k]
    return order.T.copy()


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
    batch_size: int = 32,
    transform: Callable[..., Any] | None = None,
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

    ``settings`` is the search (:class:`~pyneuron.SearchSettings`; ``mode="netdissect"``
    with ``length=1`` ranks concepts by NetDissect-Lite's category-restricted IoU);
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
    timings: dict[str, float] = {}
    started = time.perf_counter()
    activations = capture(
        model, list(layers), images, batch_size=batch_size, transform=transform, progress=progress
    )
    timings["capture"] = time.perf_counter() - started
    done = _explain_layers(
        activations, layers, store, settings, quantile, top_k, timings, progress, backend
    )
    results = pd.concat(done.tables, ignore_index=True)
    beam_table = pd.concat(done.beams, ignore_index=True)
    summary: dict[str, Any] = {
        "versions": versions(),
        "grid": list(store.grid.shape),
        "concepts": len(store),
        "concept_source": dict(store.metadata) or str(getattr(store, "path", None)),
        "layers": done.stats,
        "search": {**settings.to_dict(), "quantile": quantile},
        "timings_seconds": timings,
        **(extra_summary or {}),
    }

    def extra(staging: Path) -> None:
        _write_layers(staging, done, store if save_store else None)
        if save_model:
            import torch

            torch.save(model.state_dict(), staging / MODEL_FILE)
        if report and image_source is not None:
            t0 = time.perf_counter()
            _write_report(
                staging, results, beam_table, store, done, image_source, settings, progress
            )
            timings["report"] = time.perf_counter() - t0
            summary["report"] = str(out / "report" / "index.html")
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
    return summary


def _explain_layers(
    activations: Mapping[str, np.ndarray],
    layers: Sequence[str],
    store: ConceptStore,
    settings: SearchSettings,
    quantile: float,
    top_k: int,
    timings: dict[str, float],
    progress: bool,
    backend: Any,
) -> _Layers:
    """Explain every layer's units (the whole final beam), with their top images."""
    done = _Layers()
    for layer in layers:
        t0 = time.perf_counter()
        beam, layer_masks = explain_activations(
            activations[layer],
            store,
            layer=layer,
            quantile=quantile,
            settings=settings,
            full_beam=True,
            progress=progress,
            backend=backend,
        )
        timings[f"explain {layer}"] = time.perf_counter() - t0
        best = best_of_beam(beam)
        done.tables.append(best)
        done.beams.append(beam)
        done.masks[layer] = layer_masks[0]
        done.tops[layer] = top_activating_images(activations[layer], top_k)
        done.stats[layer] = {
            "units": int(activations[layer].shape[1]),
            "map_size": list(activations[layer].shape[2:]),
            "mean_iou": float(best["iou"].mean()),
            "explained_units": int(best["formula"].notna().sum()),
        }
    return done


def _write_layers(staging: Path, done: _Layers, store: ConceptStore | None) -> None:
    """The unit masks and top images of every layer (and the store, when given)."""
    for layer, layer_masks in done.masks.items():
        layer_masks.save(staging / "units" / layer_dir_name(layer))
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
