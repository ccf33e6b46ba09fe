"""The benchmark's baselines (bench/numpy_search.py, bench/numba_search.py) against the
brute-force oracle: the speed ratios in bench/results only mean something if the
baselines run the same search. numba comes with the ``bench`` extra."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from oracle import brute_force_beam, random_case

import pyneuron

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import numpy_search  # noqa: E402

OPTIONS = [
    dict(length=3, beam_size=4, operators=("OR", "AND", "AND NOT")),
    dict(length=4, beam_size=3, operators=("OR", "AND", "AND NOT", "OR NOT"), penalty=0.9),
]


def _case(seed: int):
    rng = np.random.default_rng(seed)
    concepts, units = random_case(rng, 5, 7, 9, n_concepts=8, n_units=6)  # 63 bits per image
    names = [f"c{i}" for i in range(len(concepts))]
    store = pyneuron.ConceptStore.from_masks(concepts, names)
    return concepts, units, names, numpy_search.PackedConcepts.from_store(store)


@pytest.mark.parametrize("options", OPTIONS)
def test_numpy_baseline_matches_brute_force(options):
    concepts, units, names, packed = _case(1)
    for u in range(len(units)):
        words = numpy_search.pack_mask(units[u])
        got = numpy_search.beam_search(words, packed, **options)
        assert got.rows() == brute_force_beam(units[u], concepts, names, **options)


@pytest.mark.parametrize("options", OPTIONS)
def test_numba_baseline_matches_brute_force(options):
    numba_search = pytest.importorskip("numba_search", reason="numba (the bench extra)")
    concepts, units, names, packed = _case(2)
    words = np.stack([numpy_search.pack_mask(u) for u in units])
    got = numba_search.beam_search(words, packed, **options)
    for u in range(len(units)):
        assert got[u].rows() == brute_force_beam(units[u], concepts, names, **options)
