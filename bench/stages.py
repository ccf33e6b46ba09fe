"""Ray benchmark of the expensive stages: segmentation into a concept store, and a
model's layers turned into units (capture, exact thresholds, unit masks, top images),
each run in one process and in parts on a local Ray cluster.

    python bench/stages.py [--images 256] [--image-size 64] [--part-sizes 16,32,64,128]
                           [--delay-ms 20] [--spin] [--clipseg] [--repeat 3]
                           [--no-ray] [--out bench/results/stages.json]

A local Ray cluster is started on 127.0.0.1 as in bench/distributed.py: a head node
without CPUs and two worker nodes with one CPU each, so parts run on 2 workers. The
probing set is ``--images`` random PNG files of ``--image-size`` pixels.

Two stages, each timed in one process (``local``: one thread for torch and the engine,
like one 1-CPU Ray worker) and on Ray with every ``--part-sizes`` (images per part):

- ``segment``: :func:`pyneuron.concepts.segment` vs
  :func:`pyneuron.concepts.distributed.segment_on_ray`, with a stub segmenter that costs
  ``--delay-ms`` per image (sleeping, standing in for an accelerator; ``--spin`` burns
  the CPU instead) on top of its own numpy work, or a tiny random CLIPSeg
  (``--clipseg``, as in tests/test_segment.py);
- ``layer_units``: a small seeded ResNet-like CNN, two layers: ``capture`` +
  ``layer_units`` per layer (exact thresholds) vs
  :func:`pyneuron.model.distributed.layer_units_on_ray`.

Every output of a parts run (the store; each layer's unit masks, thresholds and top
images) is saved and compared file by file, byte for byte, with the one-process output.
Then the fault runs, at the smallest part size:

- ``rerun, all parts done``: the same call again: every part is reused (checked: sizes
  and CRC-32 of its files), nothing computed;
- ``rerun, 1 part damaged``: one byte of one part's largest file flipped; the log of
  ``pyneuron.scale.parts`` must say "n-1 of n parts already done; computing 1" (for
  ``layer_units``, then "n of n ...; computing 0" for its unit masks round) and the
  output must be identical;
- ``worker killed``: a fresh run in which the process of one Ray actor is killed
  (SIGKILL) once a quarter of the parts are done (its process id is recorded by the
  model factory, built once per actor); the run must finish with the identical output.

How to read the numbers (wall seconds, best of ``--repeat`` warm runs):

- ``vs ideal``: parts wall time minus local / workers, the time two workers would take
  without any overhead; ``per part`` is that divided by the number of parts;
- the fit ``wall = a + b * parts`` over the part sizes (leaving out those whose best
  run had fewer actors than workers running parts): ``b`` is the marginal cost of a
  part (wall seconds, 2 workers in parallel: about half a part's cost to one worker),
  ``a - local / workers`` the fixed cost of a run (starting the actor pool, loading
  and concatenating the parts on the driver);
- ``cold``: the first parts run of a stage (for ``segment``, the first on the new
  cluster: Ray Data's start, the first workers importing pyneuron), ``cold - warm`` its
  excess over the best warm run (every run starts its own actors, so each warm run
  pays for their processes and imports too: that is in ``a``);
- ``actors``: per repeat, the processes that ran parts (built the segmenter or model;
  for ``layer_units`` in its first round); fewer than the workers means the parts
  queued on the first actor up while the other was still starting;
- ``extra`` of the killed run: its wall time minus the warm run's (a new actor, the
  part in flight done again).

Printed as a table and written to bench/results/stages.json (``--out``). ``--no-ray``
runs the parts with ``backend="local"`` (one after the other in this process, the same
files), without a cluster and without the killed-worker run: the smoke test's path.
Exits with 1 when an output differs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import pyneuron
from pyneuron.concepts.distributed import segment_on_ray
from pyneuron.concepts.segment import segment
from pyneuron.model.activations import capture
from pyneuron.model.distributed import layer_units_on_ray
from pyneuron.model.layer_units import layer_units
from pyneuron.scale.parts import PART_FILE, fingerprint_of

sys.path.insert(0, str(Path(__file__).resolve().parent))

import search as search_bench  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "stages.json"
PARTS_LOGGER = "pyneuron.scale.parts"
CONCEPTS = {"shade": ["dark", "light", "background"], "colour": ["red", "green", "blue", "other"]}
LAYERS = ["layer1", "layer2"]
#: Environment of the local cluster: Ray resolves 127.0.0.1 to itself only in its
#: single-machine mode (read when Ray is imported; see bench/distributed.py); Ray
#: Data's usage reports off (their background threads log failures).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DATA_USAGE_DISABLED": "1"}
WORKER_NODES = 2


# -- what the workers run (pickled by value) ---------------------------------------------


def _wait(seconds: float, spin: bool) -> None:
    if not spin:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Stub:
    """A stub segmenter: score maps from the pixels (numpy: a 2 x 2 box blur, channel
    contrasts), after ``delay`` seconds per image (sleeping, or spinning with ``spin``)."""

    name = "bench-stub"

    def __init__(self, delay: float = 0.02, spin: bool = False) -> None:
        self.delay, self.spin = delay, spin

    @property
    def fingerprint(self) -> str:
        return f"bench-stub-v1 delay={self.delay!r} spin={self.spin}"

    def __call__(self, images: list[Any], concepts: list[str]) -> list[np.ndarray]:
        out = []
        for image in images:
            _wait(self.delay, self.spin)
            a = np.asarray(image, dtype=np.float32) / 255
            grey = a.mean(axis=2)
            blur = (grey + np.roll(grey, 1, 0) + np.roll(grey, 1, 1) + np.roll(grey, 1, (0, 1))) / 4
            maps: dict[str, Any] = {"dark": 1 - blur, "light": blur, "background": 0.45}
            for k, colour in enumerate(("red", "green", "blue")):
                maps[colour] = 0.5 + a[..., k] - grey
            maps["other"] = 0.3
            out.append(np.stack([np.broadcast_to(maps[c], grey.shape) for c in concepts]))
        return out


def small_resnet() -> Any:
    """A small ResNet-like CNN with random weights (seeded): a stride-2 stem, a residual
    block ``layer1`` (32 channels), a stride-2 convolution, ``layer2`` (64 channels)."""
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(x + self.bn2(self.conv2(y)))

    def down(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )

    torch.manual_seed(0)
    layers = [("stem", down(3, 32)), ("layer1", Residual(32))]
    layers += [("down", down(32, 64)), ("layer2", Residual(64))]
    return nn.Sequential(OrderedDict(layers)).eval()


class Marked:
    """A zero-argument factory that writes its process id into the folder ``marker``
    (an empty file named by it), then returns ``build()``: built once per Ray actor, it
    tells which processes run the parts. Named in the parts' key as what it builds
    (``built``): its parts are those of a run without it."""

    def __init__(self, build: Callable[[], Any], marker: str, built: Any) -> None:
        self.build, self.marker = build, marker
        self.fingerprint = fingerprint_of(built)

    def __call__(self) -> Any:
        (Path(self.marker) / str(os.getpid())).touch()
        return self.build()


# -- the stages ----------------------------------------------------------------------------


@dataclass
class Stage:
    """One stage: how it runs locally and in parts, both writing their outputs (every
    file to compare) into a fresh folder ``dest``."""

    name: str
    local: Callable[[Path, Path], None]  # (dest, scratch)
    parts: Callable[..., None]  # (dest, parts_dir, part_images, backend, marker=None)
    damage_glob: str  # the round-1 part folders under parts_dir
    rounds: int  # rounds of parts (log lines per run)


def segment_stage(files: list[Path], args: argparse.Namespace, clipseg: Path | None) -> Stage:
    grid = (args.grid, args.grid)
    options: dict[str, Any] = {"grid": grid, "batch_size": args.batch_size, "progress": False}
    model: Any = str(clipseg) if clipseg is not None else Stub(args.delay_ms / 1e3, args.spin)

    def local(dest: Path, scratch: Path) -> None:
        segment(files, CONCEPTS, model, out=dest / "store", **options)

    def parts(
        dest: Path, parts_dir: Path, part_images: int, backend: Any, marker: Path | None = None
    ) -> None:
        if marker is None:
            segmenter: Any = model
        elif clipseg is not None:
            segmenter = Marked(functools.partial(str, model), str(marker), model)
        else:
            build = functools.partial(Stub, model.delay, model.spin)
            segmenter = Marked(build, str(marker), model)
        segment_on_ray(
            files,
            CONCEPTS,
            segmenter,
            out=dest / "store",
            backend=backend,
            parts_dir=parts_dir,
            part_images=part_images,
            **options,
        )

    return Stage("segment", local, parts, "segment-*/part-*", 1)


def layer_units_stage(files: list[Path], args: argparse.Namespace) -> Stage:
    size = (args.grid, args.grid)
    q, k = args.quantile, args.top_k

    def save(dest: Path, layer: str, thresholds: np.ndarray, top_images: np.ndarray) -> None:
        np.save(dest / f"{layer}.thresholds.npy", thresholds)
        np.save(dest / f"{layer}.top_images.npy", top_images)

    def local(dest: Path, scratch: Path) -> None:
        acts = capture(
            small_resnet(),
            LAYERS,
            files,
            batch_size=args.batch_size,
            out=scratch / "activations",
            progress=False,
        )
        for layer in LAYERS:
            units = layer_units(
                acts[layer],
                size,
                quantile=q,
                thresholds="exact",
                top_k=k,
                path=dest / "masks" / layer,
                progress=False,
            )
            save(dest, layer, units.thresholds, units.top_images)

    def parts(
        dest: Path, parts_dir: Path, part_images: int, backend: Any, marker: Path | None = None
    ) -> None:
        factory = (
            small_resnet if marker is None else Marked(small_resnet, str(marker), small_resnet)
        )
        result = layer_units_on_ray(
            factory,
            LAYERS,
            files,
            size=size,
            batch_size=args.batch_size,
            quantile=q,
            top_k=k,
            backend=backend,
            parts_dir=parts_dir,
            part_images=part_images,
            masks_dir=dest / "masks",
            progress=False,
        )
        for layer in LAYERS:
            save(dest, layer, result[layer].thresholds, result[layer].top_images)

    return Stage("layer_units", local, parts, "capture-*/part-*", 2)


# -- measuring -----------------------------------------------------------------------------


def same_tree(a: Path, b: Path) -> str | None:
    """``None`` when every file under ``a`` and ``b`` (recursively) holds the same bytes,
    else the first difference."""
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return f"other files: {sorted(set(files_a) ^ set(files_b))}"
    for name in files_a:
        if (a / name).read_bytes() != (b / name).read_bytes():
            return f"{name} differs"
    return None


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def parts_log() -> Iterator[list[str]]:
    """The "k of n parts already done; computing m" lines logged meanwhile."""
    logger = logging.getLogger(PARTS_LOGGER)
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.lines[:] = [line for line in handler.lines if "parts already done" in line]


def flip_a_byte(parts_dir: Path, pattern: str) -> Path:
    """Flip one bit in the middle of the largest file of the middle part."""
    folders = sorted(parts_dir.glob(pattern))
    folder = folders[len(folders) // 2]
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != PART_FILE]
    target = max(files, key=lambda p: (p.stat().st_size, str(p)))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    return target


def _kill_when(marker: Path, parts_dir: Path, after: int, stop: threading.Event, out: dict) -> None:
    """Once ``after`` parts are written and an actor has said its process id, kill it."""
    began = time.perf_counter()
    while not stop.is_set():
        pids = sorted(int(p.name) for p in marker.iterdir())
        done = len(list(parts_dir.glob(f"*/part-*/{PART_FILE}")))
        if pids and done >= after and pids[0] != os.getpid():
            try:
                os.kill(pids[0], signal.SIGKILL)
            except ProcessLookupError:  # that actor is gone: the run is ending
                out["error"] = "the actor had exited"
                return
            out.update(pid=pids[0], parts_done=done, at_s=time.perf_counter() - began)
            return
        time.sleep(0.005)


class Bench:
    """Runs and records one stage."""

    def __init__(self, stage: Stage, args: argparse.Namespace, backend: Any, tmp: Path) -> None:
        self.stage, self.args, self.backend, self.tmp = stage, args, backend, tmp
        self.workers = 1 if args.no_ray else WORKER_NODES
        self.reference = tmp / f"{stage.name}-reference"
        # Other work on the machine only ever slows a run down: the best repeat is kept,
        # and the 1-minute load average after each run is recorded beside it.
        self.report: dict[str, Any] = {"local": {"repeats": []}, "parts": {}}
        self.count = 0

    def _fresh(self, what: str) -> Path:
        self.count += 1
        return self.tmp / f"{self.stage.name}-{what}-{self.count}"

    def _say(self, run: str, seconds: float, note: str = "") -> None:
        print(f"{self.stage.name:<12} {run:<32} {seconds:7.2f} s  {note}".rstrip(), flush=True)

    def _check(self, dest: Path) -> bool:
        difference = same_tree(dest, self.reference)
        if difference is not None:
            print(f"   !! {self.stage.name}: not identical to one process: {difference}")
        return difference is None

    def local(self) -> None:
        dest, scratch = self._fresh("local"), self._fresh("scratch")
        dest.mkdir()
        scratch.mkdir()
        began = time.perf_counter()
        self.stage.local(dest, scratch)
        seconds = time.perf_counter() - began
        shutil.rmtree(scratch)
        run = self.report["local"]
        if self.reference.exists():
            run["identical"] = self._check(dest) and run.get("identical", True)
            shutil.rmtree(dest)
        else:
            dest.rename(self.reference)
        run["repeats"].append(seconds)
        run["seconds"] = min(run["repeats"])
        run.setdefault("loadavg_1min", []).append(os.getloadavg()[0])
        self._say("local, 1 process", seconds)

    def parts(
        self,
        part_images: int,
        *,
        keep: bool = False,
        marker: Path | None = None,
        parts_dir: Path | None = None,
    ) -> dict:
        """One parts run on fresh folders: seconds, identical, ``actors`` (the processes
        that built the model: ran parts, in the first round); the parts folder stays
        when ``keep`` (returned as ``parts_dir``)."""
        dest = self._fresh("out")
        parts_dir = parts_dir or self._fresh("parts")
        own = marker is None
        marker = marker or self._fresh("marker")
        dest.mkdir()
        marker.mkdir(exist_ok=True)
        began = time.perf_counter()
        self.stage.parts(dest, parts_dir, part_images, self.backend, marker)
        seconds = time.perf_counter() - began
        identical = self._check(dest)
        actors = len(list(marker.iterdir()))
        shutil.rmtree(dest)
        if own:
            shutil.rmtree(marker)
        if not keep:
            shutil.rmtree(parts_dir)
        return {
            "seconds": seconds,
            "identical": identical,
            "actors": actors,
            "parts_dir": parts_dir,
        }

    def warm(self, part_images: int, keep: bool = False) -> Path:
        run = self.parts(part_images, keep=keep)
        entry = self.report["parts"].setdefault(
            str(part_images),
            {"part_images": part_images, "parts": self.n_parts(part_images), "repeats": []},
        )
        entry["repeats"].append(run["seconds"])
        entry.setdefault("actors", []).append(run["actors"])
        entry["seconds"] = min(entry["repeats"])
        entry["best_actors"] = entry["actors"][int(np.argmin(entry["repeats"]))]
        entry.setdefault("loadavg_1min", []).append(os.getloadavg()[0])
        entry["identical"] = run["identical"] and entry.get("identical", True)
        note = f"{run['actors']} actor(s){'' if run['identical'] else ', DIFFERENT'}"
        self._say(f"parts of {part_images}", run["seconds"], note)
        return run["parts_dir"]

    def n_parts(self, part_images: int) -> int:
        return -(-self.args.images // part_images)

    def rerun(self, parts_dir: Path, part_images: int, label: str) -> dict:
        """The parts run again on ``parts_dir``: time, parts log, identical."""
        dest = self._fresh("out")
        dest.mkdir()
        with parts_log() as lines:
            began = time.perf_counter()
            self.stage.parts(dest, parts_dir, part_images, self.backend)
            seconds = time.perf_counter() - began
        identical = self._check(dest)
        shutil.rmtree(dest)
        self._say(label, seconds, "; ".join(lines))
        return {"seconds": seconds, "log": list(lines), "identical": identical}

    def run(self) -> dict:
        args, report, sizes = self.args, self.report, self.args.part_sizes
        where = "local backend" if isinstance(self.backend, str) else "ray"
        self.local()
        cold = self.parts(sizes[0])
        report["cold"] = {
            "part_images": sizes[0],
            "parts": self.n_parts(sizes[0]),
            "seconds": cold["seconds"],
            "identical": cold["identical"],
            "actors": cold["actors"],
        }
        self._say(f"parts of {sizes[0]}, cold", cold["seconds"], f"{cold['actors']} actor(s)")
        kept: Path | None = None
        for r in range(args.repeat):
            self.local()
            for size in sizes:
                last = r == args.repeat - 1 and size == min(sizes)
                parts_dir = self.warm(size, keep=last)
                if last:
                    kept = parts_dir
        assert kept is not None
        local = report["local"]["seconds"]
        ideal = local / self.workers
        for entry in report["parts"].values():
            entry["speedup"] = local / entry["seconds"]
            entry["over_ideal_s"] = entry["seconds"] - ideal
            entry["overhead_per_part_s"] = entry["over_ideal_s"] / entry["parts"]
        report["cold"]["cold_extra_s"] = (
            report["cold"]["seconds"] - report["parts"][str(sizes[0])]["seconds"]
        )
        report["fit"] = self.fit(ideal)
        report["faults"] = self.faults(kept, min(sizes))
        report["backend"], report["workers"], report["ideal_s"] = where, self.workers, ideal
        report["identical"] = (
            report["local"].get("identical", True)
            and report["cold"]["identical"]
            and all(e["identical"] for e in report["parts"].values())
            and all(
                f.get("identical", True) and f.get("ok", True) for f in report["faults"].values()
            )
        )
        shutil.rmtree(self.reference, ignore_errors=True)
        return report

    def fit(self, ideal: float) -> dict:
        """``wall = a + b * parts`` by least squares over the part sizes whose best run
        had every worker running parts (a run left on fewer actors is another model)."""
        entries = sorted(self.report["parts"].values(), key=lambda e: e["parts"])
        used = [e for e in entries if e["best_actors"] >= self.workers]
        fit: dict[str, Any] = {
            "points": [[e["parts"], e["seconds"]] for e in used],
            "left_out": [e["part_images"] for e in entries if e not in used],
        }
        if len({e["parts"] for e in used}) >= 2:
            b, a = np.polyfit([e["parts"] for e in used], [e["seconds"] for e in used], 1)
            fit.update(fixed_s=float(a), per_part_s=float(b), fixed_over_ideal_s=float(a - ideal))
        return fit

    def faults(self, parts_dir: Path, part_images: int) -> dict:
        n = self.n_parts(part_images)
        faults: dict[str, Any] = {}
        done = [f"{n} of {n} parts already done; computing 0"] * self.stage.rounds
        run = self.rerun(parts_dir, part_images, "rerun, all parts done")
        run.update(part_images=part_images, expected_log=done, ok=run["log"] == done)
        faults["rerun_all_done"] = run
        damaged = flip_a_byte(parts_dir, self.stage.damage_glob)
        expected = [f"{n - 1} of {n} parts already done; computing 1"] + done[1:]
        run = self.rerun(parts_dir, part_images, "rerun, 1 part damaged")
        run.update(
            part_images=part_images,
            damaged_file=damaged.relative_to(parts_dir).as_posix(),
            expected_log=expected,
            ok=run["log"] == expected,
        )
        faults["damaged_part"] = run
        shutil.rmtree(parts_dir)
        if not isinstance(self.backend, str):
            faults["killed_worker"] = self.killed(part_images)
        for name, fault in faults.items():
            if not fault.get("ok", True):
                print(
                    f"   !! {self.stage.name} {name}: log {fault['log']}, "
                    f"expected {fault['expected_log']}"
                )
        return faults

    def killed(self, part_images: int) -> dict:
        marker = self._fresh("marker")
        marker.mkdir()
        parts_dir = self._fresh("parts")
        after = max(1, self.n_parts(part_images) // 4)
        kill: dict[str, Any] = {}
        stop = threading.Event()
        killer = threading.Thread(target=_kill_when, args=(marker, parts_dir, after, stop, kill))
        killer.start()
        try:
            run = self.parts(part_images, marker=marker, parts_dir=parts_dir)
        finally:
            stop.set()
            killer.join()
        shutil.rmtree(marker)
        warm = self.report["parts"][str(part_images)]["seconds"]
        result = {
            "part_images": part_images,
            "seconds": run["seconds"],
            "identical": run["identical"],
            "killed": "pid" in kill,
            "actors": run["actors"],
            "extra_s": run["seconds"] - warm,
            **kill,
        }
        state = (
            f"killed pid {kill['pid']} after {kill['parts_done']} parts"
            if "pid" in kill
            else (f"nothing killed ({kill.get('error', 'the run ended first')})")
        )
        self._say(f"parts of {part_images}, worker killed", run["seconds"], state)
        return result


# -- the cluster ----------------------------------------------------------------------------


def start_cluster() -> Any:
    """Head node without CPUs, then two worker nodes with one CPU each, on 127.0.0.1;
    this process connected to it."""
    os.environ.update(RAY_ENV)
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        raise SystemExit(
            "this benchmark needs Ray (pip install 'pyneuron[ray]'), or --no-ray"
        ) from None
    if __name__ != "__main__":  # workers cannot import this module: send it by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    node = {"node_ip_address": "127.0.0.1", "object_store_memory": 2**28}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node, "num_cpus": 0, "include_dashboard": False},
    )
    for _ in range(WORKER_NODES):
        cluster.add_node(**node, num_cpus=1)
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    cluster.wait_for_nodes()
    import ray.data  # noqa: F401  (configures its loggers: quieted after)

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # "execution finished in"
    return cluster


def stop_cluster(cluster: Any) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()
    if __name__ != "__main__":
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# -- the report -----------------------------------------------------------------------------


def write_images(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    """``n`` PNG files of random blobs of colour on noise."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    files = []
    for i in range(n):
        pixels = rng.integers(0, 64, (size, size, 3)).astype(np.uint8)
        for _ in range(3):
            cy, cx, r = rng.random(), rng.random(), rng.uniform(0.1, 0.4)
            pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(64, 256, 3)
        files.append(folder / f"{i:05d}.png")
        Image.fromarray(pixels).save(files[-1])
    return files


def table(report: dict) -> str:
    """The printed summary."""
    head = f"{'stage':<12} {'run':<32} {'parts':>5} {'wall s':>7} {'vs ideal':>9} {'per part':>9}"
    lines = [f"{head}  check", "-" * (len(head) + 40)]

    def row(stage: str, run: str, parts: Any, seconds: float, vs: str, per: str, check: str):
        lines.append(f"{stage:<12} {run:<32} {parts!s:>5} {seconds:7.2f} {vs:>9} {per:>9}  {check}")

    def same(ok: bool) -> str:
        return "identical" if ok else "DIFFERENT"

    images = report["settings"]["images"]
    for name, stage in report["stages"].items():
        ideal, where = stage["ideal_s"], stage["backend"]
        local, cold = stage["local"], stage["cold"]
        ideal_text = f"ideal (/{stage['workers']}) {ideal:.2f} s"
        row(name, "local, 1 process", "-", local["seconds"], "", "", ideal_text)
        row(
            name,
            f"{where}, parts of {cold['part_images']}, cold",
            cold["parts"],
            cold["seconds"],
            f"{cold['seconds'] - ideal:+.2f}",
            "",
            f"{same(cold['identical'])}, cold - warm {cold['cold_extra_s']:+.2f} s, actors "
            f"{cold['actors']}",
        )
        for entry in sorted(stage["parts"].values(), key=lambda e: e["part_images"]):
            row(
                name,
                f"{where}, parts of {entry['part_images']}",
                entry["parts"],
                entry["seconds"],
                f"{entry['over_ideal_s']:+.2f}",
                f"{1e3 * entry['overhead_per_part_s']:.0f} ms",
                f"{same(entry['identical'])}, {entry['speedup']:.2f}x local, actors "
                f"{'/'.join(map(str, entry['actors']))}",
            )
        fit = stage["fit"]
        if "per_part_s" in fit:
            lines.append(
                f"{name:<12} fit wall = a + b * parts: a = {fit['fixed_s']:.2f} s (ideal "
                f"{fit['fixed_over_ideal_s']:+.2f} s), b = {1e3 * fit['per_part_s']:.1f} ms a part"
            )
        if fit["left_out"]:
            left = ", ".join(map(str, fit["left_out"]))
            lines.append(
                f"{name:<12}   (left out of the fit, run on fewer actors: parts of {left})"
            )
        labels = {
            "rerun_all_done": "rerun, all parts done",
            "damaged_part": "rerun, 1 part damaged",
        }
        for key, label in labels.items():
            fault = stage["faults"][key]
            log = "; ".join(fault["log"])
            check = f"{same(fault['identical'])}, log {'ok' if fault['ok'] else 'WRONG'}: {log}"
            parts = -(-images // fault["part_images"])
            row(name, label, parts, fault["seconds"], "", "", check)
        fault = stage["faults"].get("killed_worker")
        if fault is not None:
            what = (
                f"killed at {fault['parts_done']} parts done" if fault["killed"] else "NOT KILLED"
            )
            parts = -(-images // fault["part_images"])
            extra = f"{fault['extra_s']:+.2f}"
            row(
                name,
                "worker killed",
                parts,
                fault["seconds"],
                extra,
                "",
                f"{same(fault['identical'])}, {what}",
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    out = Path(args.out).resolve()
    import torch

    torch.set_num_threads(1)  # as each 1-CPU Ray worker (Ray sets OMP_NUM_THREADS=1)
    pyneuron.set_num_threads(1)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "tmpdir")} | {
        "workers": 1 if args.no_ray else WORKER_NODES,
        "concepts": CONCEPTS,
        "layers": LAYERS,
    }
    report: dict[str, Any] = {"settings": settings, "machine": search_bench._machine()}
    report["machine"]["torch"] = torch.__version__
    segmenter = "tiny CLIPSeg" if args.clipseg else f"stub, {args.delay_ms} ms per image"
    print(
        f"== stages benchmark: {args.images} images of {args.image_size}x{args.image_size}, "
        f"grid {args.grid}, parts of {args.part_sizes}, segmenter {segmenter}, "
        f"{'local backend' if args.no_ray else f'Ray, {WORKER_NODES} workers of 1 CPU'}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="pyneuron-bench-stages-", dir=args.tmpdir))
    previous = os.getcwd()
    os.chdir(tmp)  # Ray workers put the driver's directory on their path: not the source tree
    cluster = None
    try:
        files = write_images(tmp / "images", args.images, args.image_size, args.seed)
        clipseg = _tiny_clipseg(tmp / "clipseg") if args.clipseg else None
        backend: Any = "local"
        if not args.no_ray:
            began = time.perf_counter()
            cluster = start_cluster()
            report["cluster_start_s"] = time.perf_counter() - began
            backend = pyneuron.RayBackend()
            print(f"cluster started in {report['cluster_start_s']:.1f} s")
        stages = [segment_stage(files, args, clipseg), layer_units_stage(files, args)]
        report["stages"] = {s.name: Bench(s, args, backend, tmp).run() for s in stages}
    finally:
        if cluster is not None:
            stop_cluster(cluster)
        os.chdir(previous)
        shutil.rmtree(tmp, ignore_errors=True)
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    report["identical"] = all(s["identical"] for s in report["stages"].values())
    print()
    print(table(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_json) + "\n")
    print(f"wrote {out}")
    return report


def _json(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _tiny_clipseg(folder: Path) -> Path:
    """The tiny random CLIPSeg of tests/test_segment.py, saved to ``folder``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_segment import save_tiny_clipseg

    return save_tiny_clipseg(folder)


def _sizes(text: str) -> list[int]:
    sizes = list(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"part sizes must be positive integers, got {text!r}")
    return sizes


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=256, help="probing images")
    p.add_argument("--image-size", type=int, default=64, help="pixels per side")
    p.add_argument("--grid", type=int, default=32, help="concept grid per side")
    p.add_argument(
        "--part-sizes", type=_sizes, default=[16, 32, 64, 128], help="images per part, e.g. 16,64"
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per segmenter/model call")
    p.add_argument("--delay-ms", type=float, default=20.0, help="stub segmenter time per image")
    p.add_argument("--spin", action="store_true", help="the stub burns the CPU, not sleeps")
    p.add_argument("--clipseg", action="store_true", help="a tiny random CLIPSeg, not the stub")
    p.add_argument("--quantile", type=float, default=0.005)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="warm runs of each setting (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ray", action="store_true", help="parts with backend='local', no cluster")
    p.add_argument("--tmpdir", help="where the images and parts go (default: the system's)")
    p.add_argument("--out", default=str(RESULTS), help="JSON path")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if any(size % args.batch_size for size in args.part_sizes):
        p.error("every part size must be a multiple of --batch-size (the batches of one process)")
    return args


if __name__ == "__main__":
    sys.exit(0 if main()["identical"] else 1)
