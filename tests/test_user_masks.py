"""User masks: numpy arrays, per-concept PNG folders, semantic-segmentation label maps and
COCO annotations, each checked exactly against hand-made truth, plus bad input."""

from __future__ import annotations

import doctest
import importlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pyneuron
from pyneuron.concepts.user import (
    ConceptSourceError,
    MissingFileError,
    from_arrays,
    from_coco,
    from_label_maps,
    from_mask_folder,
    resize_nearest,
)


def test_docstring_examples():
    module = importlib.import_module("pyneuron.concepts.user")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0


def assert_store(store, truth: dict[str, np.ndarray]) -> None:
    assert store.names == list(truth)
    for name, mask in truth.items():
        np.testing.assert_array_equal(store.mask(name), mask, err_msg=name)


# -- numpy arrays ------------------------------------------------------------------------------


def test_from_arrays_array_and_dict_forms(tmp_path):
    rng = np.random.default_rng(0)
    masks = rng.random((3, 5, 4, 6)) < 0.3
    masks[2, 1] = True
    names = ["a", "b", "c"]
    truth = dict(zip(names, masks))
    store = from_arrays(masks, names, "object")
    assert_store(store, truth)
    assert store.categories == ["object"] * 3 and store.metadata["source"] == "arrays"
    store = from_arrays(truth, categories={"b": "part"}, progress=True)
    assert_store(store, truth)
    assert store.categories == ["", "part", ""]
    store = from_arrays(masks, names, ["x", "y", "z"], out=tmp_path / "s")
    assert_store(pyneuron.ConceptStore.open(tmp_path / "s"), truth)
    assert pyneuron.ConceptStore.open(tmp_path / "s").categories == ["x", "y", "z"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (({},), "no concept masks"),
        ((np.zeros((0, 2, 2, 2), bool), []), "no concept masks"),
        ((np.zeros((2, 2, 2), bool), ["a"]), "concepts, images, height, width"),
        ((np.zeros((1, 2, 2, 2), bool),), "one name per concept"),
        ((np.zeros((2, 2, 2, 2), bool), ["a"]), "1 names for 2"),
        ((np.zeros((2, 2, 2, 2), bool), ["a", "a"]), "duplicate concept name 'a'"),
        ((np.zeros((1, 2, 2, 2), float), ["a"]), "must be bool"),
        (({"a": np.zeros((2, 2, 2), bool), "b": np.zeros((2, 3, 2), bool)},), "shape"),
        (({"a": np.zeros((2, 2, 2), bool)}, ["a"]), "give names only with an array"),
        ((np.zeros((1, 2, 2, 2), bool), ["a"], ["x", "y"]), "2 categories for 1"),
        ((np.zeros((1, 2, 2, 2), bool), ["a"], {"b": "x"}), "unknown concepts"),
    ],
)
def test_from_arrays_bad_input(args, message):
    with pytest.raises(ConceptSourceError, match=message):
        from_arrays(*args)


# -- a folder of per-concept masks ------------------------------------------------------------


def save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode == "P":
        image = image.convert("P")
    elif mode == "1":
        image = image.convert("1")
    image.save(path)


@pytest.fixture
def mask_folder(tmp_path):
    root = tmp_path / "masks"
    dog = np.zeros((4, 4), np.uint8)
    dog[1:3, 0] = 255
    save(root / "dog" / "img_b.png", dog)  # 4x4 -> 8x8: each pixel a 2x2 block
    big = np.zeros((16, 16), np.uint8)
    big[1, 1] = big[3, 5] = big[2, 2] = 1  # 16 -> 8 keeps odd rows/cols: (1,1), (3,5)
    save(root / "dog" / "img_a.png", big, "P")
    sky = np.zeros((8, 8, 3), np.uint8)
    sky[:3, :, 2] = 200  # only the blue channel is on
    save(root / "sky" / "img_a.png", sky)
    save(root / "sky" / "img_c.png", np.ones((8, 8), np.uint8) * 255, "1")
    (root / "grass").mkdir()  # a concept with no masks at all
    (root / ".cache").mkdir()  # hidden: skipped
    (root / "sky" / "notes.txt").write_text("not a mask")
    truth_dog = np.zeros((3, 8, 8), bool)
    truth_dog[0, 0, 0] = truth_dog[0, 1, 2] = True
    truth_dog[1, 2:6, 0:2] = True
    truth_sky = np.zeros((3, 8, 8), bool)
    truth_sky[0, :3] = True
    truth_sky[2] = True
    truth = {"dog": truth_dog, "grass": np.zeros((3, 8, 8), bool), "sky": truth_sky}
    return root, truth


def test_from_mask_folder_discovers_images_and_concepts(mask_folder, tmp_path):
    root, truth = mask_folder
    store = from_mask_folder(root, grid=8, categories={"sky": "scene"}, progress=False)
    assert store.metadata["images"] == ["img_a", "img_b", "img_c"]
    assert store.categories == ["", "", "scene"]
    assert_store(store, truth)
    on_disk = from_mask_folder(root, grid=8, out=tmp_path / "s", progress=True)
    assert_store(pyneuron.ConceptStore.open(on_disk.path), truth)


def test_from_mask_folder_given_order_and_subset(mask_folder):
    root, truth = mask_folder
    store = from_mask_folder(
        root, ["img_c", "img_a", "img_zzz"], grid=(8, 8), concepts=["sky", "dog"], progress=False
    )
    assert store.names == ["sky", "dog"]
    np.testing.assert_array_equal(store.mask("sky")[:2], truth["sky"][[2, 0]])
    assert not store.mask("sky")[2].any()
    np.testing.assert_array_equal(store.mask("dog")[1], truth["dog"][0])
    assert store.images_with("dog").tolist() == [1]  # img_b is not among the images


def test_from_mask_folder_bad_input(mask_folder, tmp_path):
    root, _ = mask_folder
    with pytest.raises(MissingFileError, match="does not exist"):
        from_mask_folder(tmp_path / "nowhere", progress=False)
    with pytest.raises(MissingFileError, match="concept folder .*cat"):
        from_mask_folder(root, concepts=["dog", "cat"], progress=False)
    with pytest.raises(ConceptSourceError, match="duplicate concept name 'dog'"):
        from_mask_folder(root, concepts=["dog", "dog"], progress=False)
    with pytest.raises(ConceptSourceError, match="no concepts given"):
        from_mask_folder(root, concepts=[], progress=False)
    with pytest.raises(ConceptSourceError, match="matches any of the 1 images"):
        from_mask_folder(root, ["img_q"], progress=False)
    with pytest.raises(ConceptSourceError, match="duplicate image name"):
        from_mask_folder(root, ["img_a", "img_a"], progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptSourceError, match="no concept sub-folders"):
        from_mask_folder(tmp_path / "empty", progress=False)
    (tmp_path / "empty" / "dog").mkdir()
    with pytest.raises(ConceptSourceError, match="no mask files"):
        from_mask_folder(tmp_path / "empty", progress=False)
    (root / "dog" / "img_b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ConceptSourceError, match=r"cannot decode mask .*dog/img_b\.png"):
        from_mask_folder(root, grid=8, out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


# -- semantic-segmentation label maps -----------------------------------------------------------

CLASSES = ["wall", "floor", "sky", "person"]


@pytest.fixture
def label_folder(tmp_path):
    folder = tmp_path / "annotations_detectron2" / "validation"
    folder.mkdir(parents=True)
    a = np.array([[0, 0, 1, 1], [255, 0, 1, 3], [2, 2, 2, 2], [2, 255, 255, 3]], np.uint8)
    save(folder / "ADE_val_1.png", a)  # 4x4, uint8 L
    b = np.full((2, 2), 1, np.uint16)
    b[0, 0] = 255
    Image.fromarray(b).save(folder / "ADE_val_2.png")  # uint16 (I;16), 2x2 -> 4x4 blocks
    c = Image.fromarray(np.array([[3, 3], [0, 255]], np.uint8)).convert("P")
    c.save(folder / "ADE_val_3.png")  # palette: the indices are the labels
    (folder / "README").write_text("ignored: wrong suffix")
    truth = {name: np.zeros((3, 4, 4), bool) for name in CLASSES}
    for k, name in enumerate(CLASSES):
        truth[name][0] = a == k
    truth["floor"][1] = True
    truth["floor"][1, :2, :2] = False
    return folder, truth


def test_from_label_maps_detectron2_layout(label_folder, tmp_path):
    folder, truth = label_folder
    store = from_label_maps(folder, CLASSES, grid=4, categories="object", progress=False)
    assert store.metadata["images"] == ["ADE_val_1", "ADE_val_2", "ADE_val_3"]
    assert store.categories == ["object"] * 4
    # image 3 is a palette PNG: its indices [[3, 3], [0, 255]] are the labels
    image_c = Image.open(folder / "ADE_val_3.png")
    assert image_c.mode == "P"
    indices = np.asarray(image_c)
    big = np.kron(indices, np.ones((2, 2), np.uint8))
    for k, name in enumerate(CLASSES):
        truth[name][2] = big == k
    assert_store(store, truth)
    files = sorted(folder.glob("*.png"))
    again = from_label_maps(files[::-1], CLASSES, grid=4, out=tmp_path / "s", progress=False)
    assert again.metadata["images"] == ["ADE_val_3", "ADE_val_2", "ADE_val_1"]
    np.testing.assert_array_equal(again.mask("sky")[2], truth["sky"][0])


def test_from_label_maps_raw_ade_and_arrays():
    raw = np.array([[[0, 1], [2, 150]]], dtype=np.uint8)  # raw ADE: 0 = other, 1..150
    names = [f"class{k}" for k in range(150)]
    store = from_label_maps(raw, names, grid=2, reduce_zero_label=True, progress=False)
    assert store.mask("class0")[0].tolist() == [[False, True], [False, False]]
    assert store.mask("class149")[0].tolist() == [[False, False], [False, True]]
    assert store.table()["pixels"].sum() == 3
    maps = np.array([[[0, 1], [7, 9]]])
    store = from_label_maps(maps, ["a", "b"], grid=(2, 2), ignore_index=[7, 9], progress=False)
    assert store.mask("a")[0].tolist() == [[True, False], [False, False]]
    assert store.mask("b")[0].tolist() == [[False, True], [False, False]]
    store = from_label_maps(np.zeros((1, 3, 3), int), ["a"], grid=6, ignore_index=None)
    assert store.mask("a").all()


def test_from_label_maps_bad_input(label_folder, tmp_path):
    folder, _ = label_folder
    with pytest.raises(ConceptSourceError, match=r"ADE_val_1\.png holds value\(s\) \[3\]"):
        from_label_maps(folder, CLASSES[:3], grid=4, progress=False)
    with pytest.raises(ConceptSourceError, match=r"holds value\(s\) \[-1\]"):
        from_label_maps(np.full((1, 2, 2), -1), ["a"], grid=2, progress=False)
    with pytest.raises(ConceptSourceError, match="duplicate class name 'wall'"):
        from_label_maps(folder, ["wall", "wall"], progress=False)
    with pytest.raises(ConceptSourceError, match="no class names"):
        from_label_maps(folder, [], progress=False)
    with pytest.raises(MissingFileError):
        from_label_maps(tmp_path / "nowhere", CLASSES, progress=False)
    with pytest.raises(MissingFileError, match="missing.png"):
        from_label_maps([folder / "missing.png"], CLASSES, progress=False)
    with pytest.raises(ConceptSourceError, match="no label maps"):
        from_label_maps(folder, CLASSES, suffix=".tif", progress=False)
    with pytest.raises(ConceptSourceError, match="no label maps given"):
        from_label_maps([], CLASSES, progress=False)
    with pytest.raises(ConceptSourceError, match=r"\(images, height, width\)"):
        from_label_maps(np.zeros((2, 2), int), CLASSES, progress=False)
    save(folder / "ADE_val_4.png", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ConceptSourceError, match=r"ADE_val_4\.png must be a single-channel"):
        from_label_maps(folder, CLASSES, grid=4, progress=False)
    (folder / "ADE_val_4.png").write_bytes(b"broken")
    with pytest.raises(ConceptSourceError, match=r"cannot decode label map .*ADE_val_4\.png"):
        from_label_maps(folder, CLASSES, grid=4, out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


# -- COCO annotations ---------------------------------------------------------------------------


def column_major_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE, written out by hand: run lengths of the column-major
    pixels, starting with a run of zeros."""
    flat = mask.T.reshape(-1).astype(int)
    counts, value, run = [], 0, 0
    for bit in flat:
        if bit == value:
            run += 1
        else:
            counts.append(run)
            value, run = bit, 1
    counts.append(run)
    return counts


@pytest.fixture
def coco():
    from pycocotools import mask as mask_utils

    person_rle = np.zeros((6, 4), bool)
    person_rle[2:5, 1] = True
    person_rle[0, 3] = True
    dog_compressed = np.zeros((4, 8), bool)
    dog_compressed[1:3, 2:6] = True
    encoded = mask_utils.encode(np.asfortranarray(dog_compressed.astype(np.uint8)))
    data = {
        "images": [
            {"id": 20, "file_name": "b.jpg", "height": 4, "width": 8},
            {"id": 10, "file_name": "a.jpg", "height": 6, "width": 4},
            {"id": 30, "file_name": "c.jpg", "height": 4, "width": 4},
        ],
        "categories": [
            {"id": 18, "name": "dog", "supercategory": "animal"},
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 5, "name": "car", "supercategory": "vehicle"},
        ],
        "annotations": [
            # image 10 (6x4): a polygon person and an uncompressed-RLE person, merged
            {"id": 1, "image_id": 10, "category_id": 1, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
            {
                "id": 2,
                "image_id": 10,
                "category_id": 1,
                "iscrowd": 1,
                "segmentation": {"size": [6, 4], "counts": column_major_counts(person_rle)},
            },
            # image 20 (4x8): compressed RLE dog (counts as str, as in JSON files)
            {
                "id": 3,
                "image_id": 20,
                "category_id": 18,
                "segmentation": {"size": [4, 8], "counts": encoded["counts"].decode()},
            },
            {"id": 4, "image_id": 20, "category_id": 18, "segmentation": []},  # empty polygon
        ],
    }
    person = np.zeros((6, 4), bool)
    person[0:2, 0:2] = True
    return data, person, person_rle, dog_compressed


def test_from_coco_polygons_rle_and_compressed_rle(coco, tmp_path):
    data, person_poly, person_rle, dog = coco
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    store = from_coco(path, grid=(6, 4), progress=False)
    assert store.names == ["person", "car", "dog"]  # category-id order
    assert store.categories == ["object"] * 3
    assert store.metadata["image_ids"] == [10, 20, 30]
    assert store.metadata["images"] == ["a.jpg", "b.jpg", "c.jpg"]
    truth_person = np.zeros((3, 6, 4), bool)
    truth_person[0] = person_poly | person_rle
    np.testing.assert_array_equal(store.mask("person"), truth_person)
    # dog: 4x8 -> 6x4; rows 0,1,1,2,2,3: Pillow accumulates 1/3 + k * 2/3 in double, and
    # k = 4 lands just below 3 (the textbook floor((k + .5) * 4/6) would give 3); cols 1,3,5,7
    truth_dog = np.zeros((3, 6, 4), bool)
    truth_dog[1] = dog[np.ix_([0, 1, 1, 2, 2, 3], [1, 3, 5, 7])]
    np.testing.assert_array_equal(store.mask("dog"), truth_dog)
    assert not store.mask("car").any()

    no_crowd = from_coco(data, grid=(6, 4), crowd=False, image_ids=[30, 10], progress=False)
    assert no_crowd.metadata["image_ids"] == [30, 10]
    np.testing.assert_array_equal(no_crowd.mask("person")[1], person_poly)
    assert no_crowd.images_with("dog").size == 0
    sup = from_coco(data, grid=2, use_supercategory=True, out=tmp_path / "s", progress=True)
    assert pyneuron.ConceptStore.open(tmp_path / "s").categories == ["person", "vehicle", "animal"]
    assert sup.grid.shape == (3, 2, 2)


def test_from_coco_bad_input(coco, tmp_path, monkeypatch):
    data, *_ = coco
    with pytest.raises(MissingFileError, match="does not exist"):
        from_coco(tmp_path / "nowhere.json", progress=False)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConceptSourceError, match="cannot read COCO JSON"):
        from_coco(tmp_path / "bad.json", progress=False)

    def edited(**changes):
        new = json.loads(json.dumps(data))
        for key, value in changes.items():
            new[key] = value(new[key]) if callable(value) else value
        return new

    cases = [
        (edited(categories=[]), "no categories"),
        (edited(images=[]), "no images"),
        (edited(images=lambda x: x + x[:1]), "repeat an image id"),
        (edited(categories=lambda c: c + [{"id": 99, "name": "dog"}]), "duplicate COCO category"),
        ({"images": []}, "need 'images' and 'categories'"),
        (edited(annotations=lambda a: a + [{**a[0], "category_id": 77}]), "category 77"),
        (edited(annotations=lambda a: a + [{**a[0], "image_id": 77}]), "image 77, not in"),
        (edited(annotations=lambda a: a + [{"id": 9, "image_id": 10}]), "needs 'image_id'"),
        (
            edited(annotations=lambda a: [{**a[2], "image_id": 10}]),
            r"annotation 3 \(image 10\): its RLE size \[4, 8\]",
        ),
        (
            edited(annotations=lambda a: [{**a[0], "segmentation": [[1, 2]]}]),
            "cannot decode the segmentation of annotation 1",
        ),
        (edited(images=[{"id": 10}], annotations=[]), "needs integer 'height' and 'width'"),
    ]
    for bad, message in cases:
        with pytest.raises(ConceptSourceError, match=message):
            from_coco(bad, progress=False)
    with pytest.raises(ConceptSourceError, match=r"image ids \[4\]"):
        from_coco(data, image_ids=[10, 4], progress=False)
    with pytest.raises(ConceptSourceError, match="repeat an id"):
        from_coco(data, image_ids=[10, 10], progress=False)
    with pytest.raises(ConceptSourceError, match="cannot decode"):
        from_coco(cases[-2][0], grid=4, out=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ImportError, match="pip install pycocotools"):
        from_coco(data, progress=False)


def test_from_coco_sampled_decoding_equals_full_decode_and_resize():
    # Oracle: pycocotools' full decode (annToMask's way), then the nearest resize.
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(5)
    for trial in range(30):
        ih, iw = (int(v) for v in rng.integers(1, 40, 2))
        grid = tuple(int(v) for v in rng.integers(1, 30, 2))
        polygons = [
            [float(v) for v in rng.uniform(-3, max(ih, iw) + 3, 2 * int(rng.integers(3, 8)))]
            for _ in range(int(rng.integers(1, 3)))
        ]
        with warnings.catch_warnings():  # pycocotools vs numpy 2's __array__(copy=...)
            warnings.simplefilter("ignore", DeprecationWarning)
            rles = mask_utils.frPyObjects(polygons, ih, iw)
            truth = np.asarray(mask_utils.decode(rles), bool)
        blob = rng.random((ih, iw)) < 0.4
        data = {
            "images": [{"id": 1, "height": ih, "width": iw}],
            "categories": [{"id": 1, "name": "poly"}, {"id": 2, "name": "rle"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "segmentation": polygons},
                {
                    "id": 2,
                    "image_id": 1,
                    "category_id": 2,
                    "segmentation": {"size": [ih, iw], "counts": column_major_counts(blob)},
                },
            ],
        }
        store = from_coco(data, grid=grid, progress=False)
        expected_poly = resize_nearest(truth.any(axis=2), grid)
        np.testing.assert_array_equal(store.mask("poly")[0], expected_poly, err_msg=str(trial))
        np.testing.assert_array_equal(store.mask("rle")[0], resize_nearest(blob, grid))


@pytest.mark.parametrize(
    ("image", "segmentation", "message"),
    [
        ({"height": 100000, "width": 100000}, [[0, 0, 9, 0, 9, 9]], "100000x100000"),
        ({"height": 0, "width": 0}, [[0, 0, 1, 0, 1, 1]], "at least 1"),
        ({"height": 10, "width": 10}, [[0, 0, 1e9, 0, 1e9, 1e9]], "far outside the 10x10"),
        ({"height": 10, "width": 10}, [[0, 0, float("nan"), 0, 1, 1]], "far outside"),
        ({"height": 10, "width": 10}, [[0, 0, "x", 0, 1, 1]], "must be numbers"),
        ({"height": 4, "width": 4}, {"size": [4, 4], "counts": [0, 17]}, "cover 17 pixels"),
        ({"height": 4, "width": 4}, {"size": [4, 4], "counts": [5, -1, 12]}, "negative"),
        ({"height": 4, "width": 4}, {"size": [4, 4], "counts": "zz"}, "character 'z'"),
        ({"height": 4, "width": 4}, {"size": [4, 4], "counts": "1P"}, "ends in the middle"),
        ({"height": 4, "width": 4}, {"size": [4, 4], "counts": None}, "'counts' must be"),
    ],
)
def test_from_coco_refuses_what_would_crash_pycocotools(image, segmentation, message):
    data = {
        "images": [{"id": 1, **image}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "segmentation": segmentation}],
    }
    with pytest.raises(ConceptSourceError, match=message):
        from_coco(data, grid=8, progress=False)


def test_from_coco_huge_image_costs_only_its_grid():
    # A 30000x30000 image (900 M pixels) is never decoded at full size.
    data = {
        "images": [{"id": 1, "height": 30000, "width": 30000}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": [[0, 0, 15000, 0, 15000, 30000, 0, 30000]],
            }
        ],
    }
    store = from_coco(data, grid=8, progress=False)
    np.testing.assert_array_equal(store.mask("a")[0], np.repeat([[True] * 4 + [False] * 4], 8, 0))


def test_from_mask_folder_symlinks_outside_the_root_need_a_flag(mask_folder, tmp_path):
    root, truth = mask_folder
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save(outside / "img_b.png", np.full((8, 8), 255, np.uint8))
    (root / "grass" / "img_b.png").symlink_to(outside / "img_b.png")
    with pytest.raises(ConceptSourceError, match="leads outside the mask folder.*allow_outside"):
        from_mask_folder(root, grid=8, progress=False)
    store = from_mask_folder(root, grid=8, allow_outside_links=True, progress=False)
    assert store.images_with("grass").tolist() == [1]
    # A link that stays inside the root is followed without the flag.
    (root / "grass" / "img_b.png").unlink()
    (root / "grass" / "img_b.png").symlink_to(root / "dog" / "img_b.png")
    store = from_mask_folder(root, grid=8, progress=False)
    np.testing.assert_array_equal(store.mask("grass")[1], truth["dog"][1])
    # So is a concept folder linked from outside, only with the flag.
    (root / "tree").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ConceptSourceError, match="leads outside"):
        from_mask_folder(root, grid=8, progress=False)
    assert "tree" in from_mask_folder(root, grid=8, allow_outside_links=True, progress=False).names
