"""``mode="netdissect"``: NetDissect-Lite's category-restricted IoU, bit for bit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from netdissect_port import tally

import pyneuron
from pyneuron.engine.search import best_of_beam
from pyneuron.engine.upsample import unit_masks_from_activations

# Broden-like label numbering: label -> category (0 object, 1 part, 2 scene, 3 color).
OBJECT, PART_1, PART_2 = range(1, 8), range(8, 11), range(11, 14)
SCENE, COLOR = range(14, 17), range(17, 20)
N_LABELS = 21  # label 20: an object label that never occurs
CATEGORIES = ["object", "part", "scene", "color"]


def _category_of(label: int) -> int:
    for category, labels in enumerate((OBJECT, PART_1, SCENE, COLOR)):
        if label in labels:
            return category
    return 1 if label in PART_2 else 0


def _label_map(rng, labels, shape, unlabelled):
    coarse = rng.choice(np.asarray(list(labels)), size=(3, 3))
    label_map = np.kron(coarse, np.ones((shape[0] // 3 + 1, shape[1] // 3 + 1), dtype=int))
    label_map = label_map[: shape[0], : shape[1]].copy()
    label_map[rng.random(shape) < unlabelled] = 0
    return label_map


def random_broden(rng, n_images, shape):
    """Per image (pixel label maps, scalar labels), Broden-style; every image has a colour map."""
    images = []
    for _ in range(n_images):
        maps = [_label_map(rng, COLOR, shape, 0.3)]
        if rng.random() < 0.7:
            maps.append(_label_map(rng, OBJECT, shape, 0.4))
        if rng.random() < 0.5:  # parts: one or two layers
            maps.append(_label_map(rng, PART_1, shape, 0.6))
            if rng.random() < 0.5:
                maps.append(_label_map(rng, PART_2, shape, 0.7))
        scalars = sorted(rng.choice(list(SCENE), size=rng.integers(0, 3), replace=False).tolist())
        images.append((maps, scalars))
    return images


def store_of(images, shape):
    names = [f"label{k}" for k in range(1, N_LABELS)]
    categories = [CATEGORIES[_category_of(k)] for k in range(1, N_LABELS)]
    with pyneuron.ConceptStore.writer((len(images), *shape), names, categories) as writer:
        for i, (maps, scalars) in enumerate(images):
            stack = np.stack(maps)
            masks = {f"label{k}": (stack == k).any(axis=0) for k in np.unique(stack) if k != 0}
            writer.add_image(i, masks=masks, labels=[f"label{k}" for k in scalars])
    return writer.store


def labelcat():
    out = np.zeros((N_LABELS, len(CATEGORIES)))
    for label in range(N_LABELS):
        out[label, _category_of(label)] = 1
    return out


def random_case(seed, n_images=14, units=7, map_shape=(3, 4), shape=(10, 11)):
    rng = np.random.default_rng(seed)
    images = random_broden(rng, n_images, shape)
    features = rng.standard_normal((n_images, units, *map_shape)).astype(np.float32)
    features[:, 1] = np.round(features[:, 1])  # ties
    flat = features.transpose(1, 0, 2, 3).reshape(units, -1).astype(np.float64)
    threshold = np.quantile(flat, 0.8, axis=1)
    threshold[0] = flat[0].max() + 1  # a unit that never fires
    threshold[2] = flat[2].min() - 1  # one that fires everywhere
    return images, features, threshold, shape


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iou_table_matches_netdissect_lite_tally(seed, threads):
    images, features, threshold, shape = random_case(seed)
    expected = tally(features, threshold, images, labelcat(), shape)[:, 1:]
    store = store_of(images, shape)
    units = unit_masks_from_activations(features, threshold, shape, progress=False)
    table = pyneuron.iou_table(units, store, mode="netdissect", progress=False)
    assert table.view(np.uint64).tolist() == expected.view(np.uint64).tolist()
    dataset = pyneuron.iou_table(units, store, progress=False)
    assert (table >= dataset).all()
    assert (table > dataset).sum() > 10  # the restriction matters on this data
    assert not table[0].any()  # the silent unit


def test_minimal_case_of_the_issue():
    concept = np.zeros((1, 2, 2, 2), dtype=bool)
    concept[0, 0, 0] = True  # 2 pixels in image 0
    unit = np.zeros((1, 2, 2, 2), dtype=bool)
    unit[0, :, 0, 0] = True  # one pixel in each image, one on the concept
    store = pyneuron.ConceptStore.from_masks(concept, ["c1"], ["object"])
    units = pyneuron.UnitMasks.from_masks(unit)
    netdissect = pyneuron.iou_table(units, store, mode="netdissect", progress=False)
    assert netdissect[0, 0] == 0.499999999975 == 1 / (2 + 1e-10)
    assert pyneuron.iou_table(units, store, progress=False)[0, 0] == 1 / (3 + 1e-10)


def test_length_one_explain_ranks_by_netdissect_iou(threads):
    images, features, threshold, shape = random_case(3, units=9)
    expected = tally(features, threshold, images, labelcat(), shape)[:, 1:]
    store = store_of(images, shape)
    units = unit_masks_from_activations(features, threshold, shape, progress=False)
    beam = pyneuron.explain(
        units, store, length=1, beam_size=3, mode="netdissect", full_beam=True,
        batch_size=4, progress=False,
    )  # fmt: skip
    dataset = pyneuron.score  # the other metrics stay dataset-wide
    for u in range(expected.shape[0]):
        rows = beam[beam["unit"] == u]
        order = np.lexsort((np.arange(expected.shape[1]), -expected[u]))
        ranked = [c for c in order if expected[u, c] > 0]
        if not ranked:
            assert rows["formula"].isna().all() and (rows["iou"] == 0).all()
            continue
        assert rows["formula"].tolist() == [store.names[c] for c in ranked[:3]]
        assert rows["iou"].tolist() == [expected[u, c] for c in ranked[:3]]
        assert rows["score"].tolist() == rows["iou"].tolist()
        best = rows.iloc[0]
        assert best["primitive"] == best["formula"] and best["primitive_iou"] == best["iou"]
        metrics = dataset(best["formula"], units, store).loc[u]
        for column in ("detection_accuracy", "activation_coverage", "samples_coverage"):
            np.testing.assert_equal(best[column], metrics[column])
    one_row = pyneuron.explain(units, store, length=1, mode="netdissect", progress=False)
    pd.testing.assert_frame_equal(one_row, best_of_beam(beam))


def test_bad_modes_raise_clear_errors():
    images, features, threshold, shape = random_case(4, n_images=3, units=3)
    store = store_of(images, shape)
    units = unit_masks_from_activations(features, threshold, shape, progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="unknown IoU mode"):
        pyneuron.iou_table(units, store, mode="NetDissect", progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="length=1"):
        pyneuron.explain(units, store, length=3, mode="netdissect", progress=False)
