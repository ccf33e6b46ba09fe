"""SAM 3 as a segmenter (pyneuron.concepts.segmenters.Sam3Segmenter), on a tiny random
``Sam3Model`` saved to a folder and loaded back.

The adapter encodes each image once and each prompt once, then runs SAM 3's
prompt-dependent part per (image, concept) pair; the reference here is the model's full
forward, ``model(pixel_values=..., input_ids=..., attention_mask=...)``, one image and one
prompt at a time, from the processor's documented call. Tolerance: rtol 1e-5, atol 1e-6
on scores in [0, 1] (float32; batching pairs changes only the summation order).

SAM 3's own image processor (``Sam3ImageProcessor``) runs on torchvision, which CPU-only
machines with CUDA wheels cannot load; the tiny checkpoint's ``Sam3Processor`` holds a
PIL ``ViTImageProcessorPil`` with SAM 3's preprocessing rule instead (resize the whole
image to a square, rescale, normalise with mean = std = 0.5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyneuron import PyneuronError
from pyneuron.concepts.segment import segment
from pyneuron.concepts.segmenters import (
    CLIPSegSegmenter,
    Sam3Segmenter,
    Sam3Settings,
    as_segmenter,
    checkpoint_type,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Sam3Model"):
    pytest.skip("this transformers has no Sam3Model", allow_module_level=True)

from test_segment import clip_vocab, save_tiny_clipseg  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)
IMAGE_SIZE = 56  # 4 x 4 patches of 14: feature pyramid 16, 8, 4, 2


def save_tiny_sam3(path: Path) -> Path:
    """A tiny random SAM 3 (0.24 M parameters) and its processor saved to ``path``."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(4)
    vocab = clip_vocab()
    d = 32
    layers = dict(num_attention_heads=2, intermediate_size=64)
    config = transformers.Sam3Config(
        vision_config=dict(
            backbone_config=transformers.Sam3ViTConfig(
                hidden_size=d, num_hidden_layers=2, image_size=IMAGE_SIZE, patch_size=14,
                window_size=2, global_attn_indexes=[1], pretrain_image_size=28, **layers,
            ),
            fpn_hidden_size=d, backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        ),
        text_config=transformers.CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=d, projection_dim=d, num_hidden_layers=1,
            max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            **layers,
        ),
        geometry_encoder_config=dict(hidden_size=d, num_layers=1, **layers),
        detr_encoder_config=dict(hidden_size=d, num_layers=1, **layers),
        detr_decoder_config=dict(hidden_size=d, num_layers=1, num_queries=5, **layers),
        mask_decoder_config=dict(hidden_size=d, num_attention_heads=2),
    )  # fmt: skip
    transformers.Sam3Model(config).save_pretrained(path)
    processor = transformers.Sam3Processor(
        image_processor=ViTImageProcessorPil(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        ),
        tokenizer=transformers.CLIPTokenizer(vocab=vocab, merges=[]),
    )
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory) -> Path:
    return save_tiny_sam3(tmp_path_factory.mktemp("sam3"))


@pytest.fixture(scope="module")
def reference(sam3_dir):
    model = transformers.Sam3Model.from_pretrained(sam3_dir).eval()
    processor = transformers.Sam3Processor.from_pretrained(sam3_dir)
    return model, processor


def images(n: int, seed: int = 0) -> list[Image.Image]:
    """Random RGB images of varied sizes and aspect ratios, one grayscale."""
    rng = np.random.default_rng(seed)
    sizes = [(40, 50), (36, 36), (30, 64), (70, 20)]
    out = [
        Image.fromarray(rng.integers(0, 255, size=(*sizes[i % 4], 3), dtype=np.uint8))
        for i in range(n)
    ]
    if n > 1:
        out[1] = out[1].convert("L")
    return out


def full_forward(reference, image: Image.Image, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """The literal way: one image and one prompt through the processor (its image
    processor, as ``Sam3Processor(images=...)`` calls it, and its tokenizer) and the
    whole model. Returns (semantic map, instance map) by the documented rules."""
    model, processor = reference
    pixels = processor.image_processor(images=image.convert("RGB"), return_tensors="pt")
    text = processor(text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model(
            pixel_values=pixels["pixel_values"],
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
        )
    semantic = torch.sigmoid(out.semantic_seg[0, 0]).numpy()
    presence = torch.sigmoid(out.presence_logits[0, 0]).item()
    masks = torch.sigmoid(out.pred_masks[0]).numpy()
    instances = np.zeros_like(semantic)
    for q in range(masks.shape[0]):  # max over queries of score x mask, one at a time
        score = torch.sigmoid(out.pred_logits[0, q]).item() * presence
        instances = np.maximum(instances, score * masks[q])
    return semantic, instances


def test_adapter_equals_the_full_forward(sam3_dir, reference):
    segmenter = Sam3Segmenter.from_pretrained(str(sam3_dir), prompt_batch=3)
    assert segmenter.settings == Sam3Settings(prompt_batch=3)
    batch = images(3)
    concepts = ["cat", "red car", "sky", "cat"]  # a repeated concept gets the same map
    scores = segmenter(batch, concepts)
    assert scores.shape == (3, 4, 16, 16) and scores.dtype == np.float32
    assert 0 <= scores.min() and scores.max() <= 1
    for b, image in enumerate(batch):
        for k, concept in enumerate(concepts):
            expected, _ = full_forward(reference, image, concept)
            np.testing.assert_allclose(scores[b, k], expected, **TOL)
    np.testing.assert_array_equal(scores[:, 0], scores[:, 3])
    assert np.abs(scores[:, 0] - scores[:, 1]).max() > 1e-3  # the prompt matters
    assert np.abs(scores[0, 0] - scores[2, 0]).max() > 1e-3  # and the image


@pytest.mark.parametrize("prompt_batch", [1, 5, 64])
def test_instance_output_and_pair_batches(sam3_dir, reference, prompt_batch):
    segmenter = Sam3Segmenter.from_pretrained(
        str(sam3_dir), output="instances", prompt_batch=prompt_batch
    )
    batch = images(2, seed=1)
    concepts = ["dog", "tree", "a b"]
    scores = segmenter(batch, concepts)
    assert scores.shape == (2, 3, 16, 16)
    for b, image in enumerate(batch):
        for k, concept in enumerate(concepts):
            _, expected = full_forward(reference, image, concept)
            np.testing.assert_allclose(scores[b, k], expected, **TOL)


def test_one_image_encoding_per_call_and_one_text_encoding_per_prompt(sam3_dir):
    segmenter = Sam3Segmenter.from_pretrained(str(sam3_dir), prompt_batch=2)
    calls = {"vision": [], "text": [], "prompt": 0}
    model = segmenter.model
    model.vision_encoder.register_forward_hook(
        lambda m, args, out: calls["vision"].append(args[0].shape[0])
    )
    model.text_encoder.register_forward_hook(
        lambda m, args, kwargs, out: calls["text"].append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )

    def count_prompt_calls(module, args, kwargs, out):
        assert "pixel_values" not in kwargs and "input_ids" not in kwargs
        assert kwargs["vision_embeds"] is not None and kwargs["text_embeds"] is not None
        calls["prompt"] += 1

    model.register_forward_hook(count_prompt_calls, with_kwargs=True)
    batch = images(3)
    first = segmenter(batch, ["cat", "dog", "sky", "sea"])
    assert calls == {"vision": [3], "text": [4], "prompt": 6}  # 12 pairs / 2
    features, mask = segmenter.text_embeddings(["cat", "dog", "sky", "sea"])
    assert segmenter.text_embeddings(["cat", "dog", "sky", "sea"])[0] is features
    assert features.shape[:2] == mask.shape == (4, 32)
    again = segmenter(batch, ["cat", "dog", "sky", "sea"])
    assert calls["vision"] == [3, 3] and calls["text"] == [4]  # texts kept
    np.testing.assert_array_equal(again, first)
    other = segmenter(batch[:1], ["sea", "tree", "cat"])  # only "tree" is new
    assert calls["text"] == [4, 1]
    np.testing.assert_allclose(other[0, [0, 2]], first[0, [3, 0]], **TOL)


def test_loading_fingerprint_and_describe(sam3_dir, tmp_path):
    segmenter = Sam3Segmenter.from_pretrained(str(sam3_dir))
    assert checkpoint_type(str(sam3_dir)) == "sam3"
    loaded = as_segmenter(str(sam3_dir))  # a SAM 3 directory loads as SAM 3
    assert isinstance(loaded, Sam3Segmenter)
    assert loaded.fingerprint == segmenter.fingerprint and len(segmenter.fingerprint) == 32
    assert as_segmenter(segmenter) is segmenter
    clipseg = save_tiny_clipseg(tmp_path / "clipseg")  # any other directory stays CLIPSeg
    assert isinstance(as_segmenter(str(clipseg)), CLIPSegSegmenter)
    described = segmenter.describe()
    assert described["type"] == "Sam3Segmenter" and described["name"] == "sam3"
    assert described["models"] == {"sam3": str(sam3_dir)}
    assert described["settings"] == {"prompt": "{}", "output": "semantic", "prompt_batch": 8}
    assert described["dtype"] == "float32" and Sam3Segmenter.cli_name == "sam3"
    # outputs change with the prompt template, the output kind, the weights
    templated = Sam3Segmenter.from_pretrained(str(sam3_dir), prompt="a {}")
    instances = Sam3Segmenter.from_pretrained(str(sam3_dir), output="instances")
    assert len({segmenter.fingerprint, templated.fingerprint, instances.fingerprint}) == 3
    assert not np.allclose(templated(images(1), ["cat"]), segmenter(images(1), ["cat"]))
    with torch.no_grad():
        next(instances.model.parameters()).add_(1.0)
    changed = Sam3Segmenter(instances.model, instances.processor, instances.settings)
    assert changed.fingerprint != instances.fingerprint


def test_reduced_precision(sam3_dir):
    full = Sam3Segmenter.from_pretrained(str(sam3_dir))
    half = Sam3Segmenter.from_pretrained(str(sam3_dir), dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.fingerprint != full.fingerprint
    scores = half(images(2), ["cat", "dog"])
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, full(images(2), ["cat", "dog"]), atol=0.05)


def test_segment_end_to_end(sam3_dir):
    segmenter = Sam3Segmenter.from_pretrained(str(sam3_dir))
    batch = images(4)
    store = segment(batch, ["cat", "dog", "background"], segmenter, grid=8, progress=False)
    assert store.names == ["cat", "dog"] and store.grid.shape == (4, 8, 8)
    meta = store.metadata["segment"]["segmenter"]
    assert meta["type"] == "Sam3Segmenter" and meta["fingerprint"] == segmenter.fingerprint


def test_bad_settings_and_inputs(sam3_dir, tmp_path):
    with pytest.raises(PyneuronError, match="output must be 'semantic' or 'instances'"):
        Sam3Settings(output="boxes")
    with pytest.raises(PyneuronError, match="prompt_batch must be >= 1"):
        Sam3Settings(prompt_batch=0)
    with pytest.raises(PyneuronError, match="must contain"):
        Sam3Settings(prompt="a photo")
    segmenter = Sam3Segmenter.from_pretrained(str(sam3_dir))
    with pytest.raises(PyneuronError, match="more than SAM 3's 32"):
        segmenter(images(1), ["cat", "x" * 40])
    with pytest.raises(PyneuronError, match="no concepts given"):
        segmenter(images(1), [])
    with pytest.raises(PyneuronError, match="cannot load the SAM 3 model"):
        Sam3Segmenter.from_pretrained(str(tmp_path / "missing"))


def test_a_missing_torchvision_is_named(sam3_dir, tmp_path):
    """facebook/sam3's processor names Sam3ImageProcessor, which runs on torchvision."""
    import json
    import shutil

    folder = Path(shutil.copytree(sam3_dir, tmp_path / "sam3"))
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"] = {
        "image_processor_type": "Sam3ImageProcessor",
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }
    (folder / "processor_config.json").write_text(json.dumps(config))
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(PyneuronError, match="pip install torchvision"):
            Sam3Segmenter.from_pretrained(str(folder))
    else:  # with torchvision the real image processor loads and runs
        segmenter = Sam3Segmenter.from_pretrained(str(folder))
        assert type(segmenter.processor.image_processor).__name__ == "Sam3ImageProcessor"
        assert segmenter(images(1), ["cat"]).shape[:2] == (1, 1)
