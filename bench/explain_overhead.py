"""Fixed Python cost of one ``pyneuron.explain`` call, beyond the engine's search.

    python bench/explain_overhead.py [--label after] [--calls 2000] [--seconds 3]
                                     [--threads 1] [--sizes tiny block]
                                     [--out bench/results/explain-overhead.json]

On small inputs (``tiny``: 4 units and 20 concepts on 30 images of 8 x 8; ``block``: 64
units, one engine block, and 40 concepts) and for each search (beam and optimal, each
with ``full_beam`` False and True, and ``mode="netdissect"``), the median time of each
call below. The calls of a group take turns, round after round, so that all
see the same load on a shared machine. First group:

- ``explain``: a whole ``pyneuron.explain`` call (``progress=False``);
- ``native``: the engine calls it makes, alone, with the same arguments;
- ``in situ``: the median over rounds of ``explain`` minus ``native``: the Python cost as
  a caller pays it, right after the engine ran (which leaves the caches cold for Python:
  the same Python work takes several times longer than warm).

Second group, Python alone, warm:

- ``python``: ``explain`` with those engine calls replaced by ones that return their
  precomputed results: the Python cost measured directly rather than as a difference of
  two noisy times; ``+progress``: the same with ``progress=True`` (the default; output
  not a terminal, so a bar writes lines);
- the Python steps of the call on their own (beam and optimal only): ``settings`` (the
  settings of the options, as ``explain`` builds them), ``checks`` (the store and backend
  checks), ``batches`` (the unit blocks and their progress bar, ``progress=False``) and
  ``table`` (:func:`~pyneuron.engine.search.result_table` of the engine's result).

The engine runs on one thread by default (``--threads``): on a shared 2-core machine,
waiting for a second worker adds milliseconds of noise to the engine's time, while the
Python cost does not depend on the threads. Times are in microseconds. The results go
under ``runs[LABEL]`` of the JSON file (other labels are kept), so that a run before a
change and one after sit side by side; the load average is recorded with each run, as
the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import pyneuron
from pyneuron.engine import _native
from pyneuron.engine import search as engine_search
from pyneuron.engine.atomic import write_atomically
from pyneuron.engine.netdissect import category_codes
from pyneuron.engine.settings import SearchSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search import _json_default, _machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "explain-overhead.json"
#: Input sizes: (units, concepts, images, side of the square grid).
SIZES = {"tiny": (4, 20, 30, 8), "block": (64, 40, 30, 8)}
#: Searches: name -> explain options.
MODES = {
    "beam": {},
    "beam full_beam": {"full_beam": True},
    "optimal": {"search": "optimal"},
    "optimal full_beam": {"search": "optimal", "full_beam": True},
    "netdissect": {"length": 1, "mode": "netdissect"},
}
PARTS = ("settings", "checks", "batches", "table")
#: Rounds run before the timed ones.
WARMUP = 5


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    pyneuron.set_num_threads(args.threads)
    run: dict[str, Any] = {"machine": _machine(), "calls": args.calls, "results": []}
    for size in args.sizes:
        units, store = _inputs(*SIZES[size])
        store.cooccurrence()  # computed once per store, outside the timings
        for mode, options in MODES.items():
            row = {"size": size, "mode": mode, **_measure(units, store, options, args)}
            run["results"].append(row)
            print(_row_text(row), flush=True)
    run["loadavg_end"] = list(os.getloadavg())
    report = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    report["runs"][args.label] = run
    _compare(report["runs"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=_json_default) + "\n"
    write_atomically(args.out, lambda p: p.write_text(text))
    print(f"wrote {args.out} (run {args.label!r})")
    return report


def _inputs(n_units: int, n_concepts: int, n_images: int, side: int) -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    masks = rng.random((n_concepts, n_images, side, side)) < 0.2
    names = [f"concept {i}" if i % 3 else f"c{i}" for i in range(n_concepts)]
    categories = ["object", "part", "color"] * n_concepts
    store = pyneuron.ConceptStore.from_masks(masks, names, categories[:n_concepts])
    units = pyneuron.UnitMasks.from_masks(rng.random((n_units, n_images, side, side)) < 0.2)
    return units, store


@dataclasses.dataclass(frozen=True)
class _Timed:
    """A call to time, with the engine functions it finds replaced (name -> result)."""

    call: Callable[[], object]
    stubs: dict[str, object] = dataclasses.field(default_factory=dict)


def _round_robin(timed: dict[str, _Timed], args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Times of the calls in microseconds, the calls taking turns (each round runs every
    one once, after a few warm-up rounds), so that all see the same load on a shared
    machine: ``args.calls`` rounds or as many as ``args.seconds`` allow (at least 20).
    What a call returns is freed after the clock stops, as a caller keeps its table."""
    originals = {name: getattr(_native, name) for t in timed.values() for name in t.stubs}
    times: dict[str, list[float]] = {key: [] for key in timed}
    rounds, deadline = 0, time.perf_counter() + args.seconds
    try:
        while rounds < WARMUP + args.calls and (
            rounds < WARMUP + 20 or time.perf_counter() < deadline
        ):
            for key, entry in timed.items():
                for name, result in entry.stubs.items():
                    setattr(_native, name, lambda *_, result=result: result)
                start = time.perf_counter()
                result = entry.call()
                elapsed = time.perf_counter() - start
                del result
                for name in entry.stubs:
                    setattr(_native, name, originals[name])
                if rounds >= WARMUP:
                    times[key].append(elapsed * 1e6)
            rounds += 1
    finally:
        for name, function in originals.items():
            setattr(_native, name, function)
    return {key: np.array(values) for key, values in times.items()}


def _measure(units: Any, store: Any, options: dict, args: argparse.Namespace) -> dict:
    options = dict(options)
    full_beam = options.pop("full_beam", False)
    settings = SearchSettings.from_options(None, options)
    netdissect = settings.mode == "netdissect"
    cooccurrence = store.cooccurrence() if settings.length > 1 else None
    common = (units._native, 0, len(units), store._native, settings.length)
    if settings.optimal:
        name = "optimal_search"
        engine_args = (*common, settings.operator_codes, settings.beam_size, 0.0, 0, cooccurrence)
    elif netdissect:
        name = "beam_search"
        engine_args = (*common, len(store), [], 1.0)
    else:
        name = "beam_search"
        engine_args = (*common, settings.beam_size, settings.operator_codes, 1.0, cooccurrence)
    engine = getattr(_native, name)
    stubs: dict[str, object] = {name: engine(*engine_args)}
    if netdissect:  # the unit's pixels per category: a second engine call
        codes, n_categories = category_codes(store)
        pixel_args = (units._native, 0, len(units), store._native, codes, n_categories)
        stubs["category_unit_pixels"] = _native.category_unit_pixels(*pixel_args)

    def native() -> object:
        raw = engine(*engine_args)
        return (raw, _native.category_unit_pixels(*pixel_args)) if netdissect else raw

    def explain(progress: bool = False) -> object:
        return pyneuron.explain(units, store, full_beam=full_beam, progress=progress, **options)

    def quiet_explain() -> object:  # the bar of progress=True writes to a log
        with contextlib.redirect_stderr(io.StringIO()):
            return explain(progress=True)

    # Round robin of the whole call and its engine calls (the engine leaves caches
    # cold for Python, as in use); then of the Python steps alone, warm.
    in_use = _round_robin({"explain": _Timed(explain), "native": _Timed(native)}, args)
    warm = {"python": _Timed(explain, stubs), "python_progress": _Timed(quiet_explain, stubs)}
    if not netdissect:
        raw, names = stubs[name], store.names
        # Built once per set of options since the overhead work (issue 25), before anew.
        build_settings = getattr(engine_search, "_settings", SearchSettings.from_options)
        warm |= {
            "settings": _Timed(lambda: build_settings(None, options)),
            "checks": _Timed(
                lambda: (engine_search._check_store(store), engine_search._remote_backend(None))
            ),
            "batches": _Timed(
                lambda: list(engine_search._batches(units, store, None, False, "explain"))
            ),
            "table": _Timed(
                lambda: engine_search.result_table(raw, 0, names, full_beam, settings.optimal)
            ),
        }
    times = {**in_use, **_round_robin(warm, args)}
    medians = {key: float(np.median(values)) for key, values in times.items()}
    row: dict[str, Any] = {
        "rounds": len(times["explain"]),
        **{f"{key}_us": medians[key] for key in ("explain", "native")},
        "in_situ_us": float(np.median(times["explain"] - times["native"])),
        **{f"{key}_us": medians[key] for key in ("python", "python_progress")},
    }
    if not netdissect:
        row["parts_us"] = {part: medians[part] for part in PARTS}
    return row


def _row_text(row: dict) -> str:
    parts = row.get("parts_us", {})
    cells = " ".join(f"{parts[p]:8.1f}" if p in parts else f"{'-':>8}" for p in PARTS)
    keys = ("native_us", "explain_us", "in_situ_us", "python_us", "python_progress_us")
    return (
        f"{row['size']:6} {row['mode']:18} "
        + " ".join(f"{row[k]:9.1f}" for k in keys)
        + (f" {cells}")
    )


def _compare(runs: dict[str, dict]) -> None:
    """Print every run's table, with its Python cost against the first run's."""
    first_label, first = next(iter(runs.items()))
    base = {(r["size"], r["mode"]): r for r in first["results"]}
    header = " ".join(f"{p:>8}" for p in PARTS)
    for label, run in runs.items():
        print(f"\n== {label}: load average {run['machine'].get('loadavg_start')} at start")
        print(
            f"{'size':6} {'mode':18} {'native':>9} {'explain':>9} {'in situ':>9} "
            f"{'python':>9} {'+progress':>9} {header}   (microseconds, medians)"
        )
        for row in run["results"]:
            old = base.get((row["size"], row["mode"]))
            ratio = old["python_us"] / row["python_us"] if old else math.nan
            print(f"{_row_text(row)}   python {ratio:4.1f}x less than {first_label!r}")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--label", default="after", help="name of this run in the JSON file")
    p.add_argument("--calls", type=int, default=2000, help="calls per median (at most)")
    p.add_argument("--seconds", type=float, default=3.0, help="time per median (at most)")
    p.add_argument("--threads", type=int, default=1, help="engine threads (see above)")
    p.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES), help="inputs")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON file of the runs")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
