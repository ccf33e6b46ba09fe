"""Segmentation devices and image decoding in worker processes.

``device=``/``dtype=`` reach the segmenter from :func:`~pyneuron.concepts.segment`, the
segmenter spec parser and :func:`~pyneuron.concepts.sources.open_concepts`, and a device
this machine lacks is refused, naming those it has, before a model loads. With
``workers > 0`` image files are read and decoded by worker processes, and the store
written is byte for byte the one written without them, unreadable files included.
Everything runs on the CPU: a tiny random CLIPSeg (see ``test_segment.py``) stands in for
the real model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_segment import make_images, pil_images, save_tiny_clipseg

from pyneuron import ConceptStore, PyneuronError
from pyneuron.concepts import segmenters
from pyneuron.concepts.segment import segment
from pyneuron.concepts.segmenters import CLIPSegSegmenter
from pyneuron.concepts.sources import make_segmenter, open_concepts
from pyneuron.devices import available_devices, resolve_device, resolve_dtype, resolve_placement

torch = pytest.importorskip("torch")

GROUPS = [["cat", "dog", "background"], ["red", "blue"]]


def missing_devices() -> list[str]:
    """Devices of known kinds that this machine does not have."""
    missing = [f"cuda:{torch.cuda.device_count()}"]
    if not torch.cuda.is_available():
        missing.append("cuda")
    if not torch.backends.mps.is_available():
        missing.append("mps")
    return missing


@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory) -> Path:
    return save_tiny_clipseg(tmp_path_factory.mktemp("clipseg"))


# -- parsing devices and dtypes ---------------------------------------------------------------


def test_devices_are_parsed_and_checked():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device(" CPU ") == cpu
    assert resolve_device(cpu) == cpu
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert available_devices()[0] == "cpu"
    here = f"available here: {', '.join(available_devices())}"
    for unknown in ("tpu", "meta", "cuda:x", "", 1.5):
        with pytest.raises(PyneuronError, match="unknown device") as error:
            resolve_device(unknown)
        assert here in str(error.value)
    for missing in missing_devices():
        with pytest.raises(PyneuronError, match=f"device '{missing}' is not available") as error:
            resolve_device(missing)
        assert here in str(error.value)
        with pytest.raises(PyneuronError, match="is not available"):
            resolve_device(torch.device(missing))


def test_dtypes_are_parsed_and_checked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype(None, cuda) == torch.float16
    for name, dtype in [
        ("float32", torch.float32), ("fp32", torch.float32), ("float16", torch.float16),
        ("fp16", torch.float16), ("half", torch.float16), ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.half, torch.float16),
    ]:  # fmt: skip
        assert resolve_dtype(name, cpu) == dtype
    for bad in ("float64", "int8", torch.float64, torch.int8, 16):
        with pytest.raises(PyneuronError, match="unsupported dtype .*float32, float16 or bfloat16"):
            resolve_dtype(bad, cpu)
    assert resolve_placement("cpu", "bf16") == (cpu, torch.bfloat16)


# -- every entry point checks the device before a model loads ----------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    """Six PNG and JPEG images of different sizes (one grayscale) in a folder."""
    path = tmp_path / "images"
    path.mkdir()
    rng = np.random.default_rng(7)
    for i in range(6):
        pixels = rng.integers(0, 255, size=(20 + 3 * i, 30 - 2 * i, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if i == 4:
            image.convert("L").save(path / f"{i}.png")
        else:
            image.save(path / f"{i}.{'jpg' if i % 2 else 'png'}")
    return path


def test_a_missing_device_fails_before_the_model_loads(folder, tmp_path, monkeypatch):
    def load(*args):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(segmenters, "_pretrained", load)
    model = str(tmp_path / "model")
    vocabulary = tmp_path / "concepts.txt"
    vocabulary.write_text("cat\ndog\n")
    for device in ["tpu", *missing_devices()]:
        with pytest.raises(PyneuronError, match="device") as error:
            segment(folder, ["cat"], model, device=device, progress=False)
        assert "available here: cpu" in str(error.value)
        for spec in (None, model, f"clipseg:{model}", f"owlv2:{model},sam"):
            with pytest.raises(PyneuronError, match="available here: cpu"):
                make_segmenter(spec, device=device)
        with pytest.raises(PyneuronError, match="available here: cpu"):
            open_concepts(vocabulary, images=folder, segmenter=model, device=device)
    with pytest.raises(PyneuronError, match="unsupported dtype"):
        make_segmenter(f"grounding-dino:{model},sam", dtype="float64")
    with pytest.raises(AssertionError, match="a model was loaded"):
        make_segmenter(model, device="cpu", dtype="bfloat16")


def test_device_with_a_built_segmenter_is_refused(clipseg_dir):
    def flat(images, concepts):
        return np.full((len(images), len(concepts), 2, 2), 0.5, np.float32)

    images = make_images(2)
    with pytest.raises(PyneuronError, match="already built: give them when building it"):
        segment(images, ["x"], flat, device="cpu", progress=False)
    built = CLIPSegSegmenter.from_pretrained(str(clipseg_dir), device="cpu")
    with pytest.raises(
        PyneuronError, match=r"CLIPSegSegmenter is already built \(on cpu, in float32\)"
    ):
        segment(images, ["x"], built, dtype="bfloat16", progress=False)
    with pytest.raises(PyneuronError, match="segmenter must be"):
        segment(images, ["x"], 42, device="cpu", progress=False)


# -- reduced precision on the CPU ---------------------------------------------------------------


def test_clipseg_on_the_cpu_in_bfloat16(clipseg_dir, folder, tmp_path):
    out = tmp_path / "store"
    store = segment(
        folder, GROUPS, str(clipseg_dir), grid=16, out=out, device="cpu", dtype="bfloat16",
        progress=False,
    )  # fmt: skip
    reopened = ConceptStore.open(out)
    assert reopened.names == ["cat", "dog", "red", "blue"]
    assert reopened.grid.shape == (6, 16, 16)
    meta = reopened.metadata["segment"]
    assert meta["segmenter"]["dtype"] == "bfloat16" and meta["segmenter"]["device"] == "cpu"
    assert meta["skipped"] == [] and len(meta["image_keys"]) == 6
    # argmax over CLIPSeg's scores (all > 0): every pixel goes to one concept of a group
    assert not (store.mask("cat") & store.mask("dog")).any() and store.mask("dog").any()
    np.testing.assert_array_equal(store.mask("red") ^ store.mask("blue"), np.ones((6, 16, 16)))
    # the same store from the command line's entry point, decoding in worker processes
    (tmp_path / "concepts.txt").write_text("cat\ndog\nbackground\n\nred\nblue\n")
    again, files, built = open_concepts(
        tmp_path / "concepts.txt", images=folder, grid=16, segmenter=f"clipseg:{clipseg_dir}",
        device="cpu", dtype="bfloat16", workers=2, progress=False,
    )  # fmt: skip
    assert built and files == sorted(folder.iterdir())
    assert again.metadata["segment"]["segmenter"] == meta["segmenter"]
    for concept in store.names:
        np.testing.assert_array_equal(again.mask(concept), store.mask(concept))


def test_float16_runs_on_the_cpu(clipseg_dir):
    """Allowed (torch emulates it; slow but correct): close to float32."""
    images = pil_images(2)
    half = CLIPSegSegmenter.from_pretrained(str(clipseg_dir), device="cpu", dtype="float16")
    full = CLIPSegSegmenter.from_pretrained(str(clipseg_dir), device="cpu")
    assert half.dtype == torch.float16 and half.describe()["dtype"] == "float16"
    np.testing.assert_allclose(half(images, ["cat"]), full(images, ["cat"]), atol=0.02)


# -- decoding in worker processes ---------------------------------------------------------------


class PixelSegmenter:
    """Deterministic scores from the pixels: concept k scores channel k % 3 of the image."""

    name = "pixels"
    fingerprint = "pixels-v1"

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, images, concepts):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("segmenter failed")
        maps = []
        for image in images:
            pixels = np.asarray(image, dtype=np.float32) / 255
            maps.append(np.stack([pixels[..., k % 3] for k in range(len(concepts))]))
        return maps


def store_files(path: Path) -> dict[str, bytes]:
    files = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*")}
    return {name: data for name, data in files.items() if (path / name).is_file()}


def segment_to(out: Path, images, **options) -> ConceptStore:
    options = {"grid": 8, "batch_size": 2, "progress": False, **options}
    return segment(images, GROUPS, PixelSegmenter(), out=out, **options)


def test_workers_write_the_same_store(folder, tmp_path):
    segment_to(tmp_path / "serial", folder)
    segment_to(tmp_path / "workers", folder, workers=2)
    expected = store_files(tmp_path / "serial")
    assert len(expected) > 2 and store_files(tmp_path / "workers") == expected
    # cache entries written and then read back by the workers
    cache = {"cache_dir": tmp_path / "cache", "workers": 3}
    segment_to(tmp_path / "cached", folder, **cache)
    segmenter = PixelSegmenter()
    hits = segment(
        folder, GROUPS, segmenter, grid=8, out=tmp_path / "hits", progress=False, **cache
    )
    assert segmenter.calls == 0 and hits.names == ["cat", "dog", "red", "blue"]
    assert store_files(tmp_path / "cached") == store_files(tmp_path / "hits") == expected
    # images in memory are read here whatever the workers
    arrays = make_images(3)
    segment_to(tmp_path / "arrays-serial", arrays)
    segment_to(tmp_path / "arrays-workers", arrays, workers=2)
    assert store_files(tmp_path / "arrays-workers") == store_files(tmp_path / "arrays-serial")


def test_workers_and_unreadable_files(folder, tmp_path):
    (folder / "2.png").write_bytes(b"not a png")
    stores = {}
    for workers in (0, 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            segment_to(tmp_path / f"skip-{workers}", folder, on_error="skip", workers=workers)
        [warning] = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert str(warning.message).startswith("skipping image 2: cannot decode image")
        assert str(warning.message).endswith("2.png'")
        stores[workers] = store_files(tmp_path / f"skip-{workers}")
        out = tmp_path / f"raise-{workers}"
        with pytest.raises(PyneuronError, match=r"cannot decode image .*2\.png"):
            segment_to(out, folder, workers=workers)
        assert not out.exists()
    assert stores[2] == stores[0]
    [skipped] = ConceptStore.open(tmp_path / "skip-2").metadata["segment"]["skipped"]
    assert skipped["image"] == 2 and skipped["file"] == "2.png"


def test_workers_stop_with_a_failing_segmenter(folder):
    with pytest.raises(RuntimeError, match="segmenter failed"):
        segment(folder, GROUPS, PixelSegmenter(fail_on_call=2), grid=8, batch_size=1,
                workers=2, progress=False)  # fmt: skip


def test_workers_must_be_a_count():
    for bad in (-1, True, 1.5):
        with pytest.raises(PyneuronError, match="workers must be an integer >= 0"):
            segment(make_images(1), ["x"], PixelSegmenter(), workers=bad, progress=False)
