"""The ``pyneuron`` command.

Every option can also come from a TOML file given with ``--config`` (keys are the
option names, dashes or underscores); options on the command line win. Errors print
one line and exit with status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar

import typer

from ..errors import PyneuronError

app = typer.Typer(
    name="pyneuron",
    help="Explain what every unit of a vision network detects, as formulas over concepts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(help="Build and inspect concept stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")

F = TypeVar("F", bound=Callable[..., Any])
# typer >= 0.29 vendors click: take ClickException from typer's own BadParameter.
CLICK_EXCEPTION = typer.BadParameter.__mro__[2]


# -- shared options ----------------------------------------------------------------------


def _load_config(ctx: typer.Context, _param: Any, value: Path | None) -> Path | None:
    """Eager callback: options from a TOML file become the command's defaults."""
    if value is None:
        return value
    try:
        data = tomllib.loads(Path(value).read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise typer.BadParameter(f"cannot read config {value}: {error}") from None
    known = {p.name for p in ctx.command.params if p.name}
    defaults = {}
    for key, item in data.items():
        name = key.replace("-", "_")
        if name not in known:
            raise typer.BadParameter(f"unknown option {key!r} in {value}")
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML file with option values.",
        is_eager=True,
        callback=_load_config,
        exists=True,
        dir_okay=False,
    ),
]
# metavar="": flags take no value (typer would show "<bool>").
DebugOption = Annotated[
    bool, typer.Option("--debug", help="Show tracebacks on errors.", metavar="")
]
OverwriteOption = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an earlier output of the same kind at the output path (never other files).",
        metavar="",
    ),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.", metavar="")]
LengthOption = Annotated[
    int,
    typer.Option(
        help="Maximum concepts per formula (the results' `concepts` column; their `length` "
        "column is compexp's length, which counts each NOT once more). 1: NetDissect."
    ),
]
IouOption = Annotated[
    str,
    typer.Option(
        "--iou",
        help="IoU: 'dataset' (over all pixels, compexp) or 'netdissect' (NetDissect-Lite's "
        "category-restricted IoU; needs --length 1).",
    ),
]
BeamOption = Annotated[int, typer.Option("--beam", help="Beam size.")]
OperatorsOption = Annotated[
    str, typer.Option(help="Comma-separated operators: OR, AND, AND NOT, OR NOT.")
]
SearchOption = Annotated[
    str,
    typer.Option(help="beam (compexp's beam search) or optimal (guaranteed best formula)."),
]
TimeLimitOption = Annotated[
    float | None, typer.Option(help="Optimal search: seconds per unit (default: none).")
]
MaxNodesOption = Annotated[
    int | None, typer.Option(help="Optimal search: expanded nodes per unit (default: none).")
]

#: The search options of `dissect` and `explain`, declared once: (CLI name, field of
#: SearchSettings, option). Their defaults are SearchSettings'; run configs record them
#: under their CLI names, so a run's config.toml can be given back with --config.
SEARCH_OPTIONS = (
    ("length", "length", LengthOption),
    ("beam", "beam_size", BeamOption),
    ("operators", "operators", OperatorsOption),
    ("search", "search", SearchOption),
    ("time_limit", "time_limit", TimeLimitOption),
    ("max_nodes", "max_nodes", MaxNodesOption),
    ("iou", "mode", IouOption),
)


def search_options(command: F) -> F:
    """Give ``command`` the search options of :data:`SEARCH_OPTIONS` in place of its
    ``settings`` parameter, which receives them as one checked ``SearchSettings``."""
    from ..engine.settings import SearchSettings

    defaults = SearchSettings()
    signature = inspect.signature(command, eval_str=True)
    names = list(signature.parameters)
    at = names.index("settings")
    added = [
        inspect.Parameter(
            cli,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            annotation=option,
            default=_option_value(getattr(defaults, field)),
        )
        for cli, field, option in SEARCH_OPTIONS
    ]
    kept = list(signature.parameters.values())
    parameters = [*kept[:at], *added, *kept[at + 1 :]]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {field: kwargs.pop(cli) for cli, field, _ in SEARCH_OPTIONS}
        values["operators"] = _operators(values["operators"])
        return command(*args, settings=SearchSettings(**values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


def _option_value(value: Any) -> Any:
    """A setting as its CLI option writes it (operators comma-separated)."""
    return ",".join(value) if isinstance(value, tuple) else value


def search_config(settings: Any) -> dict[str, Any]:
    """The search settings under their CLI names, for a run's config.toml."""
    return {cli: _option_value(getattr(settings, field)) for cli, field, _ in SEARCH_OPTIONS}


RayOption = Annotated[
    str | None,
    typer.Option(
        "--ray",
        help="Run the search on Ray: 'auto' (the running cluster), 'local' (this machine) "
        "or the cluster's ADDRESS. Finished shards are kept in OUT.shards/ until the run "
        "is written, so rerunning an interrupted run computes only the missing ones.",
    ),
]


@contextlib.contextmanager
def _quiet_libraries(quiet: bool) -> Iterator[None]:
    """With ``-q``, also hide the progress bars and notices of transformers and
    huggingface_hub (weight loading, downloads) while the command runs.

    Before transformers is imported its switches are environment variables (read at
    import); once imported, its logging functions. Both are restored afterwards.
    """
    if not quiet:
        yield
        return
    names = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    saved = {name: os.environ.get(name) for name in names}
    imported = "transformers" in sys.modules
    restore = _silence_transformers() if imported else None
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if restore is not None:
            restore()


def _silence_transformers() -> Callable[[], None]:
    """Hide transformers' bars and notices; returns the function that restores them."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    def restore() -> None:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

    return restore


def friendly_errors(command: F) -> F:
    """Turn expected errors into one line on stderr and exit status 1 (unless --debug)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _quiet_libraries(bool(kwargs.get("quiet"))):
                return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, CLICK_EXCEPTION):
            raise
        except Exception as error:
            if kwargs.get("debug"):
                raise
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _operators(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


class _Chosen(NamedTuple):
    """The options of a dissection once a preset is applied."""

    values: dict[str, Any]
    settings: Any  # SearchSettings
    preset: dict[str, Any] | None  # what the run records (None: no preset)


def _with_preset(ctx: typer.Context, name: str | None, settings: Any, **values: Any) -> _Chosen:
    """``values`` and the search ``settings`` with preset ``name``'s settings in place of
    the options left at their defaults (an option on the command line or in --config
    wins over the preset's, and is recorded as an override)."""
    if name is None:
        return _Chosen(values, settings, None)
    from ..engine.settings import SearchSettings
    from ..presets import get_preset

    preset = get_preset(name)
    fields = {field: cli for cli, field, _ in SEARCH_OPTIONS}
    given = {**values, **{field: getattr(settings, field) for field in fields}}
    options = {**{name: name for name in values}, **fields}
    explicit = {key for key, option in options.items() if _given(ctx, option)}
    resolved, overrides = preset.apply(given, explicit)
    search = SearchSettings(**{field: resolved.pop(field) for field in fields})
    return _Chosen(resolved, search, preset.summary(overrides))


def _given(ctx: typer.Context, option: str) -> bool:
    """Whether ``option`` was given (on the command line, in --config or the environment)."""
    source = ctx.get_parameter_source(option)  # typer's own click: compare by name
    return source is not None and source.name != "DEFAULT"


def _backend(ray: str | None, out: Path) -> Any:
    """The search backend of a command writing ``out``: local, or Ray with shards in
    ``OUT.shards/``."""
    if ray is None:
        return "local"
    from ..scale.ray import RayBackend, run_shard_dir

    return RayBackend(address=ray, shard_dir=run_shard_dir(out))


def _drop_shards(ray: str | None, out: Path) -> None:
    """Remove the shards of a Ray run once its directory is written."""
    if ray is not None:
        import shutil

        from ..scale.ray import run_shard_dir

        shutil.rmtree(run_shard_dir(out), ignore_errors=True)


# -- commands ----------------------------------------------------------------------------


@app.command()
@friendly_errors
def info(debug: DebugOption = False) -> None:
    """Show the version, SIMD level and threads of the engine."""
    import pyneuron

    typer.echo(f"pyneuron {pyneuron.__version__}")
    levels = ", ".join(pyneuron.available_simd_levels())
    typer.echo(f"SIMD level: {pyneuron.simd_level()} (available: {levels})")
    typer.echo(f"threads: {pyneuron.num_threads()}")


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("pyneuron-demo"),
    images: Annotated[int, typer.Option(help="Synthetic images.")] = 2000,
    size: Annotated[int, typer.Option(help="Image side (also the concept grid).")] = 48,
    epochs: Annotated[int, typer.Option(help="Training epochs of the small CNN.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: OverwriteOption = False,
    quiet: QuietOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Run the built-in demo: synthetic data, a small CNN, explanations and a report."""
    from ..concepts.synthetic import DemoConfig
    from .demo import run_demo

    summary = run_demo(
        out, DemoConfig(images, size, epochs, seed), overwrite=overwrite, progress=not quiet
    )
    _print_best(out)
    typer.echo(
        f"\nCNN train accuracy {summary['train_accuracy']:.2f}; "
        f"total {summary['total_seconds']:.0f} s"
    )
    typer.echo(f"report: {Path(summary['report']).resolve()}")


def _print_best(run: Path, n: int = 10) -> None:
    from .rundir import read_results

    table = read_results(run)
    best = table.dropna(subset=["formula"]).sort_values("iou", ascending=False).head(n)
    typer.echo(f"\nbest-explained units ({len(table)} units in {table['layer'].nunique()} layers):")
    for row in best.itertuples():
        typer.echo(f"  {row.layer:>12} unit {row.unit:<4} IoU {row.iou:.3f}  {row.formula}")


ConceptsOption = Annotated[
    Path,
    typer.Option(
        help="Concept store directory, Broden folder, concept list file (.txt/.toml) or "
        "concept set (set:ade20k-150, set:coco-stuff, set:pascal-context-459, set:imagenet, "
        "set:cub-200, set:common-words:N, set:broden:DIR; `pyneuron concept-sets` lists "
        "them), segmented with --segmenter."
    ),
]
GridOption = Annotated[int, typer.Option(help="Concept grid side for built stores.")]
SubsetOption = Annotated[
    str | None, typer.Option(help="Broden: keep images of this source (e.g. ade20k).")
]
CategoryOption = Annotated[
    list[str] | None, typer.Option("--category", help="Broden: category to read (repeat).")
]
SegmenterOption = Annotated[
    str | None,
    typer.Option(
        help="clipseg:MODEL, grounding-dino:DET,SAM, owlv2:DET,SAM or sam3:MODEL "
        "(model ids from the local cache, or directories)."
    ),
]


DeviceOption = Annotated[
    str | None,
    typer.Option(
        help="Where the model and the segmenter run: cpu, cuda, cuda:N or mps "
        "(default: cuda if present)."
    ),
]
DtypeOption = Annotated[
    str | None,
    typer.Option(
        help="Segmenter precision: float32, float16 or bfloat16 (default: float16 on CUDA, "
        "else float32)."
    ),
]
WorkersOption = Annotated[
    int, typer.Option(min=0, help="Processes decoding images ahead of the model (0: none).")
]
UnitsOption = Annotated[
    str | None,
    typer.Option(
        help="'module:function' or 'file.py:function' mapping a layer's activations "
        "(B, C, h, w) to the units to explain (an SAE encoder, directions); default: channels."
    ),
]
ThresholdsOption = Annotated[
    str,
    typer.Option(
        help="auto (exact unless it needs > 1 GiB), exact (exact quantile) or compexp "
        "(compexp's streaming estimator)."
    ),
]
PresetOption = Annotated[
    str | None,
    typer.Option(
        help="Settings of a published method: ovce (5 KMeans ranges) or ovce-classic "
        "(top-1 % thresholds). Options given as well win (listed in the summary).",
    ),
]
SemanticsOption = Annotated[
    str,
    typer.Option(
        help="Segmentation of concept lists: pyneuron (one segmenter call per image, scores "
        "resized to the grid, then argmax) or ovce (one call per group, argmax at the "
        "segmenter's resolution, nearest resize).",
    ),
]
RangesOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Explain K activation ranges per unit (KMeans over its non-zero activations; "
        "OVCE: 5) instead of one top-quantile threshold.",
    ),
]
RangesMethodOption = Annotated[
    str,
    typer.Option(
        help="KMeans of --ranges: pyneuron (deterministic 1-D Lloyd's) or sklearn "
        "(scikit-learn's KMeans(random_state=0), as OVCE).",
    ),
]
UpsampleOption = Annotated[
    str,
    typer.Option(
        help="Unit maps to the grid: pillow (Pillow's bilinear, compexp/NetDissect) or torch "
        "(torch.nn.functional.interpolate bilinear, OVCE).",
    ),
]
KeepActivationsOption = Annotated[
    bool,
    typer.Option(
        "--keep-activations", help="Keep the activations in the run (activations/).", metavar=""
    ),
]


@app.command()
@friendly_errors
@search_options
def dissect(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Option(
            help="A transformers model directory, 'module:function' "
            "or 'file.py:function' returning a model, or a "
            "torchvision model name (with --weights)."
        ),
    ],
    layer: Annotated[list[str], typer.Option(help="Layer name (repeat for several).")],
    concepts: ConceptsOption,
    out: Annotated[Path, typer.Option(help="Output directory.")],
    images: Annotated[
        Path | None,
        typer.Option(help="Folder of probing images (sorted by path); not needed for Broden."),
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="State-dict file for the model.")] = None,
    image_size: Annotated[int, typer.Option(help="Input resize (ImageNet normalization).")] = 224,
    grid: GridOption = 112,
    subset: SubsetOption = None,
    category: CategoryOption = None,
    segmenter: SegmenterOption = None,
    settings: Any = None,  # the search options (search_options)
    quantile: Annotated[float, typer.Option(help="Top activation quantile per unit.")] = 0.005,
    thresholds: ThresholdsOption = "auto",
    ranges: RangesOption = None,
    ranges_method: RangesMethodOption = "pyneuron",
    upsample: UpsampleOption = "pillow",
    semantics: SemanticsOption = "pyneuron",
    preset: PresetOption = None,
    units: UnitsOption = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    workers: WorkersOption = 0,
    keep_activations: KeepActivationsOption = False,
    report: Annotated[
        bool,
        typer.Option(
            "--report/--no-report",
            help="Write the HTML report (a fixed cost per unit; `pyneuron report RUN` writes "
            "it later).",
        ),
    ] = True,
    ray: RayOption = None,
    overwrite: OverwriteOption = False,
    quiet: QuietOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Dissect layers of a model on a concept source; writes results and a report.

    Activations stream to OUT.partial/ next to the run (resumed by a rerun, removed
    once the run is written), so memory stays flat whatever the number of images.
    With --ray, segmentation, capture, unit masks and the search run on the cluster
    (OUT must then be on a filesystem every node sees).
    """
    from ..concepts.sources import (
        open_concepts,
        resolved_concepts_spec,
        resolved_segmenter_spec,
    )
    from ..devices import resolve_device, resolve_dtype
    from ..model.layer_units import threshold_method
    from ..model.models import (
        ModelFactory,
        image_transform,
        load_model,
        resolved_model_spec,
        resolved_path,
        units_function,
    )
    from .pipeline import dissect_run
    from .rundir import refuse_existing, work_dir

    refuse_existing(out, overwrite)
    chosen = _with_preset(
        ctx,
        preset,
        settings,
        grid=grid,
        semantics=semantics,
        quantile=quantile,
        thresholds=thresholds,
        ranges=ranges,
        ranges_method=ranges_method,
        upsample=upsample,
    )
    settings, grid, semantics = chosen.settings, chosen.values["grid"], chosen.values["semantics"]
    quantile, thresholds = chosen.values["quantile"], chosen.values["thresholds"]
    ranges, ranges_method = chosen.values["ranges"], chosen.values["ranges_method"]
    upsample = chosen.values["upsample"]
    threshold_method((1, 1), quantile, thresholds)  # a bad choice fails before any work
    backend = _backend(ray, out)
    if ray is not None:
        backend.connect()  # a cluster that cannot be reached fails before any work
        run_device, segmenter_dtype = device, dtype  # the workers' devices, not this one's
    else:
        run_device = resolve_device(device)  # default: CUDA when present
        segmenter_dtype = resolve_dtype(dtype, run_device)
    units_map = units_function(units) if units is not None else None
    net, processor = load_model(model, weights)
    store, files, built = open_concepts(
        concepts,
        images=images,
        grid=grid,
        subset=subset,
        categories=category,
        segmenter=segmenter,
        semantics=semantics,
        device=run_device,
        dtype=segmenter_dtype,
        workers=workers,
        backend=None if ray is None else backend,
        parts_dir=work_dir(out) / "segment-parts",
        progress=not quiet,
    )
    summary = dissect_run(
        net,
        layer,
        files,
        store,
        out,
        image_source=_image_reader(files, store),
        report=report,
        settings=settings,
        quantile=quantile,
        thresholds=thresholds,
        ranges=ranges,
        ranges_method=ranges_method,
        upsample=upsample,
        batch_size=batch_size,
        transform=processor or image_transform(image_size),
        device=run_device,
        workers=workers,
        units=units_map,
        model_factory=(
            None
            if ray is None
            else ModelFactory.of(net, resolved_model_spec(model), resolved_path(weights))
        ),
        keep_activations=keep_activations,
        extra_summary=None if chosen.preset is None else {"preset": chosen.preset},
        config={
            "model": resolved_model_spec(model),
            "layer": layer,
            "images": resolved_path(images),
            "concepts": resolved_concepts_spec(concepts),
            "weights": resolved_path(weights),
            "image_size": image_size,
            "grid": grid,
            "subset": subset,
            "category": category,
            "segmenter": resolved_segmenter_spec(segmenter),
            **search_config(settings),
            "semantics": semantics,
            "quantile": quantile,
            "thresholds": thresholds,
            "ranges": ranges,
            "ranges_method": ranges_method,
            "upsample": upsample,
            "preset": preset,
            "units": resolved_model_spec(units) if units is not None else None,
            "batch_size": batch_size,
            "device": None if run_device is None else str(run_device),
            "dtype": None
            if segmenter_dtype is None
            else str(segmenter_dtype).removeprefix("torch."),
            "workers": workers,
            "keep_activations": keep_activations,
            "ray": ray,
            "image_files": [resolved_path(f) for f in files],
        },
        save_store=built,
        overwrite=overwrite,
        progress=not quiet,
        backend=backend,
    )
    _drop_shards(ray, out)
    _print_best(out)
    if report:
        typer.echo(f"report: {Path(summary['report']).resolve()}")


def _image_reader(files: list[Path], store: Any) -> Callable[[int], Any]:
    from .rundir import image_reader

    return image_reader(files, store)


@app.command()
@friendly_errors
@search_options
def explain(
    units: Annotated[Path, typer.Option(help="Unit masks directory (UnitMasks.save).")],
    concepts: Annotated[Path, typer.Option(help="Concept store directory.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    settings: Any = None,  # the search options (search_options)
    ray: RayOption = None,
    overwrite: OverwriteOption = False,
    quiet: QuietOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Explain saved unit masks with a concept store (no model needed)."""
    import pyneuron

    from ..engine.search import best_of_beam
    from ..model.models import resolved_path
    from .rundir import refuse_existing, versions, write_run

    refuse_existing(out, overwrite)
    store = pyneuron.ConceptStore.open(concepts)
    masks = pyneuron.UnitMasks.open(units)
    beam_table = pyneuron.explain(
        masks,
        store,
        settings,
        full_beam=True,
        progress=not quiet,
        backend=_backend(ray, out),
    )
    layer = Path(units).resolve().name or "units"  # the folder of the unit masks
    beam_table.insert(0, "layer", layer)
    results = best_of_beam(beam_table)
    config_values = {
        "units": resolved_path(units),
        "concepts": resolved_path(concepts),
        **search_config(settings),
        "ray": ray,
    }
    write_run(
        out,
        results,
        summary={
            "versions": versions(),
            "grid": list(store.grid.shape),
            "units": len(masks),
            **config_values,
            "search": settings.to_dict(),  # as dissect runs record it
        },
        config=config_values,
        beam=beam_table,
        overwrite=overwrite,
    )
    _drop_shards(ray, out)
    typer.echo(f"{len(results)} units explained; results in {out / 'results.parquet'}")


@app.command()
@friendly_errors
def report(
    run: Annotated[Path, typer.Argument(help="Run directory (dissect, explain or demo).")],
    images: Annotated[
        Path | None,
        typer.Option(help="The folder of probing images (default: the run's own list)."),
    ] = None,
    describe: Annotated[
        list[Path] | None,
        typer.Option(help="A `pyneuron describe` run to show next to the formulas (repeat)."),
    ] = None,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """(Re)write the HTML report of a run directory (into RUN/report)."""
    import pandas as pd

    from .rundir import read_results, write_run_report

    descriptions = (
        pd.concat([read_results(d) for d in describe], ignore_index=True) if describe else None
    )
    index = write_run_report(run, images=images, descriptions=descriptions, progress=not quiet)
    typer.echo(f"report: {index.resolve()}")


@app.command()
@friendly_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory (dissect, explain or demo).")],
    holdout: Annotated[
        float, typer.Option(help="Share of images held out (0 skips held-out scoring).")
    ] = 0.2,
    controls: Annotated[
        int, typer.Option(help="Control units per layer for the null (0 skips it).")
    ] = 1000,
    alpha: Annotated[float, typer.Option(help="p-value below which a unit beats the null.")] = 0.05,
    faithfulness: Annotated[
        bool,
        typer.Option(help="Mask concepts in images and measure activation drops.", metavar=""),
    ] = True,
    top_k: Annotated[int, typer.Option(help="Top images per unit for faithfulness.")] = 8,
    fill: Annotated[str, typer.Option(help="Neutral fill of masked pixels: mean or blur.")] = (
        "mean"
    ),
    model: Annotated[
        str | None, typer.Option(help="The model, if not the run's own (as for dissect).")
    ] = None,
    weights: Annotated[Path | None, typer.Option(help="State-dict file for --model.")] = None,
    images: Annotated[
        Path | None,
        typer.Option(help="The folder of probing images (default: the run's own list)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, controls and regions.")] = 0,
    device: DeviceOption = None,
    quiet: QuietOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Check a run's explanations: held-out IoU, null baseline, concept masking."""
    from ..devices import resolve_device
    from .evaluation import EvaluationConfig, evaluate_run

    summary = evaluate_run(
        run,
        EvaluationConfig(
            holdout=holdout,
            controls=controls,
            alpha=alpha,
            faithfulness=faithfulness,
            top_k=top_k,
            fill=fill,
            seed=seed,
            device=str(resolve_device(device)),
        ),
        model=model,
        weights=weights,
        images=images,
        progress=not quiet,
    )
    for layer, facts in summary["layers"].items():
        typer.echo(f"{layer}: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    for note in summary["notes"]:
        typer.echo(f"note: {note}")
    if summary.get("report"):
        typer.echo(f"report: {Path(summary['report']).resolve()}")


@app.command()
@friendly_errors
def describe(
    model: Annotated[str, typer.Option(help="Model, as for `pyneuron dissect`.")],
    layer: Annotated[list[str], typer.Option(help="Layer name (repeat for several).")],
    images: Annotated[Path, typer.Option(help="Folder of probing images.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    method: Annotated[str, typer.Option(help="clip-dissect, occlusion or dnd.")] = "clip-dissect",
    concepts: Annotated[
        Path | None,
        typer.Option(help="Concept list, one per line (required for clip-dissect and occlusion)."),
    ] = None,
    clip: Annotated[str, typer.Option(help="CLIP model id (local cache) or directory.")] = (
        "openai/clip-vit-base-patch16"
    ),
    captioner: Annotated[str | None, typer.Option(help="BLIP captioner for dnd.")] = None,
    similarity: Annotated[
        str,
        typer.Option(help="CLIP-Dissect similarity: soft_wpmi, wpmi, cos, cos3 or rank_reorder."),
    ] = "soft_wpmi",
    pool: Annotated[
        str,
        typer.Option(
            help="CLIP-Dissect's summary of a unit per image: mean or max over its map "
            "(token layers: over the patch tokens)."
        ),
    ] = "mean",
    ties: Annotated[
        str,
        typer.Option(
            help="CLIP-Dissect's order of tied activations: lowest (image id) or torch "
            "(torch.topk, to reproduce published labels)."
        ),
    ] = "lowest",
    top_k: Annotated[int | None, typer.Option(help="Top images per unit.")] = None,
    weights: Annotated[Path | None, typer.Option(help="State-dict file for the model.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    image_size: Annotated[int, typer.Option(help="Input resize (ImageNet normalization).")] = 224,
    overwrite: OverwriteOption = False,
    quiet: QuietOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Describe units without concept masks (CLIP-Dissect, occlusion, Describe-and-Dissect)."""
    from .describe import describe_command

    path = describe_command(
        method=method,
        model=model,
        layer=layer,
        images=images,
        concepts=concepts,
        out=out,
        clip=clip,
        captioner=captioner,
        top_k=top_k,
        batch_size=batch_size,
        image_size=image_size,
        overwrite=overwrite,
        progress=not quiet,
        weights=weights,
        similarity=similarity,
        ties=ties,
        pool=pool,
    )
    typer.echo(f"descriptions written to {path}")


@store_app.command("build")
@friendly_errors
def store_build(
    source: Annotated[
        Path,
        typer.Option(help="Broden folder, concept list (.txt/.toml) or concept set (set:NAME)."),
    ],
    out: Annotated[Path, typer.Option(help="Store directory to write.")],
    images: Annotated[Path | None, typer.Option(help="Probing images (for concept lists).")] = None,
    grid: GridOption = 112,
    subset: SubsetOption = None,
    category: CategoryOption = None,
    segmenter: SegmenterOption = None,
    semantics: SemanticsOption = "pyneuron",
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    workers: WorkersOption = 0,
    overwrite: OverwriteOption = False,
    quiet: QuietOption = False,
    config: ConfigOption = None,
    debug: DebugOption = False,
) -> None:
    """Build a concept store from a Broden folder or a concept list (segmented)."""
    from ..concepts.sources import open_concepts
    from ..engine import storage
    from ..engine.atomic import refuse_existing
    from ..engine.store import KIND

    refuse_existing(out, overwrite, storage.output_kind(KIND), "--overwrite")
    store, _, built = open_concepts(
        source,
        images=images,
        grid=grid,
        subset=subset,
        categories=category,
        segmenter=segmenter,
        semantics=semantics,
        device=device,
        dtype=dtype,
        workers=workers,
        progress=not quiet,
    )
    if not built:
        raise FileExistsError(f"{source} is already a concept store")
    store.save(out, overwrite=overwrite)
    typer.echo(f"{store!r} written to {out}")


@store_app.command("info")
@friendly_errors
def store_info(
    path: Annotated[Path, typer.Argument(help="Concept store directory.")],
    debug: DebugOption = False,
) -> None:
    """Show a concept store: grid, size and the concepts per category."""
    from ..engine.store import ConceptStore

    store = ConceptStore.open(path)
    typer.echo(repr(store))
    typer.echo(f"{store.nbytes / 2**20:.1f} MiB of containers")
    table = store.table()
    summary = table.groupby("category").agg(
        concepts=("name", "size"), pixels=("pixels", "sum"), images=("images", "sum")
    )
    typer.echo(summary.to_string())
    if store.metadata:
        typer.echo("metadata:")
        for key, value in store.metadata.items():
            typer.echo(f"  {key}: {json.dumps(_summarised(value), default=str)}")


@app.command("concept-sets")
@friendly_errors
def concept_sets(debug: DebugOption = False) -> None:
    """List the ready-made concept sets (--concepts set:NAME[:ARG]) and their sources."""
    from ..concepts.sets import list_concept_sets

    for info in list_concept_sets().to_dict("records"):
        name = f"set:{info['name']}" + (
            f":{str(info['argument']).upper()}" if _present(info["argument"]) else ""
        )
        size = f"{int(info['size'])} concepts" if _present(info["size"]) else ""
        typer.echo(f"{name:<28} {size:<14} {info['description']}")
        typer.echo(f"{'':<28} source: {info['source']}")


def _present(value: Any) -> bool:
    """Whether a table cell holds a value (not None or NaN)."""
    return value is not None and value == value


def _summarised(value: Any, shown: int = 3) -> Any:
    """``value`` with long lists (image paths, content keys) cut to their first items and
    a count, at every depth."""
    if isinstance(value, dict):
        return {key: _summarised(item, shown) for key, item in value.items()}
    if isinstance(value, list):
        if len(value) > 2 * shown:
            return [*(_summarised(v, shown) for v in value[:shown]), f"... {len(value)} in all"]
        return [_summarised(v, shown) for v in value]
    return value


@app.command()
@friendly_errors
def compare(
    run_a: Annotated[Path, typer.Argument(help="A run directory (e.g. on human annotations).")],
    run_b: Annotated[Path, typer.Argument(help="Another run (e.g. on a segmenter's masks).")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    wordnet: Annotated[
        str | None,
        typer.Option(
            help="A WordNet lexicon (a WN-LMF file, added to wn's database once, or a name "
            "there such as oewn:2024): also compare concept names at their lowest common "
            "hypernyms."
        ),
    ] = None,
    min_depth: Annotated[
        int | None,
        typer.Option(help="Smallest depth of a meaningful hypernym (default 6).", min=0),
    ] = None,
    concepts_a: Annotated[
        Path | None,
        typer.Option(help="Run A's concept store, if not its own or the one its config names."),
    ] = None,
    concepts_b: Annotated[
        Path | None,
        typer.Option(help="Run B's concept store, if not its own or the one its config names."),
    ] = None,
    overwrite: OverwriteOption = False,
    quiet: QuietOption = False,
    debug: DebugOption = False,
) -> None:
    """Compare two runs' explanations unit by unit (same formula, same concepts, IoU of
    the formulas' masks on the shared images) and their concept masks; writes
    compare.csv, layers.csv, concepts.csv and compare.html."""
    import pandas as pd

    from .compare import lexicon_of, write_comparison

    lexicon = None if wordnet is None else lexicon_of(wordnet, min_depth=min_depth)
    page = write_comparison(
        run_a,
        run_b,
        out,
        lexicon=lexicon,
        store_a=concepts_a,
        store_b=concepts_b,
        overwrite=overwrite,
        progress=not quiet,
    )
    layers = pd.read_csv(out / "layers.csv")
    for row in layers.itertuples():
        typer.echo(
            f"{row.layer}: {row.compared} units compared, exact {row.exact:.2f}, same concepts "
            f"{row.same_concepts:.2f}, mean formula IoU {row.mean_formula_iou:.3f}"
        )
    typer.echo(f"comparison: {page.resolve()}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@friendly_errors
def bench(
    ctx: typer.Context,
    size: Annotated[str, typer.Option(help="small, medium, ade or dense.")] = "small",
    out: Annotated[
        Path, typer.Option(help="Directory for the results (search-<size>.json).")
    ] = Path("pyneuron-bench"),
    debug: DebugOption = False,
) -> None:
    """Run the search benchmark: pyneuron against exhaustive numpy (and numba, when
    installed) searches on synthetic data, side by side; further options (after the
    others) go to the benchmark script, e.g. `--units 16 --numba-units 0`."""
    import runpy

    script = _bench_script()
    out.mkdir(parents=True, exist_ok=True)
    argv = ["--size", size, "--output", str(out / f"search-{size}.json"), *ctx.args]
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved


def _bench_script() -> Path:
    """The search benchmark: the source checkout's ``bench/`` for an editable install,
    else the copy installed with the package (``pyneuron/_bench``)."""
    from importlib import resources

    import pyneuron

    checkout = Path(pyneuron.__file__).resolve().parent.parent / "bench" / "search.py"
    if checkout.is_file():  # an editable install: the checkout's current scripts
        return checkout
    installed = resources.files("pyneuron").joinpath("_bench", "search.py")
    if installed.is_file():
        return Path(str(installed))
    raise PyneuronError(
        "the benchmark scripts are missing from this installation (pyneuron/_bench); "
        "reinstall pyneuron, or run bench/search.py from a source checkout"
    )


def main() -> None:
    """Entry point of the ``pyneuron`` console script."""
    app()
