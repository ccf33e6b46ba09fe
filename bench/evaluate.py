"""Benchmark: what the checks of `pyneuron evaluate` cost next to the search they check,
and whether they tell planted units from random ones.

On a synthetic probing set (bench/synthetic.py: units with a planted formula plus noise,
and random blob units), times in the same run: the layer's search (`explain`), held-out
scoring (`explain` on 80 % of the images, `evaluate` on the rest) and the null baseline
(building the control units, then searching them), each also as a ratio to the layer's
search; then counts the units above the null — planted units, random units that fire
partly on a preferred object, random units that fire anywhere — and their IoU drops.

    python bench/evaluate.py [--size small] [--controls 1000] [--threads 2]

Writes bench/results/evaluate-<size>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import pyneuron
from pyneuron.model.dissect import explain_split

sys.path.insert(0, str(Path(__file__).parent))
import synthetic  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(synthetic.SIZES), default="small")
    p.add_argument("--controls", type=int, default=1000)
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    pyneuron.set_num_threads(args.threads)
    spec = synthetic.SIZES[args.size]
    search = {"length": 3, "beam_size": 5}

    t0 = time.perf_counter()
    built = synthetic.build(spec, seed=args.seed, chunk_units=spec.n_units, progress=False)
    units, store = built.units[0], built.store
    syn = built.synthetic
    planted = np.arange(len(units)) < syn.n_planted
    # Random units: half fire partly where a preferred object is (so concepts do explain
    # them somewhat), half anywhere (nothing to explain: the null should keep them).
    preferred = np.zeros(len(units), dtype=bool)
    preferred[syn.n_planted :] = syn.preferred >= 0
    anywhere = ~planted & ~preferred
    print(f"{args.size}: {spec} built in {time.perf_counter() - t0:.1f} s")

    seconds = {}
    t0 = time.perf_counter()
    table = pyneuron.explain(units, store, progress=False, **search)
    seconds["explain layer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    split = explain_split(units, store, holdout=args.holdout, progress=False, **search)
    seconds["held-out (explain 80 % + evaluate 20 %)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sources, chunks = pyneuron.control_units(units, args.controls, seed=args.seed)
    controls = list(chunks)
    seconds[f"build {args.controls} control units"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    null = pyneuron.explain(controls, store, progress=False, **search)
    seconds[f"explain {args.controls} control units"] = time.perf_counter() - t0
    out = pyneuron.significance(table, null)

    base = seconds["explain layer"]
    print(f"\n{'step':<45} {'seconds':>9} {'x layer search':>15}")
    for step, value in seconds.items():
        print(f"{step:<45} {value:>9.3f} {value / base:>15.2f}")

    def share(mask: np.ndarray, column: str) -> float:
        return float(out.loc[mask, column].mean())

    quality = {
        "planted units": int(planted.sum()),
        "random units near a preferred object": int(preferred.sum()),
        "random units anywhere": int(anywhere.sum()),
        "planted above null": share(planted, "above_null"),
        "preferred-object random units above null": share(preferred, "above_null"),
        "anywhere random units above null": share(anywhere, "above_null"),
        "planted mean IoU": share(planted, "iou"),
        "preferred-object random mean IoU": share(preferred, "iou"),
        "anywhere random mean IoU": share(anywhere, "iou"),
        "null mean IoU": float(null["iou"].mean()),
        "null 95th percentile IoU": float(np.quantile(null["iou"], 0.95)),
        "planted mean IoU drop (held-out)": float(split.loc[planted, "iou_drop"].mean()),
        "random mean IoU drop (held-out)": float(split.loc[~planted, "iou_drop"].mean()),
    }
    print()
    for key, value in quality.items():
        print(f"{key:<45} {value:.4f}" if isinstance(value, float) else f"{key:<45} {value}")

    result = {
        "benchmark": "evaluate",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "simd": pyneuron.simd_level(),
        "size": args.size,
        "spec": str(spec),
        "search": search,
        "controls": args.controls,
        "holdout": args.holdout,
        "seconds": seconds,
        "ratio_to_layer_search": {k: v / base for k, v in seconds.items()},
        "quality": quality,
        "control_sources_distinct": int(np.unique(sources).size),
    }
    path = Path(__file__).parent / "results" / f"evaluate-{args.size}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
