"""Ray for the expensive stages: segmentation and a layer's units over image ranges
(parts), each equal to one process's result; parts reused, damaged parts recomputed,
killed workers replaced. The cluster is the ``cluster`` fixture of conftest.py (one per
module); the tests without it use ``backend="local"`` or a stand-in for Ray."""

from __future__ import annotations

import doctest
import importlib
import logging
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_concatenate import same_directories

import pyneuron
from pyneuron import ConceptStore, PyneuronError
from pyneuron.concepts.distributed import merge_segment_metadata, segment_on_ray
from pyneuron.concepts.segment import segment
from pyneuron.engine.search import raw_beam_search
from pyneuron.engine.units import UnitMasks
from pyneuron.engine.upsample import unit_masks_from_activations
from pyneuron.model.activations import capture
from pyneuron.model.distributed import layer_units_on_ray
from pyneuron.model.layer_units import top_activating_images
from pyneuron.model.thresholds import quantile_thresholds
from pyneuron.scale import ray as ray_backend
from pyneuron.scale.parts import PART_FILE, plan_parts, run_parts
from pyneuron.scale.ray import RayBackend

CONCEPTS = {"shade": ["dark", "light", "background"], "colour": ["red", "other"]}
GRID = (5, 7)  # 35 pixels: not a multiple of 64


# -- what the workers run (pickled by value: the workers cannot import this module) -------


class Shades:
    """A stub segmenter: scores from the pixels. ``delay`` seconds per image; an image
    whose first pixel is ``fail_on`` raises; ``marker`` (a folder) records the process
    ids that segment."""

    name = "shades"
    fingerprint = "shades-v1"

    def __init__(self, delay: float = 0.0, fail_on: int | None = None, marker=None) -> None:
        self.delay, self.fail_on, self.marker = delay, fail_on, marker

    def __call__(self, images, concepts):
        if self.marker is not None:
            (Path(self.marker) / str(os.getpid())).touch()
        out = []
        for image in images:
            time.sleep(self.delay)
            a = np.asarray(image, dtype=np.float32) / 255
            if self.fail_on is not None and int(a[0, 0, 0] * 255) == self.fail_on:
                raise PyneuronError(f"cannot segment an image starting with {self.fail_on}")
            grey = a.mean(axis=2)
            maps = {"dark": 1 - grey, "light": grey, "red": a[..., 0] - 0.5, "background": 0.45}
            maps["other"] = 0.2
            out.append(np.stack([np.broadcast_to(maps[c], grey.shape) for c in concepts]))
        return out


def tiny_cnn() -> torch.nn.Module:
    """Two conv layers; channel 2 of layer "1" is dead (all its peaks tie at 0)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 5, 3, stride=2),
        torch.nn.ReLU(),
    )
    with torch.no_grad():
        model[0].bias[2] = -100.0
    return model.eval()


def mixed_units(maps: torch.Tensor) -> torch.Tensor:
    """Units that are not channels: a fixed mix of them (like an SAE's encoder)."""
    return maps[:, :4] - 0.5 * maps[:, 1:5]


def image_files(folder: Path, n: int, size=(9, 11), seed: int = 0) -> list[Path]:
    """PNG images; image i starts with pixel value i."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        pixels[0, 0, 0] = i
        files.append(folder / f"{i:03d}.png")
        Image.fromarray(pixels).save(files[-1])
    return files


#: Ray Data's usage reports query a metrics server in background threads, which log
#: failures after the tests' output streams are closed: off while these tests run.
USAGE_REPORTS = "RAY_DATA_USAGE_DISABLED"


@pytest.fixture(scope="module")
def ray_cluster(cluster):
    """The cluster, with this module's functions and classes sent to workers by value."""
    import ray

    previous = os.environ.get(USAGE_REPORTS)
    os.environ[USAGE_REPORTS] = "1"
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield cluster
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    if previous is None:
        os.environ.pop(USAGE_REPORTS)
    else:
        os.environ[USAGE_REPORTS] = previous


# -- without a cluster --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["pyneuron.scale.parts", "pyneuron.concepts.distributed", "pyneuron.model.distributed"]
)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_parts_are_reused_and_damaged_ones_recomputed(tmp_path, caplog):
    calls: list[tuple[int, int]] = []

    def compute(start, stop, folder):
        calls.append((start, stop))
        np.save(folder / "values.npy", np.arange(start, stop, dtype=np.int64) ** 2)

    def load(part):
        values = np.load(part.path / "values.npy", allow_pickle=False)
        if values.dtype != np.int64 or values.shape != (part.n_images,):
            raise PyneuronError("not this part's values")
        return values

    parts = plan_parts(10, 3, tmp_path, "squares")
    assert [(p.start, p.stop) for p in parts] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    first = run_parts(compute, load, parts, "local", progress=False)
    assert np.concatenate(first.results).tolist() == [i * i for i in range(10)]
    assert calls == [(0, 3), (3, 6), (6, 9), (9, 10)] and first.reused == []

    calls.clear()
    values = parts[1].path / "values.npy"
    data = bytearray(values.read_bytes())
    data[-1] ^= 0x01  # one bit of the data, not of the header: caught by the CRC-32
    values.write_bytes(bytes(data))
    (parts[2].path / "values.npy").write_bytes(b"")  # truncated
    (parts[3].path / PART_FILE).write_text('{"format": 1, "start": 0, "stop": 1, "key": "x"}')
    with caplog.at_level(logging.INFO, logger="pyneuron.scale.parts"):
        again = run_parts(compute, load, parts, "local", progress=False)
    assert calls == [(3, 6), (6, 9), (9, 10)] and again.reused == [0]
    assert "1 of 4 parts already done; computing 3" in caplog.text
    assert np.concatenate(again.results).tolist() == [i * i for i in range(10)]

    # A part of another shape (its files intact) does not load either.
    calls.clear()
    compute(3, 5, tmp_path)
    (tmp_path / "values.npy").replace(values)
    (parts[1].path / PART_FILE).unlink()
    assert run_parts(compute, load, parts, "local", progress=False).reused == [0, 2, 3]
    assert calls == [(3, 5), (3, 6)]

    def broken(start, stop, folder):
        (folder / "half").write_text("x")
        raise PyneuronError(f"images {start}-{stop} are broken")

    fresh = plan_parts(4, 2, tmp_path, "broken")
    with pytest.raises(PyneuronError, match="images 0-2 are broken"):
        run_parts(broken, load, fresh, "local", progress=False)
    assert not (tmp_path / "broken").exists() or not any((tmp_path / "broken").iterdir())


class FakeRay:
    """Stands in for Ray in ``_compute``: tasks run when their result is asked for; the
    cluster has ``cpus[i]`` CPUs at the i-th count of its resources."""

    exceptions = types.SimpleNamespace(RayTaskError=RuntimeError)

    def __init__(self, cpus: list[int], store: ConceptStore) -> None:
        self.cpus, self.counted, self.store = cpus, 0, store
        self.in_flight, self.most_in_flight, self.idle_waits = 0, [], 0

    def cluster_resources(self) -> dict[str, float]:
        self.counted += 1
        return {"CPU": float(self.cpus[min(self.counted, len(self.cpus)) - 1])}

    def put(self, value):
        return value

    def remote(self, function):
        fake = self

        class Task:
            def options(self, **_):
                return self

            def remote(self, shared, block, search, threads):
                fake.in_flight += 1
                fake.most_in_flight.append(fake.in_flight)
                units = UnitMasks(block["grid"], *block["index"], block["words"])
                return lambda: raw_beam_search(units, fake.store, search)

        return Task()

    def wait(self, refs, num_returns, timeout):
        if self.idle_waits < 1:  # nothing finishes for a while once: the count is redone
            self.idle_waits += 1
            return [], refs
        return refs[:1], refs[1:]

    def get(self, ref):
        self.in_flight -= 1
        return ref()

    def cancel(self, ref):
        raise AssertionError("nothing is cancelled in a run that succeeds")


def test_the_window_of_shards_grows_when_nodes_join(monkeypatch):
    rng = np.random.default_rng(0)
    store = ConceptStore.from_masks(rng.random((6, 8, 4, 4)) < 0.3, [f"c{i}" for i in range(6)])
    masks = UnitMasks.from_masks(rng.random((30, 8, 4, 4)) < 0.3)
    options = {"length": 2, "beam_size": 3, "progress": False}
    local = pyneuron.explain(masks, store, **options)
    fake = FakeRay([1, 1, 1, 4], store)
    monkeypatch.setattr(ray_backend, "_connect", lambda address: fake)
    table = pyneuron.explain(masks, store, backend=RayBackend(unit_block=1), **options)
    assert table.equals(local)
    # 1 CPU: 2 shards in flight, counted again after an idle wait and after each shard;
    # at the fourth count 4 CPUs: 8 in flight.
    assert fake.most_in_flight[:3] == [1, 2, 2]
    assert max(fake.most_in_flight) == 8
    assert fake.counted >= 4


def test_segment_parts_equal_one_run_locally(tmp_path):
    files = image_files(tmp_path / "images", 11)
    (tmp_path / "images" / "004.png").write_bytes(b"not an image")
    options = {"grid": GRID, "batch_size": 2, "on_error": "skip", "progress": False}
    with pytest.warns(RuntimeWarning, match="skipping image 4"):
        segment(files, CONCEPTS, Shades(), out=tmp_path / "local", **options)
    with pytest.warns(RuntimeWarning, match="skipping image 0"):  # image 4 is 0 of its part
        store = segment_on_ray(
            files,
            CONCEPTS,
            Shades(),
            out=tmp_path / "parts.store",
            backend="local",
            parts_dir=tmp_path / "parts",
            part_images=4,
            **options,
        )
    same_directories(tmp_path / "parts.store", tmp_path / "local")
    [skipped] = store.metadata["segment"]["skipped"]
    assert skipped["image"] == 4 and skipped["file"].endswith("004.png")
    assert len(store.metadata["segment"]["image_keys"]) == 11
    with pytest.raises(PyneuronError, match="device and dtype apply to a segmenter given as"):
        segment_on_ray(files, CONCEPTS, Shades(), device="cpu", parts_dir=tmp_path / "p")


def test_segment_metadata_of_other_runs_is_refused():
    def part(mode):
        store = ConceptStore.from_masks(np.zeros((1, 2, 2, 2), bool), ["x"])
        store.metadata.update(source="segment", segment={"mode": mode, "images": ["a", "b"]})
        return store

    with pytest.raises(PyneuronError, match="part 1 was segmented otherwise"):
        merge_segment_metadata([part("argmax"), part("threshold")])
    short = part("argmax")
    short.metadata["segment"]["images"] = ["a"]
    with pytest.raises(PyneuronError, match="part 1 lists no 'images' entry for each"):
        merge_segment_metadata([part("argmax"), short])
    with pytest.raises(PyneuronError, match="not made by segment"):
        merge_segment_metadata([ConceptStore.from_masks(np.zeros((1, 1, 2, 2), bool), ["x"])])


def test_an_unreachable_cluster_is_refused_before_any_work(tmp_path):
    files = image_files(tmp_path / "images", 2)
    started = time.monotonic()
    with pytest.raises(PyneuronError, match="cannot reach the Ray cluster at '127.0.0.1:1'"):
        segment_on_ray(
            files,
            CONCEPTS,
            Shades(fail_on=0),  # would raise if it ran
            backend=RayBackend(address="127.0.0.1:1"),
            parts_dir=tmp_path / "parts",
            progress=False,
        )
    assert time.monotonic() - started < 30
    assert not (tmp_path / "parts").exists()


# -- on the cluster --------------------------------------------------------------------------


def test_segment_on_ray_equals_segment(ray_cluster, tmp_path, caplog):
    files = image_files(tmp_path / "images", 14)
    options = {"grid": GRID, "batch_size": 2, "progress": False}
    segment(files, CONCEPTS, Shades(), out=tmp_path / "local", **options)
    ray_options = {"backend": RayBackend(), "parts_dir": tmp_path / "parts", "part_images": 4}
    segment_on_ray(files, CONCEPTS, Shades(), out=tmp_path / "ray", **options, **ray_options)
    same_directories(tmp_path / "ray", tmp_path / "local")

    # A factory (the class) builds the segmenter on the workers: the same parts' key.
    parts = sorted((tmp_path / "parts").glob("*/part-*"))
    assert len(parts) == 4
    (parts[0] / "store" / "words.bin").write_bytes(b"damaged")
    for leftover in parts[3].iterdir():  # a part whose files are gone
        if leftover.is_file():
            leftover.unlink()
    kept = {p.name: (p / PART_FILE).stat().st_mtime_ns for p in parts[1:3]}
    with caplog.at_level(logging.INFO, logger="pyneuron.scale.parts"):
        segment_on_ray(files, CONCEPTS, Shades, out=tmp_path / "again", **options, **ray_options)
    assert "2 of 4 parts already done; computing 2" in caplog.text
    same_directories(tmp_path / "again", tmp_path / "local")
    assert {p.name: (p / PART_FILE).stat().st_mtime_ns for p in parts[1:3]} == kept


def test_a_failing_part_raises_the_workers_error(ray_cluster, tmp_path):
    files = image_files(tmp_path / "images", 6)
    with pytest.raises(PyneuronError, match="cannot segment an image starting with 3"):
        segment_on_ray(
            files,
            CONCEPTS,
            Shades(fail_on=3),
            grid=GRID,
            backend="ray",
            parts_dir=tmp_path / "parts",
            part_images=2,
            progress=False,
        )
    done = {p.name for p in (tmp_path / "parts").glob("*/part-*")}
    assert "part-000000002-000000004" not in done


def _kill_first_marked(marker: Path, killed: list[int], finished: threading.Event) -> None:
    """Kill the first process that starts segmenting (mid-part: it sleeps per image)."""
    while not finished.is_set() and not killed:
        for entry in marker.iterdir():
            pid = int(entry.name)
            time.sleep(0.2)  # well inside its first image
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.01)


def test_a_worker_killed_mid_part_gives_the_same_store(ray_cluster, tmp_path):
    files = image_files(tmp_path / "images", 8)
    options = {"grid": GRID, "batch_size": 2, "progress": False}
    segment(files, CONCEPTS, Shades(), out=tmp_path / "local", **options)
    marker = tmp_path / "marker"
    marker.mkdir()
    killed: list[int] = []
    finished = threading.Event()
    killer = threading.Thread(target=_kill_first_marked, args=(marker, killed, finished))
    killer.start()
    try:
        segment_on_ray(
            files,
            CONCEPTS,
            Shades(delay=0.5, marker=str(marker)),
            out=tmp_path / "ray",
            backend=RayBackend(),
            parts_dir=tmp_path / "parts",
            part_images=2,
            **options,
        )
    finally:
        finished.set()
        killer.join()
    assert killed, "no worker was segmenting to kill"
    same_directories(tmp_path / "ray", tmp_path / "local")
    hidden = [p.name for p in (tmp_path / "parts").rglob(".*")]
    assert hidden == [], "the killed worker's staging directory was left behind"


def test_layer_units_on_ray_equal_one_process(ray_cluster, tmp_path, caplog):
    files = image_files(tmp_path / "images", 10, size=(12, 12))
    layers, size, q, k = ["1", "3"], (9, 10), 0.05, 4
    units = {"3": mixed_units}
    acts = capture(tiny_cnn(), layers, files, batch_size=2, units=units, progress=False)
    assert (acts["1"][:, 2] == 0).all() and acts["3"].shape[1] == 4
    for layer in layers:
        thresholds = quantile_thresholds(acts[layer], q)
        unit_masks_from_activations(
            acts[layer], thresholds, size, path=tmp_path / "local" / layer, progress=False
        )
    options = {
        "size": size,
        "batch_size": 2,
        "quantile": q,
        "top_k": k,
        "units": units,
        "parts_dir": tmp_path / "parts",
        "part_images": 4,  # parts of 4, 4 and 2 images
        "progress": False,
    }

    def check(result, masks_dir):
        for layer in layers:
            expected = quantile_thresholds(acts[layer], q)
            assert result[layer].thresholds.tobytes() == expected.tobytes()
            top = top_activating_images(acts[layer], k)
            np.testing.assert_array_equal(result[layer].top_images, top)
            assert result[layer].threshold_method == "exact"
            same_directories(masks_dir / layer, tmp_path / "local" / layer)
        assert result["1"].top_images[2].tolist() == [0, 1, 2, 3]  # ties: lower image first

    result = layer_units_on_ray(
        tiny_cnn, layers, files, backend=RayBackend(), masks_dir=tmp_path / "ray", **options
    )
    check(result, tmp_path / "ray")

    # Damaged parts of both rounds are computed again, the others reused.
    capture_parts = sorted((tmp_path / "parts").glob("capture-*/part-*"))
    mask_parts = sorted((tmp_path / "parts").glob("masks-*/part-*"))
    assert len(capture_parts) == len(mask_parts) == 3
    npy = sorted(capture_parts[1].rglob("*.npy"))[0]
    npy.write_bytes(npy.read_bytes()[:-8])
    words = mask_parts[2] / "masks1" / "words.bin"
    data = bytearray(words.read_bytes())
    data[0] ^= 0x10
    words.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="pyneuron.scale.parts"):
        again = layer_units_on_ray(
            tiny_cnn, layers, files, backend="ray", masks_dir=tmp_path / "again", **options
        )
    assert caplog.text.count("2 of 3 parts already done; computing 1") == 2
    check(again, tmp_path / "again")


def test_a_killed_driver_is_resumed_from_its_parts(ray_cluster, tmp_path, caplog):
    """A driver killed in the middle of a segmentation leaves its finished parts; the
    rerun computes only the others, and the store is the one-process store."""
    import subprocess

    files = image_files(tmp_path / "images", 16)
    parts_dir = tmp_path / "parts"
    options = {"grid": GRID, "batch_size": 2, "progress": False}
    driver = f"""
import sys, ray
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_ray_stages as here
from pyneuron import RayBackend
from pyneuron.concepts.distributed import segment_on_ray
ray.init(address={ray_cluster.address!r}, log_to_driver=False)
ray.cloudpickle.register_pickle_by_value(here)
files = [here.Path(p) for p in {[str(f) for f in files]!r}]
segment_on_ray(files, here.CONCEPTS, here.Shades(delay=0.25), backend=RayBackend(),
               parts_dir={str(parts_dir)!r}, part_images=2, **{options!r})
"""
    process = subprocess.Popen([sys.executable, "-c", driver])
    try:
        deadline = time.monotonic() + 120
        while len(list(parts_dir.glob(f"*/part-*/{PART_FILE}"))) < 2:
            assert process.poll() is None, "the driver stopped before it was killed"
            assert time.monotonic() < deadline, "no part was written within 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    kept = {p.parent.name: p.stat().st_mtime_ns for p in parts_dir.glob(f"*/part-*/{PART_FILE}")}
    assert 2 <= len(kept) < 8, "the driver was not killed before its end"

    ray_options = {"backend": RayBackend(), "parts_dir": parts_dir, "part_images": 2}
    with caplog.at_level(logging.INFO, logger="pyneuron.scale.parts"):
        segment_on_ray(files, CONCEPTS, Shades(), out=tmp_path / "ray", **options, **ray_options)
    assert f"{len(kept)} of 8 parts already done; computing {8 - len(kept)}" in caplog.text
    after = {p.parent.name: p.stat().st_mtime_ns for p in parts_dir.glob(f"*/part-*/{PART_FILE}")}
    assert all(after[name] == kept[name] for name in kept)
    segment(files, CONCEPTS, Shades(), out=tmp_path / "local", **options)
    same_directories(tmp_path / "ray", tmp_path / "local")
