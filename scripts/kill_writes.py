"""SIGKILL writers of pyneuron outputs at random moments and check that nothing is lost.

Targets, each replacing an existing output with ``overwrite``:

- ``store``: ``ConceptStore.writer(..., path, overwrite=True)`` streaming a store;
- ``explain``: ``pyneuron explain --overwrite`` (a run directory);
- ``report``: ``pyneuron report RUN`` (RUN/report, on a demo run);
- ``demo``: ``pyneuron demo --overwrite`` (a small one).

Each kill lands at a uniformly random time within the measured duration of a whole write
in a child forked from this process (so no import time is wasted). After
every kill the output must be complete, old or new: a store that opens and verifies, a
run whose tables, summary and unit masks read back, a report with every file of a full
one. Hidden leftovers of killed writers are counted and must be gone after the next write.

Usage::

    python scripts/kill_writes.py [--kills store=150,explain=120,report=30,demo=10] [--seed 16]

Writes ``scripts/results/kill_writes.json``; exits 1 on any lost or partial output.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from results_file import write_results
from tqdm.auto import tqdm as tqdm_auto
from tqdm.std import tqdm as tqdm_std

import pyneuron
from pyneuron.app.cli import app
from pyneuron.app.rundir import read_results
from pyneuron.concepts.synthetic import DemoConfig, make_data

DEMO = ["--images", "60", "--epochs", "1", "--size", "16", "--quiet"]


def cli(*args: object) -> None:
    code = app([str(a) for a in args], standalone_mode=False)
    if code:
        raise RuntimeError(f"pyneuron {args[0]} failed with exit status {code}")


def write_store(path: Path, version: int) -> None:
    rng = np.random.default_rng(version)
    names = [f"v{version}-{k}" for k in range(20)]
    with pyneuron.ConceptStore.writer((200, 24, 24), names, path=path, overwrite=True) as w:
        for image in range(200):
            w.add_image(image, masks={n: rng.random((24, 24)) < 0.3 for n in names[:5]})


def check_store(path: Path, reference: set[str]) -> None:
    store = pyneuron.ConceptStore.open(path)
    store.verify()
    assert len(store) == 20 and store.names[0].split("-")[0].startswith("v")


def files_of(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir()}


def check_run(path: Path, reference: set[str]) -> None:
    results = read_results(path)
    assert len(results) > 0
    json.loads((path / "summary.json").read_text())
    assert files_of(path) == reference, "a partial run directory"
    for units in (path / "units").iterdir() if (path / "units").is_dir() else []:
        pyneuron.UnitMasks.open(units).verify()


def check_report(path: Path, reference: set[str]) -> None:
    assert files_of(path / "report") == reference, "a partial report"


def leftovers(directory: Path) -> int:
    return sum(1 for p in directory.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def kill_at(write: Callable[[], object], delay: float | None) -> float:
    """Run ``write`` in a forked child and SIGKILL it after ``delay`` seconds (``None``:
    let it finish, and fail if it did not succeed); return the seconds until it ended."""
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: write, then leave without cleanup handlers
        status = 1
        try:
            # tqdm's default lock is a semaphore shared across fork: a child killed while
            # holding it would hang this process, so the child takes a lock of its own.
            for cls in {tqdm_std, tqdm_auto}:
                cls.set_lock(threading.RLock())
            write()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if delay is None and status != 0:
        raise RuntimeError(f"a whole write failed in the child (status {status})")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", default="store=150,explain=120,report=30,demo=10")
    parser.add_argument("--seed", type=int, default=16)
    args = parser.parse_args()
    kills = {k: int(v) for k, v in (item.split("=") for item in args.kills.split(","))}
    # One torch (OpenMP) thread: libgomp's worker pool does not survive fork, so a forked
    # child training the demo's CNN would hang had this process started the pool.
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    root = Path(tempfile.mkdtemp(prefix="pyneuron-kills-"))
    demo, units, concepts = root / "demo", root / "units", root / "concepts"
    cli("demo", "--out", demo, *DEMO)
    shutil.copytree(demo / "units" / "features.6", units)
    make_data(DemoConfig(60, 16, 1, 0), progress=False).store.save(concepts)
    explained = root / "explained"
    cli("explain", "--units", units, "--concepts", concepts, "--out", explained, "--quiet")

    targets: dict[str, tuple[Path, Callable[[int], None], Callable[[Path, set[str]], None]]] = {
        "store": (root / "store", lambda v: write_store(root / "store", v), check_store),
        "explain": (
            explained,
            lambda v: cli(
                "explain",
                "--units",
                units,
                "--concepts",
                concepts,
                "--out",
                explained,
                "--length",
                1 + v % 3,
                "--overwrite",
                "--quiet",
            ),
            check_run,
        ),  # fmt: skip
        "report": (demo, lambda v: cli("report", demo, "--quiet"), check_report),
        "demo": (demo, lambda v: cli("demo", "--out", demo, "--overwrite", *DEMO), check_run),
    }
    summary: dict[str, object] = {"seed": args.seed, "targets": {}}
    failures = 0
    for name, count in kills.items():
        path, write, check = targets[name]
        faulthandler.dump_traceback_later(900, exit=True)  # a hang ends the run loudly
        write(0)  # an existing output to replace
        # The longest of a few whole writes in a child, as the kills will see them.
        duration = max(kill_at(functools.partial(write, v), None) for v in (1, 2, 3))
        reference = files_of(path / "report") if name == "report" else files_of(path)
        lost, left = [], 0
        for k in range(count):
            faulthandler.dump_traceback_later(600, exit=True)  # a hang ends the run loudly
            delay = float(rng.uniform(0, duration))
            kill_at(functools.partial(write, k + 1), delay)
            left += leftovers(path.parent)
            try:
                check(path, reference)
            except Exception as error:  # noqa: BLE001 - counted and reported
                lost.append(f"kill {k} at {delay:.3f}s: {type(error).__name__}: {error}")
        write(count + 1)  # the next write cleans every leftover
        remaining = leftovers(path.parent)
        failures += len(lost) + (remaining > 0)
        summary["targets"][name] = {  # type: ignore[index]
            "kills": count,
            "write_seconds": round(duration, 3),
            "lost_or_partial": lost[:20],
            "leftovers_seen_after_kills": left,
            "leftovers_after_next_write": remaining,
        }
        print(name, json.dumps(summary["targets"][name]), file=sys.stderr)  # type: ignore[index]
    summary["total_kills"] = sum(kills.values())
    shutil.rmtree(root, ignore_errors=True)
    write_results("kill_writes", summary)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
