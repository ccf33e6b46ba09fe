"""search="optimal" against a brute-force enumerator of every left-deep formula."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from oracle import brute_force_optimal, iou, metrics, random_case

import pyneuron
from pyneuron.errors import PyneuronError

# (n_images, height, width): bits per image below, at and above 64, not multiples of 64.
GRIDS = [(6, 5, 7), (5, 8, 8), (4, 9, 13), (3, 1, 1)]
ALL_OPERATORS = ("OR", "AND", "AND NOT", "OR NOT")


def _names(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


def _case(seed: int, grid: tuple[int, int, int], n_concepts: int = 7, n_units: int = 6):
    concepts, units = random_case(np.random.default_rng(seed), *grid, n_concepts, n_units)
    if not concepts.any():  # the store must hold something
        concepts[0, 0, 0, 0] = True
    names = _names(n_concepts)
    return (
        concepts,
        units,
        names,
        pyneuron.ConceptStore.from_masks(concepts, names),
        pyneuron.UnitMasks.from_masks(units),
    )


def _check(concepts, units, names, store, masks, **options):
    got = pyneuron.explain(masks, store, search="optimal", progress=False, **options)
    beam_options = {k: v for k, v in options.items() if k in ("length", "operators")}
    beam = pyneuron.explain(masks, store, progress=False, **beam_options)
    for u in range(len(units)):
        formula, value = brute_force_optimal(units[u], concepts, names, **beam_options)
        row = got.loc[u]
        assert bool(row["optimal"]) and row["upper_bound"] == row["iou"]
        assert row["iou"] >= beam.loc[u, "iou"]
        if formula is None:
            assert pd.isna(row["formula"]) and row["iou"] == 0.0
            continue
        assert (row["formula"], row["iou"]) == (formula, value)  # exact float64, tie rule
        reference = metrics(pyneuron.Formula.parse(formula).mask(store), units[u])
        for key, expected in reference.items():
            np.testing.assert_equal(row[key], expected)
    return got


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("seed", range(2))
def test_matches_brute_force_every_simd_and_thread_count(grid, seed, simd, threads):
    _check(*_case(seed, grid), length=3)


@pytest.mark.parametrize(
    "options",
    [
        {"length": 1},
        {"length": 2, "operators": ALL_OPERATORS},
        {"length": 3, "operators": ("AND NOT", "OR")},
        {"length": 3, "operators": ("OR",)},
        {"length": 3, "operators": ("AND", "OR NOT")},
        {"length": 3, "operators": ALL_OPERATORS},
        {"length": 4, "operators": ("OR", "AND", "AND NOT")},
    ],
)
@pytest.mark.parametrize("seed", range(3))
def test_operator_sets_and_lengths_match_brute_force(options, seed):
    n_concepts = 5 if options["length"] == 4 else 7
    _check(*_case(10 + seed, GRIDS[seed % 3], n_concepts=n_concepts), **options)


def test_ties_go_to_the_shorter_then_smaller_formula():
    # c0 == c2 and c1 == c3: many formulas tie; the answer is the smallest key.
    rng = np.random.default_rng(5)
    base = rng.random((2, 4, 6, 6)) < 0.4
    concepts = np.concatenate([base, base])
    unit = (concepts[0] | concepts[1])[None]
    names = _names(4)
    store = pyneuron.ConceptStore.from_masks(concepts, names)
    got = pyneuron.explain(
        pyneuron.UnitMasks.from_masks(unit), store, search="optimal", progress=False
    )
    assert got.loc[0, "formula"] == "(c0 OR c1)" and got.loc[0, "iou"] == pytest.approx(1.0)
    # A formula of one concept wins over the longer ones equal to it.
    got = pyneuron.explain(
        pyneuron.UnitMasks.from_masks(concepts[3][None]), store, search="optimal", progress=False
    )
    assert got.loc[0, "formula"] == "c1"


@pytest.mark.parametrize("seed", range(2))
def test_many_concepts_few_last_step_candidates(seed):
    # 26 sparse concepts and planted units: at the last step few concepts pass the
    # whole-set thresholds, so the search bounds them as listed (not by a scan of all).
    rng = np.random.default_rng(seed)
    n_concepts, shape = 26, (5, 7, 9)
    concepts = rng.random((n_concepts, *shape)) < rng.uniform(0.03, 0.3, (n_concepts, 1, 1, 1))
    concepts[-1] = False  # a concept absent from the data
    units = np.stack(
        [
            (concepts[1] & concepts[4]) | concepts[9],
            (concepts[2] | concepts[20]) & ~concepts[7],
            concepts[13] ^ (rng.random(shape) < 0.02),
        ]
    )
    names = _names(n_concepts)
    store = pyneuron.ConceptStore.from_masks(concepts, names)
    _check(concepts, units, names, store, pyneuron.UnitMasks.from_masks(units), length=3)


def test_planted_and_or_beats_the_best_single_concept():
    # Unit = (a AND b) OR c with 5 % of its pixels flipped off and a few false positives.
    rng = np.random.default_rng(0)
    shape = (60, 16, 16)
    concepts = np.zeros((12, *shape), dtype=bool)
    for k in range(12):
        images = rng.random(shape[0]) < 0.5
        density = 0.35 if k == 9 else 0.6
        concepts[k, images] = rng.random((int(images.sum()), *shape[1:])) < density
    a, b, c = concepts[1], concepts[4], concepts[9]
    planted = (a & b) | c
    unit = planted & (rng.random(shape) >= 0.05)
    unit |= rng.random(shape) < 0.002
    names = _names(12)
    store = pyneuron.ConceptStore.from_masks(concepts, names)
    got = pyneuron.explain(
        pyneuron.UnitMasks.from_masks(unit[None]), store, search="optimal", progress=False
    )
    row = got.loc[0]
    assert 0.7 < row["primitive_iou"] < 0.8  # the best single concept (c9) is far from it
    assert bool(row["optimal"])
    assert row["iou"] >= iou(planted, unit) > row["primitive_iou"] + 0.1
    assert row["formula"] == "((c1 AND c4) OR c9)"


@pytest.mark.parametrize("max_nodes", [1, 2, 4, 16])
@pytest.mark.parametrize("seed", range(3))
def test_budget_keeps_an_honest_upper_bound(max_nodes, seed):
    concepts, units, names, store, masks = _case(20 + seed, (5, 8, 8), n_concepts=8)
    got = pyneuron.explain(
        masks, store, search="optimal", max_nodes=max_nodes, length=3, progress=False
    )
    for u in range(len(units)):
        formula, value = brute_force_optimal(units[u], concepts, names, length=3)
        row = got.loc[u]
        assert row["nodes"] <= max_nodes
        assert row["iou"] <= value <= row["upper_bound"]
        if row["optimal"]:
            assert row["iou"] == value == row["upper_bound"]
            assert row["formula"] == formula or (formula is None and pd.isna(row["formula"]))


def test_time_limit_stops_with_a_bound():
    concepts, units, names, store, masks = _case(3, (6, 5, 7), n_concepts=8)
    got = pyneuron.explain(masks, store, search="optimal", time_limit=1e-9, progress=False)
    for u in range(len(units)):
        _, value = brute_force_optimal(units[u], concepts, names, length=3)
        assert got.loc[u, "iou"] <= value <= got.loc[u, "upper_bound"]
    assert got["seconds"].ge(0).all()
    assert not got["optimal"].all()  # units that fire need at least one node


def test_bounds_prune_most_of_the_space():
    concepts, units, names, store, masks = _case(1, (20, 16, 16), n_concepts=40, n_units=12)
    got = pyneuron.explain(masks, store, search="optimal", length=3, progress=False)
    assert got["optimal"].all()
    present = int(concepts.reshape(40, -1).any(1).sum())
    prefixes = present + present * present * 3  # nodes an exhaustive search expands
    assert got["nodes"].sum() < prefixes * len(units) / 3


def test_compare_searches_classifies_every_unit():
    concepts, units, names, store, masks = _case(4, (5, 8, 8), n_concepts=8, n_units=12)
    audit = pyneuron.compare_searches(masks, store, progress=False)
    beam = pyneuron.explain(masks, store, progress=False)
    assert audit["beam_iou"].tolist() == beam["iou"].tolist()
    assert (audit["gap"] >= 0).all() and audit["optimal"].all()
    worse = audit["audit"] == "beam worse"
    assert ((audit["gap"] > 0) == worse).all()
    same = audit["audit"] == "same formula"
    assert (audit.loc[same, "beam_formula"] == audit.loc[same, "optimal_formula"]).all()
    assert set(audit["audit"]) <= set(pyneuron.engine.search.AUDIT_VERDICTS)
    assert (audit["audit"] == "no formula").sum() == audit["optimal_formula"].isna().sum() > 0


def test_full_beam_and_chunks_give_one_row_per_unit():
    concepts, units, names, store, masks = _case(6, (4, 9, 13))
    one = pyneuron.explain(masks, store, search="optimal", progress=False)
    full = pyneuron.explain(masks, store, search="optimal", full_beam=True, progress=False)
    assert (full["rank"] == 0).all()
    pd.testing.assert_frame_equal(
        pyneuron.engine.search.best_of_beam(full).drop(columns="seconds"),
        one.drop(columns="seconds"),
    )
    halves = [pyneuron.UnitMasks.from_masks(units[:3]), pyneuron.UnitMasks.from_masks(units[3:])]
    chunked = pyneuron.explain(halves, store, search="optimal", batch_size=2, progress=False)
    columns = ["unit", "formula", "iou", "optimal", "nodes"]
    pd.testing.assert_frame_equal(chunked[columns], one[columns])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"search": "exhaustive"}, "unknown search 'exhaustive'"),
        ({"search": "optimal", "penalty": 0.9}, "penalty=1.0"),
        ({"time_limit": 1.0}, "search='optimal' only"),
        ({"max_nodes": 10}, "search='optimal' only"),
        ({"search": "optimal", "time_limit": -1}, "time_limit must be a positive"),
        ({"search": "optimal", "time_limit": "1"}, "time_limit must be a positive"),
        ({"search": "optimal", "max_nodes": 0}, "max_nodes must be an integer >= 1"),
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    _, _, _, store, masks = _case(0, (3, 1, 1))
    with pytest.raises(PyneuronError, match=message):
        pyneuron.explain(masks, store, progress=False, **options)


def test_report_layer_summary_shows_the_audit(tmp_path):
    concepts, units, names, store, masks = _case(4, (5, 8, 8), n_concepts=8, n_units=12)
    audit = pyneuron.compare_searches(masks, store, progress=False)
    results = pyneuron.explain(masks, store, search="optimal", progress=False)
    results["audit"], results["gap"] = audit["audit"], audit["gap"]
    results.insert(0, "layer", "layer")
    from pyneuron.report import write_report

    out = write_report(
        tmp_path / "report",
        results,
        store,
        unit_masks={"layer": masks},
        images=None,
        top_images={},
        max_units=2,
        progress=False,
    )
    index = out.read_text()  # write_report returns the index page
    assert f"{int(results['optimal'].sum())} of {len(results)}" in index
    counts = audit["audit"].value_counts()
    for verdict, n in counts.items():
        assert f"{n} {verdict}" in index


def test_too_many_concepts_for_the_pair_table(monkeypatch):
    _, _, _, store, masks = _case(0, (5, 8, 8))
    monkeypatch.setattr(pyneuron.engine.search, "COOCCURRENCE_MAX_CONCEPTS", 2)
    with pytest.raises(PyneuronError, match="kept for up to 2 concepts"):
        pyneuron.explain(masks, store, search="optimal", progress=False)


def test_unproven_upper_bound_is_at_most_one():
    _, _, _, store, masks = _case(2, (5, 8, 8), n_concepts=8)
    got = pyneuron.explain(masks, store, search="optimal", length=4, max_nodes=1, progress=False)
    assert (got["upper_bound"] <= 1.0).all() and (got["upper_bound"] >= got["iou"]).all()


def _dense_case(n_images: int = 100, n_concepts: int = 500, side: int = 64):
    """A unit that fires everywhere and hundreds of concepts in most images: the unit's
    pair tables alone (every pair of concepts present in an image) take a long time."""
    rng = np.random.default_rng(7)
    names = _names(n_concepts)
    writer = pyneuron.ConceptStoreWriter(pyneuron.Grid(n_images, side, side), names)
    with writer:
        for i in range(n_images):
            present = np.flatnonzero(rng.random(n_concepts) < 0.7)
            bits = rng.random((present.size, side, side)) < 0.5
            writer.add_image(i, masks={names[c]: bits[k] for k, c in enumerate(present)})
    store = writer.store
    unit = np.ones((1, n_images, side, side), dtype=bool)
    unit[0, :, ::2] = False  # half of every image
    return store, pyneuron.UnitMasks.from_masks(unit)


def test_time_limit_holds_inside_the_units_tables():
    """The budget is checked while the unit's pair tables are built (the root phase), and
    counted as the unit's own time: it stops there, with the trivial bound, within 10 %."""
    store, masks = _dense_case()
    limit = 0.1
    got = pyneuron.explain(masks, store, search="optimal", time_limit=limit, progress=False)
    row = got.loc[0]
    assert not row["optimal"] and row["nodes"] == 0  # stopped before the first node
    assert row["upper_bound"] == 1.0 and 0 < row["iou"] <= 1.0  # the beam's formula
    assert limit <= row["seconds"] <= 1.1 * limit
    # the same unit with no limit proves its optimum or expands nodes: its tables take
    # longer than the limit (so this test can fail when the tables ignore the budget)
    longer = pyneuron.explain(
        masks, store, search="optimal", time_limit=10 * limit, max_nodes=1, progress=False
    ).loc[0]
    assert longer["seconds"] > limit
