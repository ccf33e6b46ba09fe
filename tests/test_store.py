"""Concept stores and unit masks: construction, round trips, on-disk format, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from oracle import random_case
from store_fuzz import read_manifest, refresh, write_manifest

import pyneuron
from pyneuron.engine import storage
from pyneuron.engine.grid import pack_bits


@pytest.fixture
def case():
    rng = np.random.default_rng(1)
    concepts, units = random_case(rng, 7, 5, 9, n_concepts=8, n_units=6)
    names = [f"concept {i}" for i in range(8)]
    categories = ["object" if i % 2 else "scene" for i in range(8)]
    return concepts, units, names, categories


def assert_same_concepts(store, concepts, names):
    assert len(store) == len(names) and store.names == names
    for i, name in enumerate(names):
        np.testing.assert_array_equal(store.mask(name), concepts[i])
        np.testing.assert_array_equal(store.mask(i), concepts[i])
        for image in range(concepts.shape[1]):
            np.testing.assert_array_equal(store.image_mask(name, image), concepts[i, image])
        np.testing.assert_array_equal(
            store.images_with(name), np.flatnonzero(concepts[i].any((1, 2)))
        )
    table = store.table()
    np.testing.assert_array_equal(table["pixels"], concepts.reshape(len(names), -1).sum(1))
    np.testing.assert_array_equal(table["images"], concepts.any((2, 3)).sum(1))


def test_from_masks_round_trip(case):
    concepts, _, names, categories = case
    store = pyneuron.ConceptStore.from_masks(concepts, names, categories)
    assert store.grid == pyneuron.Grid(7, 5, 9)
    assert store.categories == categories
    assert_same_concepts(store, concepts, names)


def test_containers_are_empty_full_or_bitset():
    masks = np.zeros((3, 4, 2, 3), dtype=bool)
    masks[0, 1] = True  # full in image 1
    masks[1, 2, 0, 0] = True  # one pixel in image 2
    store = pyneuron.ConceptStore.from_masks(masks, ["full", "pixel", "empty"])
    assert store._slots.tolist() == [-1, 0]  # full container, then one bitset
    assert store._words.shape == (1, 1)
    assert store.image_counts.tolist() == [1, 1, 0]


def test_writer_matches_dense_and_streams_to_disk(case, tmp_path):
    concepts, _, names, categories = case
    label_concepts = [
        i for i in range(8) if concepts[i].reshape(7, -1).all(1)[concepts[i].any((1, 2))].all()
    ]
    with pyneuron.ConceptStore.writer(
        store_grid := (7, 5, 9), names, categories, path=tmp_path / "s"
    ) as w:
        for image in range(7):
            full = [names[c] for c in label_concepts if concepts[c, image].all()]
            masks = {
                names[c]: concepts[c, image]
                for c in range(8)
                if c not in label_concepts and concepts[c, image].any()
            }
            w.add_image(image, masks=masks, labels=full)
    store = w.store
    assert store.grid.shape == store_grid
    assert isinstance(store._words, np.memmap)
    assert_same_concepts(store, concepts, names)
    assert store.categories == categories
    assert_same_concepts(pyneuron.ConceptStore.open(tmp_path / "s"), concepts, names)


def test_writer_label_maps():
    label_maps = np.array([[[0, 1], [1, -1]], [[2, 2], [2, 2]]])
    with pyneuron.ConceptStore.writer((2, 2, 2), ["a", "b", "c"]) as w:
        for i, label_map in enumerate(label_maps):
            w.add_image(i, label_map=label_map)
    store = w.store
    for k, name in enumerate("abc"):
        np.testing.assert_array_equal(store.mask(name), label_maps == k)


def test_save_open_is_memory_mapped_and_identical(case, tmp_path):
    concepts, _, names, categories = case
    store = pyneuron.ConceptStore.from_masks(concepts, names, categories)
    store.metadata["source"] = "test"
    store.save(tmp_path / "s")
    opened = pyneuron.ConceptStore.open(tmp_path / "s")
    assert isinstance(opened._words, np.memmap)
    assert opened.metadata == {"source": "test"}
    assert_same_concepts(opened, concepts, names)
    units = pyneuron.UnitMasks.from_masks(case[1])
    a = pyneuron.explain(units, store, progress=False)
    b = pyneuron.explain(units, opened, progress=False)
    assert a.equals(b)


def test_unit_masks_all_constructors_agree(case, tmp_path):
    _, units, _, _ = case
    n_units, n_images, h, w = units.shape
    dense = pyneuron.UnitMasks.from_masks(units)
    words = np.stack([pack_bits(units[u].reshape(n_images, -1), h * w) for u in range(n_units)])
    packed = pyneuron.UnitMasks.from_words(words, h, w)
    with pyneuron.UnitMasks.writer((n_images, h, w), n_units) as by_unit:
        for u in range(n_units):
            by_unit.add_unit(u, units[u])
    with pyneuron.UnitMasks.writer((n_images, h, w), n_units, path=tmp_path / "u") as by_image:
        for i in range(n_images):
            by_image.add_image(i, units[:, i])
    dense.save(tmp_path / "saved")
    sets = [
        dense,
        packed,
        by_unit.result,
        by_image.result,
        pyneuron.UnitMasks.open(tmp_path / "saved"),
    ]
    for masks in sets:
        assert len(masks) == n_units
        for u in range(n_units):
            np.testing.assert_array_equal(masks.mask(u), units[u])
            np.testing.assert_array_equal(masks.image_mask(u, n_images - 1), units[u, -1])


def test_duplicate_names_and_pairs_are_rejected():
    masks = np.zeros((2, 1, 2, 2), dtype=bool)
    with pytest.raises(pyneuron.PyneuronError, match="duplicate concept name 'a'"):
        pyneuron.ConceptStore.from_masks(masks, ["a", "a"])
    with pyneuron.ConceptStore.writer((2, 2, 2), ["a"]) as w:
        w.add_image(0, labels=["a"])
        with pytest.raises(pyneuron.PyneuronError, match="already added"):
            w.add_image(0, labels=["a"])
    writer = pyneuron.UnitMasks.writer((1, 2, 2), 1)
    writer.add_unit(0, np.ones((1, 2, 2), dtype=bool))
    writer.add_image(0, np.ones((1, 2, 2), dtype=bool))
    with pytest.raises(pyneuron.PyneuronError, match="given twice"):
        writer.close()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pyneuron.UnitMasks.from_masks(np.zeros((1, 2, 2, 2), dtype=np.float32)), "bool"),
        (lambda: pyneuron.UnitMasks.from_masks(np.zeros((2, 2, 2), dtype=bool)), "shape"),
        (
            lambda: pyneuron.ConceptStore.from_masks(np.zeros((2, 1, 2, 2), dtype=bool), ["a"]),
            "names",
        ),
        (lambda: pyneuron.UnitMasks.from_words(np.zeros((1, 1, 2), np.uint64), 4, 4), "words"),
        (
            lambda: pyneuron.UnitMasks.from_words(np.full((1, 1, 1), 2**20, np.uint64), 4, 4),
            "padding",
        ),
        (lambda: pyneuron.UnitMasks.from_words(np.zeros((1, 1, 1), np.int64), 4, 4), "uint64"),
        (lambda: pyneuron.Grid(0, 2, 2), "n_images"),
    ],
)
def test_bad_construction_input(call, message):
    with pytest.raises(pyneuron.PyneuronError, match=message):
        call()


def test_writer_bad_input():
    w = pyneuron.ConceptStore.writer((2, 2, 2), ["a"])
    with pytest.raises(pyneuron.PyneuronError, match="out of range"):
        w.add_image(5, labels=["a"])
    with pytest.raises(pyneuron.PyneuronError, match="label 3"):
        w.add_image(0, label_map=np.full((2, 2), 3))
    with pytest.raises(pyneuron.PyneuronError, match="shape"):
        w.add_image(0, masks={"a": np.ones((3, 3), dtype=bool)})
    with pytest.raises(pyneuron.PyneuronError, match="bool"):
        w.add_image(0, masks={"a": np.ones((2, 2), dtype=np.uint8)})
    store = w.close()
    with pytest.raises(pyneuron.PyneuronError, match="closed"):
        w.add_image(1, labels=["a"])
    assert len(store) == 1


# -- on-disk format: corruption, truncation, versions, atomic writes -------------------


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(2)
    concepts, _ = random_case(rng, 6, 8, 8, n_concepts=6, n_units=1)
    path = tmp_path / "store"
    pyneuron.ConceptStore.from_masks(concepts, [f"c{i}" for i in range(6)]).save(path)
    return path


@pytest.mark.parametrize("name", ["words.bin", "images.bin", "offsets.bin", "table.parquet"])
def test_truncated_file_is_reported(saved, name):
    data = (saved / name).read_bytes()
    (saved / name).write_bytes(data[: len(data) - 4])
    with pytest.raises(pyneuron.StoreError, match=f"{name}.*truncated"):
        pyneuron.ConceptStore.open(saved)


@pytest.mark.parametrize("name", ["words.bin", "counts.bin", "slots.bin"])
def test_corrupted_file_fails_its_checksum(saved, name):
    data = bytearray((saved / name).read_bytes())
    data[len(data) // 2] ^= 0x10
    (saved / name).write_bytes(bytes(data))
    with pytest.raises(pyneuron.StoreError, match=f"checksum of {name}"):
        pyneuron.ConceptStore.open(saved)


def test_corrupted_words_found_by_verify_when_not_checked_on_open(saved):
    data = bytearray((saved / "words.bin").read_bytes())
    data[3] ^= 0x01
    (saved / "words.bin").write_bytes(bytes(data))
    store = pyneuron.ConceptStore.open(saved, verify=False)  # opens: words not read
    with pytest.raises(pyneuron.PyneuronError, match="count differs"):
        store.verify()


def test_consistent_but_invalid_index_is_rejected_not_crashing(saved):
    # Rewrite slots with an out-of-range value and a matching checksum.
    slots = np.fromfile(saved / "slots.bin", dtype="<i8")
    slots[-1] = 10**9
    slots.tofile(saved / "slots.bin")
    refresh(saved, "slots.bin")
    with pytest.raises(pyneuron.StoreError, match="slot out of range"):
        pyneuron.ConceptStore.open(saved)


def test_future_version_and_foreign_directories(saved, tmp_path):
    manifest = read_manifest(saved)
    manifest["version"] = storage.FORMAT_VERSION + 1
    write_manifest(saved, manifest)
    with pytest.raises(pyneuron.StoreError, match="newer pyneuron"):
        pyneuron.ConceptStore.open(saved)
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(pyneuron.StoreError, match="unreadable manifest"):
        pyneuron.ConceptStore.open(saved)
    with pytest.raises(pyneuron.StoreError, match="no store"):
        pyneuron.ConceptStore.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pyneuron.StoreError, match="not a pyneuron store"):
        pyneuron.ConceptStore.open(tmp_path / "empty")


def test_units_and_concepts_are_not_confused(saved, tmp_path):
    with pytest.raises(pyneuron.StoreError, match="holds concepts, not units"):
        pyneuron.UnitMasks.open(saved)


def test_existing_store_is_kept_unless_overwrite(saved):
    store = pyneuron.ConceptStore.open(saved)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        store.save(saved)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pyneuron.ConceptStore.writer((6, 8, 8), ["x"], path=saved)
    store.save(saved, overwrite=True)
    assert pyneuron.ConceptStore.open(saved).names == store.names


def test_interrupted_writer_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="interrupted"):
        with pyneuron.ConceptStore.writer((2, 2, 2), ["a"], path=tmp_path / "s") as w:
            w.add_image(0, labels=["a"])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_previous_store(saved, monkeypatch):
    before = pyneuron.ConceptStore.open(saved).names

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "write_directory", crash)
    store = pyneuron.ConceptStore.from_masks(np.ones((1, 6, 8, 8), dtype=bool), ["other"])
    with pytest.raises(OSError, match="disk full"):
        store.save(saved, overwrite=True)
    assert pyneuron.ConceptStore.open(saved).names == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["store"]


def test_an_existing_empty_directory_is_replaced(tmp_path):
    import pandas as pd

    from pyneuron.app.rundir import write_run

    (tmp_path / "store").mkdir()
    pyneuron.ConceptStore.from_masks(np.ones((1, 1, 2, 2), dtype=bool), ["a"]).save(
        tmp_path / "store"
    )
    assert pyneuron.ConceptStore.open(tmp_path / "store").names == ["a"]
    (tmp_path / "run").mkdir()
    write_run(tmp_path / "run", pd.DataFrame({"unit": [0]}), summary={}, config={})
    assert (tmp_path / "run" / "results.parquet").is_file()


# -- hardening: grid limits, index invariants, manifest edits (issue 16) ------------------


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ((1, 65535, 65537), "at most 2\\*\\*31 - 1 pixels"),  # (p + 63) / 64 wrapped to 0
        ((1, 65536, 32768), "at most 2\\*\\*31 - 1 pixels"),  # exactly 2**31
        ((2**31, 1, 1), "at most 2\\*\\*31 - 1 images"),
        ((1, 2**40, 2**40), "at most 2\\*\\*31 - 1 pixels"),  # beyond 64-bit products
    ],
)
def test_grids_beyond_the_limit_are_refused(grid, message):
    with pytest.raises(pyneuron.PyneuronError, match=message):
        pyneuron.ConceptStore.writer(grid, names=["a"]).close()


def test_engine_refuses_oversized_grids_itself():
    empty = [np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)]
    arrays = [*empty, np.zeros(0, np.int32), np.zeros(0, np.uint64)]
    with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1 pixels"):
        pyneuron.engine._native.NativeMaskSet(1, 65535 * 65537, *arrays)
    with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1 images"):
        pyneuron.engine._native.NativeMaskSet(2**31, 64, *arrays)
    largest = pyneuron.engine._native.NativeMaskSet(2**31 - 1, 2**31 - 1, *arrays)
    assert largest.pixels == 2**31 - 1 and largest.n_images == 2**31 - 1


def edit_array(path, name, index, value):
    array = np.fromfile(path / name, dtype=storage.INDEX_FILES[name])
    array[index] = value
    array.tofile(path / name)
    refresh(path, name)


def test_edits_with_recomputed_checksums_are_caught(saved):
    # counts.bin edited (the IoU 1.0139 case): refused on a default open.
    counts = np.fromfile(saved / "counts.bin", dtype="<i4")
    slots = np.fromfile(saved / "slots.bin", dtype="<i8")
    bitset = int(np.flatnonzero(slots >= 0)[0])
    edit_array(saved, "counts.bin", bitset, counts[bitset] + 1)
    with pytest.raises(pyneuron.StoreError, match="count differs|disagrees"):
        pyneuron.ConceptStore.open(saved)
    # Even with verify=False the table's totals no longer match the index.
    with pytest.raises(pyneuron.StoreError, match="'pixels' column .* disagrees"):
        pyneuron.ConceptStore.open(saved, verify=False)


def test_padding_bits_are_caught_on_a_default_open(tmp_path):
    masks = np.zeros((1, 2, 3, 3), dtype=bool)  # 9 pixels: 55 padding bits per image
    masks[0, 0, 0, 0] = True
    path = tmp_path / "s"
    pyneuron.ConceptStore.from_masks(masks, ["a"]).save(path)
    words = np.fromfile(path / "words.bin", dtype="<u8")
    words[0] |= np.uint64(1) << np.uint64(40)
    words.tofile(path / "words.bin")
    refresh(path, "words.bin")
    with pytest.raises(pyneuron.StoreError, match="padding bits"):
        pyneuron.ConceptStore.open(path)
    assert pyneuron.ConceptStore.open(path, verify=False).pixel_counts.tolist() == [1]


@pytest.mark.parametrize(
    ("name", "index", "value", "message"),
    [
        ("offsets.bin", 1, -3, "not increasing"),
        ("slots.bin", 0, 0, "used twice|impossible count|not used"),
        ("counts.bin", 0, 0, "impossible count|count other"),
        ("images.bin", 0, 99, "image ids must be increasing"),
    ],
)
def test_index_invariants_are_checked_without_reading_words(saved, name, index, value, message):
    slots = np.fromfile(saved / "slots.bin", dtype="<i8")
    if name != "offsets.bin":
        index = int(np.flatnonzero(slots >= 0)[1])
    edit_array(saved, name, index, value)
    with pytest.raises(pyneuron.StoreError, match=message):
        pyneuron.ConceptStore.open(saved, verify=False)


BIG = "RAW_BIG"  # written as the JSON number 1e400


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (("files", "offsets.bin"), 5, "lacks the size and CRC-32 of offsets.bin"),
        (("files", "words.bin", "crc32"), None, "lacks the size and CRC-32 of words.bin"),
        (("n_masks",), BIG, "'n_masks' .* must be an integer"),
        (("n_masks",), 6.0, "'n_masks' .* must be an integer"),
        (("n_entries",), -1, "'n_entries' .* must be an integer"),
        (("metadata",), [1, 2], "'metadata' .* must be an object"),
        (("grid",), [6, 8, 8], "'grid' .* must hold"),
        (("grid", "height"), 0, "bad grid"),
        (("grid", "width"), 2**40, "bad grid"),
        (("version",), 0, "unknown format version 0"),
        (("version",), -1, "unknown format version -1"),
        (("version",), "1", "unknown format version '1'"),
        (("version",), 1.5, "unknown format version 1.5"),
        (("version",), True, "unknown format version True"),
        (("kind",), ["concepts"], "holds \\['concepts'\\], not concepts"),
    ],
)
def test_manifest_edits_give_store_errors(saved, field, value, message):
    manifest = read_manifest(saved)
    target = manifest
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    write_manifest(saved, manifest)  # with a matching manifest checksum
    with pytest.raises(pyneuron.StoreError, match=message):
        pyneuron.ConceptStore.open(saved)


def test_manifest_checksum_and_deep_metadata(saved):
    manifest = read_manifest(saved)
    manifest["metadata"] = {"note": "edited"}
    write_manifest(saved, manifest, checksum=False)
    with pytest.raises(pyneuron.StoreError, match="checksum of manifest.json"):
        pyneuron.ConceptStore.open(saved)
    text = json.dumps(read_manifest(saved)).replace('"edited"', "[" * 50000 + "]" * 50000)
    (saved / "manifest.json").write_text(text)
    with pytest.raises(pyneuron.StoreError, match="unreadable manifest.json"):
        pyneuron.ConceptStore.open(saved)


def test_version_1_stores_without_a_manifest_checksum_still_open(saved):
    manifest = read_manifest(saved)
    manifest["version"] = 1
    del manifest["manifest_crc32"]
    write_manifest(saved, manifest, checksum=False)
    assert len(pyneuron.ConceptStore.open(saved)) == 6


def test_bad_names_and_indices_are_pyneuron_errors():
    masks = np.zeros((2, 1, 2, 2), dtype=bool)
    for names in (["", "b"], [None, "b"], [1, "b"]):
        with pytest.raises(pyneuron.PyneuronError, match="non-empty strings"):
            pyneuron.ConceptStore.from_masks(masks, names)
    store = pyneuron.ConceptStore.from_masks(masks, ["a", "b"])
    for bad in (99, -1, 2):
        with pytest.raises(pyneuron.OutOfRangeError, match="holds 2 masks, numbered 0 to 1"):
            store.mask(bad)
    with pytest.raises(IndexError):  # also an IndexError, for code that expects one
        store.image_mask("a", 5)
