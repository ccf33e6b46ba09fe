"""One-call dissection on hand-built models whose units are known concept detectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyneuron


@pytest.fixture
def planted():
    rng = np.random.default_rng(0)
    n, size = 40, 8
    concepts = rng.random((5, n, size, size)) < 0.3
    names = ["a", "b", "c", "d", "e"]
    store = pyneuron.ConceptStore.from_masks(concepts, names)
    images = concepts[:3].transpose(1, 0, 2, 3).astype(np.float32)  # channel k = concept k
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 0] = 1.0  # unit 0 = a
        model[0].weight[1, 1] = 1.0  # unit 1 = b
        model[0].weight[2, :, 0, 0] = torch.tensor([1.0, 1.0, -2.0])  # (a OR b) AND NOT c
    return model.eval(), images, store, concepts


def test_planted_units_are_explained_exactly(planted):
    model, images, store, _ = planted
    table = pyneuron.dissect(model, "0", images, store, thresholds=0.5, progress=False)
    assert table["layer"].tolist() == ["0"] * 3
    assert table["threshold"].tolist() == [0.5] * 3
    assert table.loc[0, "primitive"] == "a" and table.loc[0, "primitive_iou"] == pytest.approx(1.0)
    assert table.loc[1, "primitive"] == "b"
    assert table.loc[2, "formula"] in ("((a OR b) AND NOT c)", "((b OR a) AND NOT c)")
    assert table["iou"].to_numpy() == pytest.approx(1.0)


def test_quantile_thresholds_and_upsampling(planted):
    model, images, store, concepts = planted
    pooled = torch.nn.Sequential(model[0], torch.nn.AvgPool2d(2))  # 4x4 maps, upsampled to 8x8
    table = pyneuron.dissect(pooled, "1", images, store, quantile=0.2, length=1, progress=False)
    assert table.loc[0, "primitive"] == "a" and table.loc[1, "primitive"] == "b"
    acts = pyneuron.capture(pooled, "1", images, progress=False)["1"]
    expected = pyneuron.quantile_thresholds(acts, 0.2)
    np.testing.assert_array_equal(table["threshold"], expected)


def test_activation_ranges(planted):
    model, images, store, _ = planted
    table = pyneuron.dissect(model, "0", images, store, ranges=2, length=2, progress=False)
    assert {"range", "lower", "upper"} <= set(table.columns)
    assert set(table["unit"]) <= {0, 1, 2}
    assert (table["lower"] <= table["upper"]).all()


def test_image_count_must_match_the_store(planted):
    model, images, store, _ = planted
    with pytest.raises(pyneuron.GridMismatchError, match="captured 39 images"):
        pyneuron.dissect(model, "0", images[:39], store, thresholds=0.5, progress=False)
