"""Label-free describers of units, to compare with compositional explanations.

- :func:`clip_dissect` — CLIP-Dissect (Oikarinen & Weng, ICLR 2023): soft-WPMI (or hard
  WPMI, cos, cos³, rank-reorder) between unit activations and CLIP image-concept similarities; the
  math alone is :func:`similarity_matrix` (numpy in, numpy out).
- :func:`occlusion_describe` — the patch of each top image that drives a unit (found by
  occlusion), scored against a vocabulary with CLIP.
- :func:`describe_and_dissect` — Describe-and-Dissect-lite: captions (BLIP or any
  callable) of top images and crops → candidate descriptions → ranked by how the probing
  images CLIP retrieves for each activate the unit.
- :func:`compare` — formulas next to label-free labels, with an agreement measure.
- the ``pyneuron describe`` command lives in :mod:`pyneuron.app.describe`.

Every model is loaded through transformers from a directory or the local cache; nothing
is downloaded.
"""

from __future__ import annotations

from .clip import DEFAULT_CLIP, ClipEncoder
from .clip_dissect import clip_dissect, clip_image_text_similarities
from .compare import agreement, compare, formula_concepts, normalize
from .dnd import (
    DEFAULT_CAPTIONER,
    BlipCaptioner,
    activation_percentiles,
    candidate_descriptions,
    caption_phrases,
    describe_and_dissect,
)
from .images import ImageList
from .occlusion import driving_patches, occlusion_describe
from .result import DescribeResult, load_concepts, split
from .similarity import (
    SIMILARITIES,
    activation_summary,
    concept_probabilities,
    cos_cubed,
    cos_similarity,
    rank_reorder,
    similarity_defaults,
    similarity_matrix,
    soft_wpmi,
    soft_wpmi_weights,
    top_concepts,
    wpmi,
)

__all__ = [
    "DEFAULT_CAPTIONER",
    "DEFAULT_CLIP",
    "SIMILARITIES",
    "BlipCaptioner",
    "ClipEncoder",
    "DescribeResult",
    "ImageList",
    "activation_percentiles",
    "activation_summary",
    "agreement",
    "candidate_descriptions",
    "caption_phrases",
    "clip_dissect",
    "clip_image_text_similarities",
    "compare",
    "concept_probabilities",
    "cos_cubed",
    "cos_similarity",
    "describe_and_dissect",
    "driving_patches",
    "formula_concepts",
    "load_concepts",
    "normalize",
    "occlusion_describe",
    "rank_reorder",
    "similarity_defaults",
    "similarity_matrix",
    "soft_wpmi",
    "soft_wpmi_weights",
    "split",
    "top_concepts",
    "wpmi",
]
