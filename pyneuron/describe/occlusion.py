"""Occlusion + vocabulary scoring: find the patch of each top image that drives a unit by
occluding it, crop it, and score candidate words for the crops with CLIP."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import PyneuronError
from ..model.activations import capture
from ..progress import progress_bar
from .clip import DEFAULT_CLIP, ClipEncoder
from .images import ImageList, crop_box, expand_box, grey_box, occlusion_boxes
from .result import (
    DescribeResult,
    check_concepts,
    join,
    layer_summary,
    ranked_labels,
    score_text,
    select_units,
)
from .similarity import activation_summary, top_concepts

METHOD = "occlusion"
FULL = (0.0, 0.0, 1.0, 1.0)


def top_image_ids(summary: np.ndarray, units: np.ndarray, k: int) -> np.ndarray:
    """(len(units), k) ids of each unit's ``k`` highest-summary images, best first (ties:
    lower id).

    Examples
    --------
    >>> top_image_ids(np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 5.0]]), np.array([0]), 2)
    array([[1, 2]])
    """
    if k < 1:
        raise PyneuronError(f"top_k must be at least 1, got {k}")
    k = min(int(k), summary.shape[0])
    order = np.argsort(-summary[:, units], axis=0, kind="stable")[:k]
    return order.T.copy()


def driving_patches(
    model: Any,
    layer: str,
    images: ImageList,
    units: np.ndarray,
    tops: np.ndarray,
    *,
    patch: float = 0.25,
    stride: float = 0.125,
    transform: Callable[..., Any] | None = None,
    batch_size: int = 32,
    device: Any = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """For each (unit, top image), the occlusion box that lowers the unit the most.

    Every image in ``tops`` is run once with no occlusion and once per box of
    :func:`~pyneuron.describe.images.occlusion_boxes` (``patch`` and ``stride`` are
    fractions of the image side; the box is filled with grey 128 in the *original*
    image, before ``transform``); the drop of a unit is its summary (spatial mean) on the
    plain image minus that on the occluded one. One pass per image serves every unit.
    When no box lowers the unit (best drop <= 0), the whole image is returned.

    Returns
    -------
    boxes, drops
        (len(units), k, 4) boxes (left, top, right, bottom as fractions) and
        (len(units), k) the drops they cause.
    """
    grid = occlusion_boxes(patch, stride)
    boxes = np.zeros((*tops.shape, 4), dtype=np.float64)
    drops = np.zeros(tops.shape, dtype=np.float64)
    where: dict[int, list[tuple[int, int]]] = {}
    for row in range(tops.shape[0]):
        for col in range(tops.shape[1]):
            where.setdefault(int(tops[row, col]), []).append((row, col))
    for image_id in progress_bar(sorted(where), desc="occlusion", unit="img", enabled=progress):
        image = images[image_id]
        variants = [image] + [grey_box(image, box) for box in grid]
        maps = capture(
            model,
            layer,
            variants,
            batch_size=batch_size,
            device=device,
            transform=transform,
            progress=False,
        )[layer]
        summary = activation_summary(maps)  # (1 + boxes, all units)
        drop = summary[0][None, :] - summary[1:]
        for row, col in where[image_id]:
            unit_drop = drop[:, units[row]]
            best = int(np.argmax(unit_drop))
            drops[row, col] = float(unit_drop[best])
            boxes[row, col] = grid[best] if unit_drop[best] > 0 else FULL
    return boxes, drops


def _box_text(box: Sequence[float]) -> str:
    return ",".join(f"{v:.3g}" for v in box)


def occlusion_describe(
    model: Any,
    layer: str,
    images: Any,
    vocabulary: Sequence[str],
    *,
    clip: Any = DEFAULT_CLIP,
    top_k: int = 5,
    top_n: int = 5,
    units: Sequence[int] | None = None,
    patch: float = 0.25,
    stride: float = 0.125,
    crop_scale: float = 1.5,
    prompt: str = "{}",
    temperature: float | None = None,
    batch_size: int = 32,
    transform: Callable[..., Any] | None = None,
    activations: Any = None,
    device: Any = None,
    progress: bool = True,
) -> DescribeResult:
    """Describe units by the words CLIP assigns to the image patches that drive them.

    For each unit: its ``top_k`` probing images by activation summary; in each, the
    occlusion box that lowers the unit most (:func:`driving_patches`); the crop of that
    box enlarged ``crop_scale`` times about its centre (context around the patch); CLIP
    zero-shot probabilities of the ``vocabulary`` words for each crop (softmax of the
    cosine similarities times CLIP's logit scale, i.e. ``temperature = 1 / logit_scale``
    unless given); the unit's score of a word is its mean probability over the crops,
    and the label is the best word.

    This follows the occlusion + CLIP-scoring idea of the generative describers
    (Describe-and-Dissect and relatives) with a user vocabulary instead of generated
    words.

    Parameters
    ----------
    model, layer, images
        The network, one module name, and the probing images (a folder, image paths,
        PIL images, or a uint8 array); the model is needed (occlusion reruns it).
    vocabulary
        Candidate words or phrases.
    top_k
        Top images per unit.
    patch, stride
        Occlusion box side and step, as fractions of the image side (default: 7 x 7
        boxes of a quarter of the side).
    activations
        Precomputed activations of ``layer`` on ``images`` (saves the first pass).

    Returns
    -------
    DescribeResult
        ``table`` (common columns plus ``boxes``, the crop boxes per top image, and
        ``drops``), ``scores`` (units, words), ``details["boxes"]``.

    Examples
    --------
    >>> result = occlusion_describe(model, "layer4", "images/", ["dog", "sky"],
    ...                             clip="path/to/clip", units=[0, 1])  # doctest: +SKIP
    """
    words = check_concepts(vocabulary, "vocabulary")
    if model is None:
        raise PyneuronError("occlusion needs the model: it reruns it on occluded images")
    if images is None:
        raise PyneuronError("occlusion needs the probing images")
    if crop_scale < 1:
        raise PyneuronError(f"crop_scale must be at least 1, got {crop_scale}")
    image_list = ImageList.of(images)
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
    selected = select_units(units, summary.shape[1])
    tops = top_image_ids(summary, selected, top_k)
    boxes, drops = driving_patches(
        model,
        layer,
        image_list,
        selected,
        tops,
        patch=patch,
        stride=stride,
        transform=transform,
        batch_size=batch_size,
        device=device,
        progress=progress,
    )
    encoder = ClipEncoder.load(clip, batch_size=batch_size, prompt=prompt, device=device)
    crops, crop_index = _crops(image_list, tops, boxes, crop_scale)
    crop_features = encoder.encode_images(crops, progress=progress)
    word_features = encoder.encode_texts(words, progress=progress)
    scale = encoder.logit_scale if temperature is None else 1.0 / temperature
    probabilities = _softmax(scale * (crop_features @ word_features.T))  # (crops, words)
    scores = probabilities[crop_index].mean(axis=1)  # (units, words)
    ids, values = top_concepts(scores, top_n)
    table = ranked_labels(
        layer,
        selected,
        METHOD,
        words,
        ids,
        values,
        tops,
        boxes=[join(row, _box_text) for row in boxes],
        drops=[join(row, score_text) for row in drops],
    )
    return DescribeResult(
        table=table,
        method=METHOD,
        concepts=words,
        scores=scores,
        top_images=tops,
        details={"boxes": boxes, "drops": drops, "logit_scale": scale, "crop_scale": crop_scale},
    )


def _crops(
    images: ImageList, tops: np.ndarray, boxes: np.ndarray, scale: float
) -> tuple[list[Any], np.ndarray]:
    """Unique crops and, per (unit, top image), the index of its crop."""
    crops: list[Any] = []
    seen: dict[tuple[int, tuple[float, ...]], int] = {}
    index = np.zeros(tops.shape, dtype=np.int64)
    for row in range(tops.shape[0]):
        for col in range(tops.shape[1]):
            box = expand_box(tuple(boxes[row, col]), scale)  # type: ignore[arg-type]
            key = (int(tops[row, col]), box)
            if key not in seen:
                seen[key] = len(crops)
                crops.append(crop_box(images[key[0]], box))
            index[row, col] = seen[key]
    return crops, index


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
