"""The dissection pipeline of a run: capture, explain every layer, write the run."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..engine.checks import positive_int
from ..engine.search import best_of_beam
from ..engine.settings import SearchSettings
from ..engine.store import ConceptStore
from ..engine.units import UnitMasks
from ..engine.upsample import check_upsample
from ..errors import PyneuronError
from ..model.activations import capture, image_files
from ..model.dissect import check_image_count, explain_ranges
from ..model.distributed import layer_units_on_ray
from ..model.layer_units import LayerRanges, LayerUnits, layer_ranges, layer_units
from ..model.models import ModelFactory
from ..model.thresholds import check_ranges_method
from ..scale import RayBackend, explain, resolve_backend
from .rundir import (
    ACTIVATIONS,
    MODEL_FILE,
    TOP_IMAGES,
    UNITS,
    layer_dir_name,
    refuse_existing,
    report_title,
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
    masks: dict[str, UnitMasks | list[UnitMasks]] = field(default_factory=dict)
    mask_dirs: dict[str, Path] = field(default_factory=dict)
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
    ranges: int | None = None,
    ranges_method: str = "pyneuron",
    upsample: str = "pillow",
    batch_size: int = 32,
    transform: Callable[..., Any] | None = None,
    device: Any = None,
    workers: int = 0,
    units: Callable[[Any], Any] | None = None,
    model_factory: Callable[[], Any] | None = None,
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
    and unit masks are written to disk image block by image block (``upsample``: how
    unit maps are resized to the grid, see
    :func:`~pyneuron.engine.upsample.unit_masks_from_activations`). With ``ranges=K``
    each unit is explained as ``K`` activation ranges instead (KMeans by
    ``ranges_method``, see :func:`~pyneuron.model.layer_units.layer_ranges`; results get
    ``range``, ``lower`` and ``upper`` columns, unit masks go to
    ``units/<layer>/range<k>``). An interrupted run
    resumes its capture from the work directory when rerun with the same model, images
    and options; the work directory is removed once the run is written
    (``keep_activations`` moves the activations into the run as ``activations/``).

    ``settings`` is the search (:class:`~pyneuron.SearchSettings`; ``mode="netdissect"``
    with ``length=1`` ranks concepts by NetDissect-Lite's category-restricted IoU);
    ``device``, ``workers`` and ``units`` are :func:`~pyneuron.capture`'s;
    with a :class:`~pyneuron.RayBackend` and ``images`` a list of files (on paths every
    node sees, as ``out``), capture, thresholds (exact) and unit masks run on the
    cluster too, in parts of the images (``OUT.partial/parts``), each worker building
    the model with ``model_factory`` (default: the model itself, pickled; see
    :class:`~pyneuron.model.models.ModelFactory`) -- the same files as a local run;
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
    check_ranges_method(ranges_method)
    check_upsample(upsample)
    if ranges is not None:
        ranges = positive_int(ranges, "ranges")
    stage = _Stage(
        list(layers),
        (store.grid.height, store.grid.width),
        quantile,
        thresholds,
        ranges,
        ranges_method,
        upsample,
        top_k,
        work,
        timings,
        progress,
    )
    # A list of files is what Ray workers can read (a folder stays with the local path).
    files = image_files(images) if isinstance(images, (list, tuple)) else None
    if isinstance(backend, RayBackend) and files is not None:
        if thresholds == "compexp" or keep_activations or ranges is not None:
            raise PyneuronError(
                "on Ray, thresholds are exact quantiles merged across parts and the "
                "activations stay in the parts: drop thresholds='compexp' / keep_activations; "
                "activation ranges (KMeans over all of a unit's values) run on one machine: "
                "drop ranges or the Ray backend"
            )
        check_image_count(len(files), store)
        backend.connect()  # before any image is read
        factory = model_factory or ModelFactory.of(model)
        found = stage.on_ray(factory, files, transform, batch_size, units, device, backend)
    else:
        found = stage.here(model, images, store, transform, batch_size, units, device, workers)
    done = _explain_layers(found, store, settings, timings, progress, backend)
    results = pd.concat(done.tables, ignore_index=True)
    beam_table = pd.concat(done.beams, ignore_index=True)
    summary: dict[str, Any] = {
        "versions": versions(),
        "grid": list(store.grid.shape),
        "concepts": len(store),
        "concept_source": dict(store.metadata) or str(getattr(store, "path", None)),
        "layers": done.stats,
        "search": {
            **settings.to_dict(),
            "quantile": quantile,
            "thresholds": thresholds,
            "ranges": ranges,
            "ranges_method": ranges_method,
            "upsample": upsample,
        },
        "timings_seconds": timings,
        **(extra_summary or {}),
    }

    def extra(staging: Path) -> None:
        if report and image_source is not None:
            t0 = time.perf_counter()
            _write_report(
                staging,
                results,
                beam_table,
                store,
                done,
                image_source,
                settings,
                report_title(config or {}),
                progress,
            )
            timings["report"] = time.perf_counter() - t0
            summary["report"] = str(out / "report" / "index.html")
        _write_layers(staging, done, store if save_store else None)
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


@dataclass(frozen=True)
class _Stage:
    """Capture → thresholds → unit masks → top images of a run's layers, here or on Ray;
    each gives (layer, its units, the directory of its unit masks) layer by layer."""

    layers: list[str]
    size: tuple[int, int]
    quantile: float
    thresholds: str
    ranges: int | None
    ranges_method: str
    upsample: str
    top_k: int
    work: Path
    timings: dict[str, float]
    progress: bool

    def here(
        self,
        model: Any,
        images: Any,
        store: ConceptStore,
        transform: Callable[..., Any] | None,
        batch_size: int,
        units: Callable[[Any], Any] | None,
        device: Any,
        workers: int,
    ) -> Iterator[tuple[str, LayerUnits | LayerRanges, Path]]:
        """In this process: activations streamed to ``work/activations``, then each
        layer's units (or activation ranges) read from them block by block."""
        t0 = time.perf_counter()
        activations = capture(
            model,
            self.layers,
            images,
            batch_size=batch_size,
            transform=transform,
            device=device,
            workers=workers,
            units=units,
            out=self.work / ACTIVATIONS,
            progress=self.progress,
        )
        check_image_count(next(iter(activations.values())).shape[0], store)
        self.timings["capture"] = time.perf_counter() - t0
        for layer, layer_activations in activations.items():
            t0 = time.perf_counter()
            path = self.work / UNITS / layer_dir_name(layer)
            found: LayerUnits | LayerRanges
            if self.ranges is None:
                found = layer_units(
                    layer_activations,
                    self.size,
                    quantile=self.quantile,
                    thresholds=self.thresholds,
                    top_k=self.top_k,
                    upsample=self.upsample,
                    path=path,
                    progress=self.progress,
                )
            else:
                found = layer_ranges(
                    layer_activations,
                    self.size,
                    self.ranges,
                    ranges_method=self.ranges_method,
                    upsample=self.upsample,
                    top_k=self.top_k,
                    path=path,
                    progress=self.progress,
                )
            self.timings[f"units {layer}"] = time.perf_counter() - t0
            yield layer, found, path

    def on_ray(
        self,
        factory: Callable[[], Any],
        files: list[Path],
        transform: Callable[..., Any] | None,
        batch_size: int,
        units: Callable[[Any], Any] | None,
        device: Any,
        backend: RayBackend,
    ) -> Iterator[tuple[str, LayerUnits, Path]]:
        """On a Ray cluster: parts of the images captured and masked on the workers
        (in ``work/parts``, which every node must see), merged exactly."""
        t0 = time.perf_counter()
        if device is None and backend.connect().cluster_resources().get("GPU", 0):
            device = "cuda"  # the workers' GPUs (this machine may have none)
        found = layer_units_on_ray(
            factory,
            self.layers,
            files,
            size=self.size,
            transform=transform,
            batch_size=batch_size,
            quantile=self.quantile,
            top_k=self.top_k,
            upsample=self.upsample,
            units=units,
            device=device,
            backend=backend,
            parts_dir=self.work / "parts",
            masks_dir=self.work / "ray-units",
            progress=self.progress,
        )
        self.timings["capture and unit masks (ray)"] = time.perf_counter() - t0
        for layer in self.layers:
            yield layer, found[layer], self.work / "ray-units" / layer


def _explain_layers(
    found: Iterable[tuple[str, LayerUnits | LayerRanges, Path]],
    store: ConceptStore,
    settings: SearchSettings,
    timings: dict[str, float],
    progress: bool,
    backend: Any,
) -> _Layers:
    """Explain every layer's units (the whole final beam), keeping their top images and
    where their unit masks are."""
    done = _Layers()
    for layer, units, path in found:
        t0 = time.perf_counter()
        if isinstance(units, LayerRanges):
            beam = explain_ranges(
                units.masks,
                units.ranges,
                store,
                settings=settings,
                full_beam=True,
                progress=progress,
                backend=backend,
            )
            method = {"ranges_method": units.ranges_method}
        else:
            beam = explain(
                units.masks, store, settings, full_beam=True, progress=progress, backend=backend
            )
            units.masks.release_pages()  # read from disk again if needed (the report)
            beam["threshold"] = units.thresholds[beam["unit"].to_numpy()]
            method = {"threshold_method": units.threshold_method}
        store.release_pages()
        beam.insert(0, "layer", layer)
        timings[f"explain {layer}"] = time.perf_counter() - t0
        best = best_of_beam(beam)
        done.tables.append(best)
        done.beams.append(beam)
        done.masks[layer] = units.masks
        done.mask_dirs[layer] = path
        done.tops[layer] = units.top_images
        done.stats[layer] = {
            "units": int(units.top_images.shape[0]),
            "map_size": list(units.map_size),
            **method,
            "mean_iou": float(best["iou"].mean()),
            "explained_units": int(best["formula"].notna().sum()),
        }
    return done


def _write_layers(staging: Path, done: _Layers, store: ConceptStore | None) -> None:
    """The unit masks (moved from the work directory) and top images of every layer (and
    the store, when given)."""
    (staging / UNITS).mkdir()
    for layer, path in done.mask_dirs.items():
        os.replace(path, staging / UNITS / layer_dir_name(layer))
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
    title: str,
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
        title=title,
    )
