"""Open-vocabulary segmentation: pyneuron.concepts.segment, vocabularies, segmenter adapters.

A stub segmenter (a plain function with known score maps) checks the whole path exactly;
tiny random CLIPSeg, Grounding DINO, OWLv2 and SAM models built from their config
classes, saved and loaded back by path, check the adapters against direct model calls.
Nothing is downloaded.
"""

from __future__ import annotations

import doctest
import importlib
import string
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyneuron import ConceptStore, PyneuronError, bilinear_resize
from pyneuron.concepts.segment import segment
from pyneuron.concepts.segmenters import (
    BoxSettings,
    CallableSegmenter,
    CLIPSegSegmenter,
    CLIPSegSettings,
    Detections,
    GroundingDinoSamSegmenter,
    Owlv2SamSegmenter,
)
from pyneuron.concepts.vocabulary import ConceptGroup, ConceptVocabulary, load_vocabulary

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

RNG = np.random.default_rng(0)


# -- the stub segmenter ------------------------------------------------------------------


class Stub:
    """Score maps looked up per image (by its mean pixel value) and concept name."""

    def __init__(self, table: dict[int, dict[str, np.ndarray]], shape: tuple[int, int]) -> None:
        self.table = table
        self.shape = shape
        self.calls: list[tuple[int, list[str]]] = []
        self.name = "stub"
        self.fingerprint = "stub-v1"

    def __call__(self, images: list[Image.Image], concepts: list[str]) -> np.ndarray:
        self.calls.append((len(images), list(concepts)))
        out = np.zeros((len(images), len(concepts), *self.shape), dtype=np.float32)
        for b, image in enumerate(images):
            assert image.mode == "RGB"
            maps = self.table[image_id(image)]
            for k, concept in enumerate(concepts):
                out[b, k] = maps.get(concept, 0.0)
        return out


def image_id(image: Image.Image) -> int:
    return int(np.asarray(image)[0, 0, 0])


def make_images(n: int, size: tuple[int, int] = (6, 5)) -> np.ndarray:
    """uint8 (n, H, W, 3); image i has value i in its first pixel (its id for the stub)."""
    images = RNG.integers(0, 255, size=(n, *size, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return images


def random_table(n: int, names: list[str], shape: tuple[int, int]) -> dict:
    return {i: {c: RNG.random(shape).astype(np.float32) for c in names} for i in range(n)}


GROUPS = [["sky", "grass", "background"], ["blue", "green", "other"]]


def expected_argmax(maps: dict[str, np.ndarray], group: list[str]) -> np.ndarray:
    stack = np.stack([maps[c] for c in group])
    labels = np.argmax(stack, axis=0)
    labels[stack.max(axis=0) <= 0] = -1
    return labels


# -- the whole path, exactly ---------------------------------------------------------------


def test_argmax_groups_fillers_and_metadata():
    n, grid = 4, (6, 5)
    stub = Stub(random_table(n, [c for g in GROUPS for c in g], grid), grid)
    store = segment(make_images(n), GROUPS, stub, grid=grid, batch_size=3, progress=False)

    assert store.names == ["sky", "grass", "blue", "green"]  # fillers are not stored
    assert store.categories == ["group1", "group1", "group2", "group2"]
    assert store.grid.shape == (n, *grid)
    # one call per batch, with every distinct concept of every group
    assert [c[0] for c in stub.calls] == [3, 1]
    assert stub.calls[0][1] == ["sky", "grass", "background", "blue", "green", "other"]
    for i in range(n):
        for group in GROUPS:
            labels = expected_argmax(stub.table[i], group)
            for k, concept in enumerate(group):
                if concept in ("background", "other"):
                    continue
                np.testing.assert_array_equal(store.mask(concept)[i], labels == k)
    # concepts of one group never overlap, concepts of different groups do
    assert not (store.mask("sky") & store.mask("grass")).any()
    assert (store.mask("sky") & store.mask("blue")).any()
    meta = store.metadata["segment"]
    assert store.metadata["source"] == "segment"
    assert meta["groups"] == [
        {"name": "group1", "concepts": GROUPS[0], "mode": "argmax"},
        {"name": "group2", "concepts": GROUPS[1], "mode": "argmax"},
    ]
    assert meta["segmenter"] == {"name": "stub", "fingerprint": "stub-v1"}
    assert meta["mode"] == "argmax" and meta["fillers"] == ["background", "other"]
    assert meta["grid"] == list(grid)


def test_resize_then_argmax():
    """Score maps are resized (Pillow bilinear) to the grid first, then argmaxed."""
    n, native, grid = 3, (9, 7), (4, 5)
    names = ["a", "b", "c"]
    stub = Stub(random_table(n, names, native), native)
    store = segment(make_images(n), names, stub, grid=grid, fillers=(), progress=False)
    for i in range(n):
        resized = bilinear_resize(np.stack([stub.table[i][c] for c in names]), *grid)
        labels = np.argmax(resized, axis=0)
        for k, concept in enumerate(names):
            np.testing.assert_array_equal(store.mask(concept)[i], labels == k)


def test_threshold_mode_and_group_override():
    n, grid = 3, (4, 4)
    names = ["dog", "cat", "background"]
    stub = Stub(random_table(n, names + ["red", "blue"], grid), grid)
    store = segment(
        make_images(n), names, stub, grid=grid, mode="threshold", threshold=0.4, progress=False
    )
    assert store.names == ["dog", "cat"]
    for i in range(n):
        for concept in ("dog", "cat"):
            np.testing.assert_array_equal(store.mask(concept)[i], stub.table[i][concept] > 0.4)
    assert (store.mask("dog") & store.mask("cat")).any()  # independent concepts may overlap

    vocab = ConceptVocabulary(
        (ConceptGroup("animals", names), ConceptGroup("colours", ["red", "blue"], "threshold"))
    )
    store = segment(make_images(n), vocab, stub, grid=grid, threshold=0.7, progress=False)
    assert store.categories == ["animals", "animals", "colours", "colours"]
    for i in range(n):
        labels = expected_argmax(stub.table[i], names)
        np.testing.assert_array_equal(store.mask("cat")[i], labels == 1)
        np.testing.assert_array_equal(store.mask("red")[i], stub.table[i]["red"] > 0.7)
    modes = [g["mode"] for g in store.metadata["segment"]["groups"]]
    assert modes == ["argmax", "threshold"]


def test_ties_and_unlabelled_pixels():
    grid = (2, 3)
    maps = {
        "a": np.array([[0.5, 0.0, 0.2], [0.0, 0.3, 0.3]], np.float32),
        "b": np.array([[0.5, 0.0, 0.1], [0.0, 0.3, 0.9]], np.float32),
    }
    stub = Stub({0: maps}, grid)
    store = segment(make_images(1), ["a", "b"], stub, grid=grid, progress=False)
    # ties go to the concept listed first; pixels where every score is 0 stay unlabelled
    assert store.mask("a")[0].tolist() == [[True, False, True], [False, True, False]]
    assert store.mask("b")[0].tolist() == [[False, False, False], [False, False, True]]


def test_image_sources_agree(tmp_path):
    n, grid = 3, (6, 5)
    images = make_images(n)
    stub = Stub(random_table(n, ["x", "y"], grid), grid)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(n):
        Image.fromarray(images[i]).save(folder / f"{i:03d}.png")
    from_array = segment(images, ["x", "y"], stub, grid=grid, progress=False)
    from_folder = segment(folder, ["x", "y"], stub, grid=grid, progress=False)
    from_pil = segment(
        [Image.fromarray(a) for a in images], ["x", "y"], stub, grid=grid, progress=False
    )
    from_files = segment(sorted(folder.iterdir()), ["x", "y"], stub, grid=grid, progress=False)
    for store in (from_folder, from_pil, from_files):
        for concept in ("x", "y"):
            np.testing.assert_array_equal(store.mask(concept), from_array.mask(concept))
    assert from_folder.metadata["segment"]["images"] == ["000.png", "001.png", "002.png"]
    assert from_array.metadata["segment"]["images"] is None


def test_grayscale_images_are_converted(tmp_path):
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "gray.png")
    stub = Stub({0: {"x": np.ones((5, 5), np.float32)}}, (5, 5))
    store = segment(tmp_path, ["x"], stub, grid=5, progress=False)
    assert store.mask("x").all()


def test_store_written_to_disk(tmp_path):
    n, grid = 3, (4, 4)
    stub = Stub(random_table(n, ["x", "y", "other"], grid), grid)
    out = tmp_path / "store"
    store = segment(make_images(n), ["x", "y", "other"], stub, grid=grid, out=out, progress=False)
    reopened = ConceptStore.open(out)
    assert reopened.names == ["x", "y"]
    np.testing.assert_array_equal(reopened.mask("x"), store.mask("x"))
    assert reopened.metadata["segment"]["groups"][0]["concepts"] == ["x", "y", "other"]
    with pytest.raises(FileExistsError):
        segment(make_images(n), ["x", "y"], stub, grid=grid, out=out, progress=False)
    segment(make_images(n), ["x"], stub, grid=grid, out=out, overwrite=True, progress=False)
    assert ConceptStore.open(out).names == ["x"]


# -- cache ---------------------------------------------------------------------------------


def test_cache_skips_the_segmenter_on_rerun(tmp_path):
    n, grid = 5, (4, 4)
    names = ["x", "y", "background"]
    stub = Stub(random_table(n, names + ["z"], grid), grid)
    images = make_images(n)
    kwargs = dict(grid=grid, batch_size=2, cache_dir=tmp_path / "cache", progress=False)
    first = segment(images, names, stub, **kwargs)
    assert sum(c[0] for c in stub.calls) == n
    stub.calls.clear()
    second = segment(images, names, stub, **kwargs)
    assert stub.calls == []
    for concept in ("x", "y"):
        np.testing.assert_array_equal(first.mask(concept), second.mask(concept))
    # changing fillers does not need the segmenter again (fillers apply when writing)
    third = segment(images, names, stub, fillers=(), **kwargs)
    assert stub.calls == [] and third.names == names
    # a lost entry (an interrupted run) is recomputed alone
    entries = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(entries) == n
    entries[0].unlink()
    segment(images, names, stub, **kwargs)
    assert [c[0] for c in stub.calls] == [1]
    stub.calls.clear()
    # other concepts, grid, mode, threshold or segmenter fingerprint: recomputed
    segment(images, ["x", "z"], stub, **kwargs)
    segment(images, names, stub, **{**kwargs, "grid": (2, 2)})
    segment(images, names, stub, mode="threshold", **kwargs)
    stub.fingerprint = "stub-v2"
    segment(images, names, stub, **kwargs)
    assert sum(c[0] for c in stub.calls) == 4 * n


def test_cache_needs_a_fingerprint_for_plain_functions(tmp_path):
    def plain(images, concepts):
        return np.ones((len(images), len(concepts), 2, 2), np.float32)

    with pytest.raises(PyneuronError, match="fingerprint"):
        segment(make_images(1), ["x"], plain, grid=2, cache_dir=tmp_path, progress=False)
    plain.fingerprint = "plain-v1"
    store = segment(make_images(1), ["x"], plain, grid=2, cache_dir=tmp_path, progress=False)
    assert store.mask("x").all()
    wrapped = CallableSegmenter(lambda i, c: plain(i, c), name="mine", fingerprint="f")
    store = segment(make_images(1), ["x"], wrapped, grid=2, cache_dir=tmp_path, progress=False)
    assert store.metadata["segment"]["segmenter"]["name"] == "mine"


# -- bad input -------------------------------------------------------------------------------


def test_bad_concepts():
    stub = Stub({0: {}}, (2, 2))
    images = make_images(1)
    with pytest.raises(PyneuronError, match="empty"):
        segment(images, [], stub, progress=False)
    with pytest.raises(PyneuronError, match="empty"):
        segment(images, [["x"], []], stub, progress=False)
    with pytest.raises(PyneuronError, match="duplicate concept name 'x'"):
        segment(images, ["x", "y", "x"], stub, progress=False)
    with pytest.raises(PyneuronError, match="duplicate concept name 'x' in groups"):
        segment(images, [["x", "y"], ["x", "z"]], stub, progress=False)
    with pytest.raises(PyneuronError, match="only filler"):
        segment(images, [["x"], ["background"]], stub, progress=False)
    with pytest.raises(PyneuronError, match="not the string"):
        segment(images, "sky", stub, progress=False)
    with pytest.raises(PyneuronError, match="non-empty"):
        segment(images, ["x", " "], stub, progress=False)
    with pytest.raises(PyneuronError, match="mode"):
        segment(images, ["x"], stub, mode="softmax", progress=False)
    with pytest.raises(PyneuronError, match="grid"):
        segment(images, ["x"], stub, grid=0, progress=False)
    with pytest.raises(PyneuronError, match="batch_size"):
        segment(images, ["x"], stub, batch_size=0, progress=False)
    # a filler listed in two groups is fine: it is never stored
    segment(images, [["x", "other"], ["y", "other"]], Stub({0: {}}, (2, 2)), grid=2, progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_image_names_the_file_and_writes_nothing(tmp_path, workers):
    folder = tmp_path / "images"
    folder.mkdir()
    images = make_images(4)
    for i in range(4):
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    (folder / "2.png").write_bytes(b"this is not a png")
    stub = Stub(random_table(4, ["x"], (3, 3)), (3, 3))
    out = tmp_path / "store"
    with pytest.raises(PyneuronError, match=r"cannot decode image .*2\.png"):
        segment(folder, ["x"], stub, grid=3, batch_size=1, out=out, workers=workers,
                progress=False)  # fmt: skip
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [folder]  # no staging directory left behind either


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_keeps_the_images_done_before_a_decode_error(tmp_path, workers):
    folder = tmp_path / "images"
    folder.mkdir()
    images = make_images(4)
    for i in range(4):
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    good = (folder / "2.png").read_bytes()
    (folder / "2.png").write_bytes(b"broken")
    stub = Stub(random_table(4, ["x"], (3, 3)), (3, 3))
    kwargs = dict(grid=3, batch_size=1, cache_dir=tmp_path / "cache", workers=workers,
                  progress=False)  # fmt: skip
    with pytest.raises(PyneuronError, match=r"2\.png"):
        segment(folder, ["x"], stub, **kwargs)
    assert [c[0] for c in stub.calls] == [1, 1]  # images 0 and 1, cached
    (folder / "2.png").write_bytes(good)
    stub.calls.clear()
    store = segment(folder, ["x"], stub, **kwargs)
    assert [c[0] for c in stub.calls] == [1, 1]  # only images 2 and 3
    assert store.metadata["segment"]["skipped"] == []


@pytest.mark.parametrize("workers", [0, 2])
def test_on_error_skip(tmp_path, workers):
    folder = tmp_path / "images"
    folder.mkdir()
    images = make_images(3)
    for i in range(3):
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    (folder / "1.png").write_bytes(b"broken")
    table = {i: {"x": np.ones((3, 3), np.float32)} for i in range(3)}
    with pytest.warns(RuntimeWarning, match=r"skipping image 1: cannot decode image .*1\.png"):
        store = segment(folder, ["x"], Stub(table, (3, 3)), grid=3, on_error="skip",
                        workers=workers, progress=False)  # fmt: skip
    assert store.images_with("x").tolist() == [0, 2]
    [skipped] = store.metadata["segment"]["skipped"]
    assert skipped["image"] == 1 and skipped["file"] == "1.png"
    assert "cannot decode" in skipped["error"]
    with pytest.raises(PyneuronError, match="on_error"):
        segment(folder, ["x"], Stub(table, (3, 3)), on_error="ignore", progress=False)


def test_bad_segmenter_outputs():
    images = make_images(2)

    def wrong_shape(images, concepts):
        return np.zeros((len(images), len(concepts) + 1, 2, 2), np.float32)

    def nan(images, concepts):
        return np.full((len(images), len(concepts), 2, 2), np.nan, np.float32)

    def list_of_wrong(images, concepts):
        return [np.zeros((2, 2), np.float32) for _ in images]

    with pytest.raises(PyneuronError, match="expected"):
        segment(images, ["x"], wrong_shape, progress=False)
    with pytest.raises(PyneuronError, match="NaN"):
        segment(images, ["x"], nan, progress=False)
    with pytest.raises(PyneuronError, match="expected"):
        segment(images, ["x"], list_of_wrong, progress=False)
    with pytest.raises(PyneuronError, match="segmenter must be"):
        segment(images, ["x"], 42, progress=False)
    with pytest.raises(PyneuronError, match="uint8"):
        segment(images.astype(np.float32), ["x"], nan, progress=False)


def test_per_image_sizes_are_accepted():
    """A segmenter may return one (K, h_i, w_i) array per image (e.g. at image size)."""

    def per_image(images, concepts):
        return [np.full((len(concepts), im.height, im.width), 0.5, np.float32) for im in images]

    pil = [Image.new("RGB", (7, 3)), Image.new("RGB", (4, 9))]
    store = segment(pil, ["x"], per_image, grid=4, progress=False)
    assert store.mask("x").all()


# -- vocabularies ------------------------------------------------------------------------------


def test_vocabulary_text_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text(
        "# parts of things\n[parts]\nwheel\ndoor  # a comment\nbackground\n\n\n"
        "red wheel\nblue wheel\n\n[colours]\nred\n"
    )
    vocab = load_vocabulary(path)
    assert [(g.name, g.concepts) for g in vocab] == [
        ("parts", ("wheel", "door", "background")),
        ("group2", ("red wheel", "blue wheel")),
        ("colours", ("red",)),
    ]
    assert ConceptVocabulary.of(path) == vocab
    assert ConceptVocabulary.of(str(path)) == vocab
    (tmp_path / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(PyneuronError, match=r"dup.txt:1: .*duplicate concept name 'a'"):
        load_vocabulary(tmp_path / "dup.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(PyneuronError, match="lists no concepts"):
        load_vocabulary(tmp_path / "empty.txt")
    with pytest.raises(PyneuronError, match="does not exist"):
        load_vocabulary(tmp_path / "missing.txt")


def test_vocabulary_toml_file(tmp_path):
    path = tmp_path / "vocab.toml"
    path.write_text(
        '[groups]\nparts = ["wheel", "door"]\n\n'
        '[groups.colours]\nconcepts = ["red", "blue"]\nmode = "threshold"\n'
    )
    vocab = load_vocabulary(path)
    assert vocab.groups == (
        ConceptGroup("parts", ("wheel", "door")),
        ConceptGroup("colours", ("red", "blue"), "threshold"),
    )
    (tmp_path / "bad.toml").write_text('[groups]\nparts = ["a"]\n[groups.c]\nmode = "soft"\n')
    with pytest.raises(PyneuronError, match="concepts must be a list"):
        load_vocabulary(tmp_path / "bad.toml")
    (tmp_path / "bad2.toml").write_text('[groups.c]\nconcepts = ["a"]\nmode = "soft"\n')
    with pytest.raises(PyneuronError, match="mode must be one of"):
        load_vocabulary(tmp_path / "bad2.toml")
    (tmp_path / "bad3.toml").write_text("parts = [1, 2\n")
    with pytest.raises(PyneuronError, match="not valid TOML"):
        load_vocabulary(tmp_path / "bad3.toml")
    (tmp_path / "bad4.toml").write_text('parts = ["a"]\n')
    with pytest.raises(PyneuronError, match=r"\[groups\] table"):
        load_vocabulary(tmp_path / "bad4.toml")


def test_segment_reads_a_vocabulary_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[things]\nx\ny\nother\n\n[colours]\nz\nbackground\n")
    stub = Stub(random_table(2, ["x", "y", "z", "other", "background"], (3, 3)), (3, 3))
    store = segment(make_images(2), path, stub, grid=3, progress=False)
    assert store.names == ["x", "y", "z"]
    assert store.categories == ["things", "things", "colours"]


@pytest.mark.parametrize(
    "name",
    [
        "pyneuron.concepts.segment",
        "pyneuron.concepts.vocabulary",
        "pyneuron.concepts.segmenters",
    ],
)
def test_docstring_examples(name):
    result = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0
    assert result.failed == 0


# -- tiny random transformers models -------------------------------------------------------------


def clip_vocab(first: str | None = None) -> dict[str, int]:
    """A byte-level BPE vocabulary of single letters (no merges): a word is its letters."""
    vocab = {first: 0} if first else {}
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return vocab


def pil_images(n: int, sizes=((40, 50), (36, 36), (30, 44))) -> list[Image.Image]:
    return [
        Image.fromarray(RNG.integers(0, 255, size=(*sizes[i % len(sizes)], 3), dtype=np.uint8))
        for i in range(n)
    ]


def save_tiny_clipseg(path: Path) -> Path:
    """A tiny random CLIPSeg model and its processor saved to ``path`` (returned)."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    vocab = clip_vocab()
    config = transformers.CLIPSegConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=16, reduce_dim=16, extract_layers=[0, 1, 2],
        decoder_num_attention_heads=2, decoder_intermediate_size=20,
        use_complex_transposed_convolution=True,
    )  # fmt: skip
    model = transformers.CLIPSegForImageSegmentation(config)
    with torch.no_grad():  # random init saturates the sigmoid; keep logits moderate
        for parameter in model.decoder.transposed_convolution.parameters():
            parameter.mul_(0.2)
    model.save_pretrained(path)
    processor = transformers.CLIPSegProcessor(
        image_processor=ViTImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=transformers.CLIPTokenizer(vocab=vocab, merges=[]),
    )
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clipseg_dir(tmp_path_factory) -> Path:
    return save_tiny_clipseg(tmp_path_factory.mktemp("clipseg"))


def test_clipseg_adapter_equals_the_model(clipseg_dir):
    segmenter = CLIPSegSegmenter.from_pretrained(str(clipseg_dir), decoder_batch=4)
    images = pil_images(3)
    concepts = ["cat", "dog", "sky"]
    scores = segmenter(images, concepts)
    assert scores.shape == (3, 3, 16, 16) and scores.dtype == np.float32
    assert 0 <= scores.min() and scores.max() <= 1
    # the model called the documented way: each image once per concept
    model = transformers.CLIPSegForImageSegmentation.from_pretrained(clipseg_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(clipseg_dir)
    for b, image in enumerate(images):
        inputs = processor(text=concepts, images=[image] * 3, padding=True, return_tensors="pt")
        with torch.no_grad():
            expected = torch.sigmoid(model(**inputs).logits).numpy()
        np.testing.assert_allclose(scores[b], expected, rtol=1e-4, atol=1e-5)
    # the decoder batch does not change results
    one_pair = CLIPSegSegmenter(
        segmenter.model, segmenter.processor, CLIPSegSettings(decoder_batch=1)
    )
    single = one_pair(images[:1], ["cat"])
    np.testing.assert_allclose(single[0, 0], scores[0, 0], rtol=1e-4, atol=1e-5)
    # the text conditionals are computed once per concept list
    assert segmenter.conditional_embeddings(concepts) is segmenter.conditional_embeddings(concepts)
    # the prompt template reaches the text encoder
    templated = CLIPSegSegmenter.from_pretrained(str(clipseg_dir), prompt="a {}")
    assert templated.fingerprint != segmenter.fingerprint
    assert not np.allclose(templated(images[:1], ["cat"])[0, 0], scores[0, 0])


def test_reduced_precision(clipseg_dir, grounding_dino_dir, sam_dir):
    """The half-precision path (float16 is the default on GPUs) runs: bfloat16 on the CPU."""
    images = pil_images(2)
    full = CLIPSegSegmenter.from_pretrained(str(clipseg_dir))
    half = CLIPSegSegmenter.from_pretrained(str(clipseg_dir), dtype="bfloat16")
    assert full.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert half.fingerprint != full.fingerprint
    scores = half(images, ["cat", "dog"])
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, full(images, ["cat", "dog"]), atol=0.05)
    boxes = GroundingDinoSamSegmenter.from_pretrained(
        str(grounding_dino_dir), str(sam_dir), dtype="bfloat16"
    )
    maps = boxes(images, ["cat", "red car"])
    assert [m.dtype for m in maps] == [np.float32, np.float32]


def test_clipseg_segment_end_to_end(clipseg_dir, tmp_path):
    images = pil_images(5)
    out = tmp_path / "store"
    store = segment(
        images, [["cat", "dog", "background"], ["red", "blue"]], str(clipseg_dir), grid=16,
        batch_size=5, out=out, cache_dir=tmp_path / "cache", progress=False,
    )  # fmt: skip
    assert store.names == ["cat", "dog", "red", "blue"]
    assert store.grid.shape == (5, 16, 16)
    meta = ConceptStore.open(out).metadata["segment"]
    assert meta["segmenter"]["type"] == "CLIPSegSegmenter"
    assert meta["segmenter"]["dtype"] == "float32"
    assert len(meta["segmenter"]["fingerprint"]) == 32
    # every pixel of every image is labelled in each group (argmax; CLIPSeg scores > 0)
    group1 = store.mask("cat") | store.mask("dog")
    segmenter = CLIPSegSegmenter.from_pretrained(str(clipseg_dir))
    scores = segmenter(images, ["cat", "dog", "background", "red", "blue"])  # as segment() did
    assert 0 < scores.min() and scores.max() < 1
    resized = bilinear_resize(scores[:, :3], 16, 16)
    np.testing.assert_array_equal(group1, np.argmax(resized, axis=1) < 2)
    np.testing.assert_array_equal(
        store.mask("red") | store.mask("blue"), np.ones((5, 16, 16), bool)
    )
    # the rerun is served from the cache
    calls = []
    original = segmenter.__call__

    class Counting:
        name, fingerprint, describe = segmenter.name, segmenter.fingerprint, segmenter.describe

        def __call__(self, images, concepts):
            calls.append(len(images))
            return original(images, concepts)

    again = segment(
        images, [["cat", "dog", "background"], ["red", "blue"]], Counting(), grid=16,
        cache_dir=tmp_path / "cache", progress=False,
    )  # fmt: skip
    assert calls == []
    np.testing.assert_array_equal(again.mask("dog"), store.mask("dog"))


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory) -> Path:
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    torch.manual_seed(1)
    config = transformers.SamConfig(
        vision_config=dict(
            hidden_size=16, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
            image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=32,
            num_pos_feats=8,
        ),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=8,
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2,
                                 num_attention_heads=2, iou_head_hidden_dim=16),
    )  # fmt: skip
    path = tmp_path_factory.mktemp("sam")
    transformers.SamModel(config).save_pretrained(path)
    processor = transformers.SamProcessor(
        image_processor=SamImageProcessorPil(
            size={"longest_edge": 64},
            pad_size={"height": 64, "width": 64},
            mask_size={"longest_edge": 16},
            mask_pad_size={"height": 16, "width": 16},
        )  # fmt: skip
    )
    processor.save_pretrained(path)
    return path


GD_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "cat", "red", "car", "wheel",
            "##s", "background"]  # fmt: skip


@pytest.fixture(scope="module")
def grounding_dino_dir(tmp_path_factory) -> Path:
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("grounding-dino")
    (path / "words.txt").write_text("\n".join(GD_WORDS) + "\n")
    config = transformers.GroundingDinoConfig(
        backbone_config=dict(
            model_type="swin", embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
            window_size=4, image_size=64, out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=dict(
            model_type="bert", vocab_size=len(GD_WORDS), hidden_size=32, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=20, max_position_embeddings=64,
        ),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=20, decoder_ffn_dim=20,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20,
        max_text_len=12, encoder_n_points=2, decoder_n_points=2,
    )  # fmt: skip
    transformers.GroundingDinoForObjectDetection(config).save_pretrained(path)
    processor = transformers.GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(
            size={"shortest_edge": 64, "longest_edge": 96}
        ),
        tokenizer=transformers.BertTokenizer(vocab=str(path / "words.txt")),
    )
    processor.save_pretrained(path)
    return path


def select(scores: np.ndarray, boxes: np.ndarray, threshold: float, max_boxes: int):
    """Reference selection: per concept the best max_boxes boxes with score > threshold."""
    rows = []
    for k in range(scores.shape[1]):
        kept = [q for q in np.argsort(-scores[:, k], kind="stable") if scores[q, k] > threshold]
        rows += [(k, scores[q, k], boxes[q]) for q in kept[:max_boxes]]
    return rows


def assert_detections(found: Detections, rows) -> None:
    assert len(found) == len(rows)
    np.testing.assert_array_equal(found.labels, [r[0] for r in rows])
    np.testing.assert_allclose(found.scores, [r[1] for r in rows], rtol=1e-5)
    np.testing.assert_allclose(found.boxes, np.array([r[2] for r in rows]), rtol=1e-4, atol=1e-3)


def reference_sam_maps(sam_dir: Path, image: Image.Image, found: Detections, n_concepts: int):
    """SAM called the documented way: processor(images, input_boxes) -> model -> masks."""
    model = transformers.SamModel.from_pretrained(sam_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(sam_dir)
    maps = np.zeros((n_concepts, image.height, image.width), np.float32)
    if not len(found):
        return maps
    inputs = processor(images=[image], input_boxes=[found.boxes.tolist()], return_tensors="pt")
    inputs["input_boxes"] = inputs["input_boxes"].float()
    with torch.no_grad():
        masks = model(**inputs, multimask_output=False).pred_masks
    binary = processor.post_process_masks(
        masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )[0][:, 0].numpy()
    for j, k in enumerate(found.labels):
        maps[k] = np.maximum(maps[k], found.scores[j] * binary[j])
    return maps


def test_grounding_dino_sam_adapter_equals_the_models(grounding_dino_dir, sam_dir):
    segmenter = GroundingDinoSamSegmenter.from_pretrained(
        str(grounding_dino_dir), str(sam_dir), box_threshold=0.3, max_boxes=3, sam_batch=2
    )
    images = pil_images(2)
    concepts = ["cat", "red car", "wheels"]
    # prompt: "cat. red car. wheels." -> [CLS] cat . red car . wheel ##s . [SEP]
    [(prompt, positions)] = segmenter.prompts(concepts)
    assert prompt == "cat. red car. wheels."
    assert positions == [(0, [1]), (1, [3, 4]), (2, [6, 7])]
    found = segmenter.detect(images, concepts)

    model = transformers.GroundingDinoForObjectDetection.from_pretrained(grounding_dino_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(grounding_dino_dir)
    inputs = processor(images=images, text=[concepts] * 2, return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs)
    boxes = processor.post_process_grounded_object_detection(
        output, threshold=0.0, target_sizes=[(im.height, im.width) for im in images]
    )
    probs = torch.sigmoid(output.logits).numpy()
    for b in range(2):
        scores = np.stack([probs[b][:, t].max(-1) for t in ([1], [3, 4], [6, 7])], axis=1)
        assert_detections(found[b], select(scores, boxes[b]["boxes"].numpy(), 0.3, 3))
        assert len(found[b]) > 0

    maps = segmenter(images, concepts)
    assert [m.shape for m in maps] == [(3, 40, 50), (3, 36, 36)]
    for b in range(2):
        expected = reference_sam_maps(sam_dir, images[b], found[b], 3)
        np.testing.assert_array_equal(maps[b], expected)
        assert (maps[b] > 0).any()


def test_grounding_dino_prompt_chunks(grounding_dino_dir, sam_dir):
    """Concepts beyond max_text_len (12 tokens here) go into several prompts."""
    segmenter = GroundingDinoSamSegmenter.from_pretrained(str(grounding_dino_dir), str(sam_dir))
    concepts = ["cat", "red car", "wheels", "background", "red wheel", "car"]
    chunks = segmenter.prompts(concepts)
    assert len(chunks) > 1
    assert [k for _, positions in chunks for k, _ in positions] == list(range(6))
    found = segmenter.detect(pil_images(1), concepts)
    assert set(found[0].labels.tolist()) <= set(range(6))
    with pytest.raises(PyneuronError, match="separates concepts with '.'"):
        segmenter.prompts(["st. peter"])


def test_grounding_dino_segment_end_to_end(grounding_dino_dir, sam_dir):
    segmenter = GroundingDinoSamSegmenter.from_pretrained(
        str(grounding_dino_dir), str(sam_dir), max_boxes=2
    )
    store = segment(
        pil_images(3), ["cat", "red car", "background"], segmenter, grid=8, progress=False
    )
    assert store.names == ["cat", "red car"]
    assert store.metadata["segment"]["segmenter"]["settings"]["max_boxes"] == 2


@pytest.fixture(scope="module")
def owlv2_dir(tmp_path_factory) -> Path:
    pytest.importorskip("scipy", reason="OWLv2's image processor needs scipy (or torchvision)")
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    torch.manual_seed(3)
    vocab = clip_vocab(first="!")  # OWLv2 treats queries starting with token id 0 as padding
    config = transformers.Owlv2Config(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            image_size=32, patch_size=8,
        ),
        projection_dim=32,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("owlv2")
    transformers.Owlv2ForObjectDetection(config).save_pretrained(path)
    processor = transformers.Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=transformers.CLIPTokenizer(
            vocab=vocab, merges=[], pad_token="!", model_max_length=16
        ),
    )
    processor.save_pretrained(path)
    return path


def test_owlv2_sam_adapter_equals_the_models(owlv2_dir, sam_dir):
    segmenter = Owlv2SamSegmenter.from_pretrained(
        str(owlv2_dir), str(sam_dir), box_threshold=0.2, max_boxes=3
    )
    assert segmenter.settings == BoxSettings(box_threshold=0.2, max_boxes=3)
    images = pil_images(2)
    concepts = ["cat", "dog", "sky"]
    found = segmenter.detect(images, concepts)

    model = transformers.Owlv2ForObjectDetection.from_pretrained(owlv2_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(owlv2_dir)
    inputs = processor(text=[concepts] * 2, images=images, return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs)
    boxes = processor.post_process_grounded_object_detection(  # every box: score > -1
        output, threshold=-1.0, target_sizes=[(im.height, im.width) for im in images]
    )  # (with threshold 0, a box whose sigmoid score underflows to 0 would be dropped)
    scores = torch.sigmoid(output.logits).numpy()
    for b in range(2):
        assert len(boxes[b]["boxes"]) == scores.shape[1]  # every patch box is kept
        assert_detections(found[b], select(scores[b], boxes[b]["boxes"].numpy(), 0.2, 3))
        assert len(found[b]) > 0

    maps = segmenter(images, concepts)
    for b in range(2):
        assert maps[b].shape == (3, images[b].height, images[b].width)
        expected = reference_sam_maps(sam_dir, images[b], found[b], 3)
        np.testing.assert_array_equal(maps[b], expected)
        assert (maps[b] > 0).any()
    store = segment(images, concepts, segmenter, grid=8, mode="threshold", progress=False)
    assert store.names == concepts
    assert store.metadata["segment"]["segmenter"]["type"] == "Owlv2SamSegmenter"
