"""The only importer of the compiled engine ``pyneuron._core``.

Everything else in the package reaches C++ through the names defined here, so a
missing or broken build fails in one place with one clear message. The engine's
functions are wrapped so that running out of memory inside them raises
:class:`InsufficientMemoryError` (a :class:`~pyneuron.errors.PyneuronError` and a
``MemoryError``) that names the grid, not a bare ``MemoryError: std::bad_alloc``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import InsufficientMemoryError, PyneuronError

try:
    from . import _core
except ImportError as error:  # pragma: no cover - only when the build is missing
    raise ImportError(
        "pyneuron's compiled engine (pyneuron._core) could not be imported. Install the "
        "package with `pip install .` (not by putting the source tree on sys.path) and run "
        f"tests with `pytest`, not `python -m pytest`. Original error: {error}"
    ) from error

F = TypeVar("F", bound=Callable[..., Any])


def memory_error(
    what: str, n_images: int | None = None, pixels: int | None = None
) -> PyneuronError:
    """The error raised when ``what`` ran out of memory, naming the grid when known."""
    grid = f" on a grid of {n_images} images x {pixels} pixels" if n_images is not None else ""
    return InsufficientMemoryError(
        f"not enough memory for {what}{grid}: the memory it needs grows with the number "
        "of images (and with units x concepts). Free memory, use fewer threads "
        "(pyneuron.set_num_threads) or split the probing set. If the grid claims more images "
        "than the masks were built on (an edited manifest.json), rebuild the store"
    )


def _engine(function: F) -> F:
    """``function`` with ``MemoryError`` (``std::bad_alloc``) turned into
    :class:`InsufficientMemoryError` naming the grid of its first mask-set argument."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except InsufficientMemoryError:
            raise
        except MemoryError:
            sets = [a for a in (*args, *kwargs.values()) if isinstance(a, _core.MaskSet)]
            grid = (sets[0].n_images, sets[0].pixels) if sets else (None, None)
            raise memory_error(f"the engine's {name}", *grid) from None

    name = function.__name__
    call.__name__ = call.__qualname__ = name
    call.__doc__ = function.__doc__
    return call  # type: ignore[return-value]


NativeMaskSet = _core.MaskSet
#: What ``beam_search`` and ``optimal_search`` return: per-unit arrays named by ``FIELDS``.
SearchResult = _core.SearchResult
OptimalSearchResult = _core.OptimalSearchResult
beam_search = _engine(_core.beam_search)
optimal_search = _engine(_core.optimal_search)
concept_cooccurrence = _engine(_core.concept_cooccurrence)
intersection_counts = _engine(_core.intersection_counts)
category_unit_pixels = _engine(_core.category_unit_pixels)
evaluate_words = _engine(_core.evaluate_words)
formula_counts = _engine(_core.formula_counts)
bilinear_resize = _engine(_core.bilinear_resize)
#: Largest ``length`` and ``beam_size`` the beam search accepts.
MAX_LENGTH: int = _core.max_length
MAX_BEAM_SIZE: int = _core.max_beam_size
upsample_threshold = _engine(_core.upsample_threshold)
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
    PyneuronError
        If ``level`` is not a string, is unknown, or this CPU does not support it.
    """
    levels = ", ".join(map(repr, available_simd_levels()))
    if not isinstance(level, str):
        raise PyneuronError(
            f"a SIMD level is a string, one of {levels}; got {type(level).__name__} {level!r:.60}"
        )
    try:
        _core.set_simd_level(level)
    except ValueError as error:
        raise PyneuronError(str(error)) from None


def num_threads() -> int:
    """Number of worker threads the engine uses."""
    return _core.num_threads()


def max_threads() -> int:
    """Largest number of worker threads :func:`set_num_threads` accepts: 4 per CPU, and
    at least 512.

    The engine's work is CPU-bound, so threads beyond the CPUs only add context switches,
    and each one reserves a stack (8 MiB of address space by default): hundreds of them
    can exhaust a limited address space (``ulimit -v``, a batch job's memory limit).
    ``PYNEURON_NUM_THREADS`` beyond this is capped to it.
    """
    return _core.max_threads()


def set_num_threads(n: int) -> None:
    """Set the number of worker threads (default: all cores, or ``PYNEURON_NUM_THREADS``).

    Raises
    ------
    PyneuronError
        Unless ``n`` is an integer from 1 to :func:`max_threads`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PyneuronError(f"number of threads must be a positive integer, got {n!r:.60}")
    limit = max_threads()
    if n > limit:
        raise PyneuronError(
            f"number of threads must be at most {limit} (4 per CPU, at least 512; this "
            f"machine has {os.cpu_count()} CPUs), got {n}: more threads than CPUs do not run "
            "the engine faster, and each reserves a stack, so hundreds more can exhaust the "
            "address space and stop the process"
        )
    _core.set_num_threads(n)
