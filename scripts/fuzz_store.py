"""Long fuzz run of the store loader (the suite runs 300 variants; this runs thousands).

Each variant is a saved store damaged or edited in one to three ways (bit flips, with and
without recomputed CRCs; truncation; index values set to edge cases; bitset edits with
their counts fixed; manifest fields deleted, retyped, nested 50,000 deep or set to
1e400, with and without a matching manifest checksum; table edits; files removed) and is
opened with ``verify`` None, True or False. A variant must be refused with a StoreError,
or open and give counts, IoU table and search results equal to the numpy oracle's on its
decoded masks. Variants run in child processes so crashes and hangs are counted too.

Usage::

    python scripts/fuzz_store.py [--variants 3000] [--seed 16] [--chunk 250] [--timeout 120]

Writes ``scripts/results/fuzz_store.json`` and exits 1 if any variant crashed, hung,
gave a wrong result or raised something other than a StoreError.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from results_file import write_results

FAILURES = {"WRONG", "ERROR", "CRASH", "HANG"}
HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"

CHILD = """
import json, shutil, sys, tempfile
from pathlib import Path
sys.path.insert(0, {tests!r})
from store_fuzz import check_variant, make_bases
root = Path(tempfile.mkdtemp())
bases = make_bases(root / "bases", {seed})
for i in range({start}, {stop}):
    print(json.dumps([i, check_variant(root, bases, {seed}, i)]), flush=True)
shutil.rmtree(root)
"""


def run_chunk(seed: int, start: int, stop: int, timeout: float) -> tuple[dict[int, str], str]:
    """Outcomes of variants [start, stop) in one child; ("crash"|"hang"|"") for the rest."""
    code = CHILD.format(tests=str(TESTS), seed=seed, start=start, stop=stop)
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
        out, failure = done.stdout, "" if done.returncode == 0 else "crash"
    except subprocess.TimeoutExpired as expired:
        partial = expired.stdout or ""
        out = partial.decode() if isinstance(partial, bytes) else partial
        failure = "hang"
    outcomes = {}
    for line in out.splitlines():
        if line.startswith("["):
            i, outcome = json.loads(line)
            outcomes[i] = outcome
    return outcomes, failure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=250)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per chunk")
    args = parser.parse_args()
    started = time.perf_counter()
    outcomes: dict[int, str] = {}
    start = 0
    while start < args.variants:
        stop = min(start + args.chunk, args.variants)
        found, failure = run_chunk(args.seed, start, stop, args.timeout)
        outcomes.update(found)
        if failure:
            culprit = start + len(found)  # the first variant without an outcome
            outcomes[culprit] = f"{failure.upper()} variant {culprit}"
            stop = culprit + 1
        start = stop
        print(f"{start}/{args.variants} variants", file=sys.stderr)

    def kind(outcome: str) -> str:
        first = outcome.split(" ")[0]
        return first if first in FAILURES else outcome

    kinds = Counter(kind(o) for o in outcomes.values())
    bad = sorted((i, o) for i, o in outcomes.items() if kind(o) in FAILURES)
    summary = {
        "seed": args.seed,
        "variants": len(outcomes),
        "outcomes": dict(kinds),
        "failures": [o for _, o in bad[:50]],
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results("fuzz_store", summary)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
