"""pyneuron: explain what every unit of a vision network detects, as logical formulas
over concepts, exactly and fast.

Main entry points: :func:`dissect` (model layer -> explanations), :func:`capture`,
:class:`ConceptStore`, :class:`UnitMasks`, :func:`explain` (its search:
:class:`SearchSettings`), :func:`iou_table`, :func:`compare_searches`, :func:`score` and
:class:`Formula`; checks of explanations: :func:`evaluate` (held-out images),
:func:`null_baseline` and :func:`significance` (control units), :func:`faithfulness`
(masking concepts).
"""

from . import concepts, describe
from .engine import (
    available_simd_levels,
    num_threads,
    set_num_threads,
    set_simd_level,
    simd_level,
)
from .engine.formula import And, Concept, Formula, Not, Or
from .engine.grid import Grid
from .engine.heldout import evaluate, split_images
from .engine.null import control_units, null_baseline, significance
from .engine.search import compare_searches, iou_table, score
from .engine.settings import MAX_BEAM_SIZE, MAX_LENGTH, OPERATORS, SearchSettings
from .engine.store import ConceptStore, ConceptStoreWriter
from .engine.units import UnitMasks, UnitMasksWriter
from .engine.upsample import bilinear_resize, unit_masks_from_activations
from .errors import (
    EmptyStoreError,
    GridMismatchError,
    InsufficientMemoryError,
    OutOfRangeError,
    OutputExistsError,
    PyneuronError,
    StoreError,
    UnknownConceptError,
)
from .model.activations import LayerFormat, capture
from .model.dissect import dissect
from .model.faithfulness import faithfulness
from .model.thresholds import activation_ranges, compexp_level, quantile_thresholds, user_thresholds
from .scale import explain
from .scale.ray import RayBackend

__version__ = "0.1.0"

__all__ = [
    "MAX_BEAM_SIZE",
    "MAX_LENGTH",
    "OPERATORS",
    "And",
    "Concept",
    "ConceptStore",
    "ConceptStoreWriter",
    "EmptyStoreError",
    "Formula",
    "Grid",
    "GridMismatchError",
    "InsufficientMemoryError",
    "LayerFormat",
    "Not",
    "Or",
    "OutOfRangeError",
    "OutputExistsError",
    "PyneuronError",
    "RayBackend",
    "SearchSettings",
    "StoreError",
    "UnitMasks",
    "UnitMasksWriter",
    "UnknownConceptError",
    "concepts",
    "describe",
    "__version__",
    "activation_ranges",
    "available_simd_levels",
    "bilinear_resize",
    "capture",
    "compare_searches",
    "compexp_level",
    "control_units",
    "dissect",
    "evaluate",
    "explain",
    "faithfulness",
    "iou_table",
    "null_baseline",
    "num_threads",
    "quantile_thresholds",
    "score",
    "set_num_threads",
    "set_simd_level",
    "significance",
    "simd_level",
    "split_images",
    "unit_masks_from_activations",
    "user_thresholds",
]
