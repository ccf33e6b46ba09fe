"""The engine: stores, masks, formulas and the exact searches (no torch, no CLI, no Ray).

Its compiled core is reached only through :mod:`pyneuron.engine._native`; the engine's
settings (SIMD level, threads) are re-exported here for the rest of the package.
"""

from ._native import available_simd_levels, num_threads, set_num_threads, set_simd_level, simd_level

__all__ = [
    "available_simd_levels",
    "num_threads",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
]
