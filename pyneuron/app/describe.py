"""``pyneuron describe``: label-free descriptions of units written as a run directory.

Layout of the run directory (the same result formats as ``pyneuron dissect``)::

    results.parquet / results.csv   one row per (layer, unit): method, label, score,
                                    top_concepts, top_scores, top_images, ...
    summary.json                    versions, timings, counts, per-layer statistics
    config.toml                     the resolved configuration (provenance)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..describe.result import load_concepts
from ..errors import PyneuronError

METHODS = ("clip-dissect", "occlusion", "dnd")
#: ``top_k`` per method when the command is given none (or a value < 1).
DEFAULT_TOP_K = {"clip-dissect": 100, "occlusion": 5, "dnd": 5}


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


def describe_command(
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
    *,
    weights: Path | None = None,
    similarity: str = "soft_wpmi",
    ties: str = "lowest",
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
        (:data:`DEFAULT_TOP_K`).
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
        clip-dissect's similarity function: ``soft_wpmi`` (default), ``cos``, ``cos3``
        or ``rank_reorder``.
    ties
        clip-dissect's order of tied activation summaries: ``lowest`` (lower image id
        first) or ``torch`` (``torch.topk``'s, as CLIP-Dissect's code).

    Returns
    -------
    Path
        ``out``.
    """
    from ..describe.clip import ClipEncoder
    from ..describe.clip_dissect import clip_dissect
    from ..describe.dnd import BlipCaptioner, describe_and_dissect
    from ..describe.images import ImageList
    from ..describe.occlusion import occlusion_describe
    from ..describe.similarity import check_ties, similarity_name
    from ..image_files import list_images
    from ..model.activations import capture, resolve_layers
    from ..model.models import image_transform, load_model, resolved_model_spec, resolved_path
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
    k = DEFAULT_TOP_K[name] if top_k is None or top_k < 1 else int(top_k)
    names = load_concepts(concepts) if concepts is not None else None
    if name in ("clip-dissect", "occlusion") and names is None:
        raise PyneuronError(f"{name} needs a concept list (--concepts, one concept per line)")
    if name == "dnd" and not captioner:
        raise PyneuronError("dnd needs a captioning model (--captioner, e.g. a BLIP directory)")

    timings: dict[str, float] = {}
    started = time.perf_counter()
    files = list_images(images)
    image_list = ImageList(files, files)
    net, processor = load_model(model, weights)
    resolve_layers(net, layers)  # unknown layers fail before any model is run
    transform = processor or image_transform(image_size)
    encoder = ClipEncoder.load(clip, batch_size=batch_size)
    timings["load"] = time.perf_counter() - started

    t0 = time.perf_counter()
    activations = capture(
        net, layers, image_list, batch_size=batch_size, transform=transform, progress=progress
    )
    timings["capture"] = time.perf_counter() - t0
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "transform": transform,
        "progress": progress,
    }
    image_features = None
    if name in ("clip-dissect", "dnd"):
        t0 = time.perf_counter()
        image_features = encoder.encode_images(image_list, progress=progress)
        timings["clip images"] = time.perf_counter() - t0
    text_features = None
    if name == "clip-dissect":
        assert names is not None
        t0 = time.perf_counter()
        text_features = encoder.encode_texts(names, progress=progress)
        timings["clip texts"] = time.perf_counter() - t0
    describer = BlipCaptioner.load(captioner, batch_size=batch_size) if name == "dnd" else None

    tables, layer_stats = [], {}
    for layer_name in layers:
        t0 = time.perf_counter()
        if name == "clip-dissect":
            result = clip_dissect(
                net, layer_name, image_list, names or [], clip=encoder, top_k=k,
                similarity=similarity, ties=ties, activations=activations[layer_name],
                image_features=image_features,
                text_features=text_features, **common,
            )  # fmt: skip
        elif name == "occlusion":
            result = occlusion_describe(
                net, layer_name, image_list, names or [], clip=encoder, top_k=k,
                activations=activations[layer_name], **common,
            )  # fmt: skip
        else:
            assert describer is not None
            result = describe_and_dissect(
                net, layer_name, image_list, clip=encoder, captioner=describer, top_k=k,
                extra_candidates=names, activations=activations[layer_name],
                image_features=image_features, **common,
            )  # fmt: skip
        timings[f"describe {layer_name}"] = time.perf_counter() - t0
        tables.append(result.table)
        layer_stats[layer_name] = {
            "units": len(result.table),
            "mean_score": float(np.nanmean(result.table["score"]))
            if result.table["score"].notna().any()
            else None,
            "distinct_labels": int(result.table["label"].nunique()),
        }
    results = pd.concat(tables, ignore_index=True)
    timings["total"] = time.perf_counter() - started
    settings: dict[str, Any] = {
        "method": name,
        "model": resolved_model_spec(model),
        "layer": layers,
        "images": resolved_path(images),
        "concepts": resolved_path(concepts),
        "clip": resolved_model_spec(clip),
        "captioner": resolved_model_spec(captioner) if captioner is not None else None,
        "weights": resolved_path(weights),
        "similarity": similarity if name == "clip-dissect" else None,
        "ties": ties if name == "clip-dissect" else None,
        "top_k": k,
        "batch_size": batch_size,
        "image_size": image_size,
    }
    summary = {
        "versions": versions(),
        **settings,
        "n_images": len(files),
        "n_concepts": len(names) if names is not None else None,
        "layers": layer_stats,
        "timings_seconds": timings,
    }
    write_run(
        out,
        results,
        summary=summary,
        config={**settings, "image_files": [resolved_path(f) for f in files]},
        overwrite=overwrite,
    )
    return out
