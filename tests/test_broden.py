"""Broden-format datasets: every concept mask against hand-made truth, the compexp
subset and filters, nearest-neighbour resizing, store inspection, and bad input."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pyneuron
from pyneuron.concepts.broden import BrodenError, broden, broden_images
from pyneuron.concepts.user import ConceptSourceError, MissingFileError, resize_nearest

GRID = (8, 8)
CATEGORIES = ["color", "object", "part", "material", "scene", "texture"]
# number, name, category field (counts; ';' as in Broden, ',' accepted too)
LABELS = [
    (1, "red-c", "color(3)"),
    (2, "blue-c", "color(2)"),
    (3, "wall", "object(5);part(1)"),
    (4, "door", "object(2);part(2)"),  # tie: the first listed (object) wins
    (5, "knob", "part(3)"),
    (6, "window", "part(4),object(1)"),  # comma-separated; part dominates
    (7, "kitchen-s", "scene(2)"),
    (8, "street-s", "scene(1)"),
    (9, "striped", "texture(2)"),
    (10, "dotted", "texture(1)"),
    (300, "rare", "object(1)"),  # >= 256: encoded in the G channel
]
NAMES = [name for _, name, _ in LABELS]
PRIMARY = ["color", "color", "object", "object", "part", "part"]
PRIMARY += ["scene", "scene", "texture", "texture", "object"]


def pil_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Reference: PIL's own NEAREST resize of the integer label image."""
    image = Image.fromarray(np.asarray(labels, dtype=np.int32), mode="I")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.NEAREST))


def write_label_png(path: Path, labels: np.ndarray, mode: str = "RGB") -> None:
    labels = np.asarray(labels)
    channels = [labels % 256, labels // 256, np.full_like(labels, 77)]  # B is ignored
    if mode == "RGBA":
        channels.append(np.full_like(labels, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8), mode=mode).save(path)


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_broden(
    root: Path,
    rows: list[dict[str, object]],
    pngs: dict[str, np.ndarray],
    labels: list[tuple[int, str, str]] = LABELS,
    categories: list[str] = CATEGORIES,
    index: str = "index.csv",
) -> Path:
    """A Broden-format folder: ``rows`` are index rows (image, sh, sw, category cells),
    ``pngs`` the label images by file name under images/."""
    root.mkdir(parents=True, exist_ok=True)
    header = ["image", "split", "ih", "iw", "sh", "sw", *categories]
    write_csv(
        root / index,
        header,
        [
            [r["image"], r.get("split", "train"), 0, 0, r.get("sh", 8), r.get("sw", 8)]
            + [r.get(c, "") for c in categories]
            for r in rows
        ],
    )
    write_csv(
        root / "label.csv",
        ["number", "name", "category", "frequency", "coverage", "syns"],
        [[n, name, cat, 1, 0.5, ""] for n, name, cat in labels],
    )
    write_csv(
        root / "category.csv",
        ["name", "first", "last", "count", "frequency"],
        [[c, 0, 0, 0, 0] for c in categories],
    )
    for name, array in pngs.items():
        write_label_png(root / "images" / name, array, "RGBA" if "rgba" in name else "RGB")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    pngs = {
        "ade20k/a_object.png": rng.choice([0, 3, 4, 300], size=(8, 8)),
        "ade20k/a_part_1.png": rng.choice([0, 5], size=(8, 8)),
        "ade20k/a_part_2_rgba.png": rng.choice([0, 5, 6], size=(8, 8)),
        "ade20k/a_color.png": rng.choice([1, 2], size=(8, 8)),
        "ade20k/c_object.png": rng.choice([0, 3, 4], size=(6, 10)),
        "opensurfaces/e_color.png": rng.choice([0, 1, 2], size=(16, 16)),
    }
    rows = [
        {
            "image": "ade20k/a.jpg",
            "color": "ade20k/a_color.png",
            "object": "ade20k/a_object.png",
            "part": "ade20k/a_part_1.png;ade20k/a_part_2_rgba.png",
            "scene": "7",
        },
        {"image": "dtd/b.jpg", "split": "val", "sh": 4, "sw": 4, "texture": "9;10"},
        {
            "image": "ade20k/c.jpg",
            "sh": 6,
            "sw": 10,
            "object": "ade20k/c_object.png;4",  # door: pixels *and* the whole image
            "scene": "8;0",  # 0 is skipped
        },
        {"image": "ade20k/d.jpg", "scene": "0"},  # no data: dropped, as in NetDissect
        {"image": "opensurfaces/e.jpg", "sh": 16, "sw": 16, "color": "opensurfaces/e_color.png"},
    ]
    root = write_broden(tmp_path_factory.mktemp("broden") / "broden1", rows, pngs)

    # Hand-made truth, image by image (kept images: a, b, c, e).
    kept = [rows[0], rows[1], rows[2], rows[4]]
    truth = {name: np.zeros((len(kept), *GRID), dtype=bool) for name in NAMES}
    by_number = {n: name for n, name, _ in LABELS}
    for i, row in enumerate(kept):
        for category in CATEGORIES:
            for item in str(row.get(category, "")).split(";"):
                if not item or item == "0":
                    continue
                if item.isdigit():
                    truth[by_number[int(item)]][i] = True
                    continue
                small = pil_nearest(pngs[item], GRID)
                for number in np.unique(small[small > 0]):
                    truth[by_number[int(number)]][i] |= small == number
    return root, rows, pngs, truth


def test_every_mask_matches_hand_made_truth(dataset):
    root, _, _, truth = dataset
    store = broden(root, grid=8, progress=False)
    assert store.grid == pyneuron.Grid(4, 8, 8)
    assert store.names == NAMES
    assert store.categories == PRIMARY
    for name in NAMES:
        np.testing.assert_array_equal(store.mask(name), truth[name], err_msg=name)
    meta = store.metadata
    assert meta["labels"] == [n for n, _, _ in LABELS]
    assert meta["images"] == ["ade20k/a.jpg", "dtd/b.jpg", "ade20k/c.jpg", "opensurfaces/e.jpg"]
    assert meta["categories"] == CATEGORIES and meta["source"] == "broden"


def test_truth_spot_checks(dataset):
    """A few facts of the truth written out by hand, so the oracle is not circular."""
    root, _, pngs, _ = dataset
    store = broden(root, grid=8, progress=False)
    # Image 0 is stored at 8x8: masks are the label images themselves.
    np.testing.assert_array_equal(store.mask("rare")[0], pngs["ade20k/a_object.png"] == 300)
    knob = (pngs["ade20k/a_part_1.png"] == 5) | (pngs["ade20k/a_part_2_rgba.png"] == 5)
    np.testing.assert_array_equal(store.mask("knob")[0], knob)
    # Image-level labels are full images; 0 is never a concept.
    assert store.mask("kitchen-s")[0].all() and not store.mask("kitchen-s")[1:].any()
    assert store.mask("striped")[1].all() and store.mask("dotted")[1].all()
    assert store.images_with("street-s").tolist() == [2]
    assert store.mask("door")[2].all()  # image-level 4 wins over its pixels
    # 16x16 -> 8x8 keeps rows and columns 1, 3, 5, ... (PIL NEAREST samples centres).
    color = pngs["opensurfaces/e_color.png"][1::2, 1::2]
    np.testing.assert_array_equal(store.mask("red-c")[3], color == 1)
    np.testing.assert_array_equal(store.mask("blue-c")[3], color == 2)
    # 6x10 -> 8x8: row k samples floor((k + 0.5) * 6/8), column k floor((k + 0.5) * 10/8).
    rows, cols = [0, 1, 1, 2, 3, 4, 4, 5], [0, 1, 3, 4, 5, 6, 8, 9]
    expected = pngs["ade20k/c_object.png"][np.ix_(rows, cols)] == 3
    np.testing.assert_array_equal(store.mask("wall")[2], expected)


def test_subset_reproduces_compexp_ade20k_index(dataset):
    root, _, _, truth = dataset
    store = broden(root, subset="ade20k", grid=8, progress=False)
    assert store.metadata["images"] == ["ade20k/a.jpg", "ade20k/c.jpg"]
    for name in NAMES:
        np.testing.assert_array_equal(store.mask(name), truth[name][[0, 2]], err_msg=name)
    both = broden(root, subset=["ade20k", "dtd"], grid=8, progress=False)
    assert both.metadata["images"] == ["ade20k/a.jpg", "dtd/b.jpg", "ade20k/c.jpg"]
    assert broden(root, split="val", grid=8, progress=False).grid.n_images == 1
    assert broden_images(root, subset="ade20k") == [
        root / "images" / "ade20k" / "a.jpg",
        root / "images" / "ade20k" / "c.jpg",
    ]


def test_categories_select_concepts_images_and_masks(dataset):
    root, _, pngs, _ = dataset
    store = broden(root, categories=["part"], grid=8, progress=False)
    # Labels filed under part (label.csv), their category now "part"; only image a has parts.
    assert store.names == ["wall", "door", "knob", "window"]
    assert store.categories == ["part"] * 4
    assert store.grid.n_images == 1
    np.testing.assert_array_equal(store.mask("window")[0], pngs["ade20k/a_part_2_rgba.png"] == 6)
    assert not store.mask("wall").any()  # wall is in no part PNG
    scenes = broden(root, categories=("texture", "scene"), grid=8, progress=False)
    assert scenes.names == ["kitchen-s", "street-s", "striped", "dotted"]
    assert scenes.metadata["categories"] == ["scene", "texture"]  # category.csv order
    assert scenes.metadata["images"] == ["ade20k/a.jpg", "dtd/b.jpg", "ade20k/c.jpg"]


def test_other_grids_and_native_size(dataset, tmp_path):
    root, _, pngs, truth = dataset
    store = broden(root, grid=(4, 6), progress=False)
    assert store.grid == pyneuron.Grid(4, 4, 6)
    small = pil_nearest(pngs["ade20k/c_object.png"], (4, 6))
    np.testing.assert_array_equal(store.mask("wall")[2], small == 3)
    with pytest.raises(BrodenError, match="one segmentation size"):
        broden(root, grid=None, progress=False)
    native = broden(root, subset="ade20k", categories=["part"], grid=None, progress=False)
    assert native.grid.shape == (1, 8, 8)  # only image a has parts: its (sh, sw)
    assert native.metadata["grid"] == [8, 8]


def test_store_streams_to_disk_and_reopens(dataset, tmp_path):
    root, _, _, truth = dataset
    store = broden(root, grid=8, out=tmp_path / "s", progress=False)
    assert isinstance(store._words, np.memmap)
    reopened = pyneuron.ConceptStore.open(tmp_path / "s")
    assert reopened.names == NAMES and reopened.categories == PRIMARY
    assert reopened.metadata["labels"][-1] == 300
    for name in NAMES:
        np.testing.assert_array_equal(reopened.mask(name), truth[name])
    with pytest.raises(FileExistsError):
        broden(root, grid=8, out=tmp_path / "s", progress=False)
    broden(root, grid=8, subset="dtd", out=tmp_path / "s", overwrite=True, progress=False)
    assert pyneuron.ConceptStore.open(tmp_path / "s").grid.n_images == 1


def test_index_file_name_and_label_in_unexpected_category(tmp_path):
    pngs = {"x/o.png": np.array([[0, 5], [3, 3]])}  # knob (part only) inside an object map
    rows = [{"image": "x/i.jpg", "sh": 2, "sw": 2, "object": "x/o.png"}]
    root = write_broden(tmp_path / "b", rows, pngs, index="index_x.csv")
    with pytest.raises(MissingFileError, match="index.csv"):
        broden(root, progress=False)
    store = broden(root, categories=["object"], grid=2, index="index_x.csv", progress=False)
    # declared in number order first, then the label found under "object" on the fly
    assert store.names == ["wall", "door", "window", "rare", "knob"]
    assert store.categories == ["object"] * 5
    assert store.metadata["labels"] == [3, 4, 6, 300, 5]
    assert store.mask("knob")[0].tolist() == [[False, True], [False, False]]


def test_inspection_info_and_sample(dataset):
    root, _, _, truth = dataset
    store = broden(root, grid=8, progress=False)
    info = store.info()
    assert list(info.columns) == ["concepts", "present", "pixels", "images"]
    assert list(info.index) == ["color", "object", "part", "scene", "texture"]
    for category in info.index:
        names = [n for n, c in zip(NAMES, PRIMARY) if c == category]
        row = info.loc[category]
        assert row["concepts"] == len(names)
        assert row["present"] == sum(truth[n].any() for n in names)
        assert row["pixels"] == sum(int(truth[n].sum()) for n in names)
        union = np.zeros(4, dtype=bool)
        for n in names:
            union |= truth[n].any((1, 2))
        assert row["images"] == union.sum()
    ids, masks = store.sample("wall", 5, seed=3)
    assert ids.tolist() == [0, 2] and masks.shape == (2, 8, 8)
    np.testing.assert_array_equal(masks, truth["wall"][ids])
    ids, masks = store.sample("red-c", 1, seed=1)
    assert ids.shape == (1,) and ids[0] in (0, 3)
    np.testing.assert_array_equal(masks[0], truth["red-c"][ids[0]])
    assert store.sample("red-c", 1, seed=1)[0].tolist() == ids.tolist()  # repeatable
    assert store.sample("kitchen-s", 0)[1].shape == (0, 8, 8)


def test_sample_spreads_over_images_and_rejects_bad_k():
    rng = np.random.default_rng(5)
    masks = rng.random((2, 50, 3, 5)) < 0.3
    masks[0, :, 0, 0] = True  # present everywhere
    masks[0, 7] = True  # a full container
    store = pyneuron.ConceptStore.from_masks(masks, ["a", "b"])
    seen = set()
    for seed in range(5):
        ids, got = store.sample("a", 10, seed=seed)
        assert len(ids) == 10 and (np.diff(ids) > 0).all()
        np.testing.assert_array_equal(got, masks[0, ids])
        seen.update(ids.tolist())
    assert len(seen) > 20
    ids, got = store.sample(1, 1000)
    np.testing.assert_array_equal(ids, np.flatnonzero(masks[1].any((1, 2))))
    for bad in (-1, 1.5, True):
        with pytest.raises(pyneuron.PyneuronError, match="k must be an integer"):
            store.sample("a", bad)
    with pytest.raises(KeyError, match="no concept named 'c'"):
        store.sample("c", 1)


def test_info_and_sample_edge_cases():
    masks = np.ones((3, 3, 2, 2), dtype=bool)
    masks[2] = False  # an absent concept
    store = pyneuron.ConceptStore.from_masks(masks, ["a", "b", "c"])
    info = store.info()
    assert info.index.tolist() == [""]
    assert info.loc[""].tolist() == [3, 2, 24, 3]
    ids, got = store.sample("c", 4)
    assert ids.shape == (0,) and got.shape == (0, 2, 2)


@pytest.mark.parametrize(("size_in", "size_out"), [(2, 7), (480, 112), (16, 8), (6, 8), (5, 5)])
def test_resize_nearest_is_pil_nearest(size_in, size_out):
    rng = np.random.default_rng(size_in * 1000 + size_out)
    labels = rng.integers(0, 1200, size=(size_in, size_in + 3), dtype=np.int32)
    out = (size_out, size_out + 1)
    np.testing.assert_array_equal(resize_nearest(labels, out), pil_nearest(labels, out))
    mask = labels > 600
    expected = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize(out[::-1], Image.Resampling.NEAREST)
    )
    np.testing.assert_array_equal(resize_nearest(mask, out), expected > 0)


def test_resize_nearest_by_hand():
    # 2 -> 7: Pillow accumulates 1/7 + k*2/7 in double, and position 3 lands on 0.
    row = resize_nearest(np.array([[10, 20]]), (1, 7))
    assert row.tolist() == [[10, 10, 10, 10, 20, 20, 20]]
    assert resize_nearest(np.arange(4)[None], (1, 8)).tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]


# -- bad input -----------------------------------------------------------------------------


def small_broden(tmp_path: Path, pngs=None, **row) -> Path:
    pngs = {"x/o.png": np.array([[0, 3], [4, 3]])} if pngs is None else pngs
    rows = [{"image": "x/i.jpg", "sh": 2, "sw": 2, "object": "x/o.png", **row}]
    return write_broden(tmp_path / "b", rows, pngs)


def test_missing_files(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        broden(tmp_path / "nowhere", progress=False)
    root = small_broden(tmp_path)
    (root / "label.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"label\.csv"):
        broden(root, progress=False)
    (root / "index.csv").unlink()
    with pytest.raises(pyneuron.PyneuronError, match=r"index\.csv"):
        broden(root, progress=False)


def test_missing_segmentation_names_the_file(tmp_path):
    root = small_broden(tmp_path, part="x/missing_part.png")
    with pytest.raises(MissingFileError, match=r"x/missing_part\.png.*line 2, column part"):
        broden(root, grid=2, out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging directory left


def test_unknown_labels_name_file_and_label(tmp_path):
    root = small_broden(tmp_path, pngs={"x/o.png": np.array([[0, 3], [777, 3]])})
    with pytest.raises(BrodenError, match=r"segmentation .*x/o\.png holds label 777"):
        broden(root, grid=2, progress=False)
    root = small_broden(tmp_path / "2", scene="7;42")
    with pytest.raises(BrodenError, match=r"index\.csv line 2 \(scene\) holds label 42"):
        broden(root, grid=2, progress=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_undecodable_png_names_it_and_leaves_store_untouched(tmp_path, damage):
    root = small_broden(tmp_path)
    out = tmp_path / "store"
    broden(root, grid=2, out=out, progress=False)  # a good store already there
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    png = root / "images" / "x" / "o.png"
    data = png.read_bytes()
    png.write_bytes(b"not a png at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ConceptSourceError, match=r"cannot decode segmentation .*x/o\.png"):
        broden(root, grid=2, out=out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "store"]


def test_bad_csvs_and_arguments(tmp_path):
    root = small_broden(tmp_path)
    with pytest.raises(BrodenError, match=r"unknown categories \['objects'\]"):
        broden(root, categories=["objects"], progress=False)
    with pytest.raises(BrodenError, match="no image .* is left"):
        broden(root, subset="ade20k", progress=False)
    with pytest.raises(BrodenError, match="no image .* is left"):
        broden(root, categories=["scene"], progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="grid"):
        broden(root, grid=0, progress=False)
    dup = [*LABELS, (11, "wall", "object(1)")]
    root = write_broden(tmp_path / "dup", [{"image": "x/i.jpg", "scene": "7"}], {}, labels=dup)
    with pytest.raises(BrodenError, match="label name 'wall' is used by labels 3 and 11"):
        broden(root, progress=False)
    bad = [*LABELS[:-1], ("x", "rare", "object(1)")]
    root = write_broden(tmp_path / "bad", [{"image": "x/i.jpg", "scene": "7"}], {}, labels=bad)
    with pytest.raises(BrodenError, match="not an integer"):
        broden(root, progress=False)
    os.remove(root / "category.csv")  # without category.csv: the index columns
    (root / "label.csv").write_text("number,name\n7,kitchen-s\n")
    store = broden(root, grid=2, progress=False)
    assert store.names == ["kitchen-s"] and store.categories == [""]
    assert store.mask("kitchen-s").all()
