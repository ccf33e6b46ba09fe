"""Bad input to the search API raises clear exceptions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pyneuron


@pytest.fixture
def pair():
    concepts = np.zeros((2, 3, 4, 4), dtype=bool)
    concepts[0, 0] = True
    concepts[1, 1, :2] = True
    store = pyneuron.ConceptStore.from_masks(concepts, ["sky", "dog"])
    units = pyneuron.UnitMasks.from_masks(concepts[:1])
    return units, store


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(length=0), "length must be an integer >= 1"),
        (dict(length=2.5), "length must be an integer"),
        (dict(beam_size=0), "beam_size must be an integer >= 1"),
        (dict(operators=("XOR",)), "unknown operator 'XOR'"),
        (dict(operators=("OR", "or")), "given twice"),
        (dict(operators=()), "no operators"),
        (dict(penalty=0.0), "penalty"),
        (dict(penalty=float("nan")), "penalty"),
        (dict(batch_size=0), "batch_size"),
        (dict(beam_size=10**12), "beam_size must be at most 1024"),
        (dict(beam_size=2**31 - 1), "beam_size must be at most 1024"),
        (dict(length=2**31 - 1), "length must be at most 32"),
        (dict(penalty=1e308), "is inf: every score would be equal"),
        (dict(penalty=1e-200), "is 0: every score would be equal"),
        (dict(penalty=True), "penalty"),
    ],
)
def test_bad_search_options(pair, options, message):
    units, store = pair
    with pytest.raises(pyneuron.PyneuronError, match=message):
        pyneuron.explain(units, store, progress=False, **options)


def test_operator_spelling_is_forgiving(pair):
    units, store = pair
    result = pyneuron.explain(units, store, operators=["and  not", "Or"], progress=False)
    assert result.loc[0, "formula"] == "sky"


def test_grid_mismatch(pair):
    _, store = pair
    other = pyneuron.UnitMasks.from_masks(np.zeros((1, 3, 5, 4), dtype=bool))
    with pytest.raises(pyneuron.GridMismatchError, match=r"\(3, 5, 4\) does not match \(3, 4, 4\)"):
        pyneuron.explain(other, store, progress=False)
    with pytest.raises(pyneuron.GridMismatchError):
        pyneuron.iou_table(other, store, progress=False)
    with pytest.raises(pyneuron.GridMismatchError):
        pyneuron.score("sky", other, store)


def test_wrong_types(pair):
    units, store = pair
    with pytest.raises(pyneuron.PyneuronError, match="UnitMasks"):
        pyneuron.explain(np.zeros((1, 3, 4, 4), dtype=bool), store, progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="expected a ConceptStore"):
        pyneuron.explain(units, "store", progress=False)


def test_empty_stores(pair):
    units, _ = pair
    no_concepts = pyneuron.ConceptStore.from_masks(np.zeros((0, 3, 4, 4), dtype=bool), [])
    with pytest.raises(pyneuron.EmptyStoreError, match="no concepts"):
        pyneuron.explain(units, no_concepts, progress=False)
    absent = pyneuron.ConceptStore.from_masks(np.zeros((2, 3, 4, 4), dtype=bool), ["a", "b"])
    with pytest.raises(pyneuron.EmptyStoreError, match="not present in any image|no concept"):
        pyneuron.explain(units, absent, progress=False)


def test_unknown_concept_in_formula(pair):
    units, store = pair
    with pytest.raises(pyneuron.UnknownConceptError, match="did you mean 'sky'") as caught:
        pyneuron.score("skye OR dog", units, store)
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, pyneuron.PyneuronError)


def test_deep_formulas_are_scored_and_printed_without_recursion(pair):
    # 400 and 3000 nested ORs: printing and compiling are iterative, so they work and
    # give the result of the shallow equivalent.
    units, store = pair
    shallow = pyneuron.score("sky OR dog", units, store)
    for text in [" OR ".join(["sky"] * 400) + " OR dog", "sky" + " OR dog" * 3000]:
        deep = pyneuron.score(text, units, store)
        assert deep["formula"][0].startswith("(" * 399)
        assert deep["iou"].tolist() == shallow["iou"].tolist()
    formula = pyneuron.Formula.parse("sky" + " AND NOT dog" * 2000)
    assert formula.length == 4001 and formula.concepts() == ["sky", "dog"]
    assert repr(formula).startswith("Formula.parse('((((")
    shorter = pyneuron.Formula.parse("sky" + " AND NOT dog" * 200)
    assert pyneuron.Formula.parse(str(shorter)) == shorter
    # Parentheses are parsed recursively: thousands of levels give a short, clear error.
    with pytest.raises(
        pyneuron.PyneuronError, match=r"'\(\(\(.*\.\.\.': formula nested too"
    ) as caught:
        pyneuron.Formula.parse("(" * 5000 + "sky" + ")" * 5000)
    assert len(str(caught.value)) < 200


def test_threads_and_simd_settings():
    with pytest.raises(ValueError, match="positive integer"):
        pyneuron.set_num_threads(0)
    with pytest.raises(ValueError, match="not available"):
        pyneuron.set_simd_level("avx9000")
    assert pyneuron.simd_level() in pyneuron.available_simd_levels()


THREADS_REFUSED = """
import resource, sys
import numpy as np, pyneuron
rng = np.random.default_rng(0)
concepts = rng.random((5, 4, 4, 4)) < 0.4
units = rng.random((600, 4, 4, 4)) < 0.4
store = pyneuron.ConceptStore.from_masks(concepts, list("abcde"))
masks = pyneuron.UnitMasks.from_masks(units)
pyneuron.set_num_threads(1)
expected = pyneuron.iou_table(masks, store, progress=False)
size = next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]
# Room for the work but not for 400 thread stacks (8 MiB each).
limit = int(size) * 1024 + 200 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
pyneuron.set_num_threads(400)
table = pyneuron.iou_table(masks, store, progress=False)
print("same" if np.array_equal(table, expected) else "different")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and RLIMIT_AS")
def test_engine_runs_on_fewer_threads_when_the_system_refuses_more():
    # Before: std::thread threw inside parallel_for and the process aborted (SIGABRT).
    done = subprocess.run(
        [sys.executable, "-c", THREADS_REFUSED], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "same"


def _pool_case():
    rng = np.random.default_rng(1)
    concepts = rng.random((6, 12, 8, 8)) < 0.3
    units = rng.random((40, 12, 8, 8)) < 0.2
    store = pyneuron.ConceptStore.from_masks(concepts, list("abcdef"))
    return pyneuron.UnitMasks.from_masks(units), store


def _explain_in_child(queue):
    units, store = _pool_case()
    queue.put(pyneuron.explain(units, store, progress=False)["formula"].tolist())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method")
def test_engine_threads_work_in_a_forked_child():
    """The worker threads are kept between calls; a fork child inherits the pool but not
    its threads, and must start its own instead of waiting for the parent's."""
    import multiprocessing

    units, store = _pool_case()
    previous = pyneuron.num_threads()
    pyneuron.set_num_threads(2)
    try:
        expected = pyneuron.explain(units, store, progress=False)["formula"].tolist()
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_explain_in_child, args=(queue,))
        child.start()
        got = queue.get(timeout=120)
        child.join(timeout=120)
    finally:
        pyneuron.set_num_threads(previous)
    assert child.exitcode == 0
    assert got == expected


def test_concurrent_callers_share_the_engine_threads():
    """Python threads calling the engine at once (it releases the GIL): each gets the
    results it would get alone."""
    from concurrent.futures import ThreadPoolExecutor

    units, store = _pool_case()
    previous = pyneuron.num_threads()
    pyneuron.set_num_threads(3)
    try:
        expected = pyneuron.iou_table(units, store, progress=False)
        with ThreadPoolExecutor(4) as pool:
            tables = list(
                pool.map(lambda _: pyneuron.iou_table(units, store, progress=False), range(16))
            )
    finally:
        pyneuron.set_num_threads(previous)
    for table in tables:
        np.testing.assert_array_equal(table, expected)
