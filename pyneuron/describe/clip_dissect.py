"""CLIP-Dissect (Oikarinen & Weng, ICLR 2023): label every unit of a layer with the concept
whose CLIP image-text similarities best match the unit's activations."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import PyneuronError
from .clip import DEFAULT_CLIP, ClipEncoder
from .images import ImageList
from .result import DescribeResult, check_concepts, layer_summary, ranked_labels, select_units
from .similarity import (
    activation_summary,
    similarity_defaults,
    similarity_matrix,
    similarity_name,
    top_concepts,
    top_images_by_unit,
)

METHOD = "clip-dissect"
#: How a unit's activation on one image is summarised (see :func:`clip_dissect`).
POOLS = ("mean", "max", "cls")


def clip_image_text_similarities(image_features: Any, text_features: Any) -> np.ndarray:
    """(N, C) cosine similarities of image and text embeddings (normalized here).

    Examples
    --------
    >>> sims = clip_image_text_similarities(np.array([[2.0, 0.0]]), np.array([[1, 0], [1, 1]]))
    >>> sims.round(4)
    array([[1.    , 0.7071]], dtype=float32)
    """
    images = np.asarray(image_features, dtype=np.float32)
    texts = np.asarray(text_features, dtype=np.float32)
    if images.ndim != 2 or texts.ndim != 2 or images.shape[1] != texts.shape[1]:
        raise PyneuronError(
            f"image features {images.shape} and text features {texts.shape} must be (N, D) "
            "and (C, D) with the same embedding size D"
        )
    images = images / np.maximum(np.linalg.norm(images, axis=1, keepdims=True), 1e-12)
    texts = texts / np.maximum(np.linalg.norm(texts, axis=1, keepdims=True), 1e-12)
    return images @ texts.T


def clip_dissect(
    model: Any,
    layer: str,
    images: Any,
    concepts: Sequence[str],
    *,
    clip: Any = DEFAULT_CLIP,
    similarity: str = "soft_wpmi",
    pool: str = "mean",
    top_k: int | None = None,
    top_n: int = 5,
    batch_size: int = 32,
    transform: Callable[..., Any] | None = None,
    activations: Any = None,
    image_features: Any = None,
    text_features: Any = None,
    clip_similarities: Any = None,
    units: Sequence[int] | None = None,
    temperature: float | None = None,
    lam: float | None = None,
    ties: str = "lowest",
    prompt: str = "{}",
    return_matrix: bool = False,
    device: Any = None,
    progress: bool = True,
) -> DescribeResult:
    """Describe every unit of ``layer`` with the best concept of ``concepts`` (CLIP-Dissect).

    1. The activation summary of each unit on each probing image, by ``pool``: the
       spatial mean of its map (CLIP-Dissect's default "avg" pooling), the maximum, or a
       transformer layer's class token.
    2. CLIP cosine similarities between each image and each concept text
       (``prompt.format(concept)``; CLIP-Dissect uses the bare concept).
    3. A unit-concept score matrix with ``similarity`` over all units at once
       (:func:`~pyneuron.describe.similarity_matrix`; soft-WPMI by default, with
       P = softmax(cos / ``temperature``) over concepts, temperature 0.1 as in
       CLIP-Dissect's code, and prior weight ``lam`` = 1; hard WPMI with its own
       defaults, ``top_k`` 28, temperature 0.5, ``lam`` 0.6).
    4. Per unit: the label (best concept) and its score, and the ``top_n`` concepts.

    Parameters
    ----------
    model, layer, images
        The network, one module name, and the probing images (a folder, image paths,
        PIL images, or a uint8 (N, H, W, 3) array). ``images`` may be ``None`` when both
        ``activations`` and the CLIP side (``clip_similarities``, or ``image_features``
        with or without ``text_features``) are given.
    concepts
        Candidate concept names (no duplicates).
    clip
        CLIP model: a directory or cached model id (nothing is downloaded), a
        ``(model, processor)`` pair or a :class:`~pyneuron.describe.ClipEncoder` (used as
        is: its own ``prompt`` and ``batch_size`` apply).
    similarity
        ``"soft_wpmi"`` (default), ``"wpmi"`` (hard WPMI), ``"cos"``, ``"cos3"`` or
        ``"rank_reorder"``.
    pool
        Summary of a unit's activation on one image:

        - ``"mean"`` (default): the mean over the h x w positions of a conv layer's map;
          for a token layer (B, T, C) the mean over the patch tokens that
          :func:`pyneuron.capture` folds into a grid (class and register tokens are
          dropped, see :class:`pyneuron.model.activations.LayerFormat`).
        - ``"max"``: the maximum over the same positions (conv: over h x w; token layer:
          over the patch tokens, not the class token).
        - ``"cls"``: token layers only: token 0 of the layer's (B, T, C) output, the
          class token of ViT, DeiT, BEiT and CLIP vision encoders (which prepend it to the
          patch tokens). It is taken as is, whatever the model: for a model without a
          class token (Swin, ...) token 0 is a patch. A layer whose output is not
          (B, T, C), e.g. a conv layer, raises :class:`~pyneuron.errors.PyneuronError`.

        ``activations`` given as an (N, U) matrix are used as is, whatever ``pool``;
        given as (N, U, h, w) maps they take ``"mean"`` or ``"max"`` (the maps hold no
        class token).
    top_k
        Top images per unit for the WPMI similarities (``None``: CLIP-Dissect's 100 for
        soft-WPMI, 28 for hard WPMI; clipped to the image count).
    top_n
        Concepts listed per unit in ``top_concepts``.
    transform
        Preprocessing of the images for ``model`` (as in :func:`pyneuron.capture`).
    activations
        Precomputed (N, U, h, w) maps or (N, U) summaries of ``layer``.
    image_features, text_features
        Cached CLIP embeddings, (N, D) and (C, D) (normalized here).
    clip_similarities
        Cached (N, C) image-concept cosine similarities (skips CLIP entirely).
    units
        Report only these units (the soft-WPMI prior still averages over all units).
    ties
        Order of images with equal activation summaries among a unit's top images (for
        soft-WPMI's top ``top_k`` and the reported ``top_images``): ``"lowest"`` (the
        lower image id first; the default, the same on every device) or ``"torch"``
        (``torch.topk`` on the CPU, as CLIP-Dissect's code does; use it to reproduce
        published labels of units with tied activations -- dead, constant or quantized
        units -- since through soft-WPMI's prior they shift every unit's scores).
    return_matrix
        Keep the (units, concepts) score matrix in the result.

    Returns
    -------
    DescribeResult
        ``table`` with layer, unit, method, label, score, top_concepts, top_scores,
        top_images (the unit's top-5 images by summary).

    Examples
    --------
    >>> summary = np.array([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    >>> sims = np.array([[0.3, 0.1], [0.1, 0.3], [0.2, 0.2]])
    >>> result = clip_dissect(None, "fc", None, ["dog", "cat"], activations=summary,
    ...                       clip_similarities=sims, top_k=1, progress=False)
    >>> result.table[["unit", "label"]].to_dict("list")
    {'unit': [0, 1], 'label': ['dog', 'cat']}
    """
    names = check_concepts(concepts)
    method = similarity_name(similarity)
    if pool not in POOLS:
        raise PyneuronError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}")
    default_k, default_temperature, default_lam = similarity_defaults(method)
    top_k = default_k if top_k is None else top_k
    temperature = default_temperature if temperature is None else temperature
    lam = default_lam if lam is None else lam
    image_list = ImageList.of(images) if images is not None else None
    if activations is not None:
        activations = _pool_given(activations, pool)
    elif pool != "mean" and model is not None and image_list is not None:
        activations = _capture_pooled(
            model, layer, image_list, pool, transform=transform, batch_size=batch_size,
            device=device, progress=progress,
        )  # fmt: skip
    summary = layer_summary(
        model,
        layer,
        image_list,
        activations,
        transform=transform,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    sims = _clip_side(
        names,
        image_list,
        clip,
        image_features=image_features,
        text_features=text_features,
        clip_similarities=clip_similarities,
        batch_size=batch_size,
        prompt=prompt,
        device=device,
        progress=progress,
    )
    if sims.shape[0] != summary.shape[0]:
        raise PyneuronError(
            f"CLIP similarities cover {sims.shape[0]} images but the activations cover "
            f"{summary.shape[0]}; both must be over the same probing images, in order"
        )
    scores = similarity_matrix(
        summary, sims, method, top_k=top_k, temperature=temperature, lam=lam, ties=ties,
        device=device,
    )  # fmt: skip
    selected = select_units(units, summary.shape[1])
    ids, values = top_concepts(scores[selected], top_n)
    import torch

    shown = min(5, summary.shape[0])
    tops = top_images_by_unit(torch.from_numpy(summary), shown, ties).numpy().T[selected]
    table = ranked_labels(layer, selected, METHOD, names, ids, values, tops, similarity=method)
    return DescribeResult(
        table=table,
        method=METHOD,
        concepts=names,
        scores=scores[selected] if return_matrix else None,
        top_images=tops,
        details={
            "similarity": method,
            "pool": pool,
            "top_k": top_k,
            "temperature": temperature,
            "lam": lam,
            "ties": ties,
        },
    )


def _pool_given(activations: Any, pool: str) -> Any:
    """Given activations as :func:`layer_summary` takes them: (N, U) as is, maps pooled."""
    if pool == "mean" or np.ndim(activations) == 2:
        return activations
    if pool == "cls":
        raise PyneuronError(
            "pool='cls' needs the class token, which (N, U, h, w) activation maps do not "
            "hold; pass the (N, U) class-token features as activations, or give the model "
            "and images instead"
        )
    return activation_summary(activations, pool=pool)


def _capture_pooled(
    model: Any,
    layer: str,
    images: ImageList,
    pool: str,
    *,
    transform: Callable[..., Any] | None,
    batch_size: int,
    device: Any,
    progress: bool,
) -> np.ndarray:
    """(N, U, 1, 1) summaries of ``layer`` by ``pool`` ("max" or "cls"), captured in one
    pass without keeping the maps."""
    import torch

    from ..model.activations import capture, resolve_layers

    if not isinstance(layer, str):
        raise PyneuronError(f"layer must be one module name, got {layer!r}")
    if pool == "max":
        units: Callable[[Any], Any] = _max_over_positions
        handle = None
    else:
        class_tokens: list[Any] = []

        def keep_class_token(_module: Any, _inputs: Any, output: Any) -> None:
            try:  # a tensor, or a tuple / ModelOutput whose first item is the hidden state
                tensor = output if isinstance(output, torch.Tensor) else output[0]
            except (IndexError, KeyError, TypeError):
                tensor = None
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None
                raise PyneuronError(
                    f"pool='cls' needs a token layer with (batch, tokens, channels) output; "
                    f"layer {layer!r} gives {shape or type(output).__name__}; use pool='mean' "
                    "or 'max'"
                )
            class_tokens.append(tensor[:, 0])

        def units(_maps: Any) -> Any:
            return class_tokens.pop()

        # registered before capture's own hook, so it runs first on every batch
        handle = resolve_layers(model, layer)[layer].register_forward_hook(keep_class_token)
    try:
        return capture(
            model, layer, images, batch_size=batch_size, device=device, transform=transform,
            units=units, progress=progress,
        )[layer]  # fmt: skip
    finally:
        if handle is not None:
            handle.remove()


def _max_over_positions(maps: Any) -> Any:
    """(B, U) maximum of (B, U, h, w) maps over the positions."""
    return maps.amax(dim=(2, 3))


def _clip_side(
    names: list[str],
    images: ImageList | None,
    clip: Any,
    *,
    image_features: Any,
    text_features: Any,
    clip_similarities: Any,
    batch_size: int,
    prompt: str,
    device: Any,
    progress: bool,
) -> np.ndarray:
    """(N, C) image-concept cosine similarities, computing only what was not given."""
    if clip_similarities is not None:
        sims = np.asarray(clip_similarities, dtype=np.float32)
        if sims.ndim != 2 or sims.shape[1] != len(names):
            raise PyneuronError(
                f"clip_similarities has shape {sims.shape} but there are {len(names)} concepts; "
                "give an (images, concepts) matrix with one column per concept, in order"
            )
        return sims
    if text_features is not None and len(text_features) != len(names):
        raise PyneuronError(
            f"text_features has {len(text_features)} rows but there are {len(names)} concepts; "
            "give one embedding per concept, in order"
        )
    encoder = None
    if image_features is None or text_features is None:
        encoder = ClipEncoder.load(clip, batch_size=batch_size, prompt=prompt, device=device)
    if image_features is None:
        if images is None:
            raise PyneuronError("give the probing images (or CLIP image_features)")
        assert encoder is not None
        image_features = encoder.encode_images(images, progress=progress)
    if text_features is None:
        assert encoder is not None
        text_features = encoder.encode_texts(names, progress=progress)
    return clip_image_text_similarities(image_features, text_features)
