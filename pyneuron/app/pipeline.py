"""The dissection pipeline of a run: capture, explain every layer, write the run."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..engine.search import best_of_beam
from ..engine.store import ConceptStore
from ..model.activations import capture
from ..model.dissect import explain_activations
from .rundir import MODEL_FILE, TOP_IMAGES, layer_dir_name, refuse_existing, versions, write_run


def top_activating_images(activations: np.ndarray, k: int) -> np.ndarray:
    """(units, k) ids of the images with the highest maximum activation, best first."""
    peaks = activations.reshape(activations.shape[0], activations.shape[1], -1).max(axis=2)
    k = min(k, peaks.shape[0])
    order = np.argsort(-peaks, axis=0, kind="stable")[:k]
    return order.T.copy()


def dissect_run(
    model: Any,
    layers: Sequence[str],
    images: Any,
    store: ConceptStore,
    out: str | os.PathLike[str],
    *,
    image_source: Callable[[int], np.ndarray] | None = None,
    quantile: float = 0.005,
    length: int = 3,
    beam_size: int = 5,
    operators: Sequence[str] = ("OR", "AND", "AND NOT"),
    search: str = "beam",
    time_limit: float | None = None,
    max_nodes: int | None = None,
    iou: str = "dataset",
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
    """Dissect ``layers`` of ``model`` on ``store`` and write a run directory (see module doc).

    ``image_source(i)`` returns image ``i`` as uint8 (H, W, 3) for the report; without
    it (or with ``report=False``) no report is written; ``save_model`` writes the model's
    state dict to ``model.pt`` (name it in ``config`` as ``weights = "model.pt"`` so
    ``pyneuron evaluate`` can load it); ``save_store`` copies the concept
    store into the run (for stores built from a Broden folder or by segmentation);
    ``backend`` is :func:`pyneuron.explain`'s (``"ray"`` or a ``RayBackend``). The
    directory appears only when everything succeeded; an existing one is kept unless
    ``overwrite``. ``iou="netdissect"`` (with ``length=1``) ranks concepts by
    NetDissect-Lite's category-restricted IoU (``explain(..., mode=...)``); ``search``,
    ``time_limit`` and ``max_nodes`` are those of :func:`pyneuron.explain`.
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

    tables, beams, masks, tops, layer_stats = [], [], {}, {}, {}
    for layer in layers:
        t0 = time.perf_counter()
        beam, layer_masks = explain_activations(
            activations[layer],
            store,
            layer=layer,
            quantile=quantile,
            length=length,
            beam_size=beam_size,
            operators=operators,
            search=search,
            time_limit=time_limit,
            max_nodes=max_nodes,
            mode=iou,
            full_beam=True,
            progress=progress,
            backend=backend,
        )
        timings[f"explain {layer}"] = time.perf_counter() - t0
        best = best_of_beam(beam)
        tables.append(best)
        beams.append(beam)
        masks[layer] = layer_masks[0]
        tops[layer] = top_activating_images(activations[layer], top_k)
        layer_stats[layer] = {
            "units": int(activations[layer].shape[1]),
            "map_size": list(activations[layer].shape[2:]),
            "mean_iou": float(best["iou"].mean()),
            "explained_units": int(best["formula"].notna().sum()),
        }
    results = pd.concat(tables, ignore_index=True)
    beam_table = pd.concat(beams, ignore_index=True)
    summary: dict[str, Any] = {
        "versions": versions(),
        "grid": list(store.grid.shape),
        "concepts": len(store),
        "concept_source": dict(store.metadata) or str(getattr(store, "path", None)),
        "layers": layer_stats,
        "search": {
            "length": length,
            "beam_size": beam_size,
            "operators": list(operators),
            "search": search,
            "time_limit": time_limit,
            "max_nodes": max_nodes,
            "quantile": quantile,
            "iou": iou,
        },
        "timings_seconds": timings,
        **(extra_summary or {}),
    }

    def extra(staging: Path) -> None:
        for layer, layer_masks in masks.items():
            layer_masks.save(staging / "units" / layer_dir_name(layer))
        if save_store:
            store.save(staging / "concepts")
        if save_model:
            import torch

            torch.save(model.state_dict(), staging / MODEL_FILE)
        np.savez(staging / TOP_IMAGES, **{layer_dir_name(k): v for k, v in tops.items()})
        if report and image_source is not None:
            t0 = time.perf_counter()
            from ..report import write_report

            write_report(
                staging / "report",
                results,
                store,
                unit_masks=masks,
                images=image_source,
                top_images=tops,
                beam=beam_table,
                progress=progress,
                iou=iou,
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
