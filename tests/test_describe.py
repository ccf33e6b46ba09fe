"""Label-free describers: pyneuron.describe (CLIP-Dissect math, occlusion, DnD-lite, compare).

The math is checked against direct numpy computations on hand-made matrices; the model
paths run end to end on tiny random CLIP and BLIP models built from their configs, saved
to a temp dir and loaded back by path (nothing is downloaded).
"""

from __future__ import annotations

import doctest
import importlib
import json
import string
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import pyneuron
from pyneuron.app.describe import describe_command
from pyneuron.describe import (
    ClipEncoder,
    DescribeResult,
    activation_percentiles,
    activation_summary,
    agreement,
    candidate_descriptions,
    clip_dissect,
    compare,
    concept_probabilities,
    cos_cubed,
    cos_similarity,
    describe_and_dissect,
    driving_patches,
    formula_concepts,
    load_concepts,
    normalize,
    occlusion_describe,
    rank_reorder,
    similarity_matrix,
    soft_wpmi,
    soft_wpmi_weights,
    split,
    top_concepts,
)

transformers = pytest.importorskip("transformers")
RNG = np.random.default_rng(7)


# -- numpy oracles (literal transcriptions of the definitions) ------------------------------------


def stable_top(column: np.ndarray, k: int) -> list[int]:
    return sorted(range(len(column)), key=lambda i: (-column[i], i))[:k]


def soft_wpmi_oracle(
    summary, probabilities, k, lam=1.0, p_start=0.998, p_end=0.97, eps=1e-7, top=None
):
    """``top``: (k, U) top image ids, best first; default: ties to the lower image id."""
    n_units, n_concepts = summary.shape[1], probabilities.shape[1]
    weights = p_start - np.arange(k) / k * (p_start - p_end)
    log_given = np.zeros((n_units, n_concepts))
    for unit in range(n_units):
        order = stable_top(summary[:, unit], k) if top is None else top[:, unit]
        for rank, image in enumerate(order):
            log_given[unit] += np.log(1 + weights[rank] * (probabilities[image] - 1) + eps)
    prior = np.log(np.mean(np.exp(log_given), axis=0))
    return log_given - lam * prior


def cos_oracle(summary, sims):
    a = summary / np.linalg.norm(summary, axis=0)
    b = sims / np.linalg.norm(sims, axis=0)
    return a.T @ b


def cos3_oracle(summary, sims, min_norm=1e-3):
    def prep(x):
        x = (x - x.mean(axis=0)) ** 3
        return x / np.maximum(np.linalg.norm(x, axis=0), min_norm)

    return prep(summary).T @ prep(sims)


def rank_reorder_oracle(summary, sims, top_fraction=0.05, p=3.0, scale_p=0.5):
    n_images, n_units = summary.shape
    n = min(n_images, max(2, int(n_images * top_fraction)))
    out = np.zeros((n_units, sims.shape[1]))
    for unit in range(n_units):
        order = stable_top(summary[:, unit], n)
        top = summary[order, unit]
        ascending = top[::-1]
        base = np.mean(np.abs(ascending[:, None] - ascending[None, :]) ** p)
        for concept in range(sims.shape[1]):
            x = sims[order, concept]
            ranks = np.argsort(np.argsort(x, kind="stable"), kind="stable")
            error = np.mean(np.abs(top - ascending[ranks]) ** p)
            error = error / base if base > 0 else 0.0
            out[unit, concept] = -error / max(x.mean(), 1e-6) ** scale_p
    return out


def softmax(x, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# -- the math -------------------------------------------------------------------------------------


def test_soft_wpmi_weights_follow_clip_dissect():
    weights = soft_wpmi_weights(100)
    assert weights[0] == pytest.approx(0.998)
    assert weights[-1] == pytest.approx(0.998 - 0.99 * 0.028)  # 0.97028, as the paper's code
    assert np.all(np.diff(weights) < 0)


def test_soft_wpmi_known_answer():
    # unit 0 fires on images 0, 1 (where concept 0 is likely), unit 1 on images 4, 5 (concept 2)
    summary = np.array([[5, 0], [4, 0], [1, 1], [0, 1], [0, 4], [0, 5]], dtype=np.float32)
    uniform = [1 / 3, 1 / 3, 1 / 3]
    probabilities = np.array(
        [[0.8, 0.1, 0.1], [0.8, 0.1, 0.1], uniform, uniform, [0.1, 0.1, 0.8], [0.1, 0.1, 0.8]]
    )
    scores = soft_wpmi(summary, probabilities, top_k=2)
    assert scores.shape == (2, 3) and scores.dtype == np.float32
    assert scores.argmax(axis=1).tolist() == [0, 2]
    np.testing.assert_allclose(scores, soft_wpmi_oracle(summary, probabilities, 2), rtol=1e-5)
    # by hand: unit 0, concept 0: log P(d|E) = log(1 - .998*.2) + log(1 - .984*.2)
    weights = [0.998, 0.998 - 0.5 * 0.028]
    given = [sum(np.log(1 + w * (p - 1) + 1e-7) for w in weights) for p in (0.8, 0.1)]
    prior = np.log((np.exp(given[0]) + np.exp(given[1])) / 2)
    assert scores[0, 0] == pytest.approx(given[0] - prior, rel=1e-5)


@pytest.mark.parametrize("k", [1, 3, 7, 50])
@pytest.mark.parametrize("lam", [0.0, 1.0, 0.6])
def test_soft_wpmi_matches_numpy(k, lam):
    summary = RNG.normal(size=(30, 9)).astype(np.float32)
    summary[:5, 0] = 2.0  # ties in the top images: broken by image id
    probabilities = RNG.dirichlet(np.ones(11), size=30)
    expected = soft_wpmi_oracle(summary, probabilities, min(k, 30), lam=lam)
    got = soft_wpmi(summary, probabilities, top_k=k, lam=lam, block_bytes=4 * k * 11 * 2)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def test_soft_wpmi_ties_torch_takes_torch_topk_order():
    import torch

    summary = RNG.normal(size=(40, 6)).astype(np.float32)
    summary[:, 0] = 0.0  # a dead unit
    summary[:, 1] = 3.0  # a constant one
    summary[:, 2] = np.round(summary[:, 2])  # quantized
    probabilities = RNG.dirichlet(np.ones(7), size=40)
    top = torch.topk(torch.from_numpy(summary), 10, dim=0).indices.numpy()
    assert not (top == np.stack([stable_top(summary[:, u], 10) for u in range(6)], 1)).all()
    expected = soft_wpmi_oracle(summary, probabilities, 10, top=top)
    got = soft_wpmi(summary, probabilities, top_k=10, ties="torch")
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    lowest = soft_wpmi(summary, probabilities, top_k=10)
    np.testing.assert_allclose(lowest, soft_wpmi_oracle(summary, probabilities, 10), atol=2e-5)
    assert np.abs(got - lowest).max() > 1e-3  # through the prior, every unit moves
    sims = RNG.uniform(0.1, 0.3, size=(40, 7)).astype(np.float32)
    result = clip_dissect(
        None, "fc", None, [f"c{i}" for i in range(7)], activations=summary,
        clip_similarities=sims, top_k=10, ties="torch", progress=False,
    )  # fmt: skip
    shown = torch.topk(torch.from_numpy(summary), 5, dim=0).indices.numpy()
    np.testing.assert_array_equal(result.top_images, shown.T)
    assert result.details["ties"] == "torch"
    with pytest.raises(pyneuron.PyneuronError, match="ties"):
        similarity_matrix(summary, sims, ties="random")


def test_similarity_matrix_soft_wpmi_uses_the_temperature():
    summary = RNG.normal(size=(20, 4))
    sims = RNG.uniform(0.1, 0.35, size=(20, 6))
    np.testing.assert_allclose(
        concept_probabilities(sims, 0.1), softmax(sims / 0.1), rtol=1e-5, atol=1e-7
    )
    expected = soft_wpmi_oracle(summary, softmax(10 * sims), 5)
    got = similarity_matrix(summary, sims, "soft_wpmi", top_k=5)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    warmer = similarity_matrix(summary, sims, "soft-wpmi", top_k=5, temperature=0.05)
    np.testing.assert_allclose(
        warmer, soft_wpmi_oracle(summary, softmax(20 * sims), 5), rtol=2e-5, atol=2e-5
    )


def test_cos_and_cos3_match_numpy():
    summary = RNG.normal(size=(25, 5))
    sims = RNG.uniform(0.1, 0.35, size=(25, 7))
    np.testing.assert_allclose(cos_similarity(summary, sims), cos_oracle(summary, sims), atol=1e-5)
    np.testing.assert_allclose(cos_cubed(summary, sims), cos3_oracle(summary, sims), atol=1e-5)
    np.testing.assert_allclose(
        similarity_matrix(summary, sims, "cos_similarity_cubed"),
        cos3_oracle(summary, sims),
        atol=1e-5,
    )
    # a dead unit scores 0 rather than NaN
    summary[:, 2] = 0
    assert np.all(cos_similarity(summary, sims)[2] == 0)
    assert np.isfinite(cos_cubed(summary, sims)).all()


def test_rank_reorder_matches_numpy():
    summary = RNG.normal(size=(60, 4))
    sims = RNG.uniform(0.1, 0.35, size=(60, 9))
    for fraction in (0.05, 0.2, 1.0):
        np.testing.assert_allclose(
            rank_reorder(summary, sims, top_fraction=fraction, block_bytes=1000),
            rank_reorder_oracle(summary, sims, fraction),
            rtol=1e-4,
            atol=1e-6,
        )


def test_rank_reorder_prefers_a_concept_ordered_like_the_unit():
    summary = np.linspace(0, 1, 40)[:, None]
    sims = RNG.uniform(0.2, 0.3, size=(40, 5))
    sims[:, 3] = 0.2 + 0.1 * summary[:, 0]  # same order as the activations
    scores = similarity_matrix(summary, sims, "rank_reorder", top_fraction=0.25)
    assert scores[0, 3] == pytest.approx(0.0, abs=1e-7)
    assert scores.argmax(axis=1).tolist() == [3]


def test_top_concepts_order_and_ties():
    scores = np.array([[0.1, 0.5, 0.5, 0.2], [3.0, 1.0, 2.0, 3.0]])
    ids, values = top_concepts(scores, 3)
    assert ids.tolist() == [[1, 2, 3], [0, 3, 2]]
    np.testing.assert_allclose(values, [[0.5, 0.5, 0.2], [3.0, 3.0, 2.0]])
    assert top_concepts(scores, 99)[0].shape == (2, 4)


def test_activation_summary_is_the_spatial_mean():
    maps = RNG.normal(size=(7, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(activation_summary(maps), maps.mean(axis=(2, 3)), rtol=1e-6)
    np.testing.assert_allclose(activation_summary(maps, block=2), maps.mean(axis=(2, 3)), rtol=1e-6)
    assert activation_summary(maps[:, :, 0, 0]).shape == (7, 3)
    with pytest.raises(pyneuron.PyneuronError, match="images, units"):
        activation_summary(maps[0])


def planted_layer(n_per_class=20, classes=3, units=5, size=4):
    """Activation maps where unit 0 fires exactly on class-1 images, plus CLIP similarities
    that score each image's class name highest."""
    labels = np.repeat(np.arange(classes), n_per_class)
    n = len(labels)
    maps = RNG.uniform(0, 0.2, size=(n, units, size, size)).astype(np.float32)
    maps[:, 0] = 0.0
    maps[labels == 1, 0] = 1.0
    names = [f"class{c}" for c in range(classes)] + ["sky", "grass", "wood", "metal"]
    sims = RNG.uniform(0.18, 0.22, size=(n, len(names)))
    sims[np.arange(n), labels] = 0.3
    return maps, sims, names


@pytest.mark.parametrize("similarity", ["soft_wpmi", "cos", "cos3"])
def test_planted_unit_gets_its_class(similarity):
    maps, sims, names = planted_layer()
    result = clip_dissect(
        None, "layer", None, names, activations=maps, clip_similarities=sims,
        similarity=similarity, top_k=10, top_n=3, return_matrix=True, progress=False,
    )  # fmt: skip
    assert isinstance(result, DescribeResult)
    table = result.table
    assert list(table.columns[:8]) == [
        "layer", "unit", "method", "label", "score", "top_concepts", "top_scores", "top_images",
    ]  # fmt: skip
    assert table.loc[0, "label"] == "class1"
    assert split(table.loc[0, "top_concepts"])[0] == "class1"
    assert len(split(table.loc[0, "top_scores"])) == 3
    assert set(map(int, split(table.loc[0, "top_images"]))) <= set(range(20, 40))
    assert result.scores.shape == (5, len(names))
    assert table["method"].eq("clip-dissect").all() and table["similarity"].eq(similarity).all()


def test_planted_unit_subset_keeps_the_layer_prior():
    maps, sims, names = planted_layer()
    full = clip_dissect(
        None, "l", None, names, activations=maps, clip_similarities=sims, top_k=10,
        return_matrix=True, progress=False,
    )  # fmt: skip
    part = clip_dissect(
        None, "l", None, names, activations=maps, clip_similarities=sims, top_k=10,
        units=[0, 3], return_matrix=True, progress=False,
    )  # fmt: skip
    assert part.table["unit"].tolist() == [0, 3]
    np.testing.assert_array_equal(part.scores, full.scores[[0, 3]])


# -- tiny random models ----------------------------------------------------------------------------


def clip_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary of single letters (no merges): a word is its letters."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    vocab = clip_vocab()
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=16,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("clip")
    transformers.CLIPModel(config).save_pretrained(path)
    transformers.CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=transformers.CLIPTokenizer(vocab=vocab, merges=[]),
    ).save_pretrained(path)
    return path


BLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "dog", "cat", "red",
              "car", "on", "of", "sitting", "couch", "with", "blue", "sky", "tree", "picture",
              "grass", "green", "street", "house"]  # fmt: skip


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("blip")
    (path / "words.txt").write_text("\n".join(BLIP_WORDS) + "\n")
    tokenizer = transformers.BertTokenizer(str(path / "words.txt"))
    config = transformers.BlipConfig(
        text_config=dict(
            vocab_size=len(BLIP_WORDS), hidden_size=32, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
            encoder_hidden_size=32, bos_token_id=2, eos_token_id=3, pad_token_id=0,
            sep_token_id=3,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=16,
    )  # fmt: skip
    transformers.BlipForConditionalGeneration(config).save_pretrained(path)
    transformers.BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    ).save_pretrained(path)
    return path


def tiny_cnn() -> torch.nn.Module:
    torch.manual_seed(2)
    return torch.nn.Sequential(
        OrderedDict(
            conv1=torch.nn.Conv2d(3, 4, 3, stride=2, padding=1),
            relu1=torch.nn.ReLU(),
            conv2=torch.nn.Conv2d(4, 6, 3, stride=2, padding=1),
        )
    ).eval()


def make_images(n: int = 12, size: int = 32) -> np.ndarray:
    """Coloured squares on coloured backgrounds, uint8 (n, size, size, 3)."""
    rng = np.random.default_rng(3)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        images[i] = rng.integers(0, 255, size=3)
        y, x = rng.integers(0, size // 2, size=2)
        images[i, y : y + size // 2, x : x + size // 2] = rng.integers(0, 255, size=3)
    return images


CONCEPTS = ["dog", "cat", "red car", "sky", "grass"]


def test_clip_encoder_matches_the_model(clip_dir):
    encoder = ClipEncoder.load(str(clip_dir), batch_size=2)
    model = transformers.CLIPModel.from_pretrained(clip_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(clip_dir)
    images = [Image.fromarray(a) for a in make_images(3)]
    with torch.no_grad():
        inputs = processor(text=CONCEPTS, images=images, padding=True, return_tensors="pt")
        output = model(**inputs)
    np.testing.assert_allclose(
        encoder.encode_images(images), torch.nn.functional.normalize(output.image_embeds),
        atol=1e-5,
    )  # fmt: skip
    np.testing.assert_allclose(
        encoder.encode_texts(CONCEPTS), torch.nn.functional.normalize(output.text_embeds),
        atol=1e-5,
    )  # fmt: skip
    assert encoder.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    long = ["a very long description " * 5]  # longer than the 32 positions: truncated
    assert encoder.encode_texts(long).shape == (1, 16)


def test_clip_dissect_end_to_end(clip_dir, tmp_path):
    images = make_images()
    model = tiny_cnn()
    first = clip_dissect(
        model, "conv2", images, CONCEPTS, clip=str(clip_dir), top_k=4, top_n=2,
        return_matrix=True, progress=False,
    )  # fmt: skip
    assert len(first.table) == 6 and first.scores.shape == (6, 5)
    assert first.table["label"].isin(CONCEPTS).all()
    assert np.isfinite(first.table["score"]).all()
    again = clip_dissect(
        model, "conv2", images, CONCEPTS, clip=str(clip_dir), top_k=4, top_n=2, progress=False
    )
    pd.testing.assert_frame_equal(first.table, again.table)
    # the same from cached pieces: activations, CLIP image and text features, a folder
    encoder = ClipEncoder.load(str(clip_dir))
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    acts = pyneuron.capture(model, "conv2", images, progress=False)["conv2"]
    cached = clip_dissect(
        None, "conv2", folder, CONCEPTS, clip=encoder, top_k=4, top_n=2, activations=acts,
        image_features=encoder.encode_images([Image.fromarray(a) for a in images]),
        text_features=encoder.encode_texts(CONCEPTS), progress=False,
    )  # fmt: skip
    pd.testing.assert_frame_equal(first.table, cached.table, atol=1e-5)
    for name in ("cos", "cos3", "rank_reorder"):
        other = clip_dissect(
            model, "conv2", images, CONCEPTS, clip=encoder, similarity=name, progress=False
        )
        assert other.table["label"].isin(CONCEPTS).all()


def test_driving_patch_of_a_planted_unit():
    """A unit that sums the pixels: occluding the white square lowers it most."""
    model = torch.nn.Sequential(OrderedDict(conv=torch.nn.Conv2d(3, 1, 1, bias=False))).eval()
    with torch.no_grad():
        model.conv.weight.fill_(1.0)
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[0, 8:16, 16:24] = 255  # box (0.5, 0.25, 0.75, 0.5)
    images[1, 24:32, 0:8] = 255  # box (0, 0.75, 0.25, 1)
    from pyneuron.describe.images import ImageList

    boxes, drops = driving_patches(
        model, "conv", ImageList.of(images), np.array([0]), np.array([[0, 1]]),
        patch=0.25, stride=0.25, progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(boxes[0, 0], [0.5, 0.25, 0.75, 0.5])
    np.testing.assert_allclose(boxes[0, 1], [0.0, 0.75, 0.25, 1.0])
    assert np.all(drops > 0)


def test_occlusion_end_to_end(clip_dir):
    images = make_images(8)
    model = tiny_cnn()
    result = occlusion_describe(
        model, "conv2", images, CONCEPTS, clip=str(clip_dir), top_k=2, units=[0, 3, 5],
        progress=False,
    )  # fmt: skip
    table = result.table
    assert table["unit"].tolist() == [0, 3, 5]
    assert table["method"].eq("occlusion").all() and table["label"].isin(CONCEPTS).all()
    assert result.scores.shape == (3, 5)
    np.testing.assert_allclose(result.scores.sum(axis=1), 1.0, rtol=1e-5)  # mean probabilities
    boxes = result.details["boxes"]
    assert boxes.shape == (3, 2, 4) and boxes.min() >= 0 and boxes.max() <= 1
    assert len(split(table.loc[0, "boxes"])) == 2
    again = occlusion_describe(
        model, "conv2", images, CONCEPTS, clip=str(clip_dir), top_k=2, units=[0, 3, 5],
        progress=False,
    )  # fmt: skip
    pd.testing.assert_frame_equal(table, again.table)


def test_caption_candidates():
    assert candidate_descriptions(["a picture of a red car on the street", "red car"]) == [
        "red car", "red car on the street", "street",
    ]  # fmt: skip
    assert candidate_descriptions(["there is a dog sitting on a couch"] * 3) == [
        "dog sitting on a couch", "dog", "couch",
    ]  # fmt: skip
    assert candidate_descriptions(["", "a", "picture"]) == []
    assert (
        len(candidate_descriptions([f"thing{i} of place{i}" for i in range(30)], max_candidates=7))
        == 7
    )  # noqa: E501


def test_activation_percentiles():
    summary = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
    np.testing.assert_allclose(activation_percentiles(summary), [[0, 0.5], [1, 0.5], [0.5, 0.5]])


class PlantedEncoder(ClipEncoder):
    """CLIP stand-in: image i embeds as its class; a text embeds as the class it names."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        self.name = "planted"

    def encode_images(self, images, *, progress=False):
        return np.eye(3, dtype=np.float32)[self.labels[: len(images)]]

    def encode_texts(self, texts, *, progress=False):
        return np.stack([np.eye(3, dtype=np.float32)[int(t[-1]) % 3] + 0.01 for t in texts])


def test_dnd_ranks_candidates_by_retrieved_activation():
    labels = np.repeat([0, 1, 2], 6)
    images = make_images(18)
    images[labels == 1] = 250  # bright class: the summing unit fires on it
    images[labels != 1] //= 4
    model = torch.nn.Sequential(OrderedDict(conv=torch.nn.Conv2d(3, 1, 1, bias=False))).eval()
    with torch.no_grad():
        model.conv.weight.fill_(1.0)
    seen = []

    def captioner(pictures):
        seen.append(len(pictures))
        return ["a photo of thing0 and thing1", "thing2 with thing1"] * (len(pictures) // 2) + [
            "thing1"
        ] * (len(pictures) % 2)

    result = describe_and_dissect(
        model, "conv", images, clip=PlantedEncoder(labels), captioner=captioner, top_k=3,
        crops=False, retrieve=6, progress=False,
    )  # fmt: skip
    assert seen == [3]
    row = result.table.iloc[0]
    assert row["label"] == "thing1" and row["score"] == pytest.approx(
        activation_percentiles(activation_summary(
            pyneuron.capture(model, "conv", images, progress=False)["conv"]
        ))[labels == 1, 0].mean()
    )  # fmt: skip
    assert split(row["top_concepts"])[0] == "thing1"
    assert row["candidates"] == len(result.details["candidates"][0])


def test_dnd_end_to_end_with_blip(clip_dir, blip_dir):
    images = make_images(8)
    model = tiny_cnn()
    result = describe_and_dissect(
        model, "conv2", images, clip=str(clip_dir), captioner=str(blip_dir), top_k=2,
        units=[1, 4], max_candidates=5, extra_candidates=["red car"], progress=False,
    )  # fmt: skip
    table = result.table
    assert table["unit"].tolist() == [1, 4] and table["method"].eq("dnd").all()
    assert all(isinstance(c, str) for caps in result.details["captions"] for c in caps)
    assert all(len(caps) >= 2 for caps in result.details["captions"])  # images (+ crops)
    for candidates, label in zip(result.details["candidates"], table["label"], strict=True):
        assert "red car" in candidates and label in candidates
        assert len(candidates) <= 6
    assert table["score"].between(0, 1).all()
    again = describe_and_dissect(
        model, "conv2", images, clip=str(clip_dir), captioner=str(blip_dir), top_k=2,
        units=[1, 4], max_candidates=5, extra_candidates=["red car"], progress=False,
    )  # fmt: skip
    pd.testing.assert_frame_equal(table, again.table)


# -- comparison -----------------------------------------------------------------------------------


def test_normalize_and_formula_concepts():
    assert normalize("Red_Cars") == "red car"
    assert normalize("street-s") == normalize("Streets") == "street"
    assert normalize("boxes") == "box" and normalize("glass") == "glass"
    assert formula_concepts("((a OR b) AND NOT (c OR NOT d))") == (["a", "b", "d"], ["c"])


def test_agreement_cases():
    formula = "((water OR river-s) AND NOT blue-c)"
    assert agreement("River", formula) == ("exact", 1.0)
    assert agreement("rivers", formula) == ("exact", 1.0)
    assert agreement("calm water surface", formula) == ("words", pytest.approx(1 / 3))
    assert agreement("blue", formula) == ("negated", 0.0)
    assert agreement("cat", formula) == ("none", 0.0)
    kind, overlap = agreement(None, formula)
    assert kind is None and np.isnan(overlap)
    kind, overlap = agreement("river", float("nan"))
    assert kind is None and np.isnan(overlap)


def test_compare_tables():
    comp = pd.DataFrame(
        {
            "layer": ["l4", "l4", "l4", "l3"],
            "unit": [0, 1, 2, 0],
            "formula": ["(water OR river)", "grass AND NOT dog", None, "sky"],
            "iou": [0.2, 0.1, 0.0, 0.3],
        }
    )
    clip = pd.DataFrame(
        {"layer": ["l4"] * 3, "unit": [0, 1, 2], "method": "clip-dissect",
         "label": ["rivers", "dog", "cat"], "score": [1.0, 2.0, 3.0]}
    )  # fmt: skip
    dnd = DescribeResult(
        table=pd.DataFrame(
            {
                "layer": ["l4", "l3"],
                "unit": [1, 0],
                "method": "dnd",
                "label": ["green grass field", "blue sky"],
            }
        ),  # fmt: skip
        method="dnd",
    )
    table = compare(comp, [clip, dnd])
    assert list(table.columns) == [
        "layer", "unit", "formula", "iou",
        "clip-dissect", "clip-dissect_agreement", "clip-dissect_overlap",
        "dnd", "dnd_agreement", "dnd_overlap",
    ]  # fmt: skip
    rows = {(r.layer, r.unit): r for r in table.itertuples(index=False)}
    assert rows[("l4", 0)][5] == "exact" and rows[("l4", 0)][6] == 1.0
    assert rows[("l4", 1)][5] == "negated"
    assert pd.isna(rows[("l4", 2)][5])  # no formula
    assert rows[("l4", 1)][8] == "words" and rows[("l4", 1)][9] == pytest.approx(1 / 3)
    assert rows[("l3", 0)][8] == "words" and rows[("l3", 0)][9] == pytest.approx(0.5)
    assert pd.isna(rows[("l4", 0)][7]) and pd.isna(rows[("l4", 0)][8])  # no dnd label
    assert table.attrs["agreement_rate"] == {"clip-dissect": 0.5, "dnd": 1.0}
    with pytest.raises(pyneuron.PyneuronError, match="formula"):
        compare(comp.drop(columns="formula"), clip)


# -- bad input ------------------------------------------------------------------------------------


def test_bad_input(clip_dir):
    maps, sims, names = planted_layer()
    error = pyneuron.PyneuronError
    with pytest.raises(error, match="empty"):
        clip_dissect(None, "l", None, [], activations=maps, clip_similarities=sims[:, :0])
    with pytest.raises(error, match="duplicates"):
        clip_dissect(None, "l", None, ["a", "a"], activations=maps, clip_similarities=sims)
    with pytest.raises(error, match="7 concepts"):
        clip_dissect(None, "l", None, names, activations=maps, clip_similarities=sims[:, :5])
    with pytest.raises(error, match="text_features has 2 rows"):
        clip_dissect(
            None, "l", None, names, activations=maps, image_features=np.ones((60, 4)),
            text_features=np.ones((2, 4)),
        )  # fmt: skip
    with pytest.raises(error, match="same probing images"):
        clip_dissect(None, "l", None, names, activations=maps[:10], clip_similarities=sims)
    with pytest.raises(error, match="unknown similarity"):
        clip_dissect(None, "l", None, names, activations=maps, clip_similarities=sims,
                     similarity="dot")  # fmt: skip
    with pytest.raises(error, match="out of range"):
        clip_dissect(None, "l", None, names, activations=maps, clip_similarities=sims,
                     units=[99])  # fmt: skip
    with pytest.raises(error, match=r"\[0, 1\]"):
        soft_wpmi(maps.mean(axis=(2, 3)), softmax(sims) - 0.5)
    with pytest.raises(error, match="NaN"):
        bad = sims.copy()
        bad[0, 0] = np.nan
        clip_dissect(None, "l", None, names, activations=maps, clip_similarities=bad)
    with pytest.raises(error, match="no layer 'conv9'"):
        clip_dissect(tiny_cnn(), "conv9", make_images(4), CONCEPTS, clip=str(clip_dir))
    with pytest.raises(error, match="without downloading"):
        clip_dissect(tiny_cnn(), "conv2", make_images(4), CONCEPTS,
                     clip=str(clip_dir / "missing"), progress=False)  # fmt: skip
    with pytest.raises(error, match="empty"):
        occlusion_describe(tiny_cnn(), "conv2", make_images(4), [], clip=str(clip_dir))
    with pytest.raises(error, match="one string per image"):
        describe_and_dissect(tiny_cnn(), "conv2", make_images(4), clip=str(clip_dir),
                             captioner=lambda pictures: ["x"], crops=False,
                             progress=False)  # fmt: skip


def test_load_concepts(tmp_path):
    path = tmp_path / "concepts.txt"
    path.write_text("# header\ndog\n\n  red car \ncat\n")
    assert load_concepts(path) == ["dog", "red car", "cat"]
    path.write_text("dog\ncat\ndog\n")
    with pytest.raises(pyneuron.PyneuronError, match="duplicates"):
        load_concepts(path)
    path.write_text("\n# nothing\n")
    with pytest.raises(pyneuron.PyneuronError, match="no concepts"):
        load_concepts(path)
    with pytest.raises(pyneuron.PyneuronError, match="does not exist"):
        load_concepts(tmp_path / "missing.txt")


# -- the command ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def command_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("describe-command")
    (root / "net.py").write_text(
        "import torch\nfrom collections import OrderedDict\n\n"
        "def build():\n    torch.manual_seed(2)\n"
        "    return torch.nn.Sequential(OrderedDict(\n"
        "        conv1=torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), relu1=torch.nn.ReLU(),\n"
        "        conv2=torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)))\n"
    )
    folder = root / "images"
    folder.mkdir()
    for i, image in enumerate(make_images(8)):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    (root / "concepts.txt").write_text("\n".join(CONCEPTS) + "\n")
    return {"model": root / "net.py", "images": folder, "concepts": root / "concepts.txt"}


@pytest.mark.parametrize("method", ["clip-dissect", "occlusion", "dnd"])
def test_describe_command_writes_a_run(method, command_inputs, clip_dir, blip_dir, tmp_path):
    out = tmp_path / "run"
    args = dict(
        method=method, model=f"{command_inputs['model']}:build", layer=["conv1", "conv2"],
        images=command_inputs["images"], concepts=command_inputs["concepts"], out=out,
        clip=str(clip_dir), captioner=str(blip_dir), top_k=2, batch_size=4, image_size=32,
        overwrite=False, progress=False,
    )  # fmt: skip
    assert describe_command(**args) == out
    results = pd.read_parquet(out / "results.parquet")
    assert results.groupby("layer").size().to_dict() == {"conv1": 4, "conv2": 6}
    assert results["method"].eq("dnd" if method == "dnd" else method).all()
    assert pd.read_csv(out / "results.csv").shape == results.shape
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["n_images"] == 8
    assert "conv2" in summary["layers"] and "total" in summary["timings_seconds"]
    config = (out / "config.toml").read_text()
    assert f'"method" = "{method}"' in config and "image_files" in config
    with pytest.raises(FileExistsError):
        describe_command(**args)
    if method == "clip-dissect":
        describe_command(
            **{**args, "overwrite": True, "top_k": None}, similarity="cos", ties="torch"
        )
        again = pd.read_parquet(out / "results.parquet")
        assert again["similarity"].eq("cos").all()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["top_k"] == 100 and summary["ties"] == "torch"
        assert summary["pool"] == "mean"
        # hard WPMI takes CLIP-Dissect's own top_k (28) when none is given; pool=max is
        # the maximum of each unit's map
        describe_command(
            **{**args, "overwrite": True, "top_k": None}, similarity="hard-wpmi", pool="max"
        )
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["similarity"], summary["top_k"], summary["pool"]) == ("wpmi", 28, "max")
        assert pd.read_parquet(out / "results.parquet")["similarity"].eq("wpmi").all()


def test_describe_command_bad_input(command_inputs, clip_dir, tmp_path):
    args = dict(
        method="clip-dissect", model=f"{command_inputs['model']}:build", layer=["conv9"],
        images=command_inputs["images"], concepts=command_inputs["concepts"],
        out=tmp_path / "run", clip=str(clip_dir), captioner=None, top_k=2, batch_size=4,
        image_size=32, overwrite=False, progress=False,
    )  # fmt: skip
    error = pyneuron.PyneuronError
    with pytest.raises(error, match="no layer 'conv9'"):
        describe_command(**args)
    with pytest.raises(error, match="unknown method"):
        describe_command(**{**args, "method": "netdissect"})
    with pytest.raises(error, match="captioner"):
        describe_command(**{**args, "method": "dnd"})
    with pytest.raises(error, match="needs a concept list"):
        describe_command(**{**args, "concepts": None})
    with pytest.raises(error, match="unknown ties rule"):
        describe_command(**args, ties="stable")
    with pytest.raises(error, match="pool='cls' reads the layer's raw tokens"):
        describe_command(**args, pool="cls")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name",
    [
        "pyneuron.describe.similarity",
        "pyneuron.describe.images",
        "pyneuron.describe.result",
        "pyneuron.describe.clip_dissect",
        "pyneuron.describe.occlusion",
        "pyneuron.describe.dnd",
        "pyneuron.describe.compare",
        "pyneuron.app.describe",
    ],
)
def test_docstring_examples(name):
    result = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.failed == 0


def test_cli_describe_and_report_side_by_side(command_inputs, clip_dir, tmp_path):
    from typer.testing import CliRunner

    from pyneuron.app.cli import app

    runner = CliRunner()
    rng = np.random.default_rng(0)
    masks = rng.random((len(CONCEPTS), 8, 8, 8)) < 0.3
    pyneuron.ConceptStore.from_masks(masks, list(CONCEPTS)).save(tmp_path / "store")
    model = f"{command_inputs['model']}:build"
    common = ["--model", model, "--layer", "conv2", "--images", str(command_inputs["images"])]
    dissected = runner.invoke(
        app,
        [
            "dissect",
            *common,
            "--concepts",
            str(tmp_path / "store"),
            "--out",
            str(tmp_path / "run"),
            "--image-size",
            "32",
            "--length",
            "2",
            "--quiet",
        ],
    )
    assert dissected.exit_code == 0, dissected.output
    described = runner.invoke(
        app,
        [
            "describe",
            *common,
            "--concepts",
            str(command_inputs["concepts"]),
            "--clip",
            str(clip_dir),
            "--out",
            str(tmp_path / "desc"),
            "--top-k",
            "2",
            "--image-size",
            "32",
            "--quiet",
        ],
    )
    assert described.exit_code == 0, described.output
    report = runner.invoke(
        app, ["report", str(tmp_path / "run"), "--describe", str(tmp_path / "desc"), "--quiet"]
    )
    assert report.exit_code == 0, report.output
    comparison = pd.read_csv(tmp_path / "run" / "report" / "comparison.csv")
    assert len(comparison) == 6 and "clip-dissect" in comparison.columns
    page = next((tmp_path / "run" / "report" / "units").rglob("0.html")).read_text()
    assert "Label-free descriptions" in page and "clip-dissect" in page
