"""``segment(..., semantics="ovce")``: OVCE's mask rules, bit for bit.

The reference below is a literal transcription of those rules with torch, as OVCE's code
(aiea-lab/ovce) applies them: one segmenter call per concept group with that group's
concepts only (and one image per call), ``torch.argmax`` over the group's concepts at the
segmenter's output resolution, each concept's mask ``labels == k`` resized to the grid
with ``torch.nn.functional.interpolate(mask.float(), size=grid, mode="nearest").bool()``,
fillers zeroed (here: not stored). The segmenters are callables with known score maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from pyneuron import ConceptStore, PyneuronError
from pyneuron.concepts import sources
from pyneuron.concepts.distributed import segment_on_ray
from pyneuron.concepts.segment import SEMANTICS, segment
from pyneuron.concepts.vocabulary import ConceptGroup

torch = pytest.importorskip("torch")
F = torch.nn.functional

FILLERS = ("background", "other")


# -- segmenters with known score maps --------------------------------------------------------


def image_id(image: Image.Image) -> int:
    return int(np.asarray(image)[0, 0, 0])


def make_images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 6, 5, 3); image i has value i in its first pixel (its id)."""
    images = np.random.default_rng(seed).integers(0, 255, size=(n, 6, 5, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return images


class Maps:
    """Score maps looked up by image id and concept name; records its calls.

    With ``query_dependent``, the maps are logits: each call returns their softmax over
    the concepts queried in it, each map then scaled to a peak of 1 (so a concept's score
    depends on which other concepts are asked for with it, as in CAT-Seg).
    """

    def __init__(self, maps: dict[int, dict[str, np.ndarray]], query_dependent: bool = False):
        self.maps = maps
        self.query_dependent = query_dependent
        self.calls: list[tuple[int, list[str]]] = []
        self.name = "maps"
        self.fingerprint = f"maps-{query_dependent}"

    def __call__(self, images: list[Image.Image], concepts: list[str]) -> list[np.ndarray]:
        self.calls.append((len(images), list(concepts)))
        out = []
        for image in images:
            scores = np.stack([self.maps[image_id(image)][c] for c in concepts])
            if self.query_dependent:
                scores = np.exp(scores - scores.max(axis=0))
                scores /= scores.sum(axis=0)
                scores /= scores.max(axis=(1, 2), keepdims=True)
            out.append(scores.astype(np.float32))
        return out


def random_maps(
    n: int,
    names: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    seed: int,
    levels: int | None = None,
) -> dict[int, dict[str, np.ndarray]]:
    """Image i's maps of shape ``shapes[i % len(shapes)]``: uniform in [-0.2, 1), or with
    ``levels`` only that many distinct values (many ties). Image 0 scores 0 everywhere."""
    rng = np.random.default_rng(seed)
    table = {}
    for i in range(n):
        shape = shapes[i % len(shapes)]
        maps = {}
        for name in names:
            if levels is None:
                maps[name] = rng.uniform(-0.2, 1.0, shape).astype(np.float32)
            else:
                maps[name] = (rng.integers(0, levels, shape) / (levels - 1)).astype(np.float32)
            if i == 0:
                maps[name] = np.zeros(shape, np.float32)
        table[i] = maps
    return table


# -- the literal reference -------------------------------------------------------------------


def ovce_reference(
    segmenter: Maps,
    images: np.ndarray,
    groups: Sequence[Sequence[str]],
    grid: tuple[int, int],
    fillers: Sequence[str] = FILLERS,
) -> dict[str, np.ndarray]:
    """OVCE's masks: {stored concept: bool (N, *grid)}."""
    masks: dict[str, list[np.ndarray]] = {}
    for group in groups:
        for array in images:
            scores = segmenter([Image.fromarray(array)], list(group))[0]
            labels = torch.argmax(torch.from_numpy(scores).unsqueeze(0), dim=1)  # (1, h, w)
            for k, concept in enumerate(group):
                mask = labels == k
                mask = F.interpolate(mask.float().unsqueeze(0), size=grid, mode="nearest")
                mask = mask.bool().squeeze(0)
                if concept in fillers:
                    mask = torch.zeros_like(mask)
                masks.setdefault(concept, []).append(mask[0].numpy())
    return {c: np.stack(v) for c, v in masks.items() if c not in fillers}


def union_reference(
    segmenter: Maps, images: np.ndarray, groups: Sequence[Sequence[str]]
) -> dict[str, np.ndarray]:
    """pyneuron's masks where no resize happens: one call with every group's concepts,
    argmax per group (all scores > 0 here)."""
    queried = list(dict.fromkeys(c for g in groups for c in g))
    masks: dict[str, list[np.ndarray]] = {}
    for array in images:
        scores = segmenter([Image.fromarray(array)], queried)[0]
        for group in groups:
            labels = np.argmax(np.stack([scores[queried.index(c)] for c in group]), axis=0)
            for k, concept in enumerate(group):
                masks.setdefault(concept, []).append(labels == k)
    return {c: np.stack(v) for c, v in masks.items() if c not in FILLERS}


def assert_store_equals(store: ConceptStore, expected: dict[str, np.ndarray]) -> None:
    assert sorted(store.names) == sorted(expected)
    for concept, masks in expected.items():
        np.testing.assert_array_equal(store.mask(concept), masks, err_msg=concept)


def tie_count(maps: dict[int, dict[str, np.ndarray]], group: Sequence[str]) -> int:
    """Pixels where the group's best score is reached by two concepts or more."""
    count = 0
    for per_image in maps.values():
        stack = np.stack([per_image[c] for c in group])
        count += int(((stack == stack.max(axis=0)).sum(axis=0) > 1).sum())
    return count


# -- bit for bit against the reference ---------------------------------------------------------

GROUPS = [
    ["sky", "grass", "tree", "background"],  # a filler competing
    ["red"],  # a group of one concept: every pixel
    ["blue", "green", "other", "yellow"],  # another filler, not last
    ["cloud", "background"],  # a filler in two groups
]
NAMES = sorted({c for g in GROUPS for c in g})

# (segmenter output shapes, grid): grids that divide the output and grids that do not,
# down and up (also 2x and identity, which torch treats apart), mixed per axis, outputs of
# several sizes, and sizes where single precision changes the sampled row (14 -> 46:
# floor(i * 14 / 46) in exact arithmetic picks other rows than torch does).
CASES = [
    ([(8, 8)], (4, 4)),
    ([(9, 7)], (4, 5)),
    ([(4, 4)], (8, 8)),
    ([(3, 5)], (7, 11)),
    ([(6, 20)], (9, 7)),
    ([(5, 5)], (5, 5)),
    ([(14, 9)], (46, 111)),
    ([(12, 10), (7, 13), (16, 16)], (6, 6)),
    ([(352, 352)], (112, 112)),  # CLIPSeg's output to OVCE's grid
]


@pytest.mark.parametrize(("shapes", "grid"), CASES)
@pytest.mark.parametrize("levels", [None, 3])
def test_equals_the_reference(shapes, grid, levels):
    n = 5
    segmenter = Maps(random_maps(n, NAMES, shapes, seed=len(shapes) + grid[0], levels=levels))
    images = make_images(n)
    store = segment(
        images, GROUPS, segmenter, grid=grid, batch_size=2, semantics="ovce", progress=False
    )
    # one call per group and batch, with that group's concepts only
    assert segmenter.calls == [(b, g) for b in (2, 2, 1) for g in GROUPS]
    assert_store_equals(store, ovce_reference(segmenter, images, GROUPS, grid))
    if levels is not None:
        assert tie_count(segmenter.maps, GROUPS[0]) > 0
    assert store.mask("red").all()  # one concept: every pixel, whatever its scores
    assert (store.mask("sky") & store.mask("blue")).any()  # groups overlap
    assert not (store.mask("sky") & store.mask("grass")).any()


def test_single_precision_sampling_is_exercised():
    """The 14 -> 46 case above samples other rows than exact arithmetic would."""
    exact = np.arange(46) * 14 // 46
    sampled = F.interpolate(
        torch.arange(14.0).reshape(1, 1, 14, 1), size=(46, 1), mode="nearest"
    ).flatten()
    assert not np.array_equal(sampled.long().numpy(), exact)


def test_ties_go_to_the_first_concept_and_zero_scores_are_labelled():
    maps = {0: {"a": np.zeros((2, 2), np.float32), "b": np.zeros((2, 2), np.float32)}}
    maps[0]["b"][1] = 1.0  # the bottom row goes to b, the tie on top to a
    store = segment(
        make_images(1), ["a", "b"], Maps(maps), grid=2, semantics="ovce", progress=False
    )
    assert store.mask("a")[0].tolist() == [[True, True], [False, False]]
    pyneuron = segment(make_images(1), ["a", "b"], Maps(maps), grid=2, progress=False)
    assert not pyneuron.mask("a").any()  # all scores <= 0 there: unlabelled


# -- segmenters whose scores depend on the query set -------------------------------------------


def test_query_dependent_scores_differ_between_the_semantics():
    n, shape = 4, (6, 6)
    groups = [["sky", "grass", "background"], ["blue", "green", "yellow"]]
    names = [c for g in groups for c in g]
    rng = np.random.default_rng(7)
    maps = {i: {c: rng.normal(0, 2, shape).astype(np.float32) for c in names} for i in range(n)}
    images = make_images(n)

    dependent = Maps(maps, query_dependent=True)
    ovce = segment(images, groups, dependent, grid=shape, semantics="ovce", progress=False)
    assert_store_equals(ovce, ovce_reference(dependent, images, groups, shape))
    pyneuron = segment(images, groups, dependent, grid=shape, progress=False)
    assert_store_equals(pyneuron, union_reference(dependent, images, groups))
    differ = [c for c in ovce.names if not np.array_equal(ovce.mask(c), pyneuron.mask(c))]
    assert differ  # the union call ranks a group's concepts otherwise

    # scores that do not depend on the query set, no resize: the two semantics agree
    independent = Maps({i: {c: np.exp(m) for c, m in maps[i].items()} for i in maps})
    ovce = segment(images, groups, independent, grid=shape, semantics="ovce", progress=False)
    pyneuron = segment(images, groups, independent, grid=shape, progress=False)
    for concept in ovce.names:
        np.testing.assert_array_equal(ovce.mask(concept), pyneuron.mask(concept))


# -- cache, metadata, refusals -----------------------------------------------------------------


def test_cache_and_metadata(tmp_path):
    n, grid = 4, (5, 3)
    segmenter = Maps(random_maps(n, NAMES, [(7, 9)], seed=3))
    images = make_images(n)
    options = dict(grid=grid, batch_size=3, cache_dir=tmp_path / "cache", progress=False)
    first = segment(images, GROUPS, segmenter, semantics="ovce", **options)
    assert segmenter.calls
    segmenter.calls.clear()
    again = segment(images, GROUPS, segmenter, semantics="ovce", **options)
    assert segmenter.calls == []  # every image from the cache
    assert_store_equals(again, {c: first.mask(c) for c in first.names})
    assert_store_equals(first, ovce_reference(segmenter, images, GROUPS, grid))
    segmenter.calls.clear()

    other = segment(images, GROUPS, segmenter, **options)  # pyneuron semantics: a miss
    assert [len(c[1]) for c in segmenter.calls] == [len(NAMES)] * 2  # one union call a batch
    assert any(not np.array_equal(other.mask(c), first.mask(c)) for c in first.names)

    meta = first.metadata["segment"]
    assert meta["semantics"] == "ovce" and other.metadata["segment"]["semantics"] == "pyneuron"
    assert "interpolate(mode='nearest')" in meta["resize"] and "per group" in meta["resize"]
    assert "bilinear" in other.metadata["segment"]["resize"]
    runs = sorted((tmp_path / "cache").glob("segment-*/run.json"))
    assert len(runs) == 2
    assert {'"semantics": "ovce"' in r.read_text() for r in runs} == {True, False}
    assert SEMANTICS == ("pyneuron", "ovce")


def test_refusals(tmp_path):
    images = make_images(2)
    segmenter = Maps(random_maps(2, NAMES, [(3, 3)], seed=1))
    with pytest.raises(PyneuronError, match=r"semantics must be one of \('pyneuron', 'ovce'\)"):
        segment(images, GROUPS, segmenter, grid=3, semantics="OVCE", progress=False)
    with pytest.raises(PyneuronError, match="threshold mode.*semantics='ovce'"):
        segment(images, GROUPS, segmenter, grid=3, mode="threshold", semantics="ovce")
    group = ConceptGroup("colours", ("red", "blue"), mode="threshold")
    with pytest.raises(PyneuronError, match="group 'colours' is in threshold mode"):
        segment(images, [group], segmenter, grid=3, semantics="ovce", progress=False)
    with pytest.raises(PyneuronError, match="semantics must be one of"):
        segment_on_ray([tmp_path / "x.png"], GROUPS, segmenter, semantics="x", parts_dir=tmp_path)
    assert segmenter.calls == []  # refused before any image is segmented


def test_segment_on_ray_passes_the_semantics(tmp_path):
    n, grid = 5, (4, 4)
    segmenter = Maps(random_maps(n, NAMES, [(9, 6)], seed=5, levels=4))
    files = []
    for i, array in enumerate(make_images(n)):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(files[-1])
    options = dict(grid=grid, batch_size=2, semantics="ovce", progress=False)
    parts = segment_on_ray(
        files,
        GROUPS,
        segmenter,
        backend="local",
        parts_dir=tmp_path / "parts",
        part_images=2,
        **options,
    )
    whole = segment(files, GROUPS, segmenter, **options)
    assert parts.metadata == whole.metadata
    assert whole.metadata["segment"]["semantics"] == "ovce"
    images = np.stack([np.asarray(Image.open(f)) for f in files])
    assert_store_equals(parts, ovce_reference(segmenter, images, GROUPS, grid))


def test_open_concepts_passes_the_semantics(tmp_path, monkeypatch):
    n, grid = 3, 4
    segmenter = Maps(random_maps(n, NAMES, [(6, 6)], seed=9, levels=3))
    monkeypatch.setattr(sources, "make_segmenter", lambda spec, **placement: segmenter)
    folder = tmp_path / "images"
    folder.mkdir()
    images = make_images(n)
    for i, array in enumerate(images):
        Image.fromarray(array).save(folder / f"{i}.png")
    vocabulary = tmp_path / "concepts.txt"
    vocabulary.write_text("\n\n".join("\n".join(g) for g in GROUPS) + "\n")
    store, files, built = sources.open_concepts(
        vocabulary, images=folder, grid=grid, semantics="ovce", progress=False
    )
    assert built and [f.name for f in files] == [f"{i}.png" for i in range(n)]
    assert store.metadata["segment"]["semantics"] == "ovce"
    assert_store_equals(store, ovce_reference(segmenter, images, GROUPS, (grid, grid)))
