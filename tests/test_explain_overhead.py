"""The explanations table built in one step (issue 25, item 4) is the table it replaced:
same values, dtypes, column order and index, for beam and optimal searches, full beams,
NetDissect mode, several engine blocks and tables without any formula. The reference is
the former table-building code, kept literally below (``pd.DataFrame`` of a dict of
columns, row by row formulas, ``take_along_axis`` re-ranking). Functional checks only: the
speed is measured by bench/explain_overhead.py."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from oracle import random_case

import pyneuron
from pyneuron.engine import _native, search
from pyneuron.engine.formula import quote_name
from pyneuron.engine.metrics import METRIC_COLUMNS, metrics
from pyneuron.engine.netdissect import category_codes, netdissect_iou
from pyneuron.engine.settings import OPERATORS
from pyneuron.errors import EmptyStoreError, PyneuronError

#: Names that formulas must quote (spaces, keywords, quotes, parentheses) and plain ones.
NAMES = ["sky", "dog park", "NOT", 'say "hi"', "(x)", "a\\b", "tree", "OR more", "c8", "c9"]
CATEGORIES = ["object", "part", "", "object", "scene", "part", "", "color", "object", "part"]
OPS = [0, 1, 2]


# -- the former table code, verbatim in substance ----------------------------------------


def _old_formula_text(concept_ids, op_codes, quoted, names):
    def name(concept):
        if concept not in quoted:
            quoted[concept] = quote_name(names[concept])
        return quoted[concept]

    text = name(int(concept_ids[0]))
    for op, concept in zip(op_codes.tolist(), concept_ids[1:].tolist()):
        if concept < 0:
            break
        text = f"({text} {OPERATORS[op]} {name(concept)})"
    return text


def _old_result_table(raw, first_unit, names, full_beam, optimal=False):
    columns = [
        "unit",
        *(["rank"] if full_beam else []),
        "formula",
        "concepts",
        "length",
        "score",
        *METRIC_COLUMNS,
        "primitive",
        "primitive_iou",
        "unit_pixels",
        "unit_images",
        *(search.OPTIMAL_COLUMNS if optimal else []),
    ]
    if raw is None:
        return pd.DataFrame({c: [] for c in columns})
    n_units, beam = raw.score.shape
    ranks = beam if full_beam else 1
    unit_idx = np.repeat(np.arange(n_units), ranks)
    rank_idx = np.tile(np.arange(ranks), n_units)
    keep = rank_idx < np.maximum(raw.beam_count[unit_idx], 1)
    unit_idx, rank_idx = unit_idx[keep], rank_idx[keep]
    has = rank_idx < raw.beam_count[unit_idx]
    values = metrics(
        raw.intersection[unit_idx, rank_idx],
        raw.size[unit_idx, rank_idx],
        raw.unit_size[unit_idx],
        raw.intersection_images[unit_idx, rank_idx],
        raw.size_images[unit_idx, rank_idx],
        raw.unit_images[unit_idx],
    )
    quoted = {}
    formulas = [
        _old_formula_text(raw.concepts[u, r], raw.ops[u, r], quoted, names) if h else None
        for u, r, h in zip(unit_idx, rank_idx, has)
    ]
    primitive = raw.primitive[unit_idx]
    data = {
        "unit": first_unit + unit_idx,
        "rank": rank_idx,
        "formula": formulas,
        "concepts": np.where(has, (raw.concepts[unit_idx, rank_idx] >= 0).sum(axis=-1), 0),
        "length": raw.length[unit_idx, rank_idx],
        "score": np.where(has, raw.score[unit_idx, rank_idx], 0.0),
        **{column: values[column] for column in METRIC_COLUMNS},
        "primitive": [names[p] if p >= 0 else None for p in primitive],
        "primitive_iou": raw.primitive_iou[unit_idx],
        "unit_pixels": raw.unit_size[unit_idx],
        "unit_images": raw.unit_images[unit_idx],
        **{c: getattr(raw, c)[unit_idx] for c in (search.OPTIMAL_COLUMNS if optimal else ())},
    }
    data["iou"] = np.where(has, data["iou"], 0.0)
    return pd.DataFrame({column: data[column] for column in columns})


def _old_netdissect_table(raw, per_category, codes, first_unit, names, beam_size, full_beam):
    concepts = raw.concepts[:, :, 0]
    have = np.arange(concepts.shape[1])[None, :] < raw.beam_count[:, None]
    safe = np.where(have, concepts, 0)
    scores = netdissect_iou(
        raw.intersection, raw.size, np.take_along_axis(per_category, codes[safe], 1)
    )
    scores = np.where(have, scores, -np.inf)
    order = np.lexsort((np.where(have, concepts, np.iinfo(np.int32).max), -scores), axis=1)
    order = order[:, :beam_size]
    ranked = {
        key: np.take_along_axis(array, order if array.ndim == 2 else order[:, :, None], 1)
        if array.ndim > 1
        else array
        for key, array in raw.to_arrays().items()
    }
    best = np.take_along_axis(scores, order, 1)
    ranked["score"] = ranked["iou"] = np.where(np.isfinite(best), best, np.nan)
    ranked["beam_count"] = np.minimum(raw.beam_count, beam_size)
    ranked["primitive"] = np.where(ranked["beam_count"] > 0, ranked["concepts"][:, 0, 0], -1)
    ranked["primitive_iou"] = np.where(ranked["beam_count"] > 0, best[:, 0], 0.0)
    frame = _old_result_table(search.SearchResult.from_arrays(ranked), first_unit, names, full_beam)
    frame["iou"] = frame["score"]
    return frame


# -- helpers -----------------------------------------------------------------------------


def _case(seed: int, n_units: int = 9, silent: bool = False):
    rng = np.random.default_rng(seed)
    concepts, units = random_case(rng, 7, 4, 5, n_concepts=len(NAMES), n_units=n_units)
    if silent:  # no unit fires: no formula anywhere
        units[:] = False
    store = pyneuron.ConceptStore.from_masks(concepts, NAMES, CATEGORIES)
    return pyneuron.UnitMasks.from_masks(units), store


def _blocks(n_units: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n_units)) for s in range(0, n_units, batch_size)]


def _assert_same(new: pd.DataFrame, old: pd.DataFrame) -> None:
    """Identical tables: values (NaN where NaN), dtypes, column order, index, column index."""
    pd.testing.assert_frame_equal(new, old, check_exact=True)
    assert list(new.columns) == list(old.columns)
    assert new.columns.dtype == old.columns.dtype
    assert list(new.dtypes) == list(old.dtypes)
    assert isinstance(new.index, pd.RangeIndex) and new.index.equals(old.index)
    for column in ("formula", "primitive"):
        assert new[column].isna().tolist() == old[column].isna().tolist()


# -- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("full_beam", [False, True])
@pytest.mark.parametrize("optimal", [False, True])
def test_result_table_is_the_former_table(seed, full_beam, optimal):
    units, store = _case(seed, silent=seed == 3)
    common = (units._native, 0, len(units), store._native, 3)
    if optimal:
        raw = _native.optimal_search(*common, OPS, 4, 0.0, 0, store.cooccurrence())
    else:
        raw = _native.beam_search(*common, 4, OPS, 0.9, store.cooccurrence())
    first = int(np.random.default_rng(seed).integers(0, 1000))
    new = search.result_table(raw, first, store.names, full_beam, optimal)
    _assert_same(new, _old_result_table(raw, first, store.names, full_beam, optimal))
    if seed == 3:  # no formula at all: the text columns stay object, all None
        assert new["formula"].dtype == object and new["formula"].isna().all()


@pytest.mark.parametrize("batch_size", [2, 4, 100])
@pytest.mark.parametrize("full_beam", [False, True])
@pytest.mark.parametrize("search_kind", ["beam", "optimal"])
def test_explain_is_the_former_table_per_block(batch_size, full_beam, search_kind):
    units, store = _case(10 + batch_size)
    optimal = search_kind == "optimal"
    table = pyneuron.explain(
        units, store, length=3, beam_size=4, search=search_kind, full_beam=full_beam,
        batch_size=batch_size, progress=False,
    )  # fmt: skip
    frames = []
    for start, stop in _blocks(len(units), batch_size):
        common = (units._native, start, stop, store._native, 3)
        if optimal:
            raw = _native.optimal_search(*common, OPS, 4, 0.0, 0, store.cooccurrence())
        else:
            raw = _native.beam_search(*common, 4, OPS, 1.0, store.cooccurrence())
        frames.append(_old_result_table(raw, start, store.names, full_beam, optimal))
    old = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    ignore = ["seconds"] if optimal else []  # the optimal search's own time differs per run
    _assert_same(table.drop(columns=ignore), old.drop(columns=ignore))


@pytest.mark.parametrize("batch_size", [3, 100])
@pytest.mark.parametrize("full_beam", [False, True])
@pytest.mark.parametrize("beam_size", [1, 3, 20])
def test_netdissect_is_the_former_table(batch_size, full_beam, beam_size):
    units, store = _case(20 + beam_size)
    table = pyneuron.explain(
        units, store, length=1, beam_size=beam_size, mode="netdissect", full_beam=full_beam,
        batch_size=batch_size, progress=False,
    )  # fmt: skip
    codes, n_categories = category_codes(store)
    frames = []
    for start, stop in _blocks(len(units), batch_size):
        raw = _native.beam_search(units._native, start, stop, store._native, 1, len(store), [], 1.0)
        per_category = _native.category_unit_pixels(
            units._native, start, stop, store._native, codes, n_categories
        )
        frames.append(
            _old_netdissect_table(
                raw, per_category, codes, start, store.names, beam_size, full_beam
            )
        )
    old = pd.concat(frames, ignore_index=True)  # the former code concatenated even one
    _assert_same(table, old)


def test_silent_units_give_the_former_empty_formulas():
    """Every unit without a formula: NA formulas of object dtype, as before."""
    units, store = _case(5, silent=True)
    for full_beam in (False, True):
        table = pyneuron.explain(units, store, full_beam=full_beam, progress=False)
        raw = search.raw_beam_search(units, store, (3, 5, OPS, 1.0))
        _assert_same(table, _old_result_table(raw, 0, store.names, full_beam))


def test_table_without_the_block_constructor_is_the_same(monkeypatch):
    """pandas 2 has no ``create_dataframe_from_blocks``: the table is then built from a
    dict of columns, the same."""
    units, store = _case(6)
    raw = search.raw_beam_search(units, store, (3, 4, OPS, 1.0))
    fast = search.result_table(raw, 0, store.names, True)
    monkeypatch.setattr(search, "create_dataframe_from_blocks", None)
    _assert_same(search.result_table(raw, 0, store.names, True), fast)
    _assert_same(fast, _old_result_table(raw, 0, store.names, True))


@pytest.mark.parametrize("option", ["python storage", "no str inference"])
def test_text_columns_follow_pandas_options(option):
    """The text columns and column labels are typed as pandas would type them under its
    string options (``mode.string_storage``; the deprecated ``future.infer_string``)."""
    units, store = _case(7)
    raw = search.raw_beam_search(units, store, (3, 4, OPS, 1.0))
    name, value = (
        ("mode.string_storage", "python")
        if option == "python storage"
        else ("future.infer_string", False)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setting future.infer_string warns in pandas 3
        try:
            context = pd.option_context(name, value)
        except (KeyError, pd.errors.OptionError):
            pytest.skip(f"this pandas has no option {name}")
        with context:
            new = search.result_table(raw, 0, store.names, False)
            old = _old_result_table(raw, 0, store.names, False)
    _assert_same(new, old)


def test_tables_do_not_share_a_column_name():
    units, store = _case(8)
    first = pyneuron.explain(units, store, progress=False)
    first.columns.name = "renamed"
    assert pyneuron.explain(units, store, progress=False).columns.name is None


def test_one_block_shows_no_bar_several_do(capsys):
    units, store = _case(9, n_units=6)
    pyneuron.explain(units, store, batch_size=6, progress=True)
    assert capsys.readouterr().err == ""
    pyneuron.explain(units, store, batch_size=2, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("explain: 100% 6/6")


def test_store_checks_are_kept_only_for_usable_stores():
    masks = np.zeros((2, 3, 2, 2), dtype=bool)
    empty = pyneuron.ConceptStore.from_masks(masks, ["a", "b"])
    units = pyneuron.UnitMasks.from_masks(masks[:1])
    for _ in range(2):  # refused every time, not remembered as checked
        with pytest.raises(EmptyStoreError):
            pyneuron.explain(units, empty, progress=False)
    with pytest.raises(PyneuronError, match="expected a ConceptStore"):
        pyneuron.explain(units, {"a": 1}, progress=False)  # unhashable: refused cleanly


def test_category_codes_are_kept_per_store_read_only():
    _, store = _case(11)
    codes, n_categories = search._category_codes(store)
    expected, expected_n = category_codes(store)
    assert np.array_equal(codes, expected) and n_categories == expected_n
    assert search._category_codes(store)[0] is codes and not codes.flags.writeable


def test_remembered_settings_keep_every_check():
    """Settings are built once per set of options, keyed by type: ``penalty=True`` is
    refused even after ``penalty=1`` was accepted; unhashable options still work."""
    assert search._settings(None, {"penalty": 1}).penalty == 1
    assert search._settings(None, {"penalty": 1}) is search._settings(None, {"penalty": 1})
    with pytest.raises(PyneuronError, match="penalty"):
        search._settings(None, {"penalty": True})
    listed = search._settings(None, {"operators": ["or", "and"]})
    assert listed.operators == ("OR", "AND")
    with pytest.raises(PyneuronError, match="unknown search option"):
        search._settings(None, {"lenght": 2})
    base = pyneuron.SearchSettings(length=2)
    assert search._settings(base, {}) == base
    assert search._settings(base, {"beam_size": 7}) == pyneuron.SearchSettings(
        length=2, beam_size=7
    )
