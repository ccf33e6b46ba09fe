"""Search benchmark: pyneuron.explain against two exhaustive beam searches over dense
packed bitsets, compiled (numba, bench/numba_search.py, units in parallel) and numpy
(bench/numpy_search.py), and the PyPI package ``compositional-explanations`` when it is
installed, on synthetic probing sets (see bench/synthetic.py): ADE20K / Broden-like
statistics (``small``, ``medium``, ``ade``), open-vocabulary concept groups (``dense``),
or blob concepts in 5-50 % of the images against dense units that fire in about 70 % of
the images at 2-3 % of the pixels (``dense-units``) or against the KMeans activation
ranges of a synthetic ReLU layer (``ranges``, ``--units`` channels x 5 ranges).

    python bench/search.py --size small|medium|ade|dense|dense-units|ranges [--units N]
                           [--numpy-units K] [--numba-units K] [--threads T]
                           [--simd LEVEL | --all-simd] [--length L] [--beam-size B]
    python bench/search.py --size sweep [--densities D ...] [--presences P ...]
                           [--images N] [--concepts C] [--units U]

Prints a table with side-by-side per-unit times and ratios, checks that pyneuron, numba
and numpy give identical formulas, IoUs and final beams on the units they ran, measures
the in-cache AND+popcount peak of one core and the share of it the search achieves (when
the engine exposes both), and writes ``bench/results/search-<size>.json``. The numba
baseline needs ``pip install ".[bench]"``; it uses as many threads as pyneuron.

``--size sweep`` runs the grid of unit densities (``synthetic.DENSITIES``: top-0.5 %
blobs to units in 90 % of the images at 5 % of the pixels, and activation ranges) x
concept presences (``synthetic.PRESENCES``: 5 %, 15 %, 50 % of the images) on the
``dense-units`` grid at a smaller scale (:data:`SWEEP_SCALE`; ``--images``,
``--concepts``, ``--units`` override it), each cell against numba (with the same checks),
and reports per cell pyneuron's and numba's per-unit times, their ratio, the counting
passes' share of the in-cache peak, and the cell where the ratio is lowest.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import pyneuron
from pyneuron.engine.atomic import write_atomically

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy_search  # noqa: E402
import synthetic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_NUMPY_UNITS = {"small": 4, "medium": 4, "ade": 2, "dense": 2, "dense-units": 2,
                       "ranges": 2, "sweep": 0}  # fmt: skip
#: The sweep's cells: the ``dense-units`` grid with these images, concepts and units
#: (a ``ranges`` cell has units // n_ranges channels); about 20-40 s a cell on 2 cores.
SWEEP_SCALE = {"n_images": 1_000, "n_concepts": 500, "n_units": 20}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    if args.threads is not None:
        pyneuron.set_num_threads(args.threads)
    if args.simd is not None:
        pyneuron.set_simd_level(args.simd)
    if args.size == "sweep":
        report = _sweep(args)
        reports = report["cells"]
    else:
        report = _run(_spec(synthetic.SIZES[args.size], args), args)
        _table(report)
        reports = [report]
    out = Path(args.output) if args.output else RESULTS / f"search-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=_json_default) + "\n"
    write_atomically(out, lambda p: p.write_text(text))  # an interrupted run leaves the old results
    print(f"wrote {out}")
    if not all(_identical(r) for r in reports):
        sys.exit(1)
    return report


def _spec(base: synthetic.SizeSpec, args) -> synthetic.SizeSpec:
    """``base`` with the --images, --concepts and --units given."""
    overrides = {
        k: v
        for k, v in (
            ("n_images", args.images),
            ("n_concepts", args.concepts),
            ("n_units", args.units),
        )
        if v is not None
    }
    return dataclasses.replace(base, **overrides)


def _identical(report: dict) -> bool:
    """False when a baseline's answers differ from pyneuron's on a unit both ran."""
    checks = [report[k].get("agreement") for k in ("numba", "numpy")]
    checks.append(report["numpy"].get("numba_agreement"))
    return not any(c is not None and not c["identical"] for c in checks)


def _units_text(spec: synthetic.SizeSpec) -> str:
    if spec.units == "ranges":
        return f"{spec.n_units} channels x {spec.n_ranges} ranges"
    return f"{spec.n_units} units"


def _run(spec: synthetic.SizeSpec, args, label: str | None = None) -> dict:
    """Build one probing set and run every phase on it; the report (not written)."""
    numpy_units = DEFAULT_NUMPY_UNITS[args.size] if args.numpy_units is None else args.numpy_units
    stream = args.size == "ade" if args.stream is None else args.stream
    report: dict = {
        "size": args.size,
        "spec": dataclasses.asdict(spec),
        "search": {"length": args.length, "beam_size": args.beam_size},
        "machine": _machine(),
        "notes": [],
    }
    print(
        f"== search benchmark, size {label or args.size}: {spec.n_images:,} images x "
        f"{spec.height}x{spec.width}, {spec.n_concepts:,} concepts, {_units_text(spec)}"
    )
    print(
        f"   pyneuron {pyneuron.__version__}, {pyneuron.num_threads()} threads, SIMD "
        f"{pyneuron.simd_level()} (available: {', '.join(pyneuron.available_simd_levels())}), "
        f"numpy {np.__version__}, {os.cpu_count()} CPUs"
    )

    tmp = Path(tempfile.mkdtemp(prefix="pyneuron-bench-", dir=args.tmpdir))
    try:
        built = _build(spec, args, tmp if stream else None, report)
        _sizes(built, tmp, stream or args.cache is not None, report)
        results = _time_pyneuron(built, args, report)
        _pruning(built, args, report)
        _peak(built, args, report)
        _planted(built, results, report)
        packed = _dense_concepts(built, numpy_units > 0 or args.numba_units != 0, report)
        # pyneuron's final beams, to check the baselines' against.
        full = _explain(built, args, full_beam=True) if packed is not None else None
        numba_found = _numba(built, results, full, args, packed, report)
        _numpy(built, results, full, args, numpy_units, packed, numba_found, report)
        del packed
        _compexp(built, results, args, tmp, report)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    report["peak_rss_mb"] = _rss_mb()
    if hasattr(os, "getloadavg"):
        report["machine"]["loadavg_end"] = list(os.getloadavg())
    return report


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=[*sorted(synthetic.SIZES), "sweep"], default="small")
    p.add_argument(
        "--units",
        type=int,
        help="units (default 64 small/medium/dense, 512 ade, 32 dense-units; for ranges: "
        "channels, default 8, each giving 5 units; for the sweep: units per cell, default 20)",
    )
    p.add_argument(
        "--densities",
        nargs="+",
        choices=list(synthetic.DENSITIES),
        default=list(synthetic.DENSITIES),
        help="--size sweep: the unit densities (rows)",
    )
    p.add_argument(
        "--presences",
        nargs="+",
        choices=list(synthetic.PRESENCES),
        default=list(synthetic.PRESENCES),
        help="--size sweep: the concept presences (columns)",
    )
    p.add_argument("--images", type=int, help="override the number of images")
    p.add_argument("--concepts", type=int, help="override the number of concepts")
    p.add_argument(
        "--numpy-units",
        type=int,
        help="units for the numpy baseline (default 4 small/medium, 2 ade if it fits)",
    )
    p.add_argument(
        "--numba-units",
        type=int,
        help="units for the numba baseline (default: all units if they take at most "
        "--numba-budget seconds, else as many as fit; 0 skips it)",
    )
    p.add_argument(
        "--numba-budget",
        type=float,
        help="seconds for the numba baseline (default 120, a sweep cell 10)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="pyneuron worker threads, also the numba baseline's (default: all cores)",
    )
    p.add_argument("--simd", choices=["scalar", "avx2", "avx512"], help="pyneuron SIMD level")
    p.add_argument(
        "--all-simd", action="store_true", help="also time pyneuron at every available SIMD level"
    )
    p.add_argument(
        "--repeat",
        type=int,
        help="time pyneuron this many times, keep the best (default 10, as timeit: a shared "
        "machine's noise only adds time; ade 1, a sweep cell 3)",
    )
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one untimed pyneuron run first (default: not for ade)",
    )
    p.add_argument("--length", type=int, default=3)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--chunk-units", type=int, default=64, help="units per UnitMasks chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write store and units to a temporary directory, memory-mapped "
        "(default: only for ade)",
    )
    p.add_argument(
        "--compexp-units",
        type=int,
        default=3,
        help="units for compositional-explanations, if installed (small only)",
    )
    p.add_argument("--tmpdir", help="where temporary stores go (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--cache",
        help="directory to keep generated probing sets in and reuse them from (streamed, "
        "memory-mapped); build times reported are those of the first build",
    )
    p.add_argument(
        "--output",
        help="JSON path (default bench/results/search-<size>.json next to this script; "
        "`pyneuron bench --out DIR` writes DIR/search-<size>.json)",
    )
    p.add_argument("--progress", action="store_true", help="pyneuron progress bars")
    return p.parse_args(argv)


# -- phases ----------------------------------------------------------------------------


def _build(spec, args, directory, report) -> synthetic.Built:
    built = None
    if args.cache:
        directory = Path(args.cache) / synthetic.cache_key(spec, args.seed, args.chunk_units)
        built = synthetic.load_cache(spec, directory, seed=args.seed, chunk_units=args.chunk_units)
        if built is not None:
            print(
                f"probing set from the cache {directory} (built in {built.seconds['total']:.1f} s)"
            )
        elif directory.exists():
            shutil.rmtree(directory)
    if built is None:
        built = synthetic.build(
            spec, seed=args.seed, chunk_units=args.chunk_units, directory=directory, progress=True
        )
        if args.cache:
            synthetic.save_cache(built, directory)
    t0 = time.perf_counter()
    built.check_counts()
    syn = built.synthetic
    table = built.store.table()
    density = built.unit_pixels / built.store.grid.total_pixels
    report["build"] = {
        "seconds": built.seconds["total"],
        "generate_seconds": built.seconds["generate"],
        "writer_seconds": built.seconds["writers"],
        "check_seconds": time.perf_counter() - t0,
        "streamed_to_disk": directory is not None,
        "from_cache": bool(built.seconds.get("cached")),
        "concepts_by_category": table.groupby("category").size().to_dict(),
        "concepts_absent": int((table["pixels"] == 0).sum()),
        "concept_images_median": float(table["images"].median()),
        "unit_chunks": len(built.units),
        "planted_units": syn.n_planted,
        "unit_density_mean": float(density.mean()),
        "unit_density_median": float(np.median(density)),
        "unit_images_mean_fraction": float((built.unit_images / spec.n_images).mean()),
        # Per chunk (for ranges: per range, lowest first).
        "unit_density_by_chunk": _by_chunk(built, density),
        "unit_images_fraction_by_chunk": _by_chunk(built, built.unit_images / spec.n_images),
        "concept_images_mean_fraction": float(table["images"].mean() / spec.n_images),
        "peak_rss_mb": _rss_mb(),
    }
    b = report["build"]
    print(
        f"build: {b['seconds']:.1f} s (generate {b['generate_seconds']:.1f} s, writers "
        f"{b['writer_seconds']:.1f} s); {b['concepts_absent']} concepts absent; units: "
        f"{100 * b['unit_density_mean']:.2f} % of pixels, in "
        f"{100 * b['unit_images_mean_fraction']:.1f} % of images; "
        f"peak RSS {b['peak_rss_mb']:.0f} MB"
    )
    return built


def _by_chunk(built, values: np.ndarray) -> list[float]:
    """The mean of per-unit ``values`` over each chunk's units."""
    bounds = np.cumsum([0] + [len(chunk) for chunk in built.units])
    return [float(values[lo:hi].mean()) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _sizes(built, tmp: Path, stream: bool, report) -> None:
    store = built.store
    t0 = time.perf_counter()
    if stream:
        store_dir = store.path
        save_seconds = None
    else:
        store_dir = store.save(tmp / "store")
        save_seconds = time.perf_counter() - t0
    dense = numpy_search.dense_bytes(store.grid, len(store))
    report["store"] = {
        "nbytes": store.nbytes,
        "disk_bytes": _du(store_dir),
        "save_seconds": save_seconds,
        "dense_packed_bytes": dense,
        "dense_bool_bytes": len(store) * store.grid.total_pixels,
        "units_nbytes": sum(u.nbytes for u in built.units),
        "units_dense_packed_bytes": numpy_search.dense_bytes(store.grid, built.n_units),
    }
    s = report["store"]
    print(
        f"store: {_mb(s['nbytes'])} (nbytes), {_mb(s['disk_bytes'])} on disk "
        f"(dense packed {_mb(dense)}, dense bool {_mb(s['dense_bool_bytes'])}); "
        f"units {_mb(s['units_nbytes'])} (dense packed {_mb(s['units_dense_packed_bytes'])})"
    )


def _explain(built, args, full_beam: bool = False):
    return pyneuron.explain(
        built.units,
        built.store,
        length=args.length,
        beam_size=args.beam_size,
        full_beam=full_beam,
        progress=args.progress,
    )


def _time_pyneuron(built, args, report):
    n = built.n_units
    runs = []
    level = pyneuron.simd_level()
    levels = pyneuron.available_simd_levels() if args.all_simd else [level]
    if level in levels:  # the chosen level first: its results are the reference
        levels = [level] + [x for x in levels if x != level]
    # The store's co-occurrence table: computed once per store and kept; timed apart.
    t0 = time.perf_counter()
    if args.length > 1:
        built.store.cooccurrence()
    table_seconds = time.perf_counter() - t0
    print(
        f"co-occurrence table (once per store, kept with it): {table_seconds:.3f} s "
        f"= {1e3 * table_seconds / n:.2f} ms per unit of these {n}"
    )
    if args.warmup if args.warmup is not None else args.size != "ade":
        _explain(built, args)  # untimed: thread pool start, first touch of the pages
    reference = None
    repeat = args.repeat if args.repeat is not None else {"ade": 1, "sweep": 3}.get(args.size, 10)
    for lev in levels:
        pyneuron.set_simd_level(lev)
        times, cpu = [], []
        for _ in range(repeat):
            c0 = _cpu_seconds()
            t0 = time.perf_counter()
            frame = _explain(built, args)
            times.append(time.perf_counter() - t0)
            cpu.append(_cpu_seconds() - c0)
        best = int(np.argmin(times))
        seconds = times[best]
        # CPU time over wall time x threads: well under 1 means other work on the machine
        # took cores from the engine (or the engine did not keep its threads busy).
        utilization = cpu[best] / (seconds * pyneuron.num_threads())
        run = {
            "simd": lev,
            "threads": pyneuron.num_threads(),
            "units": n,
            "seconds": seconds,
            "per_unit_seconds": seconds / n,
            "repeats": times,
            "median_seconds": float(np.median(times)),
            "cpu_seconds": cpu[best],
            "cpu_utilization": utilization,
        }
        if reference is None:
            reference = frame
        else:
            same = _same_results(reference, frame)
            run["identical_to_" + levels[0]] = same
            if not same:
                report["notes"].append(f"pyneuron results at SIMD {lev} differ from {levels[0]}")
        runs.append(run)
        of = f" (best of {repeat}, median {np.median(times):.3f})" if repeat > 1 else ""
        print(
            f"pyneuron explain ({lev}, {run['threads']} threads): {seconds:.3f} s for {n} units"
            f"{of}, {1e3 * run['per_unit_seconds']:.2f} ms/unit, CPU utilization "
            f"{100 * utilization:.0f} %"
        )
    pyneuron.set_simd_level(level)
    report["pyneuron"] = {
        "runs": runs,
        "peak_rss_mb": _rss_mb(),
        "cooccurrence_seconds": table_seconds,
    }
    ious = reference["iou"].to_numpy()
    report["pyneuron"]["iou_mean"] = float(np.mean(ious))
    report["pyneuron"]["length_counts"] = {
        str(k): int(v) for k, v in reference["length"].value_counts().sort_index().items()
    }
    return reference


def _raw_search(built, chunk, n: int, args) -> dict:
    """The engine's raw beam search of a chunk's first ``n`` units, as ``explain`` runs it
    (with the store's co-occurrence table), for its work counters: per unit ``derived``,
    ``pruned``, ``counted`` pairs and ``words``; ``count_seconds``, ``count_words``."""
    return pyneuron.engine._native.beam_search(
        chunk._native, 0, n, built.store._native, args.length, args.beam_size, [0, 1, 2], 1.0,
        pyneuron.engine.search.search_cooccurrence(built.store, args.length),
    )  # fmt: skip


def _pruning(built, args, report) -> None:
    """What became of the (beam formula, concept) pairs of the expansion steps, on a sample
    of units from the first chunk (planted units first) and the last chunk (random units):
    scored from the co-occurrence intervals without counting |F AND C| ("derived"),
    dropped by the bounds ("pruned"), or scored after counting |F AND C| ("counted")."""
    k = 16 if args.size == "ade" else 64
    chunks = [built.units[0]] if len(built.units) == 1 else [built.units[0], built.units[-1]]
    totals = {"derived": 0, "pruned": 0, "counted": 0}
    sampled = 0
    for chunk in chunks:
        n = min(len(chunk), k)
        raw = _raw_search(built, chunk, n, args)
        for key in totals:
            totals[key] += int(raw[key].sum())
        sampled += n
    pairs = max(sum(totals.values()), 1)
    report["pruning"] = {
        "sample_units": sampled,
        **{f"pairs_{key}": value for key, value in totals.items()},
        **{f"fraction_{key}": value / pairs for key, value in totals.items()},
    }
    print(
        f"pairs ({sampled} sampled units): {100 * totals['derived'] / pairs:.1f} % scored "
        f"from the co-occurrence intervals, {100 * totals['pruned'] / pairs:.1f} % pruned by "
        f"the bounds, {100 * totals['counted'] / pairs:.1f} % counted "
        f"({totals['counted'] / max(sampled, 1):,.0f} per unit)"
    )


PEAK_WORDS, PEAK_SECONDS = 2048, 0.3  # the micro-benchmark: words per operand, duration


def _peak(built, args, report) -> None:
    """The in-cache AND+popcount peak of one core at the current SIMD level (the engine's
    micro-benchmark, 16 bytes per 64-bit word pair) and the share of it the search
    achieves, over a raw search of all units: in its batched counting passes (16 bytes x
    word pairs counted there / (their wall time x threads)) and over the whole search."""
    native, threads = pyneuron.engine._native, pyneuron.num_threads()
    peak = float(native.and_popcount_throughput(PEAK_WORDS, PEAK_SECONDS))
    print(
        f"AND+popcount peak ({pyneuron.simd_level()}, one core, {PEAK_WORDS} words in "
        f"cache): {peak / 1e9:.1f} GB/s"
    )
    words = count_words = 0
    seconds = count_seconds = 0.0
    for chunk in built.units:
        t0 = time.perf_counter()
        raw = _raw_search(built, chunk, len(chunk), args)
        seconds += time.perf_counter() - t0
        words += int(np.sum(raw["words"]))
        count_words += int(raw["count_words"])
        count_seconds += float(raw["count_seconds"])
    # The co-occurrence table's passes: the same batched kernel on whole concept bitsets.
    _, table_seconds, table_words = native.concept_cooccurrence(
        built.store._native, with_stats=True
    )
    table_rate = 16 * table_words / max(table_seconds * threads, 1e-12)
    counting = 16 * count_words / max(count_seconds * threads, 1e-12)
    overall = 16 * words / (seconds * threads)
    report["popcount_peak"] = {
        "simd": pyneuron.simd_level(),
        "threads": threads,
        "peak_words": PEAK_WORDS,
        "peak_bytes_per_second_per_core": peak,
        "search_units": built.n_units,
        "search_seconds": seconds,
        "word_pairs": words,
        "counting_seconds": count_seconds,
        "counting_word_pairs": count_words,
        "counting_bytes_per_second_per_core": counting,
        "counting_fraction_of_peak": counting / peak,
        "search_bytes_per_second_per_core": overall,
        "search_fraction_of_peak": overall / peak,
        "cooccurrence_seconds": table_seconds,
        "cooccurrence_word_pairs": table_words,
        "cooccurrence_bytes_per_second_per_core": table_rate,
        "cooccurrence_fraction_of_peak": table_rate / peak,
    }
    print(
        f"counting passes: {16 * count_words / 1e9:.2f} GB of word pairs in "
        f"{count_seconds:.3f} s on {threads} threads = {counting / 1e9:.1f} GB/s per core, "
        f"{100 * counting / peak:.1f} % of the peak; whole search ({seconds:.3f} s): "
        f"{100 * overall / peak:.1f} % of the peak"
    )
    print(
        f"co-occurrence table passes: {16 * table_words / 1e9:.2f} GB of word pairs in "
        f"{table_seconds:.3f} s = {table_rate / 1e9:.1f} GB/s per core, "
        f"{100 * table_rate / peak:.1f} % of the peak"
    )


def _planted(built, results, report) -> None:
    syn = built.synthetic
    if not syn.n_planted:
        return
    rows = []
    first = built.units[0]
    for u in range(min(syn.n_planted, len(first))):
        planted = syn.planted_formula(u)
        planted_iou = float(pyneuron.score(planted, first, built.store)["iou"].iloc[u])
        found = results["formula"].iloc[u]
        found = found if isinstance(found, str) else None
        rows.append(
            {
                "unit": u,
                "planted": planted,
                "planted_iou": planted_iou,
                "found": found,
                "found_iou": float(results["iou"].iloc[u]),
            }
        )
    exact = sum(r["planted"] == r["found"] for r in rows)
    at_least = sum(r["found_iou"] >= r["planted_iou"] for r in rows)
    report["planted"] = {
        "units": rows,
        "recovered_exactly": exact,
        "found_iou_at_least_planted": at_least,
    }
    print(
        f"planted formulas: {exact}/{len(rows)} recovered exactly, found IoU >= planted IoU "
        f"for {at_least}/{len(rows)}"
    )
    for r in rows[:8]:
        print(
            f"   unit {r['unit']}: planted {r['planted']} (IoU {r['planted_iou']:.3f}) -> "
            f"found {r['found']} (IoU {r['found_iou']:.3f})"
        )


def _numpy_units(built, k: int) -> list[int]:
    n, planted = built.n_units, built.synthetic.n_planted
    k = min(k, n)
    take_planted = min(planted, (k + 1) // 2)
    rest = k - take_planted
    randoms = np.linspace(planted, n - 1, rest).round().astype(int).tolist() if rest else []
    chosen = list(range(take_planted)) + [u for u in randoms if u >= take_planted]
    return sorted(dict.fromkeys(chosen))[:k]


def _unit_mask(built, u: int) -> np.ndarray:
    """Dense bool (N, H, W) mask of unit ``u`` (numbered across the chunks)."""
    bounds = np.cumsum([0] + [len(c) for c in built.units])
    chunk = int(np.searchsorted(bounds, u, side="right") - 1)
    return built.units[chunk].mask(u - int(bounds[chunk]))


def _beam_rows(full, u: int) -> list[tuple[str, float, float]]:
    """pyneuron's final beam of unit ``u`` from a ``full_beam`` frame, as (formula, score,
    iou) like :meth:`numpy_search.Result.rows`."""
    rows = full[full["unit"] == u]
    return [
        (f, float(s), float(i))
        for f, s, i in zip(rows["formula"], rows["score"], rows["iou"])
        if isinstance(f, str)
    ]


def _agreement(chosen, found, results, full) -> dict:
    """Best formula and IoU of each unit against the timed pyneuron run, and the whole
    final beam against pyneuron's full beam; ``found`` = baseline Results of ``chosen``."""
    units, disagreements = [], []
    for u, res in zip(chosen, found):
        py_formula = results["formula"].iloc[u]
        py_formula = py_formula if isinstance(py_formula, str) else None
        py_iou = float(results["iou"].iloc[u])
        py_beam, beam = _beam_rows(full, u), res.rows()
        same = py_formula == res.formula and py_iou == res.iou and py_beam == beam
        units.append(
            {
                "unit": u,
                "formula": res.formula,
                "iou": res.iou,
                "pyneuron_formula": py_formula,
                "pyneuron_iou": py_iou,
                "identical": same,
            }
        )
        if not same:
            disagreements.append({"unit": u, "beam": beam, "pyneuron_beam": py_beam})
    return {
        "units": units,
        "agreement": {
            "units": len(units),
            "identical": not disagreements,
            "disagreements": disagreements,
        },
    }


def _print_disagreements(name: str, agreement: dict) -> None:
    for d in agreement["disagreements"]:
        print(f"   unit {d['unit']}:")
        print(f"     {name:<8} {d['beam']}")
        print(f"     pyneuron {d['pyneuron_beam']}")


def _dense_concepts(built, needed: bool, report):
    """The dense packed concept matrix both baselines search (None if not needed or if it
    would take more than half of the available memory)."""
    store = built.store
    dense = numpy_search.dense_bytes(store.grid, len(store))
    info: dict = {"bytes": dense}
    report["dense_matrix"] = info
    available = _mem_available()
    if not needed:
        info["skipped"] = "no baseline asked for"
        return None
    if available is not None and dense > 0.5 * available:
        info["skipped"] = (
            f"the dense packed concept matrix needs {_mb(dense)}, more than half of the "
            f"{_mb(available)} available"
        )
        report["notes"].append("numpy and numba baselines skipped: " + info["skipped"])
        return None
    t0 = time.perf_counter()
    packed = numpy_search.PackedConcepts.from_store(store)
    info["build_seconds"] = time.perf_counter() - t0
    print(f"dense packed concept matrix for the baselines: {_mb(dense)} in "
          f"{info['build_seconds']:.1f} s")  # fmt: skip
    return packed


def _numba(built, results, full, args, packed, report) -> dict:
    """The numba baseline (bench/numba_search.py) on all units or as many as fit in
    ``--numba-budget`` seconds; returns {unit: Result}."""
    info: dict = {}
    report["numba"] = info
    if args.numba_units == 0 or packed is None:
        info["skipped"] = (
            "--numba-units 0" if args.numba_units == 0 else report["dense_matrix"]["skipped"]
        )
        print(f"numba baseline: skipped ({info['skipped']})")
        return {}
    try:
        import numba
        import numba_search
    except ImportError as error:
        info["skipped"] = f"numba is not installed ({error}); pip install '.[bench]'"
        print(f"numba baseline: skipped: {info['skipped']}")
        return {}
    numba.set_num_threads(min(pyneuron.num_threads(), numba.config.NUMBA_NUM_THREADS))
    info["threads"] = numba_search.num_threads()
    info["numba"] = numba.__version__
    info["warmup_seconds"] = numba_search.warm_up()

    def run(units: list[int]) -> tuple[list, float, float]:
        words = np.stack([numpy_search.pack_mask(_unit_mask(built, u)) for u in units])
        c0, t0 = _cpu_seconds(), time.perf_counter()
        found = numba_search.beam_search(
            words, packed, length=args.length, beam_size=args.beam_size
        )
        return found, time.perf_counter() - t0, _cpu_seconds() - c0

    n = built.n_units
    k = n if args.numba_units is None else min(args.numba_units, n)
    if args.numba_units is None:  # all units if they fit in the budget (timed on a probe)
        probe = _numpy_units(built, info["threads"])
        _, seconds, _ = run(probe)
        info["probe"] = {"units": probe, "seconds": seconds}
        budget = args.numba_budget
        if budget is None:
            budget = 10.0 if args.size == "sweep" else 120.0
        if seconds / len(probe) * n > budget:
            k = max(len(probe), int(budget * len(probe) / seconds))
    chosen = list(range(n)) if k >= n else _numpy_units(built, k)
    found, seconds, cpu = run(chosen)
    info.update(
        unit_count=len(chosen),
        seconds=seconds,
        per_unit_seconds=seconds / len(chosen),
        cpu_seconds=cpu,
        cpu_utilization=cpu / (seconds * info["threads"]),
        pairs_counted_per_unit=float(np.mean([r.counted for r in found])),
    )
    info.update(_agreement(chosen, found, results, full))
    agreement = info["agreement"]
    status = "identical" if agreement["identical"] else (
        f"{len(agreement['disagreements'])} DISAGREE")  # fmt: skip
    print(
        f"numba dense exhaustive ({info['threads']} threads, JIT warm-up "
        f"{info['warmup_seconds']:.1f} s not timed): {seconds:.2f} s for {len(chosen)} units, "
        f"{_dur(info['per_unit_seconds'])}/unit, CPU utilization "
        f"{100 * info['cpu_utilization']:.0f} %; agreement with pyneuron (formula, IoU, full "
        f"final beam): {status}"
    )
    _print_disagreements("numba", agreement)
    return dict(zip(chosen, found))


def _numpy(built, results, full, args, k: int, packed, numba_found: dict, report) -> None:
    store = built.store
    info: dict = {"units": [], "dense_packed_bytes": report["dense_matrix"]["bytes"]}
    report["numpy"] = info
    if k <= 0:
        info["skipped"] = "--numpy-units 0"
        print("numpy baseline: skipped (--numpy-units 0)")
        return
    if packed is None:
        info["skipped"] = report["dense_matrix"]["skipped"]
        info["extrapolated_per_unit_seconds"] = _extrapolate(store, args)
        print(
            f"numpy baseline: skipped: {info['skipped']}; extrapolated from measured numpy "
            f"bandwidth (if it fit in memory): {info['extrapolated_per_unit_seconds']:.0f} s/unit"
        )
        return
    chosen = _numpy_units(built, k)
    np_results, seconds = [], []
    for u in chosen:
        words = numpy_search.pack_mask(_unit_mask(built, u))
        t0 = time.perf_counter()
        res = numpy_search.beam_search(words, packed, length=args.length, beam_size=args.beam_size)
        seconds.append(time.perf_counter() - t0)
        np_results.append(res)
        print(f"numpy unit {u}: {seconds[-1]:.2f} s -> {res.formula} (IoU {res.iou:.4f})")
    info["build_peak_rss_mb"] = _rss_mb()
    info["seconds"] = float(sum(seconds))
    info["per_unit_seconds"] = float(np.mean(seconds))
    info["pairs_counted_per_unit"] = float(np.mean([r.counted for r in np_results]))
    info.update(_agreement(chosen, np_results, results, full))
    for unit, s in zip(info["units"], seconds):
        unit["seconds"] = s
    # The numba baseline's final beams on the units both ran.
    both = [(u, r) for u, r in zip(chosen, np_results) if u in numba_found]
    same_numba = [u for u, r in both if r.rows() == numba_found[u].rows()]
    info["numba_agreement"] = {"units": len(both), "identical": len(same_numba) == len(both)}
    agreement = info["agreement"]
    status = "identical" if agreement["identical"] else (
        f"{len(agreement['disagreements'])} DISAGREE")  # fmt: skip
    vs_numba = f"; final beams vs numba: {len(same_numba)}/{len(both)} identical" if both else ""
    print(
        f"numpy packed exhaustive: {info['per_unit_seconds']:.2f} s/unit on {len(chosen)} units;"
        f" agreement with pyneuron (formula, IoU, full final beam): {status}{vs_numba}"
    )
    _print_disagreements("numpy", agreement)


def _extrapolate(store, args) -> float:
    """Per-unit numpy time if the dense matrix fit in memory, from the bandwidth of the
    same kernels on a 64 MiB sample."""
    rng = np.random.default_rng(0)
    w = store.grid.n_images * store.grid.words_per_image
    rows = max(1, (64 << 20) // (8 * w))
    sample = rng.integers(0, 2**63, size=(rows, w), dtype=np.uint64)
    row = sample[0].copy()
    t0 = time.perf_counter()
    numpy_search.popcounts(sample, row)
    single = time.perf_counter() - t0
    t0 = time.perf_counter()
    numpy_search.popcounts_pair(sample, row, row)
    pair = time.perf_counter() - t0
    scale = len(store) / rows
    return scale * (single + (args.length - 1) * args.beam_size * pair)


def _compexp(built, results, args, tmp: Path, report) -> None:
    info: dict = {}
    report["compositional_explanations"] = info
    try:
        import torch  # noqa: F401
        from compositional_explanations import beam as ce_beam
        from compositional_explanations import metrics as ce_metrics
    except ImportError as error:
        info["skipped"] = f"not installed ({error})"
        print(
            "compositional-explanations: skipped, not installed (it is no dependency of pyneuron)"
        )
        return
    if args.size != "small" or args.compexp_units <= 0:
        info["skipped"] = (
            "run only on --size small (dense bool masks; out of memory beyond)"
            if args.compexp_units > 0
            else "--compexp-units 0"
        )
        print(f"compositional-explanations: skipped: {info['skipped']}")
        return
    try:
        _run_compexp(built, results, args, tmp, info, ce_beam, ce_metrics)
    except Exception as error:  # a third-party package: report, don't fail the benchmark
        info["error"] = f"{type(error).__name__}: {error}"
        print(f"compositional-explanations: failed: {info['error']}")


def _run_compexp(built, results, args, tmp: Path, info, ce_beam, ce_metrics) -> None:
    """The package's beam search (``compositional_explanations.beam``, pure torch, dense
    bool masks, one unit per call) on a few units. Its first call also computes per-concept
    dataset statistics, cached in ``cache_dir`` for the following calls: the first call is
    reported apart, the per-unit time is the mean of the others."""
    import torch

    store = built.store
    names = store.names
    masks = [torch.from_numpy(store.mask(c)) for c in range(len(store))]
    # Disjointness (no shared pixel) of every pair of concepts, from pyneuron's IoU table.
    as_units = pyneuron.UnitMasks.from_masks(np.stack([m.numpy() for m in masks]))
    disjoint = torch.from_numpy(pyneuron.iou_table(as_units, store, progress=False) == 0)
    cache_dir = tmp / "compexp-cache"
    cache_dir.mkdir(exist_ok=True)
    chunk = built.units[0]
    units = _numpy_units(built, args.compexp_units)
    info["units"] = []
    for u in units:
        bitmap = torch.from_numpy(chunk.mask(u))
        t0 = time.perf_counter()
        formula = ce_beam.compute_beam_explanations(
            bitmaps=bitmap,
            masks=masks,
            disjoint_info=disjoint,
            length=args.length,
            beam_size=args.beam_size,
            device="cpu",
            cache_dir=str(cache_dir),
        )
        seconds = time.perf_counter() - t0
        value = float(
            ce_metrics.compute_iou_from_masks(bitmaps=bitmap, masks=masks, formula=formula)
        )
        text = _ce_formula(formula, names)
        py_formula = results["formula"].iloc[u]
        info["units"].append(
            {
                "unit": u,
                "seconds": seconds,
                "formula": text,
                "iou": value,
                "pyneuron_formula": py_formula if isinstance(py_formula, str) else None,
                "pyneuron_iou": float(results["iou"].iloc[u]),
            }
        )
        print(
            f"compositional-explanations unit {u}: {seconds:.2f} s -> {text} (IoU {value:.4f}); "
            f"pyneuron: {py_formula} (IoU {results['iou'].iloc[u]:.4f})"
        )
    times = [r["seconds"] for r in info["units"]]
    info["first_call_seconds"] = times[0]
    info["per_unit_seconds"] = float(np.mean(times[1:] if len(times) > 1 else times))
    info["per_unit_note"] = "mean after the first call" if len(times) > 1 else "first call"
    info["peak_rss_mb"] = _rss_mb()


def _ce_formula(node, names) -> str:
    kind = type(node).__name__
    if kind == "Leaf":
        return names[int(node.val)]
    if kind == "Not":
        return f"NOT {_ce_formula(node.val, names)}"
    return f"({_ce_formula(node.left, names)} {kind.upper()} {_ce_formula(node.right, names)})"


# -- the sweep -------------------------------------------------------------------------


def _sweep(args) -> dict:
    """Every (density, presence) cell of ``--densities`` x ``--presences``: one report
    each (``cells``), a summary row each (``table``) and the row where pyneuron's ratio
    to numba is lowest (``lowest_ratio``)."""
    base = _spec(dataclasses.replace(synthetic.SIZES["dense-units"], **SWEEP_SCALE), args)
    report: dict = {
        "size": "sweep",
        "spec": dataclasses.asdict(base),
        "search": {"length": args.length, "beam_size": args.beam_size},
        "machine": _machine(),
        "densities": {d: synthetic.DENSITIES[d] for d in args.densities},
        "presences": {p: synthetic.PRESENCES[p] for p in args.presences},
        "cells": [],
        "table": [],
    }
    for density in args.densities:
        for presence in args.presences:
            spec = synthetic.regime(base, density, presence)
            if spec.units == "ranges":  # about as many units as the other cells
                spec = dataclasses.replace(spec, n_units=max(1, base.n_units // spec.n_ranges))
            cell = _run(spec, args, label=f"sweep {density} x {presence}")
            _table(cell)
            cell.update(density=density, presence=presence)
            report["cells"].append(cell)
            report["table"].append(_sweep_row(cell))
    if hasattr(os, "getloadavg"):
        report["machine"]["loadavg_end"] = list(os.getloadavg())
    measured = [r for r in report["table"] if r["pyneuron_vs_numba"] is not None]
    report["lowest_ratio"] = min(measured, key=lambda r: r["pyneuron_vs_numba"], default=None)
    _sweep_table(report)
    return report


def _sweep_row(cell: dict) -> dict:
    """A cell's summary: data statistics, per-unit times, ratio, pair fates, peak share."""
    b, run, nb = cell["build"], cell["pyneuron"]["runs"][0], cell["numba"]
    peak, pruning = cell["popcount_peak"], cell["pruning"]
    agreement = nb.get("agreement")
    return {
        "density": cell["density"],
        "presence": cell["presence"],
        "units": run["units"],
        "unit_density_mean": b["unit_density_mean"],
        "unit_images_mean_fraction": b["unit_images_mean_fraction"],
        "concept_images_mean_fraction": b["concept_images_mean_fraction"],
        "pyneuron_per_unit_seconds": run["per_unit_seconds"],
        "pyneuron_cpu_utilization": run["cpu_utilization"],
        "numba_per_unit_seconds": nb.get("per_unit_seconds"),
        "numba_units": nb.get("unit_count"),
        "pyneuron_vs_numba": cell["ratios"]["pyneuron_vs_numba"],
        "fraction_derived": pruning["fraction_derived"],
        "fraction_pruned": pruning["fraction_pruned"],
        "fraction_counted": pruning["fraction_counted"],
        "counting_fraction_of_peak": peak["counting_fraction_of_peak"],
        "search_fraction_of_peak": peak["search_fraction_of_peak"],
        "identical": None if agreement is None else agreement["identical"],
        "loadavg_start": cell["machine"]["loadavg_start"],
    }


def _sweep_table(report: dict) -> None:
    header = ("units", "concepts in", "unit px", "unit img", "pyneuron/unit", "numba/unit",
              "ratio", "counted", "count/peak", "same")  # fmt: skip
    rows = [
        (
            f"{r['density']} ({r['units']})",
            r["presence"],
            f"{100 * r['unit_density_mean']:.2f} %",
            f"{100 * r['unit_images_mean_fraction']:.0f} %",
            _dur(r["pyneuron_per_unit_seconds"]),
            _dur(r["numba_per_unit_seconds"]),
            _ratio(r["numba_per_unit_seconds"], r["pyneuron_per_unit_seconds"]),
            f"{100 * r['fraction_counted']:.1f} %",
            f"{100 * r['counting_fraction_of_peak']:.1f} %",
            {True: "yes", False: "NO", None: "-"}[r["identical"]],
        )
        for r in report["table"]
    ]
    print()
    spec, search = report["spec"], report["search"]
    print(
        f"== sweep: {spec['n_images']:,} images, {spec['n_concepts']:,} concepts, length "
        f"{search['length']}, beam {search['beam_size']}"
    )
    _print_table(header, rows)
    low = report["lowest_ratio"]
    if low is not None:
        print(
            f"  lowest ratio: {low['pyneuron_vs_numba']:.1f}x at units {low['density']}, "
            f"concepts in {low['presence']} of the images (load average at its start "
            f"{low['loadavg_start'][0]:.1f})"
        )
    print()


# -- helpers ---------------------------------------------------------------------------


def _same_results(a, b) -> bool:
    fa = [f if isinstance(f, str) else None for f in a["formula"]]
    fb = [f if isinstance(f, str) else None for f in b["formula"]]
    return fa == fb and np.array_equal(a["iou"].to_numpy(), b["iou"].to_numpy())


def _ratio(base: float | None, engine: float | None) -> str:
    """How many times faster ``engine`` is than ``base`` (per-unit seconds)."""
    if not base or not engine:
        return "-"
    x = base / engine
    return f"{x:,.0f}x" if x >= 10 else f"{x:.2f}x"


def _table(report) -> None:
    runs = report["pyneuron"]["runs"]
    np_info = report.get("numpy", {})
    np_unit = np_info.get("per_unit_seconds")
    np_note = "measured"
    if np_unit is None and np_info.get("extrapolated_per_unit_seconds"):
        np_unit, np_note = np_info["extrapolated_per_unit_seconds"], "extrapolated"
    nb_info = report.get("numba", {})
    nb_unit = nb_info.get("per_unit_seconds")
    py_unit = runs[0]["per_unit_seconds"]
    report["ratios"] = {
        "pyneuron_vs_numba": nb_unit / py_unit if nb_unit else None,
        "pyneuron_vs_numpy": np_unit / py_unit if np_unit else None,
        "numba_vs_numpy": np_unit / nb_unit if np_unit and nb_unit else None,
        "numpy": np_note if np_unit else None,
    }
    rows = []
    for r in runs:
        rows.append(
            (
                f"pyneuron explain ({r['simd']}, {r['threads']} threads)",
                str(r["units"]),
                f"{r['seconds']:.3f}",
                _dur(r["per_unit_seconds"]),
                _ratio(nb_unit, r["per_unit_seconds"]),
                _ratio(np_unit, r["per_unit_seconds"]),
                f"{100 * r['cpu_utilization']:.0f} %",
            )
        )
    table = report["pyneuron"]["cooccurrence_seconds"]
    if table > 0:
        first = runs[0]
        with_table = (first["seconds"] + table) / first["units"]
        rows.append(
            (
                "  the same, plus the co-occurrence table",
                str(first["units"]),
                f"{first['seconds'] + table:.3f}",
                _dur(with_table),
                _ratio(nb_unit, with_table),
                _ratio(np_unit, with_table),
                "-",
            )
        )
    if nb_unit:
        rows.append(
            (
                f"numba dense exhaustive ({nb_info['threads']} threads)",
                str(nb_info["unit_count"]),
                f"{nb_info['seconds']:.2f}",
                _dur(nb_unit),
                "1x",
                _ratio(np_unit, nb_unit),
                f"{100 * nb_info['cpu_utilization']:.0f} %",
            )
        )
    else:
        rows.append(("numba dense exhaustive", "-", "-", "skipped", "-", "-", "-"))
    if "per_unit_seconds" in np_info:
        rows.append(
            (
                "numpy packed exhaustive (1 thread)",
                str(len(np_info["units"])),
                f"{np_info['seconds']:.2f}",
                _dur(np_unit),
                _ratio(nb_unit, np_unit),
                "1x",
                "-",
            )
        )
    elif np_unit:
        rows.append(
            (f"numpy packed exhaustive ({np_note}, not run)", "-", "-", _dur(np_unit), "-",
             "1x", "-")
        )  # fmt: skip
    else:
        rows.append(("numpy packed exhaustive", "-", "-", "skipped", "-", "-", "-"))
    ce = report.get("compositional_explanations", {})
    if "per_unit_seconds" in ce:
        rows.append(
            (
                f"compositional-explanations (torch, first call {ce['first_call_seconds']:.1f} s)",
                str(len(ce["units"])),
                f"{sum(r['seconds'] for r in ce['units']):.2f}",
                _dur(ce["per_unit_seconds"]),
                _ratio(nb_unit, ce["per_unit_seconds"]),
                _ratio(np_unit, ce["per_unit_seconds"]),
                "-",
            )
        )
    else:
        rows.append(("compositional-explanations", "-", "-", "skipped", "-", "-", "-"))
    header = ("engine", "units", "total s", "per unit", "speed vs numba", "speed vs numpy",
              "CPU use")  # fmt: skip
    print()
    _print_table(header, rows)
    s = report["store"]
    extra = [
        f"build {report['build']['seconds']:.1f} s; store {_mb(s['nbytes'])} (nbytes), "
        f"{_mb(s['disk_bytes'])} on disk (dense packed: {_mb(s['dense_packed_bytes'])})",
        f"peak RSS {report['peak_rss_mb']:.0f} MB (after build "
        f"{report['build']['peak_rss_mb']:.0f} MB, after pyneuron "
        f"{report['pyneuron']['peak_rss_mb']:.0f} MB)",
    ]
    if "pruning" in report:
        p = report["pruning"]
        extra.append(
            f"(formula, concept) pairs: {100 * p['fraction_derived']:.1f} % derived, "
            f"{100 * p['fraction_pruned']:.1f} % pruned, "
            f"{100 * p['fraction_counted']:.1f} % counted"
        )
    for name, agreement in (
        ("numba vs pyneuron", nb_info.get("agreement")),
        ("numpy vs pyneuron", np_info.get("agreement")),
        ("numpy vs numba (final beams)", np_info.get("numba_agreement")),
    ):
        if agreement and agreement["units"]:
            extra.append(
                f"{name}: "
                + ("identical on all " if agreement["identical"] else "DISAGREE on some of ")
                + f"{agreement['units']} units"
            )
    if "warmup_seconds" in nb_info:
        extra.append(f"numba JIT warm-up {nb_info['warmup_seconds']:.1f} s (not timed)")
    peak = report["popcount_peak"]
    extra.append(
        f"AND+popcount in the counting passes: "
        f"{peak['counting_bytes_per_second_per_core'] / 1e9:.1f} GB/s per core = "
        f"{100 * peak['counting_fraction_of_peak']:.1f} % of the in-cache peak "
        f"{peak['peak_bytes_per_second_per_core'] / 1e9:.1f} GB/s ({peak['simd']}); whole "
        f"search {100 * peak['search_fraction_of_peak']:.1f} %; co-occurrence table passes "
        f"{100 * peak['cooccurrence_fraction_of_peak']:.1f} %"
    )
    for line in extra:
        print("  " + line)
    print()


def _print_table(header: tuple, rows: list[tuple]) -> None:
    """A Markdown table, columns as wide as their widest cell."""
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyneuron": pyneuron.__version__,
        "simd_level": pyneuron.simd_level(),
        "simd_available": pyneuron.available_simd_levels(),
        "threads": pyneuron.num_threads(),
        "memory_total_mb": _meminfo("MemTotal"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "engine_build": _engine_build(),
        # Other work on the machine skews timings (2 threads on a 2-core machine).
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _engine_build() -> dict:
    """The compiled engine's file: its digest and time, to tell builds apart (the working
    tree of the commit above may hold changes)."""
    path = Path(pyneuron.engine._native._core.__file__)
    return {
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
        "modified": datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC).isoformat(
            timespec="seconds"
        ),
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _meminfo(key: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _mem_available() -> int | None:
    mb = _meminfo("MemAvailable")
    return None if mb is None else int(mb * 1024 * 1024)


def _rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024


def _du(path: Path | None) -> int | None:
    if path is None:
        return None
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _mb(n: float | None) -> str:
    if n is None:
        return "?"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


def _dur(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    main()
