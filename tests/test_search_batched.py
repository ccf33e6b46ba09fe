"""The batched engine (units searched together, co-occurrence intervals, two-pass
screening) against the brute-force beam search, on the cases that exercise it: many units
sharing a block, units in blocks of one, with and without the co-occurrence table, beams
shorter than beam_size, dense OVCE-style concept groups, and pruning."""

from __future__ import annotations

import numpy as np
import pytest
from oracle import brute_force_beam, random_case

import pyneuron

OPS = {"OR": 0, "AND": 1, "AND NOT": 2, "OR NOT": 3}
OP_NAMES = {code: name for name, code in OPS.items()}


def _names(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


def _beams(raw: dict, names: list[str]) -> list[list[tuple[str, float, float]]]:
    """The final beams of a raw engine result as (formula, score, iou), best first."""
    beams = []
    for u in range(len(raw["beam_count"])):
        rows = []
        for k in range(int(raw["beam_count"][u])):
            concepts = [int(c) for c in raw["concepts"][u, k] if c >= 0]
            text = names[concepts[0]]
            for c, op in zip(concepts[1:], raw["ops"][u, k]):
                text = f"({text} {OP_NAMES[int(op)]} {names[c]})"
            rows.append((text, float(raw["score"][u, k]), float(raw["iou"][u, k])))
        beams.append(rows)
    return beams


def _search(units, store, length, beam_size, operators, penalty=1.0, **extra):
    ops = [OPS[o] for o in operators]
    return pyneuron.engine._native.beam_search(
        units._native, 0, len(units), store._native, length, beam_size, ops, penalty, **extra
    )


def _group_concepts(rng, n_images, height, width, groups, per_group, image_level):
    """OVCE-style concepts: in every group each pixel takes exactly one concept (blobs
    around a few seeds per image, a few speckled pixels), plus image-level concepts."""
    shape = (n_images, height, width)
    yy, xx = np.mgrid[0:height, 0:width]
    masks = []
    for _ in range(groups):
        labels = np.zeros(shape, dtype=np.int64)
        for i in range(n_images):
            k = rng.integers(1, min(4, per_group) + 1)
            present = rng.choice(per_group, size=k, replace=False)
            seeds = rng.random((k, 2)) * (height, width)
            dy = yy[None] - seeds[:, 0, None, None]
            d = dy**2 + (xx[None] - seeds[:, 1, None, None]) ** 2
            labels[i] = present[np.argmin(d, axis=0)]
            speckle = rng.random((height, width)) < 0.05
            labels[i][speckle] = rng.integers(0, per_group, int(speckle.sum()))
        masks.extend(labels == k for k in range(per_group))
    for _ in range(image_level):
        full = np.zeros(shape, dtype=bool)
        full[rng.random(n_images) < 0.4] = True
        masks.append(full)
    return np.stack(masks)


def _units_from(rng, concepts, n_units):
    """Planted formulas with noise, silent, everywhere and sparse random units."""
    shape = concepts.shape[1:]
    n = len(concepts)
    units = np.zeros((n_units, *shape), dtype=bool)
    for u in range(n_units):
        kind = u % 5
        if kind == 0:
            a, b, c = rng.choice(n, 3, replace=False)
            units[u] = ((concepts[a] & concepts[b]) | concepts[c]) ^ (rng.random(shape) < 0.05)
        elif kind == 1:
            a, b = rng.choice(n, 2, replace=False)
            units[u] = (concepts[a] & ~concepts[b]) ^ (rng.random(shape) < 0.03)
        elif kind == 2 and u % 10 == 2:
            pass  # never fires
        elif kind == 2:
            units[u] = True
        else:
            units[u] = rng.random(shape) < rng.uniform(0.005, 0.2)
    return units


def _check(concepts, unit_masks, *, length, beam_size, operators, penalty=1.0):
    names = _names(len(concepts))
    store = pyneuron.ConceptStore.from_masks(concepts, names)
    units = pyneuron.UnitMasks.from_masks(unit_masks)
    expected = [
        brute_force_beam(
            unit_masks[u],
            concepts,
            names,
            length=length,
            beam_size=beam_size,
            operators=operators,
            penalty=penalty,
        )
        for u in range(len(unit_masks))
    ]
    table = store.cooccurrence()
    variants = {
        "table, one block": dict(cooccurrence=table),
        "no table, one block": dict(cooccurrence=None),
        "table, a block per unit": dict(cooccurrence=table, block_bytes=1),
    }
    raws = {}
    for label, extra in variants.items():
        raw = _search(units, store, length, beam_size, operators, penalty, **extra)
        assert _beams(raw, names) == expected, label
        raws[label] = raw
    return raws


def test_cooccurrence_matches_numpy(simd, threads):
    rng = np.random.default_rng(5)
    for grid in [(7, 5, 7), (4, 9, 13), (3, 8, 8)]:
        concepts, _ = random_case(rng, *grid, n_concepts=11, n_units=1)
        store = pyneuron.ConceptStore.from_masks(concepts, _names(11))
        flat = concepts.reshape(11, -1).astype(np.uint64)
        np.testing.assert_array_equal(store.cooccurrence(), flat @ flat.T)


@pytest.mark.parametrize("seed", range(3))
def test_many_units_in_one_block_match_brute_force(seed, simd, threads):
    rng = np.random.default_rng(100 + seed)
    concepts, _ = random_case(rng, 6, 9, 9, n_concepts=10, n_units=1)
    units = _units_from(rng, concepts, 24)
    _check(concepts, units, length=3, beam_size=4, operators=("OR", "AND", "AND NOT"))


@pytest.mark.parametrize(
    "options",
    [
        dict(length=4, beam_size=6, operators=("OR", "AND", "AND NOT")),
        dict(length=3, beam_size=3, operators=("OR", "AND", "AND NOT", "OR NOT")),
        dict(length=3, beam_size=5, operators=("AND NOT", "OR"), penalty=0.95),
    ],
)
def test_dense_concept_groups_match_brute_force(options, simd, threads):
    # Disjoint concepts in each group make many overlaps exact (0 within a group) and
    # others tight: the derived-interval and screening paths do most of the work.
    rng = np.random.default_rng(7)
    concepts = _group_concepts(rng, 8, 7, 11, groups=3, per_group=4, image_level=2)
    units = _units_from(rng, concepts, 15)
    raws = _check(concepts, units, **options)
    raw = raws["table, one block"]
    # Most pairs never need |F AND C| counted here; some do, and some are pruned.
    assert raw["derived"].sum() > raw["counted"].sum() > 0
    assert raw["pruned"].sum() > 0
    # Without the table the overlaps are unknown: more is counted, the answer is the same.
    assert raws["no table, one block"]["counted"].sum() > raw["counted"].sum()


def test_beams_shorter_than_beam_size(simd, threads):
    # Two concepts overlap the unit: two primitives for a beam of 8, and a step must
    # still fill the beam from candidates with score 0.
    rng = np.random.default_rng(3)
    concepts = np.zeros((5, 4, 6, 6), dtype=bool)
    concepts[0, :2, :3] = True
    concepts[1, 1:3, 2:] = True
    concepts[2, 3] = True
    concepts[3, :, 5] = True
    unit = np.zeros((1, 4, 6, 6), dtype=bool)
    unit[0, 0, :2, :2] = True
    unit[0, 1, 1, 4] = True
    raws = _check(concepts, unit, length=3, beam_size=8, operators=("OR", "AND", "AND NOT"))
    assert raws["table, one block"]["beam_count"][0] == 8
    silent = _check(concepts, np.zeros_like(unit), length=3, beam_size=4, operators=("OR",))
    assert silent["table, one block"]["beam_count"][0] == 0
    del rng


def test_results_do_not_depend_on_block_neighbours(threads):
    rng = np.random.default_rng(21)
    concepts = _group_concepts(rng, 10, 8, 8, groups=2, per_group=5, image_level=1)
    unit_masks = _units_from(rng, concepts, 12)
    store = pyneuron.ConceptStore.from_masks(concepts, _names(len(concepts)))
    together = _search(
        pyneuron.UnitMasks.from_masks(unit_masks), store, 3, 5, ("OR", "AND", "AND NOT"),
        cooccurrence=store.cooccurrence(),
    )  # fmt: skip
    for u in range(len(unit_masks)):
        alone = _search(
            pyneuron.UnitMasks.from_masks(unit_masks[u : u + 1]), store, 3, 5,
            ("OR", "AND", "AND NOT"), cooccurrence=store.cooccurrence(),
        )  # fmt: skip
        for key in ("concepts", "ops", "score", "iou", "intersection", "size", "beam_count"):
            np.testing.assert_array_equal(alone[key][0], together[key][u], err_msg=key)


def test_pruning_drops_pairs_and_stays_exact(simd):
    # Many small concepts and a planted unit: the bounds must drop most of the pairs whose
    # overlap is not known, and the beam is still the brute-force one.
    rng = np.random.default_rng(11)
    concepts = rng.random((60, 8, 8, 8)) < 0.05
    unit = (concepts[3] | concepts[17]) & ~concepts[40]
    raws = _check(concepts, unit[None], length=3, beam_size=5, operators=("OR", "AND", "AND NOT"))
    raw = raws["no table, one block"]
    assert raw["pruned"][0] > raw["counted"][0]
    assert raw["words"][0] > 0


def test_explain_uses_the_table_and_keeps_it():
    rng = np.random.default_rng(2)
    concepts, unit_masks = random_case(rng, 5, 6, 6, n_concepts=6, n_units=6)
    store = pyneuron.ConceptStore.from_masks(concepts, _names(6))
    first = pyneuron.explain(pyneuron.UnitMasks.from_masks(unit_masks), store, progress=False)
    table = store.cooccurrence()
    assert store.cooccurrence() is table and not table.flags.writeable
    again = pyneuron.explain(pyneuron.UnitMasks.from_masks(unit_masks), store, progress=False)
    assert first.equals(again)


def test_a_table_of_the_wrong_shape_is_refused():
    concepts = np.zeros((3, 2, 2, 2), dtype=bool)
    concepts[:, 0] = True
    store = pyneuron.ConceptStore.from_masks(concepts, _names(3))
    units = pyneuron.UnitMasks.from_masks(concepts[:1])
    with pytest.raises(ValueError, match="cooccurrence"):
        _search(units, store, 2, 2, ("OR",), cooccurrence=np.zeros((2, 2), dtype=np.uint64))


def test_throughput_probe_reports_a_positive_rate():
    assert pyneuron.engine._native.and_popcount_throughput(64, 0.01) > 0
    with pytest.raises(ValueError, match="words"):
        pyneuron.engine._native.and_popcount_throughput(0, 0.01)


def test_long_searches_stop_at_a_fixed_point_with_the_same_beam(simd):
    # Units equal to a concept or to a short formula settle after a few steps (no candidate
    # beats the beam any more); the remaining steps are skipped and the final beam must be
    # the brute-force one of the full length.
    rng = np.random.default_rng(13)
    concepts, _ = random_case(rng, 4, 5, 7, n_concepts=6, n_units=1)
    units = np.stack([concepts[1], concepts[2] | concepts[4], _units_from(rng, concepts, 3)[2]])
    raws = _check(concepts, units, length=8, beam_size=3, operators=("OR", "AND", "AND NOT"))
    raw = raws["table, one block"]
    screened = raw["derived"] + raw["pruned"] + raw["counted"]
    present = int(concepts.reshape(len(concepts), -1).any(1).sum())
    # The unit equal to a concept settles after its second step (its beam then holds only
    # formulas of IoU 1, which every later candidate ties and loses to by order): two
    # steps' (entry, concept) pairs were screened, not seven steps' worth.
    assert 0 < screened[0] <= 2 * 3 * present
