"""A complete dissection run written to a directory: the demo and ``pyneuron dissect``.

Layout of a run directory::

    results.parquet / results.csv   one row per (layer, unit): formula, metrics, threshold
    beam.parquet / beam.csv         the whole final beam of every unit
    summary.json                    versions, timings, grid, concept source, per-layer stats
    config.toml                     the resolved configuration (provenance)
    units/<layer>/                  the unit masks (a pyneuron store directory)
    top_images.npz                  per layer, the top activating images of each unit
    concepts/                       the concept store, when it was built for the run
    model.pt                        the model's weights, when the run saves them (the demo)
    descriptions.parquet            label-free descriptions shown by the report, if any
    report/index.html               the HTML report
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .activations import capture
from .atomic import OutputKind
from .dissect import explain_activations
from .errors import PyneuronError
from .results import BEAM, CONFIG, NULL, read_results, refuse_existing, versions, write_run
from .search import best_of_beam
from .store import ConceptStore

if TYPE_CHECKING:
    from .demo import DemoConfig, DemoData

TOP_IMAGES = "top_images.npz"
#: The model's weights (state dict), in runs that save it (the demo).
MODEL_FILE = "model.pt"
#: A run's report directory (rewritten by ``pyneuron report`` and ``evaluate``).
REPORT_KIND = OutputKind("pyneuron report", lambda path: (path / "index.html").is_file())


def layer_dir_name(layer: str) -> str:
    """A file-system-safe directory name for a layer."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", layer) or "_root"


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
            from .report import write_report

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


def image_reader(files: Sequence[Path], store: ConceptStore) -> Callable[[int], np.ndarray]:
    """Image ``i`` of ``files`` as uint8 RGB resized to the store's grid (for reports)."""
    from PIL import Image

    size = (store.grid.width, store.grid.height)

    def read(i: int) -> np.ndarray:
        with Image.open(files[i]) as image:
            return np.asarray(image.convert("RGB").resize(size, Image.BILINEAR))

    return read


def read_config(run: str | os.PathLike[str]) -> dict[str, Any]:
    """The resolved configuration (``config.toml``) of a run directory."""
    import tomllib

    path = Path(run) / CONFIG
    if not path.is_file():
        raise PyneuronError(f"{run} is not a pyneuron run ({CONFIG} is missing)")
    return tomllib.loads(path.read_text())


def open_run_store(run: str | os.PathLike[str], settings: Mapping[str, Any]) -> ConceptStore:
    """The concept store of a run: its own copy, the store its config names, or for a
    demo run its synthetic store (never saved), regenerated from the seed in its config."""
    run = Path(run)
    if (run / "concepts").is_dir():
        return ConceptStore.open(run / "concepts")
    if "demo" in settings:
        return _demo_data(settings).store
    if "concepts" not in settings:
        raise PyneuronError(f"{run} has no concept store and its config names none")
    return ConceptStore.open(settings["concepts"])


def run_sources(
    run: Path, settings: Mapping[str, Any], images: str | os.PathLike[str] | None
) -> tuple[ConceptStore, Callable[[int], np.ndarray]]:
    """The concept store and image reader of a run; a demo run's synthetic data (never
    saved) are regenerated from the seed in its config."""
    if "demo" in settings and images is None:
        data = _demo_data(settings)
        return data.store, lambda i: data.images[i]
    store = open_run_store(run, settings)
    files = run_image_files(settings, images)
    if images is not None:
        from .sources import check_image_order

        check_image_order(store, files)
    return store, image_reader(files, store)


def run_file(run: Path, value: str | None) -> Path | None:
    """A file named in a run's config: relative names are files of the run directory (the
    demo's ``model.pt``); absolute ones are taken as they are."""
    if value is None:
        return None
    path = Path(value)
    return path if path.is_absolute() else run / path


def demo_model_inputs(settings: Mapping[str, Any]) -> np.ndarray:
    """The images a demo run's model saw, regenerated from its config: float32
    (N, 3, H, W) in [0, 1]."""
    from .demo import model_inputs

    return model_inputs(_demo_data(settings))


def _demo_data(settings: Mapping[str, Any]) -> DemoData:
    """A demo run's synthetic data, regenerated from its config (the last one is kept,
    so a command that needs the store and then the images builds them once)."""
    from .demo import DemoConfig

    return _make_demo_data(DemoConfig(**settings["demo"]))


@functools.lru_cache(maxsize=1)
def _make_demo_data(config: DemoConfig) -> DemoData:
    from .demo import make_data

    return make_data(config, progress=False)


def run_image_files(
    settings: Mapping[str, Any], images: str | os.PathLike[str] | None
) -> list[Path]:
    """The probing images of a run: ``images`` (a folder) or the list in its config."""
    from .activations import list_images

    if images is not None:
        return list_images(images)
    if "image_files" not in settings:
        raise PyneuronError("the run's config lists no image files; pass the image folder")
    return [Path(f) for f in settings["image_files"]]


def write_run_report(
    run: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    descriptions: pd.DataFrame | None = None,
    progress: bool = True,
) -> Path:
    """(Re)write ``run/report`` from the run's files.

    The report shows the results, unit masks, top images, beam, the ``null`` control
    units when ``pyneuron evaluate`` wrote them, and the label-free descriptions last
    given. The old report is replaced in one atomic step once the new one is complete
    (see :mod:`pyneuron.atomic`).

    Parameters
    ----------
    run
        A run directory of ``pyneuron dissect``, ``demo`` or ``explain``.
    images
        The folder of probing images (default: the run's own list). A run of
        ``pyneuron explain`` lists none: without ``images`` its report shows the masks
        on grey.
    descriptions
        Label-free descriptions (``pyneuron describe`` results) to show next to the
        formulas. They are kept in ``run/descriptions.parquet``, so later rewrites
        (``pyneuron evaluate``, ``pyneuron report`` without ``--describe``) show them
        too; an empty table removes them. ``None`` shows the kept ones, if any.
    progress
        Show progress.

    Returns
    -------
    pathlib.Path
        The report's ``index.html``.

    Notes
    -----
    A run of ``pyneuron explain`` holds no unit masks, top images or concepts of its
    own: the unit masks and the concept store are read from the ``units`` and
    ``concepts`` paths of its ``config.toml``, and each unit's top images are those
    where its mask covers the most pixels (there are no activations to rank them).
    """
    import shutil

    from .activations import list_images
    from .atomic import commit_directory, temporary_sibling
    from .describe import compare
    from .report import write_report
    from .units import UnitMasks

    run = Path(run)
    results = read_results(run)
    settings = read_config(run)
    kept = run / "descriptions.parquet"
    given = descriptions is not None
    if descriptions is None and kept.is_file():
        descriptions = pd.read_parquet(kept)
    shown = descriptions if descriptions is not None and len(descriptions) else None

    def configured(key: str, what: str) -> Path:
        """A path the run's config names (``pyneuron explain`` runs), checked to exist."""
        if key not in settings:
            raise PyneuronError(f"{run} holds no {what} and its config.toml names none")
        path = Path(settings[key])
        if not path.exists():
            raise PyneuronError(
                f"{run} holds no {what} of its own and the path its config.toml names "
                f"({key} = {str(path)!r}) does not exist (a relative path is read from the "
                f"current directory): run `pyneuron report` from the directory where the "
                f"run was made, or set {key} in {run / CONFIG} to the {what}"
            )
        return path

    if "layer" not in results.columns:  # `pyneuron explain`: one set of unit masks
        units_path = configured("units", "unit masks")
        name = units_path.resolve().name or "units"
        results = results.copy()
        results.insert(0, "layer", name)
        masks = {name: UnitMasks.open(units_path)}
    else:
        masks = {}
        for layer in dict.fromkeys(results["layer"]):
            path = run / "units" / layer_dir_name(layer)
            if not path.is_dir():
                raise PyneuronError(f"{path} is missing: the unit masks of layer {layer!r}")
            masks[layer] = UnitMasks.open(path)
    layers = list(masks)
    if "demo" not in settings and not (run / "concepts").is_dir():
        configured("concepts", "concept store")
    if images is not None or "demo" in settings or "image_files" in settings:
        store, image_source = run_sources(run, settings, images)
        found = len(list_images(images)) if images is not None else store.grid.n_images
        if found != store.grid.n_images:
            raise PyneuronError(
                f"{images} holds {found} images but the run's concepts cover "
                f"{store.grid.n_images}; pass the folder of the run's probing images"
            )
    else:  # no images known: the report draws the masks on grey
        store, image_source = open_run_store(run, settings), None
    tops = load_top_images(run)
    beam_path = run / f"{BEAM}.parquet"
    null_path = run / f"{NULL}.parquet"
    staging = temporary_sibling(run / "report")
    saving = (
        kept.with_name(f".{kept.name}.tmp-{os.getpid()}") if given and shown is not None else None
    )
    try:
        write_report(
            staging,
            results,
            store,
            unit_masks=masks,
            images=image_source,
            top_images={
                layer: tops[layer_dir_name(layer)]
                for layer in layers
                if layer_dir_name(layer) in tops
            },
            beam=pd.read_parquet(beam_path) if beam_path.exists() else None,
            descriptions=shown,
            null=pd.read_parquet(null_path) if null_path.exists() else None,
            progress=progress,
            iou=settings.get("iou", "dataset"),
        )
        if shown is not None:
            compare(results, shown).to_csv(staging / "comparison.csv", index=False)
        if saving is not None:
            shown.to_parquet(saving, index=False)
        commit_directory(staging, run / "report", True, REPORT_KIND)
        if saving is not None:
            os.replace(saving, kept)
        elif given:
            kept.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if saving is not None:
            saving.unlink(missing_ok=True)
    return run / "report" / "index.html"


def load_top_images(run: str | os.PathLike[str]) -> Mapping[str, np.ndarray]:
    """Per layer directory name, the (units, k) top activating image ids of a run; empty
    for runs without activations (``pyneuron explain``), whose report picks the images
    where each unit's mask covers the most pixels."""
    path = Path(run) / TOP_IMAGES
    if not path.is_file():
        return {}
    with np.load(path) as data:
        return {name: data[name] for name in data.files}
