"""Type stubs for the compiled engine. Use the pyneuron package, not this module."""

from typing import Literal, overload

import numpy as np
import numpy.typing as npt

def available_simd_levels() -> list[str]: ...
def simd_level() -> str: ...
def set_simd_level(level: str) -> None: ...
def and_popcount_throughput(words: int, seconds: float) -> float: ...
def num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def max_threads() -> int: ...

class MaskSet:
    def __init__(
        self,
        n_images: int,
        pixels: int,
        offsets: npt.NDArray[np.int64],
        images: npt.NDArray[np.int32],
        slots: npt.NDArray[np.int64],
        counts: npt.NDArray[np.int32],
        words: npt.NDArray[np.uint64],
    ) -> None: ...
    @property
    def n_masks(self) -> int: ...
    @property
    def n_images(self) -> int: ...
    @property
    def pixels(self) -> int: ...
    def verify_words(self) -> None: ...

max_length: int
max_beam_size: int

def beam_search(
    units: MaskSet,
    begin: int,
    end: int,
    concepts: MaskSet,
    length: int,
    beam_size: int,
    ops: list[int],
    penalty: float,
    cooccurrence: npt.NDArray[np.uint64] | None = None,
    block_bytes: int = ...,
) -> dict[str, np.ndarray | float | int]: ...
def optimal_search(
    units: MaskSet,
    begin: int,
    end: int,
    concepts: MaskSet,
    length: int,
    ops: list[int],
    beam_size: int,
    time_limit: float,
    max_nodes: int,
    cooccurrence: npt.NDArray[np.uint64] | None = None,
) -> dict[str, np.ndarray]: ...
@overload
def concept_cooccurrence(
    concepts: MaskSet, with_stats: Literal[False] = False
) -> npt.NDArray[np.uint64]: ...
@overload
def concept_cooccurrence(
    concepts: MaskSet, with_stats: Literal[True]
) -> tuple[npt.NDArray[np.uint64], float, int]: ...
def intersection_counts(
    units: MaskSet, begin: int, end: int, concepts: MaskSet
) -> npt.NDArray[np.int64]: ...
def category_unit_pixels(
    units: MaskSet,
    begin: int,
    end: int,
    concepts: MaskSet,
    category: npt.NDArray[np.int32],
    n_categories: int,
) -> npt.NDArray[np.int64]: ...
def evaluate_words(program: list[int], concepts: MaskSet) -> npt.NDArray[np.uint64]: ...
def formula_counts(
    program: list[int], concepts: MaskSet, units: MaskSet
) -> dict[str, np.ndarray | int]: ...
def bilinear_resize(
    maps: npt.NDArray[np.float32], height: int, width: int
) -> npt.NDArray[np.float32]: ...
def upsample_threshold(
    maps: npt.NDArray[np.float32],
    lo: npt.NDArray[np.float64],
    hi: npt.NDArray[np.float64] | None,
    height: int,
    width: int,
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int32]]: ...
