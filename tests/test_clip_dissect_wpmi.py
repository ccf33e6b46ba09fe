"""CLIP-Dissect leftovers: hard WPMI (``similarity="wpmi"``) and ``pool=`` for token layers.

Hard WPMI is checked against a literal port of CLIP-Dissect's ``similarity.wpmi`` (float32
torch, ``torch.topk`` on the CPU) and against a float64 numpy transcription with image-id
tie order, on random summaries with ties and dead (constant) units. The pools are checked
against the summary computed by hand from the layer's raw output (a forward hook), on a tiny
random ViT built from its config and on a small conv net.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyneuron
from pyneuron.describe import (
    SIMILARITIES,
    clip_dissect,
    concept_probabilities,
    similarity_defaults,
    similarity_matrix,
    soft_wpmi,
    wpmi,
)
from pyneuron.describe.clip_dissect import _capture_pooled
from pyneuron.describe.images import ImageList
from pyneuron.describe.similarity import similarity_name
from pyneuron.errors import PyneuronError

transformers = pytest.importorskip("transformers")

# -- references ---------------------------------------------------------------------------------


def clip_dissect_wpmi(clip_feats, target_feats, top_k=28, a=2, lam=0.6, min_prob=1e-7):
    """CLIP-Dissect's ``similarity.wpmi``, line by line (CPU, no tqdm / cuda calls)."""
    with torch.no_grad():
        clip_feats = torch.nn.functional.softmax(a * clip_feats, dim=1)
        inds = torch.topk(target_feats, dim=0, k=top_k)[1]
        prob_d_given_e = []
        for orig_id in range(target_feats.shape[1]):
            curr_clip_feats = clip_feats.gather(
                0, inds[:, orig_id : orig_id + 1].expand(-1, clip_feats.shape[1])
            )
            curr_p_d_given_e = torch.sum(torch.log(curr_clip_feats + min_prob), dim=0, keepdim=True)
            prob_d_given_e.append(curr_p_d_given_e)
        prob_d_given_e = torch.cat(prob_d_given_e, dim=0)
        prob_d = torch.logsumexp(prob_d_given_e, dim=0, keepdim=True) - torch.log(
            prob_d_given_e.shape[0] * torch.ones([1])
        )
        mutual_info = prob_d_given_e - lam * prob_d
    return mutual_info


def wpmi_float64(summary, probabilities, top_k, lam, min_prob=1e-7):
    """The formula in float64, ties in image-id order (a stable sort)."""
    n_units = summary.shape[1]
    given = np.empty((n_units, probabilities.shape[1]))
    for u in range(n_units):
        top = sorted(range(summary.shape[0]), key=lambda i: (-summary[i, u], i))[:top_k]
        given[u] = sum(np.log(probabilities[i].astype(np.float64) + min_prob) for i in top)
    prior = np.array(
        [math.log(sum(math.exp(v - given[:, d].max()) for v in given[:, d])) for d in
         range(given.shape[1])]
    ) + given.max(axis=0) - math.log(n_units)  # fmt: skip
    return given - lam * prior


def make_inputs(seed: int, n_images: int = 64, n_units: int = 14, n_concepts: int = 23):
    """Random summaries with ties (quantized units) and dead units, and CLIP cosines."""
    rng = np.random.default_rng(seed)
    summary = rng.normal(size=(n_images, n_units)).astype(np.float32)
    summary[:, 0] = 0.0  # dead
    summary[:, 1] = 1.5  # constant
    summary[:, 2] = np.round(summary[:, 2])  # many ties
    summary[:, 3] = np.maximum(summary[:, 3], 0.0)  # ReLU: ties at zero
    summary[: n_images // 2, 4] = 2.0  # more tied images than top_k
    sims = rng.uniform(0.1, 0.4, size=(n_images, n_concepts)).astype(np.float32)
    return summary, sims


# -- hard WPMI ------------------------------------------------------------------------------------


def test_wpmi_names_and_defaults():
    assert "wpmi" in SIMILARITIES
    assert {similarity_name(name) for name in ("wpmi", "hard_wpmi", "Hard-WPMI")} == {"wpmi"}
    assert similarity_defaults("wpmi") == (28, 0.5, 0.6)  # CLIP-Dissect: top_k=28, a=2, lam=0.6
    assert similarity_defaults("soft_wpmi") == (100, 0.1, 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wpmi_matches_clip_dissect_code(seed):
    summary, sims = make_inputs(seed)
    expected = clip_dissect_wpmi(torch.from_numpy(sims), torch.from_numpy(summary)).numpy()
    got = similarity_matrix(summary, sims, "wpmi", ties="torch")  # CLIP-Dissect's defaults
    # CLIP-Dissect sums 28 float32 logarithms (about -87 in all): float32 rounding
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    probabilities = concept_probabilities(sims, 0.5)
    np.testing.assert_array_equal(wpmi(summary, probabilities, ties="torch"), got)
    labels = got.argmax(axis=1)
    gaps = np.sort(expected, axis=1)[:, -1] - np.sort(expected, axis=1)[:, -2]
    clear = gaps > 1e-3
    np.testing.assert_array_equal(labels[clear], expected.argmax(axis=1)[clear])


@pytest.mark.parametrize("top_k, lam", [(28, 0.6), (5, 1.0), (1, 0.0), (500, 0.3)])
def test_wpmi_matches_float64_formula(top_k, lam):
    summary, sims = make_inputs(3)
    probabilities = concept_probabilities(sims, 0.5)
    expected = wpmi_float64(summary, probabilities, min(top_k, summary.shape[0]), lam)
    got = wpmi(summary, probabilities, top_k=top_k, lam=lam)  # ties="lowest"
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    via_matrix = similarity_matrix(summary, sims, "wpmi", top_k=top_k, lam=lam, temperature=0.5)
    np.testing.assert_array_equal(via_matrix, got)


def test_wpmi_is_soft_wpmi_with_certain_examples():
    summary, sims = make_inputs(4)
    probabilities = concept_probabilities(sims, 0.5)
    np.testing.assert_array_equal(
        wpmi(summary, probabilities, top_k=9, lam=0.6),
        soft_wpmi(summary, probabilities, top_k=9, lam=0.6, p_start=1.0, p_end=1.0),
    )


def test_wpmi_bad_input():
    summary, sims = make_inputs(5)
    with pytest.raises(PyneuronError, match="probabilities"):
        wpmi(summary, sims * 10)
    with pytest.raises(PyneuronError, match="top_k"):
        wpmi(summary, concept_probabilities(sims), top_k=0)
    with pytest.raises(PyneuronError, match="same probing images"):
        wpmi(summary[:-1], concept_probabilities(sims))


def test_clip_dissect_wpmi_uses_its_defaults():
    summary, sims = make_inputs(6)
    concepts = [f"c{i}" for i in range(sims.shape[1])]
    result = clip_dissect(
        None, "fc", None, concepts, similarity="hard-wpmi", activations=summary,
        clip_similarities=sims, ties="torch", return_matrix=True, progress=False,
    )  # fmt: skip
    assert result.details["similarity"] == "wpmi"
    assert (result.details["top_k"], result.details["temperature"], result.details["lam"]) == (
        28, 0.5, 0.6,
    )  # fmt: skip
    expected = clip_dissect_wpmi(torch.from_numpy(sims), torch.from_numpy(summary)).numpy()
    np.testing.assert_allclose(result.scores, expected, rtol=0, atol=1e-4)
    assert list(result.table["label"]) == [concepts[i] for i in result.scores.argmax(axis=1)]
    soft = clip_dissect(
        None, "fc", None, concepts, activations=summary, clip_similarities=sims, progress=False
    )
    assert (soft.details["top_k"], soft.details["temperature"], soft.details["lam"]) == (
        100, 0.1, 1.0,
    )  # fmt: skip


# -- pooling ------------------------------------------------------------------------------------


def tiny_vit() -> torch.nn.Module:
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def vit_block(model: torch.nn.Module) -> str:
    """The first encoder block's module name (``encoder.layer.0`` or ``layers.0``, by
    transformers version)."""
    return next(n for n, _ in model.named_modules() if n.endswith(("layer.0", "layers.0")))


def tiny_cnn() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3)
    ).eval()


def make_images(n: int = 9) -> np.ndarray:
    return np.random.default_rng(8).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)


def raw_output(model, layer, images) -> np.ndarray:
    """The layer's raw output on the images clip_dissect feeds it (hooked during capture)."""
    outputs = []

    def hook(_module, _inputs, output):
        tensor = output if isinstance(output, torch.Tensor) else output[0]
        outputs.append(tensor.detach().float().numpy().copy())

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    try:
        pyneuron.capture(model, layer, ImageList.of(images), batch_size=4, progress=False)
    finally:
        handle.remove()
    return np.concatenate(outputs)


def reference_summary(model, layer, images, pool) -> np.ndarray:
    raw = raw_output(model, layer, images)
    if raw.ndim == 3:  # ViT (B, 1 + 16 patches, C): token 0 is the class token
        assert raw.shape[1] == 17
        patches = raw[:, 1:, :]
        return {"mean": patches.mean(axis=1), "max": patches.max(axis=1), "cls": raw[:, 0, :]}[pool]
    flat = raw.reshape(raw.shape[0], raw.shape[1], -1)  # conv (B, C, h, w)
    return {"mean": flat.mean(axis=2), "max": flat.max(axis=2)}[pool]


@pytest.mark.parametrize(
    "net, layer, pool",
    [
        ("vit", None, "mean"),
        ("vit", None, "max"),
        ("vit", None, "cls"),
        ("cnn", "2", "mean"),
        ("cnn", "2", "max"),
    ],
)
def test_pools_equal_the_summary_of_the_raw_output(net, layer, pool):
    model = tiny_vit() if net == "vit" else tiny_cnn()
    layer = vit_block(model) if layer is None else layer
    images = make_images()
    expected = reference_summary(model, layer, images, pool)
    if pool != "mean":  # the capture path of max and cls: exact
        got = _capture_pooled(
            model, layer, ImageList.of(images), pool, transform=None, batch_size=4,
            device=None, progress=False,
        )  # fmt: skip
        assert got.shape == (*expected.shape, 1, 1)
        np.testing.assert_array_equal(got[:, :, 0, 0], expected)
    # end to end: the same scores as clip_dissect given the reference summary
    sims = np.random.default_rng(9).uniform(0.1, 0.4, size=(len(images), 6))
    concepts = [f"c{i}" for i in range(6)]
    common = dict(clip_similarities=sims, similarity="cos", return_matrix=True, progress=False)
    result = clip_dissect(model, layer, images, concepts, pool=pool, batch_size=4, **common)
    given = clip_dissect(None, layer, None, concepts, activations=expected, pool=pool, **common)
    assert result.details["pool"] == pool
    np.testing.assert_allclose(result.scores, given.scores, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(result.top_images, given.top_images)


def test_pool_of_given_maps():
    maps = np.random.default_rng(10).normal(size=(8, 3, 2, 3)).astype(np.float32)
    sims = np.random.default_rng(11).uniform(0.1, 0.4, size=(8, 4))
    concepts = ["a", "b", "c", "d"]
    common = dict(clip_similarities=sims, similarity="cos", return_matrix=True, progress=False)
    for pool, summary in (("mean", maps.mean(axis=(2, 3))), ("max", maps.max(axis=(2, 3)))):
        got = clip_dissect(None, "x", None, concepts, activations=maps, pool=pool, **common)
        want = clip_dissect(None, "x", None, concepts, activations=summary, **common)
        np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-6)
    # an (N, U) matrix is used as is, whatever the pool
    summary = maps[:, :, 0, 0]
    cls = clip_dissect(None, "x", None, concepts, activations=summary, pool="cls", **common)
    want = clip_dissect(None, "x", None, concepts, activations=summary, **common)
    np.testing.assert_array_equal(cls.scores, want.scores)
    with pytest.raises(PyneuronError, match="class token"):
        clip_dissect(None, "x", None, concepts, activations=maps, pool="cls", **common)


def test_pool_errors():
    images = make_images(4)
    sims = np.full((4, 2), 0.2)
    with pytest.raises(PyneuronError, match="token layer"):
        clip_dissect(
            tiny_cnn(), "2", images, ["a", "b"], clip_similarities=sims, pool="cls",
            progress=False,
        )  # fmt: skip
    with pytest.raises(PyneuronError, match="unknown pool"):
        clip_dissect(
            None, "x", None, ["a", "b"], activations=np.ones((4, 3)), clip_similarities=sims,
            pool="median", progress=False,
        )  # fmt: skip
