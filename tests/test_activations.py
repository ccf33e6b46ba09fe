"""Capturing activations: CNNs, a tiny random ViT loaded from disk, image sources, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import pyneuron
from pyneuron.model.activations import LayerFormat, capture, infer_prefix_tokens, to_maps


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 8, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 2),
    ).eval()


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)


def manual(model: torch.nn.Module, layer: str, batch: torch.Tensor) -> np.ndarray:
    store = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: store.setdefault("out", o)
    )
    with torch.no_grad():
        model(batch)
    handle.remove()
    return store["out"].numpy()


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)


def test_capture_matches_a_manual_hook_for_several_layers(images):
    model = small_cnn()
    acts = capture(model, ["1", "3"], images, batch_size=3, progress=False)
    assert acts["1"].shape == (10, 6, 8, 8) and acts["3"].shape == (10, 8, 4, 4)
    np.testing.assert_allclose(
        acts["1"], manual(model, "1", as_tensor(images)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        acts["3"], manual(model, "3", as_tensor(images)), rtol=1e-5, atol=1e-6
    )
    assert not any(m._forward_hooks for m in model.modules())


def test_every_image_source_gives_the_same_activations(images, tmp_path):
    model = small_cnn()
    expected = capture(model, "3", images, progress=False)["3"]
    pil = [Image.fromarray(x) for x in images]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, image in enumerate(pil):
        image.save(folder / f"{k:03d}.png")
    tensor = as_tensor(images)
    sources = [
        pil,
        folder,
        str(folder),
        DataLoader(TensorDataset(tensor, torch.zeros(10)), batch_size=4),
        DataLoader(tensor, batch_size=3),
        list(tensor),
        tensor.numpy(),
    ]
    for source in sources:
        np.testing.assert_allclose(
            capture(model, "3", source, progress=False)["3"], expected, rtol=1e-5, atol=1e-6
        )


def test_token_folding_places_token_i_j_at_row_i_column_j():
    b, h, w, d, prefix = 2, 3, 4, 5, 2
    tokens = torch.arange(b * (prefix + h * w) * d, dtype=torch.float32).reshape(b, -1, d)
    maps = to_maps(tokens, LayerFormat(prefix_tokens=prefix, grid=(h, w)))
    assert maps.shape == (b, d, h, w)
    for i in range(h):
        for j in range(w):
            assert torch.equal(maps[:, :, i, j], tokens[:, prefix + i * w + j, :])
    assert infer_prefix_tokens(197) == 1 and infer_prefix_tokens(261) == 5
    assert infer_prefix_tokens(49) == 0
    nhwc = torch.rand(2, 3, 4, 5)
    assert torch.equal(to_maps(nhwc, LayerFormat(channels_last=True)), nhwc.permute(0, 3, 1, 2))
    assert to_maps((torch.rand(2, 7),)).shape == (2, 7, 1, 1)


def test_tiny_vit_from_a_local_directory(tmp_path, images):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=16,
        patch_size=4,
        num_channels=3,
    )
    torch.manual_seed(0)
    transformers.ViTModel(config).save_pretrained(tmp_path / "vit")
    model = transformers.ViTModel.from_pretrained(tmp_path / "vit").eval()
    names = dict(model.named_modules())
    layer = "layers.1" if "layers.1" in names else "encoder.layer.1"  # transformers 5 vs 4
    acts = capture(model, layer, images, batch_size=4, progress=False)
    assert acts[layer].shape == (10, 32, 4, 4)
    with torch.no_grad():
        hidden = model(as_tensor(images), output_hidden_states=True).hidden_states[2]
    folded = hidden[:, 1:, :].reshape(10, 4, 4, 32).permute(0, 3, 1, 2).numpy()
    np.testing.assert_allclose(acts[layer], folded, rtol=1e-5, atol=1e-6)
    # The whole model returns a BaseModelOutput: its last_hidden_state is taken.
    whole = capture(model, "", images, progress=False)[""]
    with torch.no_grad():
        last = model(as_tensor(images)).last_hidden_state
    expected = last[:, 1:, :].reshape(10, 4, 4, 32).permute(0, 3, 1, 2).numpy()
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-6)


def test_low_precision_models():
    model = small_cnn()
    data = np.random.default_rng(2).random((4, 3, 16, 16), dtype=np.float32)
    reference = capture(model, "3", data, progress=False)["3"]
    for dtype in (torch.bfloat16, torch.float16):
        low = small_cnn().to(dtype)
        acts = capture(low, "3", data, progress=False)["3"]
        assert acts.dtype == np.float32
        np.testing.assert_allclose(acts, reference, atol=0.05)


def test_stream_to_disk_and_resume_after_an_interruption(images, tmp_path):
    model = small_cnn()
    expected = capture(model, "3", images, batch_size=3, progress=False)["3"]
    calls = {"n": 0}

    def crash_on_third(module, inputs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("power cut")

    handle = model[0].register_forward_pre_hook(crash_on_third)
    with pytest.raises(RuntimeError, match="power cut"):
        capture(model, "3", images, batch_size=3, out=tmp_path / "acts", progress=False)
    assert not model[2]._forward_hooks  # capture's hooks are gone after the error
    calls["n"] = 10
    resumed = capture(model, "3", images, batch_size=3, out=tmp_path / "acts", progress=False)
    handle.remove()
    assert calls["n"] == 12  # only the two remaining batches ran
    assert isinstance(resumed["3"], np.memmap)
    np.testing.assert_allclose(resumed["3"], expected, rtol=1e-5, atol=1e-6)


def test_bad_input(images, tmp_path):
    model = small_cnn()
    with pytest.raises(pyneuron.PyneuronError, match="no layer 'layer4'"):
        capture(model, "layer4", images, progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="did you mean '0.0'"):
        capture(torch.nn.Sequential(torch.nn.Sequential(torch.nn.ReLU())), "0.1", images)
    with pytest.raises(pyneuron.PyneuronError, match="different sizes"):
        capture(model, "3", [Image.new("RGB", (16, 16)), Image.new("RGB", (8, 8))], progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="no images"):
        capture(
            model,
            "3",
            DataLoader(TensorDataset(torch.zeros(0, 3, 16, 16)), batch_size=2),
            progress=False,
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(pyneuron.PyneuronError, match="no images"):
        capture(model, "3", tmp_path / "empty", progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (16, 16)).save(bad / "a.png")
    (bad / "b.png").write_bytes(b"not an image")
    with pytest.raises(pyneuron.PyneuronError, match="cannot decode image .*b.png"):
        capture(model, "3", bad, progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="batch_size"):
        capture(model, "3", images, batch_size=0)
