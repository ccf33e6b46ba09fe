"""The only importer of the compiled engine ``pyneuron._core``.

Everything else in the package reaches C++ through the names defined here, so a
missing or broken build fails in one place with one clear message.
"""

from __future__ import annotations

try:
    from . import _core
except ImportError as error:  # pragma: no cover - only when the build is missing
    raise ImportError(
        "pyneuron's compiled engine (pyneuron._core) could not be imported. Install the "
        "package with `pip install .` (not by putting the source tree on sys.path) and run "
        f"tests with `pytest`, not `python -m pytest`. Original error: {error}"
    ) from error

NativeMaskSet = _core.MaskSet
beam_search = _core.beam_search
optimal_search = _core.optimal_search
concept_cooccurrence = _core.concept_cooccurrence
intersection_counts = _core.intersection_counts
category_unit_pixels = _core.category_unit_pixels
evaluate_words = _core.evaluate_words
formula_counts = _core.formula_counts
bilinear_resize = _core.bilinear_resize
#: Largest ``length`` and ``beam_size`` the beam search accepts.
MAX_LENGTH: int = _core.max_length
MAX_BEAM_SIZE: int = _core.max_beam_size
upsample_threshold = _core.upsample_threshold
#: In-cache AND+popcount bytes/s of one core at the current SIMD level (benchmarks only).
and_popcount_throughput = _core.and_popcount_throughput


def available_simd_levels() -> list[str]:
    """SIMD levels this CPU and build support, best last (``"scalar"`` is always there)."""
    return list(_core.available_simd_levels())


def simd_level() -> str:
    """The SIMD level in use (the best available, or ``PYNEURON_SIMD`` from the environment)."""
    return _core.simd_level()


def set_simd_level(level: str) -> None:
    """Select the AND+popcount kernels: ``"scalar"``, ``"avx2"`` or ``"avx512"``.

    Raises
    ------
    ValueError
        If the level is unknown or this CPU does not support it.
    """
    _core.set_simd_level(level)


def num_threads() -> int:
    """Number of worker threads the engine uses."""
    return _core.num_threads()


def set_num_threads(n: int) -> None:
    """Set the number of worker threads (default: all cores, or ``PYNEURON_NUM_THREADS``)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of threads must be a positive integer, got {n!r}")
    _core.set_num_threads(n)
