"""Optimal-search benchmark: pyneuron's exact branch and bound (``search="optimal"``)
against its beam search on synthetic probing sets (bench/synthetic.py), with the
beam-vs-optimal audit, per-unit times, nodes and the fraction of units proven optimal.

    python bench/optimal.py --size small|medium|... [--lengths 3 5] [--time-limit 10]
                            [--threads 2] [--units N] [--cache DIR]

Writes ``bench/results/optimal-<size>.json``. The PyPI package ``compositional-explanations``
is compared only when it is installed (it is no dependency of pyneuron).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import pyneuron

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synthetic  # noqa: E402
from search import _ce_formula, _json_default, _machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    spec = synthetic.SIZES[args.size]
    if args.units is not None:
        spec = dataclasses.replace(spec, n_units=args.units)
    pyneuron.set_num_threads(args.threads)
    report: dict = {
        "size": args.size,
        "spec": dataclasses.asdict(spec),
        "time_limit_s": args.time_limit,
        "machine": _machine(),
        "runs": [],
        "notes": [],
    }
    if "dense" not in synthetic.SIZES:
        report["notes"].append("bench/synthetic.py has no 'dense' size in this checkout")
    print(
        f"== optimal search, size {args.size}: {spec.n_images:,} images x {spec.height}x"
        f"{spec.width}, {spec.n_concepts:,} concepts, {spec.n_units} units, "
        f"{pyneuron.num_threads()} threads, SIMD {pyneuron.simd_level()}"
    )
    built = _load(spec, args)
    units = built.units if len(built.units) > 1 else built.units[0]
    store = built.store
    # Setup per engine call (pair tables of the store): timed as a length-1 optimal
    # search of the first chunk (the length-1 search itself is trivial).
    t0 = time.perf_counter()
    pyneuron.explain(built.units[0], store, length=1, search="optimal", progress=False)
    report["setup_seconds_per_call"] = time.perf_counter() - t0
    for length in args.lengths:
        report["runs"].append(_run(units, store, length, args))
    report["compositional_explanations"] = _compexp(built, args)
    _table(report)
    out = Path(args.output) if args.output else RESULTS / f"optimal-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    print(f"wrote {out}")
    return report


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=sorted(synthetic.SIZES), default="small")
    p.add_argument("--lengths", type=int, nargs="+", default=[3, 5])
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds per unit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--units", type=int, help="override the number of units")
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument(
        "--repeat", type=int, default=3, help="runs per length, fastest kept (runs under 60 s)"
    )
    p.add_argument(
        "--compexp-units",
        type=int,
        default=3,
        help="units for compositional-explanations' optimal search, if installed (length 3)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", help="directory to keep generated probing sets in")
    p.add_argument("--output", help="JSON path (default bench/results/optimal-<size>.json)")
    return p.parse_args(argv)


def _load(spec: synthetic.SizeSpec, args) -> synthetic.Built:
    root = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="pyneuron-optimal-"))
    directory = root / synthetic.cache_key(spec, args.seed, 64)
    built = synthetic.load_cache(spec, directory, seed=args.seed)
    if built is None:
        built = synthetic.build(spec, seed=args.seed, chunk_units=64, directory=directory)
        synthetic.save_cache(built, directory)
    return built


def _run(units, store, length: int, args) -> dict:
    options = dict(length=length, beam_size=args.beam_size, progress=False)
    t0 = time.perf_counter()
    beam = pyneuron.explain(units, store, **options)
    beam_seconds = time.perf_counter() - t0
    # Other work on a shared machine inflates wall times: repeat short runs, keep the fastest.
    tries = []
    while len(tries) < args.repeat and (not tries or tries[-1][0] < 60):
        t0 = time.perf_counter()
        table = pyneuron.explain(
            units, store, search="optimal", time_limit=args.time_limit, **options
        )
        tries.append((time.perf_counter() - t0, table))
    optimal_seconds, best = min(tries, key=lambda item: item[0])
    seconds, nodes = best["seconds"].to_numpy(), best["nodes"].to_numpy()
    gap = np.clip(best["iou"].to_numpy() - beam["iou"].to_numpy(), 0.0, None)
    same = (best["formula"] == beam["formula"]).to_numpy()
    found = best["formula"].notna().to_numpy()
    proven = best["optimal"].to_numpy()
    run = {
        "length": length,
        "units": len(best),
        "beam_wall_seconds": beam_seconds,
        "optimal_wall_seconds": optimal_seconds,
        "optimal_wall_seconds_all_tries": [seconds for seconds, _ in tries],
        "loadavg_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "per_unit_seconds": _quantiles(seconds),
        "nodes": _quantiles(nodes.astype(float)),
        "proven_optimal": int(proven.sum()),
        "proven_fraction": float(proven.mean()),
        "open_gap_max": float((best["upper_bound"] - best["iou"]).max()),
        "audit": {
            "same_formula": int((same & found).sum()),
            "same_iou": int((~same & found & (gap == 0)).sum()),
            "beam_worse": int((gap > 0).sum()),
            "no_formula": int((~found).sum()),
            "gap_max": float(gap.max()),
            "gap_mean_where_worse": float(gap[gap > 0].mean()) if (gap > 0).any() else 0.0,
        },
        "beam_worse_examples": [
            {
                "unit": int(u),
                "beam": beam["formula"][u],
                "beam_iou": float(beam["iou"][u]),
                "optimal": best["formula"][u],
                "optimal_iou": float(best["iou"][u]),
            }
            for u in np.argsort(-gap, kind="stable")[:5]
            if gap[u] > 0
        ],
    }
    print(
        f"length {length}: optimal median {1e3 * run['per_unit_seconds']['median']:.1f} ms, "
        f"p95 {1e3 * run['per_unit_seconds']['p95']:.1f} ms per unit, "
        f"{run['proven_optimal']}/{run['units']} proven; beam {beam_seconds:.2f} s, "
        f"optimal {optimal_seconds:.2f} s wall ({optimal_seconds / beam_seconds:.1f}x the beam)"
    )
    return run


def _quantiles(values: np.ndarray) -> dict:
    return {
        "median": float(np.median(values)),
        "p95": float(np.quantile(values, 0.95)),
        "max": float(values.max()),
        "mean": float(values.mean()),
    }


def _compexp(built: synthetic.Built, args) -> dict:
    """``compositional_explanations.optimal.compute_optimal_explanations`` (pure torch, dense
    bool masks, one unit per call) on the first units of the set at length 3, next to
    pyneuron's proven optimum of the same units."""
    try:
        import torch
        from compositional_explanations import metrics as ce_metrics
        from compositional_explanations import optimal as ce_optimal
    except ImportError as error:
        print("compositional-explanations: skipped, not installed (no dependency of pyneuron)")
        return {"skipped": f"not installed ({error})"}
    if args.compexp_units <= 0:
        return {"skipped": "--compexp-units 0"}
    store, chunk = built.store, built.units[0]
    n = min(args.compexp_units, len(chunk))
    n_images = store.grid.n_images
    # Its optimal search wants per-image rows of pixels: (images, pixels) masks.
    masks = [torch.from_numpy(store.mask(c).reshape(n_images, -1)) for c in range(len(store))]
    as_units = pyneuron.UnitMasks.from_masks(np.stack([store.mask(c) for c in range(len(store))]))
    disjoint = torch.from_numpy(pyneuron.iou_table(as_units, store, progress=False) == 0)
    ours = pyneuron.explain(
        chunk, store, length=3, search="optimal", time_limit=args.time_limit, progress=False
    )
    info: dict = {"length": 3, "units": []}
    with tempfile.TemporaryDirectory(prefix="compexp-cache-") as cache_dir:
        for u in range(n):
            bitmap = torch.from_numpy(chunk.mask(u).reshape(n_images, -1))
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines
                formula = ce_optimal.compute_optimal_explanations(
                    masks=masks,
                    bitmaps=bitmap,
                    disjoint_info=disjoint,
                    length=3,
                    device="cpu",
                    cache_dir=cache_dir,
                )
            seconds = time.perf_counter() - t0
            value = float(
                ce_metrics.compute_iou_from_masks(bitmaps=bitmap, masks=masks, formula=formula)
            )
            row = {
                "unit": u,
                "seconds": seconds,
                "formula": _ce_formula(formula, store.names),
                "iou": value,
                "pyneuron_formula": ours["formula"][u],
                "pyneuron_iou": float(ours["iou"][u]),
                "pyneuron_seconds": float(ours["seconds"][u]),
                "pyneuron_proven": bool(ours["optimal"][u]),
            }
            info["units"].append(row)
            print(
                f"compositional-explanations optimal, unit {u}: {seconds:.2f} s -> "
                f"{row['formula']} (IoU {value:.4f}); pyneuron: {row['pyneuron_formula']} "
                f"(IoU {row['pyneuron_iou']:.4f}, {1e3 * row['pyneuron_seconds']:.1f} ms, "
                f"proven {row['pyneuron_proven']})"
            )
    rows = info["units"]
    info["per_unit_seconds"] = float(np.mean([r["seconds"] for r in rows]))
    info["pyneuron_per_unit_seconds"] = float(np.mean([r["pyneuron_seconds"] for r in rows]))
    info["speedup"] = info["per_unit_seconds"] / max(info["pyneuron_per_unit_seconds"], 1e-12)
    # pyneuron's IoU below the package's would contradict its proof (float64 both).
    info["pyneuron_iou_never_lower"] = all(r["pyneuron_iou"] >= r["iou"] - 1e-12 for r in rows)
    print(
        f"compositional-explanations optimal: {info['per_unit_seconds']:.2f} s / unit vs "
        f"pyneuron {1e3 * info['pyneuron_per_unit_seconds']:.1f} ms / unit "
        f"({info['speedup']:,.0f}x); pyneuron's IoU never lower: "
        f"{info['pyneuron_iou_never_lower']}"
    )
    return info


def _table(report: dict) -> None:
    print(f"\n{'length':>6} {'median ms':>10} {'p95 ms':>9} {'max s':>7} {'proven':>8} "
          f"{'nodes med':>10} {'same':>5} {'sameIoU':>8} {'worse':>6} {'gap max':>8}")  # fmt: skip
    for run in report["runs"]:
        s, a = run["per_unit_seconds"], run["audit"]
        print(
            f"{run['length']:>6} {1e3 * s['median']:>10.1f} {1e3 * s['p95']:>9.1f} "
            f"{s['max']:>7.2f} {run['proven_optimal']:>4}/{run['units']:<3} "
            f"{run['nodes']['median']:>10.0f} {a['same_formula']:>5} {a['same_iou']:>8} "
            f"{a['beam_worse']:>6} {a['gap_max']:>8.4f}"
        )
    print(
        "setup per engine call (pair tables, length-1 run): "
        f"{report['setup_seconds_per_call']:.3f} s"
    )


if __name__ == "__main__":
    os.environ.setdefault("PYNEURON_NUM_THREADS", "2")
    main()
