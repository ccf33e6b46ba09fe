"""Parts of a probing set (image ranges) put together: concept stores and unit masks
concatenated along images (byte for byte the set written in one go, every file of the
saved directory) and exact quantile thresholds merged from parts (bit for bit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyneuron import ConceptStore, PyneuronError, UnitMasks
from pyneuron.engine.grid import Grid
from pyneuron.engine.upsample import unit_masks_from_activations
from pyneuron.errors import GridMismatchError
from pyneuron.model.thresholds import (
    QuantilePart,
    StreamingQuantiles,
    merge_quantile_parts,
    quantile_part,
    quantile_thresholds,
)


def same_directories(a: Path, b: Path) -> None:
    """Every file of ``a`` and ``b`` holds the same bytes."""
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def random_masks(rng: np.random.Generator, n_images: int, size: tuple[int, int], n: int):
    """(n, n_images, h, w) masks: sparse blobs, an empty concept, a concept that covers
    some images whole, a dense one, and random empty and full images."""
    masks = rng.random((n, n_images, *size)) < rng.uniform(0.02, 0.5, (n, 1, 1, 1))
    masks[0] = False
    masks[1] = False
    masks[1, rng.random(n_images) < 0.5] = True
    masks[2] = rng.random((n_images, *size)) < 0.97
    empty = rng.random((n, n_images)) < 0.2
    masks[empty] = False
    full = rng.random((n, n_images)) < 0.1
    masks[3:][full[3:]] = True
    return masks


def written(masks: np.ndarray, first: int, stop: int, names, path=None, metadata=None):
    """Images [first, stop) of ``masks`` written image by image (full images as labels)."""
    grid = (stop - first, *masks.shape[2:])
    categories = [f"cat{i % 3}" for i in range(len(names))]
    with ConceptStore.writer(grid, names, categories, path, metadata=metadata) as writer:
        for i in range(first, stop):
            pixels = masks[:, i].reshape(len(names), -1)
            full = pixels.all(axis=1)
            writer.add_image(
                i - first,
                masks={n: masks[c, i] for c, n in enumerate(names) if not full[c]},
                labels=[n for c, n in enumerate(names) if full[c]],
            )
    return writer.store


def cuts(rng: np.random.Generator, n_images: int) -> list[int]:
    """Random cut points, with parts of one image."""
    inner = rng.choice(np.arange(1, n_images), size=4, replace=False).tolist()
    return sorted({0, 1, *inner, n_images - 1, n_images})


@pytest.mark.parametrize(("size", "seed"), [((5, 7), 0), ((8, 8), 1), ((9, 13), 2), ((1, 1), 3)])
def test_concept_stores_concatenate_to_the_one_shot_store(tmp_path, size, seed):
    rng = np.random.default_rng(seed)
    n_images = 17
    names = [f"c{i}" for i in range(9)]
    masks = random_masks(rng, n_images, size, len(names))
    metadata = {"source": "test", "nested": {"images": list(range(n_images))}}
    whole = written(masks, 0, n_images, names, tmp_path / "whole", metadata=metadata)
    bounds = cuts(rng, n_images)
    parts = [written(masks, a, b, names, metadata={"other": a}) for a, b in zip(bounds, bounds[1:])]
    assert min(p.grid.n_images for p in parts) == 1

    joined = ConceptStore.concatenate(parts, tmp_path / "joined", metadata=metadata)
    same_directories(tmp_path / "joined", tmp_path / "whole")
    assert joined.path == tmp_path / "joined" and joined.grid == whole.grid
    in_memory = ConceptStore.concatenate(parts, metadata=metadata)
    in_memory.save(tmp_path / "saved")
    same_directories(tmp_path / "saved", tmp_path / "whole")
    for c, name in enumerate(names):
        np.testing.assert_array_equal(in_memory.mask(name), masks[c])

    # Parts opened from disk (memory-mapped) and bitsets streamed in small chunks.
    for k, part in enumerate(parts):
        part.save(tmp_path / f"part{k}")
    opened = [ConceptStore.open(tmp_path / f"part{k}") for k in range(len(parts))]
    again = ConceptStore.concatenate(opened, tmp_path / "joined", True, metadata=metadata)
    same_directories(tmp_path / "joined", tmp_path / "whole")
    assert again.names == names
    # Without metadata, the first part's.
    assert ConceptStore.concatenate(opened).metadata == {"other": 0}


def test_bitsets_stream_in_chunks(tmp_path):
    rng = np.random.default_rng(4)
    names = ["a", "b", "c"]
    masks = random_masks(rng, 9, (6, 6), 3)
    whole = written(masks, 0, 9, names, tmp_path / "whole")
    parts = [written(masks, 0, 4, names), written(masks, 4, 9, names)]
    grid = Grid(9, 6, 6)
    with ConceptStore.writer(grid, names, whole.categories, tmp_path / "joined") as writer:
        writer.writer.add_set(parts[0], 0, chunk_bytes=1)
        writer.writer.add_set(parts[1], 4, chunk_bytes=17)
    same_directories(tmp_path / "joined", tmp_path / "whole")


def test_one_part_gives_the_same_store(tmp_path):
    rng = np.random.default_rng(5)
    masks = random_masks(rng, 4, (3, 3), 5)
    names = list("abcde")
    whole = written(masks, 0, 4, names, tmp_path / "whole", metadata={"x": [1]})
    ConceptStore.concatenate([whole], tmp_path / "joined")
    same_directories(tmp_path / "joined", tmp_path / "whole")


@pytest.mark.parametrize("size", [(5, 7), (8, 8), (3, 30)])
def test_unit_masks_concatenate_to_the_one_shot_masks(tmp_path, size):
    rng = np.random.default_rng(6)
    n_images, n_units = 13, 6
    acts = rng.normal(size=(n_images, n_units, 3, 4)).astype(np.float32)
    acts[:, 0] = -5.0  # a silent unit
    acts[:, 1] = 5.0  # a unit firing everywhere
    acts[3:5, 2] = 5.0  # firing on whole images only
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(n_units, -1), 0.8, axis=1)
    options = {"progress": False, "batch_images": 4}
    unit_masks_from_activations(acts, thresholds, size, path=tmp_path / "whole", **options)
    bounds = [0, 1, 2, 7, 12, 13]
    parts = [
        unit_masks_from_activations(acts[a:b], thresholds, size, **options)
        for a, b in zip(bounds, bounds[1:])
    ]
    UnitMasks.concatenate(parts, tmp_path / "joined")
    same_directories(tmp_path / "joined", tmp_path / "whole")
    for k, part in enumerate(parts):
        part.save(tmp_path / f"part{k}")
    opened = [UnitMasks.open(tmp_path / f"part{k}") for k in range(len(parts))]
    joined = UnitMasks.concatenate(opened)
    joined.save(tmp_path / "saved")
    same_directories(tmp_path / "saved", tmp_path / "whole")

    # Explicit metadata is saved and read back.
    UnitMasks.concatenate(opened, tmp_path / "meta", metadata={"layer": "conv1"})
    assert UnitMasks.open(tmp_path / "meta").metadata == {"layer": "conv1"}


def test_parts_that_do_not_fit_are_refused(tmp_path):
    a = ConceptStore.from_masks(np.zeros((2, 2, 3, 3), dtype=bool), ["x", "y"])
    with pytest.raises(PyneuronError, match="at least one part"):
        ConceptStore.concatenate([])
    other_names = ConceptStore.from_masks(np.zeros((2, 2, 3, 3), dtype=bool), ["x", "z"])
    with pytest.raises(PyneuronError, match="part 1 holds other concepts"):
        ConceptStore.concatenate([a, other_names])
    other_size = ConceptStore.from_masks(np.zeros((2, 2, 3, 4), dtype=bool), ["x", "y"])
    with pytest.raises(GridMismatchError, match="part 1 has 3x4 images, part 0 3x3"):
        ConceptStore.concatenate([a, other_size])
    fewer = ConceptStore.from_masks(np.zeros((1, 2, 3, 3), dtype=bool), ["x"])
    with pytest.raises(PyneuronError, match="part 1 holds 1 masks, part 0 2"):
        ConceptStore.concatenate([a, fewer])
    units = UnitMasks.from_masks(np.zeros((2, 2, 3, 3), dtype=bool))
    with pytest.raises(PyneuronError, match="part 1 is a UnitMasks, not a ConceptStore"):
        ConceptStore.concatenate([a, units])
    with pytest.raises(PyneuronError, match="part 1 holds 1 masks"):
        UnitMasks.concatenate([units, UnitMasks.from_masks(np.zeros((1, 2, 3, 3), bool))])
    a.save(tmp_path / "taken")
    with pytest.raises(FileExistsError, match="already exists"):
        ConceptStore.concatenate([a, a], tmp_path / "taken")
    assert ConceptStore.open(tmp_path / "taken").grid.n_images == 2


# -- exact thresholds from parts -------------------------------------------------------------


def random_activations(rng: np.random.Generator, n_images: int, shape=(5, 3, 4)):
    """Activations with many ties (a few distinct values), a constant unit, zeros."""
    acts = rng.integers(-3, 6, size=(n_images, *shape)).astype(np.float32)
    acts[:, 1] = 2.0
    acts[:, 2] = np.maximum(acts[:, 2], 0)
    acts[:, 3] = rng.normal(size=acts[:, 3].shape)
    return acts


@pytest.mark.parametrize("q", [0.005, 0.01, 0.2, 0.6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_parts_merge_to_the_exact_thresholds(q, seed):
    rng = np.random.default_rng(seed)
    n_images = 37
    acts = random_activations(rng, n_images)
    expected = quantile_thresholds(acts, q)
    bounds = cuts(rng, n_images)
    parts = [
        quantile_part(acts[a:b], q, total_images=n_images, batch_images=int(rng.integers(1, 9)))
        for a, b in zip(bounds, bounds[1:])
    ]
    for order in (parts, parts[::-1], [parts[k] for k in rng.permutation(len(parts))]):
        merged = merge_quantile_parts(order)
        assert merged.tobytes() == expected.tobytes()
    # Through the arrays a part is saved as, in float64 too.
    loaded = [QuantilePart.from_arrays(p.to_arrays()) for p in parts]
    assert merge_quantile_parts(loaded).tobytes() == expected.tobytes()
    as64 = quantile_thresholds(acts.astype(np.float64), q)
    parts64 = [
        quantile_part(acts[a:b].astype(np.float64), q, total_images=n_images)
        for a, b in zip(bounds, bounds[1:])
    ]
    assert merge_quantile_parts(parts64).tobytes() == as64.tobytes()


def test_threshold_parts_at_any_level_and_shape():
    rng = np.random.default_rng(3)
    acts = rng.normal(size=(11, 2, 7)).round(1)  # (N, U, L), ties
    for level in (0.0, 0.001, 0.3, 0.5, 0.77, 0.999, 1.0):
        parts = [
            quantile_part(acts[a:b], level=level, total_images=11) for a, b in [(0, 5), (5, 11)]
        ]
        merged = merge_quantile_parts(parts)
        assert merged.tobytes() == quantile_thresholds(acts, level=level).tobytes()


def test_threshold_parts_that_do_not_fit_are_refused():
    acts = np.random.default_rng(4).random((6, 2, 3, 3))
    a = quantile_part(acts[:2], 0.1, total_images=6)
    b = quantile_part(acts[2:], 0.1, total_images=6)
    with pytest.raises(PyneuronError, match="no quantile parts"):
        merge_quantile_parts([])
    with pytest.raises(PyneuronError, match="hold 18 values per unit but the whole set 54"):
        merge_quantile_parts([a])
    with pytest.raises(PyneuronError, match="hold 72 values"):
        merge_quantile_parts([a, b, a])
    other = quantile_part(acts[2:], 0.2, total_images=6)
    with pytest.raises(PyneuronError, match="cannot merge"):
        merge_quantile_parts([a, other])
    with pytest.raises(PyneuronError, match="part has 1 units, expected 2"):
        merge_quantile_parts([a, quantile_part(acts[2:, :1], 0.1, total_images=6)])
    damaged = {**a.to_arrays(), "values": a.values[:, 1:]}
    with pytest.raises(PyneuronError, match="must keep .* values per unit"):
        QuantilePart.from_arrays(damaged)
    with pytest.raises(PyneuronError, match="not a quantile part"):
        QuantilePart.from_arrays({"values": a.values})
    with pytest.raises(PyneuronError, match="total_images must be an integer >= 1"):
        quantile_part(acts, 0.1, total_images=0)
    with pytest.raises(PyneuronError, match="more than total_values"):
        quantile_part(acts, 0.1, total_images=2)
    unknown = StreamingQuantiles(2, 0.5, None, max_values_per_unit=4)
    unknown.update(acts)
    with pytest.raises(PyneuronError, match="export\\(\\) needs total_values"):
        unknown.export()
