"""CLIP-Dissect benchmark: describe every unit of a layer from cached activations and
CLIP similarities (the soft-WPMI math only, no model).

    python bench/describe.py [--images 10000] [--units 512] [--concepts 20000]
                             [--top-k 100] [--repeats 3] [--threads T] [--no-reference]

Random matrices of the asked shapes stand in for the cached activation summaries
(images x units) and CLIP image-concept cosine similarities (images x concepts, uniform in
[0.1, 0.35] like CLIP ViT-B/16 cosines). Timed: ``pyneuron.describe.similarity_matrix``
(softmax with temperature 0.1 + soft-WPMI, top-k 100) plus the top-5 concepts per unit.
Also timed, unless ``--no-reference``: a re-implementation of CLIP-Dissect's own loop
(one unit at a time: gather the unit's top-k rows, log, sum; then logsumexp), with a check
that both give the same scores and labels. CLIP-Dissect's paper reports about 5 s for
1,000 neurons x 20k concepts (on a GPU); the ratio against that figure, scaled to the
number of units, is printed too. Writes ``bench/results/describe.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import pyneuron
from pyneuron.describe import similarity_matrix, top_concepts

RESULTS = Path(__file__).resolve().parent / "results" / "describe.json"
#: CLIP-Dissect's reported time to describe 1,000 neurons against 20k concepts (seconds).
CLIP_DISSECT_SECONDS_PER_1000 = 5.0


def reference_soft_wpmi(
    summary: torch.Tensor, sims: torch.Tensor, top_k: int = 100, a: float = 10.0, lam: float = 1.0
) -> torch.Tensor:
    """CLIP-Dissect's soft-WPMI algorithm as its code runs it: whole-matrix softmax, then
    one unit at a time (gather rows, 1 + p (x - 1), log, sum), cat, logsumexp prior."""
    min_prob, p_start, p_end = 1e-7, 0.998, 0.97
    with torch.inference_mode():
        probs = torch.softmax(a * sims, dim=1)
        ids = torch.topk(summary, dim=0, k=top_k)[1]
        p_in = (p_start - torch.arange(0, top_k) / top_k * (p_start - p_end)).unsqueeze(1)
        rows = []
        for unit in range(summary.shape[1]):
            current = probs.gather(0, ids[:, unit : unit + 1].expand(-1, probs.shape[1]))
            current = 1 + p_in * (current - 1)
            rows.append(torch.sum(torch.log(current + min_prob), dim=0, keepdim=True))
        given = torch.cat(rows, dim=0)
        prior = torch.logsumexp(given, dim=0, keepdim=True) - math.log(given.shape[0])
        return given - lam * prior


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - start, value


def describe(summary: np.ndarray, sims: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = similarity_matrix(summary, sims, "soft_wpmi", top_k=top_k)
    ids, _ = top_concepts(scores, 5)
    return scores, ids


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--concepts", type=int, default=20_000)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    summary = rng.standard_normal((args.images, args.units), dtype=np.float32)
    sims = rng.uniform(0.1, 0.35, size=(args.images, args.concepts)).astype(np.float32)
    load_before = os.getloadavg()

    cold, (scores, ids) = _timed(describe, summary, sims, args.top_k)
    warm = [_timed(describe, summary, sims, args.top_k)[0] for _ in range(args.repeats)]
    seconds = statistics.median(warm)
    reported = CLIP_DISSECT_SECONDS_PER_1000 * args.units / 1000
    result: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_before": [round(v, 2) for v in load_before],
        },
        "versions": {
            "pyneuron": pyneuron.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "shape": {
            "images": args.images,
            "units": args.units,
            "concepts": args.concepts,
            "top_k": args.top_k,
        },
        "pyneuron": {
            "seconds_median": round(seconds, 4),
            "seconds_runs": [round(s, 4) for s in warm],
            "seconds_first_run": round(cold, 4),
            "ms_per_unit": round(1000 * seconds / args.units, 4),
        },
        "clip_dissect_reported": {
            "seconds_per_1000_neurons_x_20k_concepts": CLIP_DISSECT_SECONDS_PER_1000,
            "scaled_to_units_seconds": reported,
            "speedup_vs_reported": round(reported / seconds, 2),
            "note": "paper figure (GPU, its own probing set), scaled linearly to the unit count",
        },
    }
    print(
        f"soft-WPMI + top-5, {args.units} units x {args.images} images x {args.concepts} "
        f"concepts, top-k {args.top_k}, {torch.get_num_threads()} torch threads"
    )
    print(
        f"  pyneuron            {seconds:8.3f} s (median of {args.repeats}; first run {cold:.3f} s)"
    )
    print(
        f"  CLIP-Dissect paper  {reported:8.3f} s (5 s per 1000 neurons, scaled)   "
        f"ratio {reported / seconds:.2f}x"
    )
    if not args.no_reference:
        ref_seconds, reference = _timed(
            reference_soft_wpmi, torch.from_numpy(summary), torch.from_numpy(sims), args.top_k
        )
        reference = reference.numpy()
        ref_labels = reference.argmax(axis=1)
        same_labels = float(np.mean(ref_labels == ids[:, 0]))
        difference = float(np.max(np.abs(reference - scores)))
        result["clip_dissect_loop_here"] = {
            "seconds": round(ref_seconds, 4),
            "speedup": round(ref_seconds / seconds, 2),
            "max_abs_score_difference": difference,
            "max_abs_score": float(np.max(np.abs(reference))),
            "same_label_fraction": same_labels,
        }
        print(
            f"  CLIP-Dissect loop   {ref_seconds:8.3f} s (its algorithm re-implemented, this "
            f"machine)   ratio {ref_seconds / seconds:.2f}x"
        )
        print(
            f"  same labels on {100 * same_labels:.1f}% of units; max |score difference| "
            f"{difference:.2e} (|scores| up to {np.max(np.abs(reference)):.3g})"
        )
    result["machine"]["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
