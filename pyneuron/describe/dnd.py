"""Describe-and-Dissect-lite: caption a unit's top images and crops, turn the captions
into candidate descriptions, and keep the description whose CLIP-retrieved probing images
activate the unit most.

Describe-and-Dissect (Bai et al., arXiv 2403.13771) captions attention crops with BLIP,
summarizes the captions with an LLM, generates images for each candidate with Stable
Diffusion and ranks the candidates by how those images activate the unit. The "lite"
version here needs only local models: BLIP (or any captioner callable) for the captions,
a rule-based phrase extractor instead of the LLM, and CLIP *retrieval* of probing images
instead of image generation.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import PyneuronError
from .clip import DEFAULT_CLIP, ClipEncoder, load_pretrained
from .images import ImageList, crop_box, expand_box
from .occlusion import driving_patches, top_image_ids
from .result import (
    DescribeResult,
    check_concepts,
    join,
    layer_summary,
    place_model,
    score_text,
    select_units,
)

METHOD = "dnd"
#: The captioner Describe-and-Dissect uses, as a transformers model id.
DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"

Captioner = Callable[[list[Any]], list[str]]

_BOILERPLATE = (
    "there is",
    "there are",
    "this is",
    "it is",
    "picture of",
    "image of",
    "photo of",
    "photograph of",
    "close up of",
    "close - up of",
    "closeup of",
    "view of",
    "blurry",
    "arafed",
    "araffe",
    "arafly",
)
_DETERMINERS = {
    "a", "an", "the", "some", "this", "that", "these", "those", "its", "their", "his", "her",
    "one", "two", "three", "four", "five", "several", "many", "few", "other", "another",
}  # fmt: skip
_SPLITTERS = {
    "of", "with", "on", "in", "at", "and", "or", "near", "by", "under", "over", "behind",
    "next", "to", "from", "for", "is", "are", "was", "were", "be", "that", "which", "while",
    "into", "onto", "has", "have", "having", "it", "there", "top", "inside", "outside",
    "front", "against", "through", "above", "below", "up", "down", "out", "as",
}  # fmt: skip
_VAGUE = {
    "picture", "image", "photo", "photograph", "view", "close", "closeup", "side", "middle",
    "bunch", "couple", "group", "lot", "pair", "thing", "things", "something", "background",
}  # fmt: skip
_WORD = re.compile(r"[a-z0-9][a-z0-9'-]*")


def _clean_caption(caption: str) -> list[str]:
    """Lowercased words of a caption with leading captioner boilerplate removed."""
    words = _WORD.findall(caption.lower())
    changed = True
    while changed and words:
        changed = False
        while words and words[0] in _DETERMINERS:
            words = words[1:]
            changed = True
        text = " ".join(words)
        for prefix in _BOILERPLATE:
            if text == prefix or text.startswith(prefix + " "):
                words = words[len(prefix.split()) :]
                changed = True
                break
    return words


def caption_phrases(caption: str) -> list[str]:
    """Rule-based candidate phrases of one caption: the cleaned caption, then its noun-
    phrase-like chunks (split at prepositions, conjunctions, auxiliaries and -ing verbs,
    leading determiners and numbers dropped, vague words like "picture" skipped).

    Examples
    --------
    >>> caption_phrases("a close up of a red car parked on the street")
    ['red car parked on the street', 'red car parked', 'street']
    >>> caption_phrases("two dogs sitting on a couch")
    ['dogs sitting on a couch', 'dogs', 'couch']
    """
    words = _clean_caption(caption)
    whole = " ".join(words)
    phrases = [whole] if whole and whole not in _VAGUE else []
    chunk: list[str] = []
    chunks = []
    for word in words:
        if word in _SPLITTERS or (word.endswith("ing") and len(word) > 4):
            chunks.append(chunk)
            chunk = []
        else:
            chunk.append(word)
    chunks.append(chunk)
    for chunk in chunks:
        while chunk and (chunk[0] in _DETERMINERS or chunk[0].isdigit()):
            chunk = chunk[1:]
        phrase = " ".join(chunk)
        if phrase and phrase not in _VAGUE and phrase not in phrases:
            phrases.append(phrase)
    return phrases


def candidate_descriptions(captions: Sequence[str], *, max_candidates: int = 20) -> list[str]:
    """Deduplicated candidate descriptions from captions (:func:`caption_phrases`), the
    ones found in most captions first (ties: first seen), at most ``max_candidates``.

    Examples
    --------
    >>> candidate_descriptions(["a dog on a couch", "a dog on the grass", "a black dog"])
    ['dog', 'dog on a couch', 'couch', 'dog on the grass', 'grass', 'black dog']
    """
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for caption in captions:
        for phrase in dict.fromkeys(caption_phrases(caption)):
            counts[phrase] += 1
            first.setdefault(phrase, len(first))
    ranked = sorted(counts, key=lambda p: (-counts[p], first[p]))
    return ranked[: max(1, int(max_candidates))]


class BlipCaptioner:
    """A callable captioner ``images -> captions`` around a transformers image-to-text
    model (BLIP by default), greedy decoding.

    Parameters
    ----------
    model, processor
        E.g. ``BlipForConditionalGeneration`` and its ``BlipProcessor``.
    max_new_tokens
        Caption length limit.
    prompt
        Optional text prefix the caption continues (BLIP's conditional captioning); it is
        removed from the returned captions.

    Examples
    --------
    >>> captioner = BlipCaptioner.load("path/to/blip")  # doctest: +SKIP
    >>> captioner([image])  # doctest: +SKIP
    ['a dog sitting on a couch']
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        max_new_tokens: int = 20,
        prompt: str | None = None,
        batch_size: int = 16,
        device: Any = None,
    ) -> None:
        self.model, self.device = place_model(model, device)
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt
        self.batch_size = batch_size
        self.name = type(model).__name__

    @classmethod
    def load(
        cls, spec: str | os.PathLike[str] | tuple[Any, Any] = DEFAULT_CAPTIONER, **options: Any
    ) -> BlipCaptioner:
        """From a directory or cached model id (nothing is downloaded) or a
        ``(model, processor)`` pair."""
        if isinstance(spec, tuple):
            return cls(*spec, **options)
        import transformers

        model = load_pretrained(spec, "captioning model", transformers.AutoModelForImageTextToText)
        processor = load_pretrained(spec, "captioning processor", transformers.AutoProcessor)
        captioner = cls(model, processor, **options)
        captioner.name = str(spec)
        return captioner

    def __call__(self, images: list[Any]) -> list[str]:
        import torch

        captions: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = list(images[start : start + self.batch_size])
                if self.prompt:
                    inputs = self.processor(
                        images=batch, text=[self.prompt] * len(batch), return_tensors="pt"
                    )
                else:
                    inputs = self.processor(images=batch, return_tensors="pt")
                inputs = {k: v.to(self.device) for k, v in inputs.items() if hasattr(v, "to")}
                inputs.pop("token_type_ids", None)
                output = self.model.generate(
                    **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
                )
                texts = self.processor.batch_decode(output, skip_special_tokens=True)
                for text in texts:
                    text = text.strip()
                    if self.prompt and text.lower().startswith(self.prompt.lower()):
                        text = text[len(self.prompt) :].strip()
                    captions.append(text)
        return captions


def activation_percentiles(summary: np.ndarray) -> np.ndarray:
    """Per unit (column), each image's activation as a mid-rank percentile in [0, 1]
    (0: lowest, 1: highest; ties share their average rank).

    Examples
    --------
    >>> activation_percentiles(np.array([[0.0], [5.0], [5.0], [1.0]])).ravel()
    array([0.        , 0.83333333, 0.83333333, 0.33333333])
    """
    n = summary.shape[0]
    if n == 1:
        return np.ones_like(summary, dtype=np.float64)
    out = np.empty(summary.shape, dtype=np.float64)
    for unit in range(summary.shape[1]):
        column = summary[:, unit]
        ordered = np.sort(column)
        low = np.searchsorted(ordered, column, side="left")
        high = np.searchsorted(ordered, column, side="right")
        out[:, unit] = (low + high - 1) / 2 / (n - 1)
    return out


def describe_and_dissect(
    model: Any,
    layer: str,
    images: Any,
    *,
    clip: Any = DEFAULT_CLIP,
    captioner: str | os.PathLike[str] | Captioner = DEFAULT_CAPTIONER,
    top_k: int = 5,
    top_n: int = 5,
    units: Sequence[int] | None = None,
    crops: bool = True,
    patch: float = 0.25,
    stride: float = 0.125,
    crop_scale: float = 1.5,
    max_candidates: int = 20,
    extra_candidates: Sequence[str] | None = None,
    propose: Callable[[list[str]], list[str]] | None = None,
    retrieve: int = 10,
    prompt: str = "{}",
    batch_size: int = 32,
    transform: Callable[..., Any] | None = None,
    activations: Any = None,
    image_features: Any = None,
    device: Any = None,
    progress: bool = True,
) -> DescribeResult:
    """Describe-and-Dissect-lite: generated candidate descriptions, ranked by retrieval.

    For each unit:

    1. its ``top_k`` probing images (by activation summary) and, with ``crops``, the crop
       around the occlusion patch that drives it in each (as in
       :func:`~pyneuron.describe.occlusion_describe`);
    2. a caption of every such image and crop from ``captioner`` (any callable
       ``list of PIL images -> list of str``, or a BLIP directory / cached id);
    3. candidate descriptions from the captions (``propose``, default
       :func:`candidate_descriptions`: the captions and their noun-phrase-like chunks,
       deduplicated, most frequent first, at most ``max_candidates``), plus
       ``extra_candidates``;
    4. for each candidate, the ``retrieve`` probing images most similar to it under CLIP;
       its score is the mean activation percentile of the unit over those images
       (:func:`activation_percentiles`: 1 = the unit's highest image), so a description
       scores high when the images it retrieves are ones the unit fires on;
    5. the label is the best-scoring candidate (ties: the earlier candidate).

    Returns
    -------
    DescribeResult
        ``table`` (common columns plus ``captions`` joined with ``" | "`` and
        ``candidates``, the number of candidates), ``details["captions"]`` per unit.
        A unit whose captions give no candidate gets no label (``None``, score NaN).

    Examples
    --------
    >>> result = describe_and_dissect(model, "layer4", "images/", clip="path/to/clip",
    ...                               captioner="path/to/blip", units=[0])  # doctest: +SKIP
    """
    if model is None or images is None:
        raise PyneuronError("Describe-and-Dissect needs the model and the probing images")
    if retrieve < 1:
        raise PyneuronError(f"retrieve must be at least 1, got {retrieve}")
    extra = check_concepts(extra_candidates, "extra_candidates") if extra_candidates else []
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
    describe = captioner if callable(captioner) else BlipCaptioner.load(captioner, device=device)
    views = _views(
        model, layer, image_list, selected, tops, crops, patch, stride, crop_scale,
        transform, batch_size, device, progress,
    )  # fmt: skip
    keys = list(dict.fromkeys(key for unit_views in views for key in unit_views))
    pictures = [image_list[i] if box is None else crop_box(image_list[i], box) for i, box in keys]
    captions = describe(pictures)
    if not isinstance(captions, list) or len(captions) != len(pictures):
        raise PyneuronError(
            f"the captioner returned {type(captions).__name__} of "
            f"{len(captions) if hasattr(captions, '__len__') else '?'} items for "
            f"{len(pictures)} images; it must return one string per image"
        )
    caption_of = {key: str(text) for key, text in zip(keys, captions, strict=True)}
    proposer = propose or (
        lambda texts: candidate_descriptions(texts, max_candidates=max_candidates)
    )
    unit_captions = [[caption_of[key] for key in unit_views] for unit_views in views]
    unit_candidates = []
    for texts in unit_captions:
        proposed = [str(c).strip() for c in proposer(texts)]
        unit_candidates.append(list(dict.fromkeys([c for c in proposed if c] + extra)))
    encoder = ClipEncoder.load(clip, batch_size=batch_size, prompt=prompt, device=device)
    if image_features is None:
        image_features = encoder.encode_images(image_list, progress=progress)
    image_features = np.asarray(image_features, dtype=np.float32)
    if image_features.shape[0] != summary.shape[0]:
        raise PyneuronError(
            f"image_features cover {image_features.shape[0]} images but the activations "
            f"cover {summary.shape[0]}"
        )
    image_features = image_features / np.maximum(
        np.linalg.norm(image_features, axis=1, keepdims=True), 1e-12
    )
    all_candidates = list(dict.fromkeys(c for cands in unit_candidates for c in cands))
    text_of: dict[str, np.ndarray] = {}
    if all_candidates:
        features = encoder.encode_texts(all_candidates, progress=progress)
        text_of = dict(zip(all_candidates, features, strict=True))
    percentiles = activation_percentiles(summary[:, selected])
    retrieved_k = min(retrieve, summary.shape[0])
    labels, scores, tops_text, score_texts = [], [], [], []
    for row, candidates in enumerate(unit_candidates):
        if not candidates:
            labels.append(None)
            scores.append(float("nan"))
            tops_text.append("")
            score_texts.append("")
            continue
        sims = image_features @ np.stack([text_of[c] for c in candidates]).T  # (N, c)
        nearest = np.argsort(-sims, axis=0, kind="stable")[:retrieved_k]  # (r, c)
        values = percentiles[nearest, row].mean(axis=0)
        order = np.argsort(-values, kind="stable")[:top_n]
        labels.append(candidates[order[0]])
        scores.append(float(values[order[0]]))
        tops_text.append(join(candidates[i] for i in order))
        score_texts.append(join(values[order], score_text))
    table = pd.DataFrame(
        {
            "layer": layer,
            "unit": selected,
            "method": METHOD,
            "label": labels,
            "score": np.asarray(scores, dtype=np.float64),
            "top_concepts": tops_text,
            "top_scores": score_texts,
            "top_images": [join(row) for row in tops],
            "captions": [" | ".join(texts) for texts in unit_captions],
            "candidates": [len(c) for c in unit_candidates],
        }
    )
    return DescribeResult(
        table=table,
        method=METHOD,
        top_images=tops,
        details={
            "captions": unit_captions,
            "candidates": unit_candidates,
            "captioner": getattr(describe, "name", type(describe).__name__),
            "retrieve": retrieved_k,
        },
    )


def _views(
    model: Any,
    layer: str,
    images: ImageList,
    units: np.ndarray,
    tops: np.ndarray,
    crops: bool,
    patch: float,
    stride: float,
    crop_scale: float,
    transform: Any,
    batch_size: int,
    device: Any,
    progress: bool,
) -> list[list[tuple[int, tuple[float, ...] | None]]]:
    """Per unit, the (image id, crop box or None for the whole image) pictures to caption."""
    views: list[list[tuple[int, tuple[float, ...] | None]]] = [
        [(int(i), None) for i in row] for row in tops
    ]
    if not crops:
        return views
    boxes, _ = driving_patches(
        model, layer, images, units, tops, patch=patch, stride=stride, transform=transform,
        batch_size=batch_size, device=device, progress=progress,
    )  # fmt: skip
    for row in range(tops.shape[0]):
        for col in range(tops.shape[1]):
            box = tuple(boxes[row, col])
            if box != (0.0, 0.0, 1.0, 1.0):
                views[row].append((int(tops[row, col]), expand_box(box, crop_scale)))  # type: ignore[arg-type]
    return views
