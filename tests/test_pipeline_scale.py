"""The pipeline at scale on one machine: activations streamed to disk and read back in
blocks (memory flat), resumable runs, devices, decoding workers, units beyond channels
(a sparse autoencoder trained here), and the streaming top images and thresholds."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from pandas.testing import assert_frame_equal
from typer.testing import CliRunner

import pyneuron
from pyneuron.app.cli import app
from pyneuron.app.pipeline import dissect_run
from pyneuron.app.rundir import work_dir
from pyneuron.concepts.synthetic import DemoConfig, make_data
from pyneuron.engine.batches import image_batches
from pyneuron.engine.upsample import unit_masks_from_activations
from pyneuron.errors import PyneuronError
from pyneuron.model import layer_units as layer_units_module
from pyneuron.model.activations import capture
from pyneuron.model.dissect import explain_activations
from pyneuron.model.layer_units import layer_units, top_activating_images
from pyneuron.model.thresholds import quantile_thresholds

runner = CliRunner()


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 5, 3)
    ).eval()


class _Counting(torch.nn.Module):
    """A model that counts the images it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _model()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.inner(x)


def _rss_file_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


# -- reading in blocks ---------------------------------------------------------------------


def test_reading_a_memory_map_in_blocks_does_not_keep_its_pages(tmp_path):
    path = tmp_path / "big.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(64, 256, 64, 64))
    array[:] = 1.0  # 256 MiB
    array.flush()
    del array
    mapped = np.load(path, mmap_mode="r")
    before = _rss_file_kib()
    total = sum(float(block.sum()) for _, block in image_batches(mapped, 4))
    assert total == 64 * 256 * 64 * 64
    # Without giving the pages back, all 256 MiB would now be resident.
    assert _rss_file_kib() - before < 64 * 1024


def test_searched_masks_give_their_pages_back(tmp_path):
    rng = np.random.default_rng(5)
    words = rng.integers(0, 2**63, (128, 1024, 64), dtype=np.uint64)  # 64 MiB of bitsets
    pyneuron.UnitMasks.from_words(words, 64, 64).save(tmp_path / "units")
    masks = pyneuron.UnitMasks.open(tmp_path / "units")
    assert int(masks.arrays.words[:, 0].sum() % 7) >= 0  # every page of the bitsets read
    before = _rss_file_kib()
    masks.release_pages()
    assert before - _rss_file_kib() > 48 * 1024
    assert np.array_equal(masks.arrays.words.reshape(128, 1024, 64), words)  # read again


@pytest.mark.parametrize("batch", [1, 3, 7, None])
def test_streaming_top_images_equal_a_full_sort_with_ties(batch):
    rng = np.random.default_rng(batch or 0)
    acts = rng.integers(0, 4, (23, 5, 2, 3)).astype(np.float32)  # many ties
    acts[:, 2] = 0.0  # a unit that never fires: all tie
    peaks = acts.reshape(23, 5, -1).max(axis=2)
    for k in (1, 4, 23, 40):
        expected = np.argsort(-peaks, axis=0, kind="stable")[:k].T
        assert np.array_equal(top_activating_images(acts, k, batch_images=batch), expected)


def test_layer_units_equal_the_whole_array_computation(tmp_path):
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(30, 4, 5, 7)).astype(np.float32)
    acts[:, 1] = 0.0  # a silent unit
    units = layer_units(acts, (9, 10), quantile=0.02, top_k=3, path=tmp_path / "u", progress=False)
    thresholds = quantile_thresholds(acts, 0.02)
    assert np.array_equal(units.thresholds, thresholds) and units.threshold_method == "exact"
    expected = unit_masks_from_activations(acts, thresholds, (9, 10), progress=False)
    for got, want in zip(units.masks.arrays, expected.arrays, strict=True):
        assert np.array_equal(got, want)
    assert pyneuron.UnitMasks.open(tmp_path / "u").grid == expected.grid


def test_auto_thresholds_switch_to_the_streaming_estimator_and_say_so(monkeypatch):
    acts = np.random.default_rng(2).random((40, 3, 6, 6), dtype=np.float32)
    assert layer_units(acts, (6, 6), progress=False).threshold_method == "exact"
    monkeypatch.setattr(layer_units_module, "EXACT_THRESHOLD_MEMORY", 100)
    with pytest.warns(UserWarning, match="compexp's streaming estimator"):
        units = layer_units(acts, (6, 6), progress=False)
    assert units.threshold_method == "compexp"
    assert np.array_equal(units.thresholds, quantile_thresholds(acts, 0.005, method="compexp"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for explicitly: no warning
        assert layer_units(acts, (6, 6), thresholds="exact", progress=False).thresholds.shape == (
            3,
        )
    with pytest.raises(PyneuronError, match="unknown threshold method 'fast'"):
        layer_units(acts, (6, 6), thresholds="fast", progress=False)


# -- capture: devices, workers, resuming ---------------------------------------------------


def test_capture_checks_the_device_before_any_work():
    model = _Counting()
    if not torch.cuda.is_available():
        with pytest.raises(PyneuronError, match="'cuda' is not available"):
            capture(model, "inner.0", np.zeros((2, 8, 8, 3), np.uint8), device="cuda")
    with pytest.raises(PyneuronError, match="unknown device 'tpu'"):
        capture(model, "inner.0", np.zeros((2, 8, 8, 3), np.uint8), device="tpu")
    with pytest.raises(PyneuronError, match="unsupported dtype 'float8'"):
        capture(model, "inner.0", np.zeros((2, 8, 8, 3), np.uint8), dtype="float8")
    assert model.seen == 0


def test_capture_moves_the_model_to_the_asked_precision():
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    model = _model()
    full = capture(model, "2", images, progress=False)["2"]
    half = capture(model, "2", images, dtype="bfloat16", progress=False)["2"]
    assert next(model.parameters()).dtype == torch.bfloat16
    assert half.dtype == np.float32 and np.allclose(half, full, atol=0.1)


def _image_folder(tmp_path, n: int = 11, size: int = 12):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(3).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        Image.fromarray(pixels[i]).save(folder / f"{i:03d}.png")
    return folder


def test_decoding_workers_give_the_same_activations(tmp_path):
    folder = _image_folder(tmp_path)
    plain = capture(_model(), ["0", "2"], folder, batch_size=4, progress=False)
    parallel = capture(_model(), ["0", "2"], folder, batch_size=4, workers=2, progress=False)
    streamed = capture(
        _model(), ["0", "2"], folder, batch_size=4, workers=2, out=tmp_path / "a", progress=False
    )
    for layer in ("0", "2"):
        assert np.array_equal(plain[layer], parallel[layer])
        assert np.array_equal(plain[layer], streamed[layer])
    with pytest.raises(PyneuronError, match="workers must be a non-negative integer"):
        capture(_model(), "0", folder, workers=-1, progress=False)


def test_a_resumed_capture_skips_the_images_done_and_other_weights_start_over(tmp_path):
    folder = _image_folder(tmp_path)
    model = _Counting()
    first = capture(model, "inner.2", folder, batch_size=4, out=tmp_path / "a", progress=False)
    assert model.seen == 11
    again = capture(model, "inner.2", folder, batch_size=4, out=tmp_path / "a", progress=False)
    assert model.seen == 11  # nothing computed again
    assert np.array_equal(first["inner.2"], again["inner.2"])
    other = _Counting()
    torch.nn.init.constant_(other.inner[0].weight, 0.5)  # same shapes, other weights
    capture(other, "inner.2", folder, batch_size=4, out=tmp_path / "a", progress=False)
    assert other.seen == 11  # not taken for the first model's activations


# -- units beyond channels: a sparse autoencoder -------------------------------------------


class SparseAutoencoder(torch.nn.Module):
    """A ReLU sparse autoencoder over the channels of a (B, C, h, w) map."""

    def __init__(self, channels: int, latents: int) -> None:
        super().__init__()
        self.encoder = torch.nn.Conv2d(channels, latents, 1)
        self.decoder = torch.nn.Conv2d(latents, channels, 1)

    def encode(self, maps: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(maps))

    def forward(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.encode(maps)
        return self.decoder(latents), latents


def _train_sae(activations: np.ndarray, latents: int, steps: int = 150) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(activations.shape[1], latents)
    data = torch.from_numpy(np.ascontiguousarray(activations))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(steps):
        reconstruction, codes = sae(data)
        loss = ((reconstruction - data) ** 2).mean() + 1e-3 * codes.abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sae.eval()


def test_dissect_explains_the_latents_of_a_sparse_autoencoder(tmp_path):
    data = make_data(DemoConfig(n_images=60, size=16), progress=False)
    model = _model()
    channels = capture(model, "0", data.images, progress=False)["0"]
    sae = _train_sae(channels, latents=12)
    table = pyneuron.dissect(
        model, "0", data.images, data.store, units=sae.encode, length=2, progress=False
    )
    assert sorted(table["unit"].unique()) == list(range(12))
    # The same as explaining the latents computed by hand.
    with torch.inference_mode():
        latents = sae.encode(torch.from_numpy(channels)).numpy()
    expected, _ = explain_activations(latents, data.store, layer="0", length=2, progress=False)
    assert_frame_equal(table, expected)


def test_a_units_function_that_breaks_the_shape_is_named():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(PyneuronError, match=r"units function of layer '0' turned maps"):
        capture(_model(), "0", images, units=lambda maps: maps[0], progress=False)
    with pytest.raises(PyneuronError, match="returned list"):
        capture(_model(), "0", images, units=lambda maps: [maps], progress=False)
    with pytest.raises(PyneuronError, match="failed on maps of shape"):
        capture(_model(), "0", images, units=torch.nn.Conv2d(99, 1, 1), progress=False)
    pooled = capture(_model(), "0", images, units=lambda maps: maps.mean((2, 3)), progress=False)
    assert pooled["0"].shape == (2, 6, 1, 1)


# -- the run: streamed, resumable, reported ------------------------------------------------


def _demo(n: int = 48):
    return make_data(DemoConfig(n_images=n, size=16), progress=False)


def test_a_run_streams_through_its_work_directory_and_removes_it(tmp_path):
    data = _demo()
    out = tmp_path / "run"
    summary = dissect_run(
        _model(), ["0", "2"], data.images, data.store, out, keep_activations=True, progress=False
    )
    assert not work_dir(out).exists()
    assert summary["layers"]["2"]["threshold_method"] == "exact"
    kept = np.load(out / "activations" / "2.npy")
    assert np.array_equal(kept, capture(_model(), "2", data.images, progress=False)["2"])
    results = pd.read_parquet(out / "results.parquet")
    thresholds = quantile_thresholds(kept, 0.005)
    layer2 = results[results["layer"] == "2"]
    assert np.array_equal(layer2["threshold"].to_numpy(), thresholds[layer2["unit"].to_numpy()])
    assert pyneuron.UnitMasks.open(out / "units" / "2").grid.n_images == 48


def test_an_interrupted_run_resumes_its_capture(tmp_path, monkeypatch):
    data = _demo()
    out = tmp_path / "run"
    model = _Counting()
    import pyneuron.app.pipeline as pipeline

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "explain", fail)
        with pytest.raises(KeyboardInterrupt):
            dissect_run(model, ["inner.2"], data.images, data.store, out, progress=False)
    assert not out.exists() and (work_dir(out) / "activations" / "inner.2.npy").is_file()
    assert model.seen == 48
    dissect_run(model, ["inner.2"], data.images, data.store, out, progress=False)
    assert model.seen == 48  # the capture was not run again
    assert (out / "results.parquet").is_file() and not work_dir(out).exists()


def test_cli_dissect_takes_device_units_and_thresholds(tiny_project, tmp_path):
    root = tiny_project
    (tmp_path / "latents.py").write_text(
        "import torch\n"
        "torch.manual_seed(1)\n"
        "ENCODER = torch.nn.Conv2d(4, 7, 1)\n"
        "def encode(maps):\n"
        "    return torch.relu(ENCODER(maps))\n"
    )
    common = [
        "dissect",
        "--model",
        f"{root / 'net.py'}:build",
        "--layer",
        "1",
        "--images",
        root / "images",
        "--concepts",
        root / "store",
        "--image-size",
        32,
        "--quiet",
    ]
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            str(a)
            for a in [
                *common,
                "--out",
                out,
                "--device",
                "cpu",
                "--workers",
                1,
                "--units",
                f"{tmp_path / 'latents.py'}:encode",
                "--thresholds",
                "exact",
            ]
        ],
    )
    assert result.exit_code == 0, result.output
    results = pd.read_parquet(out / "results.parquet")
    assert sorted(results["unit"]) == list(range(7))
    config = (out / "config.toml").read_text()
    assert '"device" = "cpu"' in config and "latents.py:encode" in config
    for extra, message in [
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--dtype", "float8"], "unsupported dtype 'float8'"),
        (["--thresholds", "fast"], "unknown threshold method 'fast'"),
        (["--units", f"{tmp_path / 'latents.py'}:ENCODERS"], "has no 'ENCODERS'"),
        (["--units", "no_such_module_here:f"], "cannot import no_such_module_here"),
    ]:
        failed = runner.invoke(app, [str(a) for a in [*common, "--out", tmp_path / "x", *extra]])
        assert failed.exit_code == 1 and message in failed.output, failed.output
        assert not (tmp_path / "x").exists()
    bad = runner.invoke(app, ["evaluate", str(out), "--device", "tpu", "--quiet"])
    assert bad.exit_code == 1 and "unknown device 'tpu'" in bad.output
    checked = runner.invoke(
        app, ["evaluate", str(out), "--device", "cpu", "--controls", "0", "--top-k", "2", "-q"]
    )
    assert checked.exit_code == 0, checked.output
    evaluation = json.loads((out / "summary.json").read_text())["evaluation"]
    assert evaluation["config"]["device"] == "cpu"
    plain = tmp_path / "plain"
    quick = runner.invoke(app, [str(a) for a in [*common, "--out", plain, "--no-report"]])
    assert quick.exit_code == 0, quick.output
    assert "report:" not in quick.output and not (plain / "report").exists()
    later = runner.invoke(app, ["report", str(plain), "-q"])
    assert later.exit_code == 0 and (plain / "report" / "index.html").is_file(), later.output
    usage = runner.invoke(
        app, [str(a) for a in [*common, "--out", tmp_path / "x", "--workers", -1]]
    )
    assert usage.exit_code == 2 and "greater than or equal to 0" in usage.output


# -- backends everywhere -------------------------------------------------------------------


def test_every_entry_point_refuses_an_unknown_backend_before_any_work(tmp_path):
    data = _demo(12)
    model = _Counting()
    units = pyneuron.UnitMasks.from_masks(np.random.default_rng(0).random((2, 12, 16, 16)) < 0.1)
    calls = {
        "explain": lambda: pyneuron.explain(units, data.store, backend="bogus"),
        "dissect": lambda: pyneuron.dissect(
            model, "inner.2", data.images, data.store, backend="bogus", progress=False
        ),
        "dissect_run": lambda: dissect_run(
            model, ["inner.2"], data.images, data.store, tmp_path / "r", backend="bogus"
        ),
        "null_baseline": lambda: pyneuron.null_baseline(
            units, data.store, backend="bogus", progress=False
        ),
        "explain_split": lambda: pyneuron.model.dissect.explain_split(
            units, data.store, backend="bogus", progress=False
        ),
    }
    for name, call in calls.items():
        with pytest.raises(PyneuronError, match="unknown backend 'bogus'"):
            call()
        assert model.seen == 0, name
    with pytest.raises(PyneuronError, match="mode='netdissect' runs in this process only"):
        pyneuron.explain(
            units, data.store, length=1, mode="netdissect", backend=pyneuron.RayBackend()
        )
