"""Run directories: the one module that reads and writes them.

Layout of a run directory::

    results.parquet / results.csv   one row per (layer, unit): formula, metrics, threshold
    beam.parquet / beam.csv         the whole final beam of every unit
    summary.json                    versions, timings, grid, concept source, per-layer stats
    config.toml                     the resolved configuration (provenance)
    units/<layer>/                  the unit masks (a pyneuron store directory)
    top_images.npz                  per layer, the top activating images of each unit
    activations/<layer>.npy         the activations, when the run keeps them
    concepts/                       the concept store, when it was built for the run
    model.pt                        the model's weights, when the run saves them (the demo)
    descriptions.parquet            label-free descriptions shown by the report, if any
    report/index.html               the HTML report
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..engine import atomic
from ..engine.atomic import OutputKind, commit_directory, temporary_sibling
from ..engine.store import ConceptStore
from ..errors import PyneuronError

if TYPE_CHECKING:
    from ..concepts.synthetic import DemoConfig, DemoData


RESULTS = "results"
BEAM = "beam"
NULL = "null"
SUMMARY = "summary.json"
CONFIG = "config.toml"


def _is_run(path: Path) -> bool:
    return (path / SUMMARY).is_file() and (path / CONFIG).is_file()


#: A run directory (``dissect``, ``explain``, ``describe``, the demo): what ``--overwrite``
#: may replace.
RUN_KIND = OutputKind("pyneuron run directory", _is_run)


def versions() -> dict[str, str]:
    """Versions of pyneuron and the libraries a run depends on."""
    import numpy

    from .. import __version__
    from ..engine import num_threads, simd_level

    found = {
        "pyneuron": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "simd": simd_level(),
        "threads": str(num_threads()),
    }
    try:
        import torch

        found["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return found


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise PyneuronError(f"cannot write {type(value).__name__} values to TOML")


def to_toml(config: Mapping[str, Any]) -> str:
    """Render a config (scalars, lists, nested tables; ``None`` values are left out) as TOML."""
    lines: list[str] = []

    def table(path: list[str], mapping: Mapping[str, Any]) -> None:
        if path:
            lines.extend(["", "[" + ".".join(json.dumps(part) for part in path) + "]"])
        for key, value in mapping.items():
            if value is not None and not isinstance(value, Mapping):
                lines.append(f"{json.dumps(str(key))} = {_toml_value(value)}")
        for key, value in mapping.items():
            if isinstance(value, Mapping):
                table([*path, str(key)], value)

    table([], config)
    return "\n".join(lines) + "\n"


def write_run(
    out: str | os.PathLike[str],
    results: pd.DataFrame,
    *,
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    beam: pd.DataFrame | None = None,
    extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a run directory atomically: tables, ``summary.json``, ``config.toml``, and
    whatever ``extra(staging_dir)`` adds (unit masks, the report) before the summary
    is written.

    Raises
    ------
    OutputExistsError
        If ``out`` exists and ``overwrite`` is false, or ``out`` holds anything but an
        earlier run directory (checked before anything is written).
    """
    out = Path(out)
    refuse_existing(out, overwrite)
    staging = temporary_sibling(out)
    try:
        results.to_parquet(staging / f"{RESULTS}.parquet", index=False)
        results.to_csv(staging / f"{RESULTS}.csv", index=False)
        if beam is not None:
            beam.to_parquet(staging / f"{BEAM}.parquet", index=False)
            beam.to_csv(staging / f"{BEAM}.csv", index=False)
        if extra is not None:
            extra(staging)  # may still complete the summary
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
        (staging / CONFIG).write_text(to_toml(config))
        commit_directory(staging, out, overwrite, RUN_KIND)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Raise if ``out`` cannot take a run: it holds anything and ``overwrite``
    (``--overwrite``) is false, or it holds something other than a run directory."""
    atomic.refuse_existing(out, overwrite, RUN_KIND, "--overwrite")


def read_results(run: str | os.PathLike[str]) -> pd.DataFrame:
    """The results table of a run directory."""
    atomic.recover(run)
    path = Path(run) / f"{RESULTS}.parquet"
    if not path.is_file():
        raise PyneuronError(f"{run} holds no pyneuron results ({path.name} is missing)")
    return pd.read_parquet(path)


TOP_IMAGES = "top_images.npz"
#: A run's unit masks, one store directory per layer.
UNITS = "units"
#: A run's activations (one ``<layer>.npy`` per layer), in its work directory and, when
#: kept, in the run.
ACTIVATIONS = "activations"
#: The model's weights (state dict), in runs that save it (the demo).
MODEL_FILE = "model.pt"
#: A run's report directory (rewritten by ``pyneuron report`` and ``evaluate``).
REPORT_KIND = OutputKind("pyneuron report", lambda path: (path / "index.html").is_file())


def work_dir(out: str | os.PathLike[str]) -> Path:
    """Where a run being written to ``out`` keeps its activations and unit masks until
    it is complete: ``OUT.partial`` next to it (kept when the run is interrupted, so a
    rerun resumes; removed once the run is written).

    Examples
    --------
    >>> work_dir("runs/resnet").name
    'resnet.partial'
    """
    out = Path(out)
    return out.with_name(f"{out.name}.partial")


def layer_dir_name(layer: str) -> str:
    """A file-system-safe directory name for a layer."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", layer) or "_root"


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
    return ConceptStore.open(configured_path(run, settings, "concepts", "concept store"))


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
        from ..concepts.sources import check_image_order

        if len(files) != store.grid.n_images:
            raise PyneuronError(
                f"{images} holds {len(files)} images but the run's concepts cover "
                f"{store.grid.n_images}; pass the folder of the run's probing images"
            )
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
    from ..concepts.synthetic import model_inputs

    return model_inputs(_demo_data(settings))


def _demo_data(settings: Mapping[str, Any]) -> DemoData:
    """A demo run's synthetic data, regenerated from its config (the last one is kept,
    so a command that needs the store and then the images builds them once)."""
    from ..concepts.synthetic import DemoConfig

    return _make_demo_data(DemoConfig(**settings["demo"]))


@functools.lru_cache(maxsize=1)
def _make_demo_data(config: DemoConfig) -> DemoData:
    from ..concepts.synthetic import make_data

    return make_data(config, progress=False)


def run_image_files(
    settings: Mapping[str, Any], images: str | os.PathLike[str] | None
) -> list[Path]:
    """The probing images of a run: ``images`` (a folder) or the list in its config."""
    from ..image_files import list_images

    if images is not None:
        return list_images(images)
    if "image_files" not in settings:
        raise PyneuronError("the run's config lists no image files; pass the image folder")
    return [Path(f) for f in settings["image_files"]]


def configured_path(run: Path, settings: Mapping[str, Any], key: str, what: str) -> Path:
    """A path a run's config names (the inputs of ``pyneuron explain`` runs), checked to
    exist."""
    if key not in settings:
        raise PyneuronError(f"{run} holds no {what} and its config.toml names none")
    path = Path(settings[key])
    if not path.exists():
        raise PyneuronError(
            f"{run} holds no {what} of its own and the path its config.toml names "
            f"({key} = {str(path)!r}) does not exist (a relative path is read from the "
            f"current directory): run the command from the directory where the run was "
            f"made, or set {key} in {run / CONFIG} to the {what}"
        )
    return path


def run_unit_masks(
    run: Path, results: pd.DataFrame, settings: Mapping[str, Any]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A run's results with a ``layer`` column, and its unit masks by layer: a dissect
    run's own ``units/<layer>`` (for activation ranges, a list of ``units/<layer>/range<k>``
    by range index), or the unit masks a ``pyneuron explain`` run was given
    (its config's ``units``; runs written before explain runs had a layer column get
    the name of that folder)."""
    from ..engine.units import UnitMasks

    if "layer" not in results.columns:
        name = configured_path(run, settings, "units", "unit masks").resolve().name or "units"
        results = results.copy()
        results.insert(0, "layer", name)
    masks: dict[str, Any] = {}
    for layer in dict.fromkeys(results["layer"]):
        path = run / UNITS / layer_dir_name(layer)
        if not path.is_dir() and "units" in settings:
            path = configured_path(run, settings, "units", "unit masks")
        if not path.is_dir():
            raise PyneuronError(f"{path} is missing: the unit masks of layer {layer!r}")
        if "range" in results.columns:  # activation ranges: one set per range index
            n_ranges = int(results.loc[results["layer"] == layer, "range"].max()) + 1
            masks[layer] = [UnitMasks.open(path / f"range{k}") for k in range(n_ranges)]
        else:
            masks[layer] = UnitMasks.open(path)
    return results, masks


def report_title(config: Mapping[str, Any]) -> str:
    """The title of a run's report: it names the run's preset, if any.

    Examples
    --------
    >>> report_title({"preset": "ovce"})
    'pyneuron report (preset: ovce)'
    """
    preset = config.get("preset")
    return "pyneuron report" + (f" (preset: {preset})" if preset else "")


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
    (see :mod:`pyneuron.engine.atomic`).

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

    from ..describe import compare
    from ..engine.atomic import commit_directory, temporary_sibling, write_atomically
    from ..report import write_report

    run = Path(run)
    results = read_results(run)
    settings = read_config(run)
    kept = run / "descriptions.parquet"
    given = descriptions is not None
    if descriptions is None and kept.is_file():
        descriptions = pd.read_parquet(kept)
    shown = descriptions if descriptions is not None and len(descriptions) else None

    results, masks = run_unit_masks(run, results, settings)
    layers = list(masks)
    if images is not None or "demo" in settings or "image_files" in settings:
        store, image_source = run_sources(run, settings, images)
    else:  # no images known: the report draws the masks on grey
        store, image_source = open_run_store(run, settings), None
    tops = load_top_images(run)
    beam_path = run / f"{BEAM}.parquet"
    null_path = run / f"{NULL}.parquet"
    staging = temporary_sibling(run / "report")
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
            title=report_title(settings),
        )
        if shown is not None:
            compare(results, shown).to_csv(staging / "comparison.csv", index=False)
        # serialised before the report is committed, saved after it
        saved = shown.to_parquet(index=False) if given and shown is not None else None
        commit_directory(staging, run / "report", True, REPORT_KIND)
        if saved is not None:
            write_atomically(kept, lambda p: p.write_bytes(saved))
        elif given:
            kept.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
