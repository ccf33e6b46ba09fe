"""A seeded fuzz run of the store loader: every damaged or edited store is refused with a
StoreError or opens with results equal to the oracle's (see tests/store_fuzz.py; the
long run is scripts/fuzz_store.py)."""

from __future__ import annotations

from store_fuzz import run_variants


def test_fuzzed_stores_are_refused_or_exact(tmp_path):
    outcomes = run_variants(tmp_path, seed=1234, count=300)
    assert sum(outcomes.values()) == 300
    # The mix must exercise both paths, or the test could not fail.
    assert outcomes.get("refused", 0) > 100 and outcomes.get("opened", 0) > 20, outcomes
