"""``pyneuron describe``: label-free descriptions of units written as a run directory.

Layout of the run directory (the same result formats as ``pyneuron dissect``)::

    results.parquet / results.csv   one row per (layer, unit): method, label, score,
                                    top_concepts, top_scores, top_images, ...
    summary.json                    versions, timings, counts, per-layer statistics
    config.toml                     the resolved configuration (provenance)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd

from ..describe.result import load_concepts
from ..errors import PyneuronError

if TYPE_CHECKING:
    from ..describe.clip import ClipEncoder
    from ..describe.dnd import BlipCaptioner
    from ..describe.images import ImageList
    from ..describe.result import DescribeResult

_T = TypeVar("_T")

METHODS = ("clip-dissect", "occlusion", "dnd")
#: ``top_k`` per method when the command is given none (or a value < 1); clip-dissect's
#: is its similarity's (100, or 28 for hard WPMI, as CLIP-Dissect).
DEFAULT_TOP_K = {"occlusion": 5, "dnd": 5}
#: clip-dissect's summaries the command offers (``"cls"`` needs the layer's raw tokens:
#: :func:`pyneuron.describe.clip_dissect` in Python).
COMMAND_POOLS = ("mean", "max")


def method_name(method: str) -> str:
    """Canonical method name: ``clip-dissect``, ``occlusion`` or ``dnd``.

    Examples
    --------
    >>> method_name("CLIP_Dissect"), method_name("describe-and-dissect")
    ('clip-dissect', 'dnd')
    """
    key = str(method).strip().lower().replace("_", "-")
    aliases = {
        "clip-dissect": "clip-dissect",
        "clipdissect": "clip-dissect",
        "occlusion": "occlusion",
        "dnd": "dnd",
        "describe-and-dissect": "dnd",
    }
    if key not in aliases:
        raise PyneuronError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return aliases[key]


@dataclass(frozen=True)
class _Settings:
    """The command's arguments, checked and resolved (``top_k``: the number used)."""

    method: str
    model: str
    layers: list[str]
    images: Path
    concepts: Path | None
    names: list[str] | None
    clip: str
    captioner: str | None
    weights: Path | None
    similarity: str
    ties: str
    pool: str
    top_k: int
    batch_size: int
    image_size: int
    progress: bool


@dataclass(frozen=True)
class _Inputs:
    """What a method's describer reads, loaded and computed once for every layer."""

    settings: _Settings
    net: Any
    images: ImageList
    transform: Any
    clip: ClipEncoder
    activations: Mapping[str, Any]
    image_features: Any
    text_features: Any
    captioner: BlipCaptioner | None

    def common(self) -> dict[str, Any]:
        """The keyword arguments every describer takes."""
        return {
            "batch_size": self.settings.batch_size,
            "transform": self.transform,
            "progress": self.settings.progress,
        }


def _clip_dissect(inputs: _Inputs, layer: str) -> DescribeResult:
    """CLIP-Dissect of one layer: the concept set scored against its top images."""
    from ..describe.clip_dissect import clip_dissect

    settings = inputs.settings
    return clip_dissect(
        inputs.net, layer, inputs.images, settings.names or [], clip=inputs.clip,
        top_k=settings.top_k, similarity=settings.similarity, ties=settings.ties,
        pool=settings.pool, activations=inputs.activations[layer],
        image_features=inputs.image_features, text_features=inputs.text_features,
        **inputs.common(),
    )  # fmt: skip


def _occlusion(inputs: _Inputs, layer: str) -> DescribeResult:
    """Occlusion of one layer: the concept set's words scored on occluded top images."""
    from ..describe.occlusion import occlusion_describe

    settings = inputs.settings
    return occlusion_describe(
        inputs.net, layer, inputs.images, settings.names or [], clip=inputs.clip,
        top_k=settings.top_k, activations=inputs.activations[layer], **inputs.common(),
    )  # fmt: skip


def _dnd(inputs: _Inputs, layer: str) -> DescribeResult:
    """Describe-and-Dissect of one layer: captions of its top images as candidates."""
    from ..describe.dnd import describe_and_dissect

    assert inputs.captioner is not None
    settings = inputs.settings
    return describe_and_dissect(
        inputs.net, layer, inputs.images, clip=inputs.clip, captioner=inputs.captioner,
        top_k=settings.top_k, extra_candidates=settings.names,
        activations=inputs.activations[layer], image_features=inputs.image_features,
        **inputs.common(),
    )  # fmt: skip


@dataclass(frozen=True)
class _Method:
    """A method's describer of one layer and what has to be computed before it runs."""

    describe: Callable[[_Inputs, str], DescribeResult]
    needs_concepts: bool = False
    image_features: bool = False
    text_features: bool = False
    captioner: bool = False


_METHODS = {
    "clip-dissect": _Method(
        _clip_dissect, needs_concepts=True, image_features=True, text_features=True
    ),
    "occlusion": _Method(_occlusion, needs_concepts=True),
    "dnd": _Method(_dnd, image_features=True, captioner=True),
}


def describe_command(
    *,
    method: str,
    model: str,
    layer: list[str],
    images: Path,
    concepts: Path | None,
    out: Path,
    clip: str,
    captioner: str | None,
    top_k: int | None,
    batch_size: int,
    image_size: int,
    overwrite: bool,
    progress: bool,
    weights: Path | None = None,
    similarity: str = "soft_wpmi",
    ties: str = "lowest",
    pool: str = "mean",
) -> Path:
    """Describe every unit of ``layer`` of ``model`` and write a run directory at ``out``.

    Parameters
    ----------
    method
        ``clip-dissect``, ``occlusion`` or ``dnd`` (Describe-and-Dissect-lite).
    model
        As for ``pyneuron dissect``: a transformers directory, ``module:function``,
        ``file.py:function`` or a torchvision model name.
    layer
        Module names (one or more).
    images
        Folder of probing images (sorted by path).
    concepts
        Text file, one concept per line (``#`` comments): the concept set of
        clip-dissect and the vocabulary of occlusion (required for both); for dnd,
        optional extra candidate descriptions added to the generated ones.
    out
        Run directory to write (refused if it exists, unless ``overwrite``).
    clip
        CLIP model directory or cached model id (nothing is downloaded).
    captioner
        Captioning model (BLIP) directory or cached id; required for dnd.
    top_k
        Top images per unit: soft-WPMI's k for clip-dissect, the images occluded or
        captioned for occlusion and dnd; ``None`` or < 1 picks the method's default
        (:data:`DEFAULT_TOP_K`; clip-dissect: its similarity's, 100 or 28 for ``wpmi``).
    batch_size
        Images per forward pass (model, CLIP and captioner).
    image_size
        Input resize with ImageNet normalization for models without their own image
        processor.
    overwrite, progress
        Replace an existing ``out``; show progress bars.
    weights
        State-dict file loaded into the model (as ``pyneuron dissect --weights``).
    similarity
        clip-dissect's similarity function: ``soft_wpmi`` (default), ``wpmi`` (hard
        WPMI), ``cos``, ``cos3`` or ``rank_reorder``.
    ties
        clip-dissect's order of tied activation summaries: ``lowest`` (lower image id
        first) or ``torch`` (``torch.topk``'s, as CLIP-Dissect's code).
    pool
        clip-dissect's summary of a unit per image: ``"mean"`` (default) or ``"max"``
        over its activation map (:func:`pyneuron.describe.clip_dissect`; its ``"cls"``
        needs the layer's raw tokens and is offered in Python only).

    Returns
    -------
    Path
        ``out``.
    """
    from ..describe.similarity import check_ties, similarity_defaults, similarity_name
    from ..image_files import list_images
    from ..model.models import resolved_path
    from .rundir import refuse_existing, versions, write_run

    name = method_name(method)
    similarity = similarity_name(similarity)
    check_ties(ties)
    out = Path(out)
    refuse_existing(out, overwrite)
    layers = [layer] if isinstance(layer, str) else list(layer)
    if not layers:
        raise PyneuronError("no layers given; name at least one module with --layer")
    if batch_size < 1:
        raise PyneuronError(f"batch_size must be positive, got {batch_size}")
    if pool not in COMMAND_POOLS:
        raise PyneuronError(
            f"unknown pool {pool!r} for the command; choose one of {', '.join(COMMAND_POOLS)} "
            "(pool='cls' reads the layer's raw tokens: pyneuron.describe.clip_dissect in Python)"
        )
    if top_k is not None and top_k >= 1:
        k = int(top_k)
    elif name == "clip-dissect":
        k = similarity_defaults(similarity)[0]
    else:
        k = DEFAULT_TOP_K[name]
    names = load_concepts(concepts) if concepts is not None else None
    _check_requirements(name, names, captioner)
    settings = _Settings(
        method=name, model=model, layers=layers, images=images, concepts=concepts, names=names,
        clip=clip, captioner=captioner, weights=weights, similarity=similarity, ties=ties,
        pool=pool, top_k=k, batch_size=batch_size, image_size=image_size, progress=progress,
    )  # fmt: skip

    timings: dict[str, float] = {}
    started = time.perf_counter()
    files = list_images(images)
    inputs = _load_inputs(settings, files, timings, started)
    results, layer_stats = _describe_layers(inputs, timings)
    timings["total"] = time.perf_counter() - started
    provenance = _provenance(settings)
    summary = {
        "versions": versions(),
        **provenance,
        "n_images": len(files),
        "n_concepts": len(names) if names is not None else None,
        "layers": layer_stats,
        "timings_seconds": timings,
    }
    write_run(
        out,
        results,
        summary=summary,
        config={**provenance, "image_files": [resolved_path(f) for f in files]},
        overwrite=overwrite,
    )
    return out


def _check_requirements(method: str, names: list[str] | None, captioner: str | None) -> None:
    """Refuse a method whose concept list or captioning model is missing."""
    needs = _METHODS[method]
    if needs.needs_concepts and names is None:
        raise PyneuronError(f"{method} needs a concept list (--concepts, one concept per line)")
    if needs.captioner and not captioner:
        raise PyneuronError(
            f"{method} needs a captioning model (--captioner, e.g. a BLIP directory)"
        )


def _timed(
    timings: dict[str, float], key: str, function: Callable[..., _T], *args: Any, **kwargs: Any
) -> _T:
    """``function(*args, **kwargs)``, its duration recorded as ``timings[key]``."""
    t0 = time.perf_counter()
    result = function(*args, **kwargs)
    timings[key] = time.perf_counter() - t0
    return result


def _load_inputs(
    settings: _Settings, files: list[Path], timings: dict[str, float], started: float
) -> _Inputs:
    """Load the model, CLIP (and the captioner), capture the activations of every layer
    and compute the CLIP features the method needs."""
    from ..describe.clip import ClipEncoder
    from ..describe.dnd import BlipCaptioner
    from ..describe.images import ImageList
    from ..model.activations import capture, resolve_layers
    from ..model.models import image_transform, load_model

    needs = _METHODS[settings.method]
    image_list = ImageList(files, files)
    net, processor = load_model(settings.model, settings.weights)
    resolve_layers(net, settings.layers)  # unknown layers fail before any model is run
    transform = processor or image_transform(settings.image_size)
    encoder = ClipEncoder.load(settings.clip, batch_size=settings.batch_size)
    timings["load"] = time.perf_counter() - started

    progress = settings.progress
    activations = _timed(
        timings, "capture", capture, net, settings.layers, image_list,
        batch_size=settings.batch_size, transform=transform, progress=progress,
    )  # fmt: skip
    image_features = None
    if needs.image_features:
        image_features = _timed(
            timings, "clip images", encoder.encode_images, image_list, progress=progress
        )
    text_features = None
    if needs.text_features:
        assert settings.names is not None
        text_features = _timed(
            timings, "clip texts", encoder.encode_texts, settings.names, progress=progress
        )
    captioner = None
    if needs.captioner:
        captioner = BlipCaptioner.load(settings.captioner, batch_size=settings.batch_size)
    return _Inputs(
        settings, net, image_list, transform, encoder, activations, image_features,
        text_features, captioner,
    )  # fmt: skip


def _describe_layers(
    inputs: _Inputs, timings: dict[str, float]
) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Every layer described by the method: the results table and per-layer statistics."""
    describe = _METHODS[inputs.settings.method].describe
    tables, layer_stats = [], {}
    for layer in inputs.settings.layers:
        result = _timed(timings, f"describe {layer}", describe, inputs, layer)
        tables.append(result.table)
        layer_stats[layer] = _layer_stats(result.table)
    return pd.concat(tables, ignore_index=True), layer_stats


def _layer_stats(table: pd.DataFrame) -> dict[str, Any]:
    """Units, mean score (``None`` when no unit has one) and distinct labels of a layer."""
    return {
        "units": len(table),
        "mean_score": float(np.nanmean(table["score"])) if table["score"].notna().any() else None,
        "distinct_labels": int(table["label"].nunique()),
    }


def _provenance(settings: _Settings) -> dict[str, Any]:
    """The settings as recorded in ``summary.json`` and ``config.toml``."""
    from ..model.models import resolved_model_spec, resolved_path

    clip_dissect = settings.method == "clip-dissect"
    return {
        "method": settings.method,
        "model": resolved_model_spec(settings.model),
        "layer": settings.layers,
        "images": resolved_path(settings.images),
        "concepts": resolved_path(settings.concepts),
        "clip": resolved_model_spec(settings.clip),
        "captioner": resolved_model_spec(settings.captioner)
        if settings.captioner is not None
        else None,
        "weights": resolved_path(settings.weights),
        "similarity": settings.similarity if clip_dissect else None,
        "ties": settings.ties if clip_dissect else None,
        "pool": settings.pool if clip_dissect else None,
        "top_k": settings.top_k,
        "batch_size": settings.batch_size,
        "image_size": settings.image_size,
    }
