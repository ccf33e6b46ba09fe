"""Distributed benchmark: one layer explained by the local backend and by 1 and 2 Ray
workers, on a synthetic ADE-like probing set (bench/synthetic.py).

    python bench/distributed.py [--size ade] [--images 3000] [--units 512] [--unit-block 32]

A local Ray cluster is started on 127.0.0.1: a head node without CPUs, then one worker
node with one CPU, then a second one. The concept store is on disk and shared by path
(memory-mapped, checksummed by each worker), the unit masks go through Ray's object
store. Every Ray table is checked identical to the local one. Printed and written to
``bench/results/distributed.json``:

- wall times: local (1 engine thread, and all cores), Ray with 1 and 2 workers: the
  first run on fresh workers (cold: worker start, store opening, unit transfer), then
  the best of ``--repeat`` warm runs, interleaved with the local runs;
- overhead per shard: (1 Ray worker - local 1 thread) / shards, and the marginal cost of
  a shard from a run with smaller blocks;
- scaling efficiency: T(1 worker) / (2 * T(2 workers)), warm;
- an estimate of a ResNet-50's 4 stages (3,840 units) at full ADE scale on N machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

import pyneuron

sys.path.insert(0, str(Path(__file__).resolve().parent))

import search as search_bench  # noqa: E402
import synthetic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Ray resolves 127.0.0.1 to itself only in its single-machine mode (read at import).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Output channels of ResNet-50's four stages (layer1..layer4).
RESNET50_STAGES = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
FULL_ADE_IMAGES = synthetic.SIZES["ade"].n_images


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    spec = synthetic.SIZES[args.size]
    overrides = {"n_images": args.images, "n_concepts": args.concepts, "n_units": args.units}
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    search = {"length": args.length, "beam_size": args.beam_size, "progress": False}
    report: dict = {
        "size": args.size,
        "spec": dataclasses.asdict(spec),
        "search": {"length": args.length, "beam_size": args.beam_size},
        "unit_block": args.unit_block,
        "machine": search_bench._machine(),
    }
    print(
        f"== distributed benchmark: {spec.n_images:,} images x {spec.height}x{spec.width}, "
        f"{spec.n_concepts:,} concepts, {spec.n_units} units, blocks of {args.unit_block}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="pyneuron-bench-distributed-", dir=args.tmpdir))
    try:
        t0 = time.perf_counter()
        built = synthetic.build(spec, seed=args.seed, directory=tmp, progress=True)
        report["build_seconds"] = time.perf_counter() - t0
        report["store_bytes"] = built.store.nbytes
        report["units_bytes"] = sum(u.nbytes for u in built.units)
        _run(built, args, search, report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    _estimate(report, args)
    out = Path(args.output) if args.output else RESULTS / "distributed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=search_bench._json_default) + "\n")
    print(f"wrote {out}")
    if not all(run.get("identical", True) for run in report["runs"].values()):
        sys.exit(1)
    return report


def _timed(report: dict, name: str, call, reference: pd.DataFrame | None = None):
    """Run ``call`` once more under ``name``; the figure kept is the best of the runs
    (other work on the machine only ever slows a run down)."""
    load = os.getloadavg()[0]
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    table = call()
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - c0
    run = report["runs"].setdefault(name, {"repeats": [], "cpu_repeats": [], "loadavg_1min": []})
    run["repeats"].append(seconds)
    run["cpu_repeats"].append(cpu)
    run["loadavg_1min"].append(load)
    run["seconds"] = min(run["repeats"])
    run["cpu_seconds"] = min(run["cpu_repeats"])
    if reference is not None:
        pd.testing.assert_frame_equal(table, reference, check_exact=True)
        run["identical"] = bool(table.equals(reference)) and run.get("identical", True)
    same = "" if reference is None else ", identical to local"
    print(f"{name:<36} {seconds:6.2f} s, CPU {cpu:6.2f} s{same} (load {load:.1f})")
    return table


def _cpu_seconds() -> float:
    """CPU time of this process and of the Ray worker processes on this machine (their
    titles start with ``ray::``): what the search costs, whatever else runs here."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    ticks = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::"):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


def _run(built, args, search: dict, report: dict) -> None:
    import ray
    from ray.cluster_utils import Cluster

    units, store = built.units, built.store
    report["runs"] = {}
    threads = os.cpu_count() or 1

    def local(n_threads: int):
        pyneuron.set_num_threads(n_threads)
        return lambda: pyneuron.explain(units, store, **search)

    reference = _timed(report, "local, 1 thread", local(1))
    _timed(report, f"local, {threads} threads", local(threads), reference)

    memory = 2 * report["units_bytes"] + 2**28
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": memory}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "num_cpus": 0, "include_dashboard": False},
    )
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        backend = pyneuron.RayBackend(unit_block=args.unit_block)
        small = pyneuron.RayBackend(unit_block=args.small_block)

        def on_ray(settings):
            return lambda: pyneuron.explain(units, store, backend=settings, **search)

        rounds = {
            1: {
                "ray, 1 worker": on_ray(backend),
                f"ray, 1 worker, blocks of {args.small_block}": on_ray(small),
                "local, 1 thread": local(1),
            },
            2: {"ray, 2 workers": on_ray(backend), f"local, {threads} threads": local(threads)},
        }
        for workers, calls in rounds.items():
            cluster.add_node(**node)
            cluster.wait_for_nodes()
            _timed(report, f"ray, {workers} worker(s), cold", on_ray(backend), reference)
            for _ in range(args.repeat):
                for name, call in calls.items():
                    _timed(report, name, call, reference)
    finally:
        ray.shutdown()
        cluster.shutdown()
    _figures(report, units, args)


def _figures(report: dict, units, args) -> None:
    runs = {name: run["seconds"] for name, run in report["runs"].items()}
    shards = sum(-(-len(chunk) // args.unit_block) for chunk in units)
    small_shards = sum(-(-len(chunk) // args.small_block) for chunk in units)
    local1, ray1, ray2 = runs["local, 1 thread"], runs["ray, 1 worker"], runs["ray, 2 workers"]
    ray_small = runs[f"ray, 1 worker, blocks of {args.small_block}"]
    report["shards"], report["small_block_shards"] = shards, small_shards
    report["per_unit_seconds"] = local1 / sum(len(chunk) for chunk in units)
    report["overhead_per_shard_seconds"] = (ray1 - local1) / shards
    report["marginal_shard_seconds"] = (ray_small - ray1) / (small_shards - shards)
    report["speedup_2_workers"] = ray1 / ray2
    report["scaling_efficiency"] = ray1 / (2 * ray2)
    report["cold_start_seconds"] = runs["ray, 1 worker(s), cold"] - ray1
    cpu = {name: run["cpu_seconds"] for name, run in report["runs"].items()}
    report["cpu_per_unit_seconds"] = cpu["local, 1 thread"] / sum(len(chunk) for chunk in units)
    report["cpu_overhead_per_shard_seconds"] = (
        cpu["ray, 1 worker"] - cpu["local, 1 thread"]
    ) / shards
    # Wall time the 2 workers would take if each had a free core: the CPU they used / 2.
    report["cpu_bound_scaling_efficiency"] = cpu["ray, 1 worker"] / cpu["ray, 2 workers"]
    report["cores_busy_2_workers"] = cpu["ray, 2 workers"] / ray2
    print(
        f"per unit {1e3 * report['per_unit_seconds']:.1f} ms (1 thread); overhead per shard "
        f"{1e3 * report['overhead_per_shard_seconds']:.0f} ms vs local "
        f"({shards} shards), marginal {1e3 * report['marginal_shard_seconds']:.0f} ms per "
        f"extra shard; 2 workers: {report['speedup_2_workers']:.2f}x, scaling efficiency "
        f"{100 * report['scaling_efficiency']:.0f} %; cold start "
        f"+{report['cold_start_seconds']:.1f} s"
    )
    print(
        f"CPU: overhead per shard {1e3 * report['cpu_overhead_per_shard_seconds']:.0f} ms; "
        f"2 workers used {report['cores_busy_2_workers']:.2f} cores on average (other work "
        f"on this machine takes the rest); CPU of 1 worker / CPU of 2 workers "
        f"{report['cpu_bound_scaling_efficiency']:.2f}"
    )


def _estimate(report: dict, args) -> None:
    """ResNet-50's 4 stages at full ADE scale on N machines of ``args.cores`` cores."""
    if args.size != "ade":
        print("(no ResNet-50 estimate: it needs the ADE grid and concepts, --size ade)")
        return
    # Per-core costs from CPU time (wall time on a busy machine overstates them); the
    # search is linear in the number of images.
    scale = FULL_ADE_IMAGES / report["spec"]["n_images"]
    per_unit = report["cpu_per_unit_seconds"] * scale
    per_shard = max(report["cpu_overhead_per_shard_seconds"], report["marginal_shard_seconds"], 0)
    units = sum(RESNET50_STAGES.values())
    shards = sum(-(-n // args.unit_block) for n in RESNET50_STAGES.values())
    work = units * per_unit + shards * per_shard  # core-seconds
    rows = []
    for machines in (1, 2, 4, 8, 16):
        workers = machines * args.cores
        # Dynamic scheduling: the last shard may start when the others are done; plus
        # starting the workers (measured cold start).
        wall = work / workers + args.unit_block * per_unit + report["cold_start_seconds"]
        rows.append({"machines": machines, "workers": workers, "seconds": wall})
    report["estimate_resnet50"] = {
        "units": units,
        "shards": shards,
        "cores_per_machine": args.cores,
        "images": FULL_ADE_IMAGES,
        "per_unit_core_seconds": per_unit,
        "per_shard_overhead_seconds": per_shard,
        "core_hours": work / 3600,
        "rows": rows,
        "assumes": "per-unit CPU cost linear in images, measured on this set (length "
        f"{args.length}, beam {args.beam_size}); store shared by path; one core per worker",
    }
    print(
        f"ResNet-50, 4 stages ({units} units, {shards} shards) at {FULL_ADE_IMAGES:,} "
        f"images: {work / 3600:.2f} core-hours"
    )
    for row in rows:
        print(f"  {row['machines']:>2} machines x {args.cores} cores: {row['seconds']:.0f} s")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=sorted(synthetic.SIZES), default="ade")
    p.add_argument("--images", type=int, default=3000, help="override the number of images")
    p.add_argument("--concepts", type=int, help="override the number of concepts")
    p.add_argument("--units", type=int, help="override the number of units")
    p.add_argument("--unit-block", type=int, default=32, help="units per shard")
    p.add_argument("--small-block", type=int, default=8, help="units per shard, overhead run")
    p.add_argument("--length", type=int, default=3)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="warm runs of each setting (best kept)")
    p.add_argument("--cores", type=int, default=16, help="cores per machine in the estimate")
    p.add_argument("--tmpdir", help="where the temporary store goes (default: the system's)")
    p.add_argument("--output", help="JSON path (default bench/results/distributed.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
