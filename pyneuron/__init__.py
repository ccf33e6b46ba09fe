"""pyneuron: explain what every unit of a vision network detects, as logical formulas
over concepts, exactly and fast.

Main entry points: :class:`ConceptStore`, :class:`UnitMasks`, :func:`explain`,
:func:`iou_table`, :func:`score` and :class:`Formula`.
"""

from ._native import (
    available_simd_levels,
    num_threads,
    set_num_threads,
    set_simd_level,
    simd_level,
)
from .errors import EmptyStoreError, GridMismatchError, PyneuronError, StoreError
from .formula import And, Concept, Formula, Not, Or
from .grid import Grid
from .search import OPERATORS, explain, iou_table, score
from .store import ConceptStore, ConceptStoreWriter
from .units import UnitMasks, UnitMasksWriter

__version__ = "0.1.0"

__all__ = [
    "OPERATORS",
    "And",
    "Concept",
    "ConceptStore",
    "ConceptStoreWriter",
    "EmptyStoreError",
    "Formula",
    "Grid",
    "GridMismatchError",
    "Not",
    "Or",
    "PyneuronError",
    "StoreError",
    "UnitMasks",
    "UnitMasksWriter",
    "__version__",
    "available_simd_levels",
    "explain",
    "iou_table",
    "num_threads",
    "score",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
]
