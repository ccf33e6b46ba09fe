"""The Ray backend on a real local cluster: identical tables, killed workers, resume.

The cluster (a head node without CPUs and two worker nodes with one CPU each, all on
127.0.0.1; the ``cluster`` fixture of conftest.py) is started once for the module; the
tests are skipped only when Ray is not installed (``pip install 'pyneuron[ray]'``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pandas.testing import assert_frame_equal

import pyneuron
from pyneuron.scale import ray as distributed
from pyneuron.scale.ray import RayBackend, resolve_backend, run_shard_dir

SHARD_TASK = b"ray::_run_shard"


# -- without a cluster ---------------------------------------------------------------------


def test_backend_values_are_checked():
    assert resolve_backend("local") is None
    assert resolve_backend("ray") == RayBackend()
    with pytest.raises(pyneuron.PyneuronError, match="unknown backend 'dask'"):
        resolve_backend("dask")
    with pytest.raises(pyneuron.PyneuronError, match="unit_block must be an integer >= 1"):
        RayBackend(unit_block=0)
    with pytest.raises(pyneuron.PyneuronError, match="share_store must be one of"):
        RayBackend(share_store="nfs")
    with pytest.raises(pyneuron.PyneuronError, match="max_retries"):
        RayBackend(max_retries=-1)
    assert run_shard_dir(Path("runs") / "a") == Path("runs") / "a.shards"


def test_missing_ray_is_a_clear_error(monkeypatch, tmp_path):
    store, units = _data(seed=1, n_units=3)
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail
    with pytest.raises(pyneuron.PyneuronError, match=r"pip install 'pyneuron\[ray\]'"):
        pyneuron.explain(units, store, backend="ray", progress=False)


def test_netdissect_refuses_another_backend():
    store, units = _data(seed=2, n_units=3)
    options = {"length": 1, "mode": "netdissect", "progress": False}
    with pytest.raises(pyneuron.PyneuronError, match="runs in this process only"):
        pyneuron.explain(units, store, backend=RayBackend(), **options)
    with pytest.raises(pyneuron.PyneuronError, match="unknown backend 'bogus'"):
        pyneuron.explain(units, store, backend="bogus", **options)


def test_an_address_that_answers_nothing_is_refused_at_once():
    """Before: RayBackend(address="127.0.0.1:1") was still waiting after 400 s."""
    import time

    store, units = _data(seed=4, n_units=3)
    started = time.monotonic()
    with pytest.raises(
        pyneuron.PyneuronError, match="cannot reach the Ray cluster at '127.0.0.1:1'"
    ):
        pyneuron.explain(units, store, backend=RayBackend(address="127.0.0.1:1"), progress=False)
    assert time.monotonic() - started < 30


def test_damaged_shards_are_computed_again(tmp_path):
    """Any shard file that fails to load, or is not this search's shape, counts as missing
    (before: an empty file raised EOFError on every rerun, a flipped header byte a
    tokenize error, and a shard of the wrong shape failed at the final join)."""
    from pyneuron.engine.search import raw_beam_search

    store, units = _data(seed=3, n_units=4)
    search = (3, 5, [0, 1, 2], 1.0)
    raw = raw_beam_search(units, store, search)
    path = tmp_path / "units-000000000-000000004.npz"
    distributed._write_shard(path, raw)
    good = path.read_bytes()
    assert distributed._read_shard(path, 4, search) is not None

    def same(found):
        return all(
            np.array_equal(getattr(found, f), getattr(raw, f), equal_nan=True) for f in raw.FIELDS
        )

    path.write_bytes(b"")
    assert distributed._read_shard(path, 4, search) is None
    for position in range(0, len(good), max(1, len(good) // 400)):
        damaged = bytearray(good)
        damaged[position] ^= 0xFF
        path.write_bytes(bytes(damaged))
        found = distributed._read_shard(path, 4, search)  # never raises
        assert found is None or same(found), position
    path.write_bytes(good[: len(good) // 2])
    assert distributed._read_shard(path, 4, search) is None
    path.write_bytes(good)
    assert distributed._read_shard(path, 5, search) is None  # another unit count
    assert distributed._read_shard(path, 4, (3, 6, [0, 1, 2], 1.0)) is None  # another beam
    assert distributed._read_shard(path, 4, (2, 5, [0, 1, 2], 1.0)) is None  # another length


# -- data ----------------------------------------------------------------------------------


def _data(seed: int, n_units: int, n_images: int = 60, size: int = 12, n_concepts: int = 12):
    """Random concepts (with an empty and a full-image one) and units built from them
    (planted formulas with noise, a silent unit, a unit that fires everywhere)."""
    rng = np.random.default_rng(seed)
    concepts = rng.random((n_concepts, n_images, size, size)) < rng.uniform(0.05, 0.4)
    concepts[0] = False
    concepts[1, : n_images // 3] = True
    concepts[1, n_images // 3 :] = False
    units = np.empty((n_units, n_images, size, size), dtype=bool)
    for u in range(n_units):
        a, b, c = rng.choice(n_concepts, 3, replace=False)
        planted = (concepts[a] | concepts[b]) & ~concepts[c]
        units[u] = planted ^ (rng.random(planted.shape) < 0.03)
    units[0] = False
    units[-1] = True
    names = [f"c{i}" for i in range(n_concepts)]
    return pyneuron.ConceptStore.from_masks(concepts, names), pyneuron.UnitMasks.from_masks(units)


def _heavy(seed: int = 7):
    """A case whose shards take a noticeable time (so a run can be interrupted)."""
    return _data(seed, n_units=24, n_images=300, size=24, n_concepts=60)


HEAVY_SEARCH = {"length": 5, "beam_size": 25, "progress": False}


# -- the cluster ---------------------------------------------------------------------------


def _same_as_local(units, store, backend, **options):
    local = pyneuron.explain(units, store, progress=False, **options)
    distributed = pyneuron.explain(units, store, backend=backend, progress=False, **options)
    assert_frame_equal(distributed, local, check_exact=True)
    return distributed


# -- identical results ---------------------------------------------------------------------


# Blocks of 5: the last one of 3; blocks of 1: a silent unit and a unit firing everywhere
# (empty and full-image containers only) travel alone.
@pytest.mark.parametrize(("full_beam", "unit_block"), [(False, 5), (True, 1)])
def test_same_table_as_local(cluster, full_beam, unit_block):
    store, units = _data(seed=0, n_units=23)
    backend = RayBackend(unit_block=unit_block)
    table = _same_as_local(units, store, backend, full_beam=full_beam)
    assert table["unit"].drop_duplicates().tolist() == list(range(23))
    assert table["formula"].notna().sum() > 0


def test_same_table_with_store_on_disk_and_unit_chunks(cluster, tmp_path):
    store, units = _data(seed=2, n_units=9)
    store.save(tmp_path / "store")
    on_disk = pyneuron.ConceptStore.open(tmp_path / "store")
    masks = [units.mask(u) for u in range(len(units))]
    chunks = [
        pyneuron.UnitMasks.from_masks(np.stack(masks[:4])),
        units.__class__.from_masks(np.stack(masks[4:])),
    ]
    options = {"length": 2, "beam_size": 3, "operators": ("AND", "OR NOT"), "penalty": 0.9}
    local = pyneuron.explain(units, store, progress=False, **options)
    for share in ("path", "object"):
        backend = RayBackend(unit_block=3, share_store=share)
        table = pyneuron.explain(chunks, on_disk, backend=backend, progress=False, **options)
        assert_frame_equal(table, local, check_exact=True)


def test_dissect_on_ray(cluster):
    rng = np.random.default_rng(3)
    store, _ = _data(seed=3, n_units=1, n_images=40, size=8)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU()).eval()
    images = rng.random((40, 3, 8, 8), dtype=np.float32)
    for options in ({"quantile": 0.05}, {"ranges": 2}):
        local = pyneuron.dissect(model, "1", images, store, progress=False, **options)
        table = pyneuron.dissect(
            model, "1", images, store, progress=False, backend=RayBackend(unit_block=4), **options
        )
        assert_frame_equal(table, local, check_exact=True)


def test_cli_explain_with_ray(cluster, tmp_path):
    from typer.testing import CliRunner

    from pyneuron.app.cli import app
    from pyneuron.app.rundir import read_results

    store, units = _data(seed=4, n_units=7)
    store.save(tmp_path / "store")
    units.save(tmp_path / "units")
    runner = CliRunner()
    common = ["explain", "--units", str(tmp_path / "units"), "--concepts", str(tmp_path / "store")]
    for out, extra in (("local", []), ("ray", ["--ray", cluster.address])):
        result = runner.invoke(app, [*common, "--out", str(tmp_path / out), "-q", *extra])
        assert result.exit_code == 0, result.output
    assert_frame_equal(
        read_results(tmp_path / "ray"), read_results(tmp_path / "local"), check_exact=True
    )
    assert not run_shard_dir(tmp_path / "ray").exists()


def _same_files(a: Path, b: Path) -> None:
    """Every file under ``a`` and ``b``: the same names and bytes."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cli_dissect_with_ray_writes_the_local_run(cluster, tmp_path):
    """Segmentation (a concept list), capture, unit masks and the search all on Ray: the
    same store, results, unit masks and top images as the local run."""
    from PIL import Image
    from typer.testing import CliRunner

    from pyneuron.app.cli import app
    from pyneuron.app.rundir import read_results, work_dir

    rng = np.random.default_rng(6)
    (tmp_path / "images").mkdir()
    for i in range(12):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i:02d}.png")
    from test_segment import save_tiny_clipseg

    save_tiny_clipseg(tmp_path / "clipseg")
    (tmp_path / "concepts.txt").write_text("red\ngreen\nbackground\n\nsky\ngrass\n")
    source = ["--concepts", str(tmp_path / "concepts.txt")]
    source += ["--segmenter", f"clipseg:{tmp_path / 'clipseg'}", "--grid", "8"]
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.ReLU())\n"
    )
    args = ["dissect", "--model", f"{tmp_path / 'net.py'}:build", "--layer", "0", "--layer", "1"]
    args += ["--images", str(tmp_path / "images"), *source, "--device", "cpu"]
    args += ["--image-size", "16", "--quantile", "0.1", "--batch-size", "4", "-q"]
    runner = CliRunner()
    for out, extra in (("local", []), ("ray", ["--ray", "auto"])):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / out), *extra])
        assert result.exit_code == 0, result.output
    local, ray = tmp_path / "local", tmp_path / "ray"
    assert_frame_equal(read_results(ray), read_results(local), check_exact=True)
    _same_files(ray / "units", local / "units")
    _same_files(ray / "concepts", local / "concepts")
    with np.load(ray / "top_images.npz") as got, np.load(local / "top_images.npz") as want:
        assert {k: got[k].tolist() for k in got} == {k: want[k].tolist() for k in want}
    summary = (ray / "summary.json").read_text()
    assert "capture and unit masks (ray)" in summary
    assert not run_shard_dir(ray).exists() and not work_dir(ray).exists()


# -- faults --------------------------------------------------------------------------------


def _running_shard_pids() -> list[int]:
    """Worker processes executing a shard right now (Ray titles them ray::<task>)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(SHARD_TASK):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_worker_killed_mid_run_gives_identical_result(cluster):
    store, units = _heavy()
    local = pyneuron.explain(units, store, **HEAVY_SEARCH)
    killed: list[int] = []
    finished = threading.Event()

    def kill_one() -> None:
        while not finished.is_set() and not killed:
            for pid in _running_shard_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        table = pyneuron.explain(units, store, backend=RayBackend(unit_block=2), **HEAVY_SEARCH)
    finally:
        finished.set()
        killer.join()
    assert killed, "no worker was running a shard to kill; make the shards slower"
    assert_frame_equal(table, local, check_exact=True)


def test_bad_input_on_a_worker_fails_with_its_message(cluster, tmp_path):
    store, units = _data(seed=5, n_units=4)
    store.save(tmp_path / "store")
    on_disk = pyneuron.ConceptStore.open(tmp_path / "store", verify=True)
    words = tmp_path / "store" / "words.bin"
    data = bytearray(words.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(words, "r+b") as handle:  # in place: the driver's memory map sees it too
        handle.write(bytes(data))
    with pytest.raises(pyneuron.StoreError, match="worker on node .*checksum of words.bin"):
        pyneuron.explain(units, on_disk, backend=RayBackend(share_store="path"), progress=False)


def test_resume_after_interruption_computes_only_missing_shards(
    cluster, tmp_path, caplog, monkeypatch
):
    store, units = _heavy(seed=8)
    store.save(tmp_path / "store")
    units.save(tmp_path / "units")
    shards = tmp_path / "shards"
    backend = {"unit_block": 2, "shard_dir": str(shards)}
    driver = textwrap.dedent(
        f"""
        import ray, pyneuron
        ray.init(address={cluster.address!r}, log_to_driver=False)
        pyneuron.explain(
            pyneuron.UnitMasks.open({str(tmp_path / "units")!r}),
            pyneuron.ConceptStore.open({str(tmp_path / "store")!r}),
            backend=pyneuron.RayBackend(**{backend!r}), **{HEAVY_SEARCH!r})
        """
    )
    process = subprocess.Popen([sys.executable, "-c", driver])
    try:
        deadline = time.monotonic() + 60
        while len(list(shards.glob("*/units-*.npz"))) < 2:
            assert process.poll() is None, "the interrupted driver stopped on its own"
            assert time.monotonic() < deadline, "no shard was written within 60 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.glob("*/units-*.npz")}
    total = -(-len(units) // 2)
    assert 2 <= len(kept) < total, "the run was not interrupted before its end"

    with caplog.at_level(logging.INFO, logger="pyneuron.scale.ray"):
        table = pyneuron.explain(units, store, backend=RayBackend(**backend), **HEAVY_SEARCH)
    assert f"{len(kept)} of {total} shards already done" in caplog.text
    assert f"computing {total - len(kept)}" in caplog.text
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards.glob("*/units-*.npz")}
    assert len(after) == total and all(after[name] == kept[name] for name in kept)
    assert_frame_equal(table, pyneuron.explain(units, store, **HEAVY_SEARCH), check_exact=True)

    # All shards done: nothing to compute, so Ray is not even contacted.
    def no_ray(address):
        raise AssertionError("Ray contacted although every shard was done")

    with monkeypatch.context() as patch:
        patch.setattr(distributed, "_connect", no_ray)
        done = pyneuron.explain(units, store, backend=RayBackend(**backend), **HEAVY_SEARCH)
    assert_frame_equal(done, table, check_exact=True)

    # A damaged shard file is recomputed, not trusted.
    damaged = sorted(shards.glob("*/units-*.npz"))[0]
    damaged.write_bytes(b"not a shard")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pyneuron.scale.ray"):
        again = pyneuron.explain(units, store, backend=RayBackend(**backend), **HEAVY_SEARCH)
    assert f"{total - 1} of {total} shards already done" in caplog.text
    assert_frame_equal(again, table, check_exact=True)
    pd.testing.assert_index_equal(again.columns, table.columns)
