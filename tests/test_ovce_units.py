"""OVCE's unit rules, bit for bit: activation ranges (scikit-learn's KMeans), unit masks
(torch's bilinear interpolate, strict range tests) and classic thresholds (compexp's
seeded estimator at q = 0.01), each against a literal implementation of OVCE's code
(``utils/activations_utils.py`` of aiea-lab/ovce and the ``sorted(...)`` of its
``run_fast.py``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from compexp_quantile_port import QuantileVectorReference

import pyneuron
from pyneuron.engine import upsample as upsample_module
from pyneuron.engine.upsample import unit_masks_from_activations
from pyneuron.model.compexp_quantiles import readout_index
from pyneuron.model.dissect import explain_activations, explain_activations_split
from pyneuron.model.distributed import layer_units_on_ray
from pyneuron.model.layer_units import layer_ranges, layer_units, unit_thresholds
from pyneuron.model.thresholds import activation_ranges, quantile_thresholds

KMeans = pytest.importorskip("sklearn.cluster").KMeans

#: OVCE's own KMeans calls warn about the clusters it leaves empty (pyneuron's do not).
pytestmark = pytest.mark.filterwarnings("ignore:Number of distinct clusters")

K = 5


# --------------------------------------------------------------------------- references


def ovce_ranges(layer_activations: np.ndarray, num_clusters: int = K) -> np.ndarray:
    """OVCE's ``compute_activation_ranges`` per unit, read as its scripts read it
    (``sorted(...)``). Where OVCE stops with an error (fewer values than clusters, a
    cluster left empty) this gives NaN rows, last, as pyneuron documents."""
    layer = torch.from_numpy(layer_activations)
    result = []
    for unit in range(layer.shape[1]):
        activations = layer[:, unit, :, :].reshape(-1, 1)
        if torch.all(activations >= 0):
            activations = activations[activations > 0]
            activations = activations.reshape(-1, 1)
        if activations.shape[0] < num_clusters:  # KMeans raises: n_samples < n_clusters
            result.append([(math.nan, math.nan)] * num_clusters)
            continue
        clusters = KMeans(n_clusters=num_clusters, random_state=0).fit(activations)
        ranges = []
        for label in range(num_clusters):
            cluster_activations = activations[clusters.labels_ == label]
            if cluster_activations.numel() == 0:  # torch.min raises in OVCE
                ranges.append((math.nan, math.nan))
                continue
            lower_bound = torch.min(cluster_activations)
            upper_bound = torch.max(cluster_activations)
            ranges.append((lower_bound.item(), upper_bound.item()))
        found = sorted(r for r in ranges if not math.isnan(r[0]))
        result.append(found + [r for r in ranges if math.isnan(r[0])])
    return np.array(result, dtype=np.float64)


def ovce_bitmaps(unit_activations: torch.Tensor, activation_range, mask_shape) -> np.ndarray:
    """OVCE's ``compute_bitmaps``, reshaped back to (N, H, W)."""
    lower, upper = activation_range
    upsampled_activations = torch.nn.functional.interpolate(
        unit_activations.unsqueeze(1), size=mask_shape, mode="bilinear"
    )
    upsampled_activations = upsampled_activations.squeeze(1)
    bitmaps = torch.where(
        (upsampled_activations > lower) & (upsampled_activations < upper), True, False
    )
    return bitmaps.numpy()


def ovce_threshold(unit_activations: np.ndarray, quantile: float = 0.01) -> float:
    """OVCE's ``quantile_threshold(..., avoid_zero=False)`` of one unit (N, h, w):
    a fresh ``QuantileVector(depth=1, seed=1)`` fed 64 images at a time."""
    quant = QuantileVectorReference(1, seed=1)
    for i in range(0, unit_activations.shape[0], 64):
        quant.add(unit_activations[i : i + 64].reshape(-1, 1))
    return float(quant.readout(1000)[:, int(1000 * (1 - quantile) - 1)][0])


def ovce_layer(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """ReLU-like and signed units with ties, few distinct values and dead units."""
    acts = rng.standard_normal((n, 9, h, w)).astype(np.float32)
    acts[:, :4] = np.maximum(acts[:, :4] * rng.uniform(0.5, 3, (1, 4, 1, 1)), 0)
    acts[:, 2] = np.round(acts[:, 2] * 2) / 2  # ReLU with many ties
    acts[:, 3] = np.maximum(acts[:, 3], 0) ** 2  # skewed
    acts[:, 4] = np.round(acts[:, 4] * 4) / 4  # signed, ties, zeros kept
    acts[:, 5] = 0.0
    acts[:, 5, 0, 0] = np.arange(n) % 3 + 1.0  # three distinct values: two empty clusters
    acts[:, 6] = 0.0  # dead unit
    acts[:, 7] = 0.0
    acts[:3, 7, 0, 0] = [1.0, 2.0, 4.0]  # fewer values than clusters
    acts[:, 8] = np.where(acts[:, 8] < -1.5, -1.0, 0.0)  # signed: only 0 and -1
    return acts


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("seed", [0, 1])
def test_sklearn_ranges_are_ovces(seed):
    rng = np.random.default_rng(seed)
    acts = ovce_layer(rng, 30, 5, 6)
    expected = ovce_ranges(acts)
    for batch in (None, 7):
        got = activation_ranges(acts, K, method="sklearn", batch_images=batch)
        assert got.shape == (9, K, 2) and got.dtype == np.float64
        np.testing.assert_array_equal(got, expected)
    assert np.isnan(got[5, 3:]).all() and not np.isnan(got[5, :3]).any()
    assert np.array_equal(got[5, :3], [[1, 1], [2, 2], [3, 3]])
    assert np.isnan(got[6]).all() and np.isnan(got[7]).all()
    assert got[4, 0, 0] < 0 and ((got[4, :, 0] <= 0) & (got[4, :, 1] >= 0)).any()  # zeros kept
    assert np.isnan(got[8, 2:]).all() and np.array_equal(got[8, :2], [[-1, -1], [0, 0]])
    default = activation_ranges(acts, K)  # pyneuron's Lloyd's: other clusters
    assert not np.array_equal(default[:4], got[:4])


def test_sklearn_ranges_of_float64_activations_fit_in_float64():
    acts = np.maximum(np.random.default_rng(2).standard_normal((20, 3, 4, 4)), 0)
    np.testing.assert_array_equal(
        activation_ranges(acts, 4, method="sklearn"), ovce_ranges(acts, 4)
    )


def test_sklearn_ranges_subsampled():
    """With max_samples: fitted on the seeded sample (in image order), every value then
    assigned by the model's predict."""
    rng = np.random.default_rng(3)
    acts = ovce_layer(rng, 40, 4, 4)  # 640 values per unit
    cap = 200
    got = activation_ranges(acts, K, method="sklearn", max_samples=cap, seed=5, batch_images=6)
    draw = np.random.default_rng(5)
    for unit in range(acts.shape[1]):
        values = acts[:, unit].reshape(-1)
        if (values >= 0).all():
            values = values[values > 0]
        if values.size > cap:
            fit_on = values[np.sort(draw.choice(values.size, cap, replace=False))]
        else:
            fit_on = values
        if fit_on.size < K:
            assert np.isnan(got[unit]).all()
            continue
        model = KMeans(n_clusters=K, random_state=0).fit(fit_on.reshape(-1, 1))
        labels = model.predict(values.reshape(-1, 1))
        rows = [(values[labels == j].min(), values[labels == j].max()) for j in set(labels)]
        rows = sorted(rows) + [(np.nan, np.nan)] * (K - len(rows))
        np.testing.assert_array_equal(got[unit], np.array(rows, dtype=np.float64), str(unit))
    full = activation_ranges(acts, K, method="sklearn")
    assert not np.array_equal(got, full, equal_nan=True)  # the sample changes the fit


def test_ranges_method_errors(monkeypatch):
    acts = np.ones((3, 2, 2, 2), dtype=np.float32)
    with pytest.raises(pyneuron.PyneuronError, match="unknown ranges method 'kmeans'"):
        activation_ranges(acts, method="kmeans")
    with pytest.raises(pyneuron.PyneuronError, match="max_samples"):
        activation_ranges(acts, method="sklearn", max_samples=0)
    bad = acts.copy()
    bad[2, 1, 0, 0] = np.nan
    with pytest.raises(pyneuron.PyneuronError, match=r"unit 1 .* image 2;"):
        activation_ranges(bad, method="sklearn")
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)  # scikit-learn not installed
    with pytest.raises(pyneuron.PyneuronError, match=r"pip install 'pyneuron\[ovce\]'"):
        activation_ranges(acts, method="sklearn")
    assert activation_ranges(acts, 1).tolist() == [[[1.0, 1.0]]] * 2  # pyneuron needs none


# --------------------------------------------------------------------------- unit masks


@pytest.mark.parametrize(
    "shape",
    [(6, 4, 7, 7, 112, 112), (5, 3, 14, 14, 112, 112), (4, 3, 5, 9, 37, 61), (3, 3, 3, 3, 8, 7)],
)
def test_torch_unit_masks_are_ovces(shape, monkeypatch):
    n, units, h, w, height, width = shape
    rng = np.random.default_rng(h * w + height)
    acts = rng.standard_normal((n, units, h, w)).astype(np.float32)
    acts[1, 0] = np.round(acts[1, 0])  # ties
    acts[:, units - 1] = -3.0  # a unit that never fires
    layer = torch.from_numpy(acts)
    up = torch.nn.functional.interpolate(layer, size=(height, width), mode="bilinear")
    up = up.numpy()
    # thresholds: float64 estimates (OVCE's classic mode: a float64 tensor of shape (1,)),
    # one exactly an upsampled value (strictness matters there)
    lo = np.quantile(up.transpose(1, 0, 2, 3).reshape(units, -1), 0.9, axis=1)
    lo[0] = float(up[0, 0, 3, 2])
    lo[units - 1] = 0.0  # its maps are all -3: it never fires
    # unit 1: exactly torch's value at a pixel where Pillow's resize gives a larger one
    pillow_up = pyneuron.bilinear_resize(acts[0, 1], height, width)
    pixel = np.unravel_index(np.argmax(pillow_up > up[0, 1]), pillow_up.shape)
    assert pillow_up[pixel] > up[0, 1][pixel]
    lo[1] = float(up[0, 1][pixel])
    # ranges: float32 members (OVCE's .item() of float32 minima and maxima), both ends
    # exactly upsampled values
    lower = np.array([up[0, u, 1, 1] for u in range(units)], dtype=np.float64)
    upper = np.array([up[1, u, 2, 5] for u in range(units)], dtype=np.float64)
    lower, upper = np.minimum(lower, upper), np.maximum(lower, upper)
    monkeypatch.setattr(upsample_module, "TORCH_CHUNK_VALUES", 3 * height * width + 5)
    thresholded = unit_masks_from_activations(
        acts, lo, (height, width), upsample="torch", batch_images=4, progress=False
    )
    ranged = unit_masks_from_activations(
        acts, lower, (height, width), upper=upper, upsample="torch", progress=False
    )
    for u in range(units):
        threshold = (torch.tensor([lo[u]], dtype=torch.float64), torch.tensor(float("inf")))
        expected = ovce_bitmaps(layer[:, u, :, :], threshold, (height, width))
        np.testing.assert_array_equal(thresholded.mask(u), expected)
        expected = ovce_bitmaps(layer[:, u, :, :], (lower[u], upper[u]), (height, width))
        np.testing.assert_array_equal(ranged.mask(u), expected)
    assert thresholded.pixel_counts[units - 1] == 0 and thresholded.pixel_counts[0] > 0
    exact = up[0, 0] == np.float32(lo[0])
    assert exact.any() and not thresholded.mask(0)[0][exact].any()  # strictly above
    pillow = unit_masks_from_activations(acts, lo, (height, width), progress=False)
    assert pillow.mask(1)[0][pixel] and not thresholded.mask(1)[0][pixel]


def test_torch_unit_masks_stream_to_disk(tmp_path):
    acts = np.random.default_rng(4).standard_normal((5, 3, 4, 4)).astype(np.float32)
    lo, hi = np.full(3, -0.5), np.full(3, 0.7)
    memory = unit_masks_from_activations(acts, lo, (9, 9), upper=hi, upsample="torch")
    disk = unit_masks_from_activations(
        acts, lo, (9, 9), upper=hi, upsample="torch", path=tmp_path / "u", progress=False
    )
    reopened = pyneuron.UnitMasks.open(tmp_path / "u")
    for u in range(3):
        np.testing.assert_array_equal(disk.mask(u), memory.mask(u))
        np.testing.assert_array_equal(reopened.mask(u), memory.mask(u))


def test_upsample_errors():
    acts = np.zeros((2, 1, 2, 2), dtype=np.float32)
    with pytest.raises(pyneuron.PyneuronError, match="unknown upsample 'nearest'"):
        unit_masks_from_activations(acts, np.zeros(1), (4, 4), upsample="nearest")
    acts[1, 0, 1, 1] = np.inf
    with pytest.raises(pyneuron.PyneuronError, match="unit 0 in image 1 is inf"):
        unit_masks_from_activations(acts, np.zeros(1), (4, 4), upsample="torch")


# --------------------------------------------------------------------------- thresholds


def test_compexp_thresholds_are_ovces_classic_thresholds():
    """OVCE's classic mode (num_clusters=1): q = 0.01, one seeded estimator per unit, fed
    64 images at a time, zeros kept; pyneuron's estimator runs all units at once (they
    share the coin flips, which depend only on the count of values) and matches it."""
    rng = np.random.default_rng(6)
    acts = np.maximum(rng.standard_normal((130, 3, 16, 16)), 0).astype(np.float32)
    acts[:, 2] = np.round(acts[:, 2] * 3) / 3  # ties
    assert acts.shape[0] * 16 * 16 > 24 * 1024  # the estimator compacts
    assert readout_index(0.01) == 989
    expected = np.array([ovce_threshold(acts[:, u]) for u in range(3)])
    got = quantile_thresholds(acts, 0.01, method="compexp")
    assert got.view(np.uint64).tolist() == expected.view(np.uint64).tolist()
    values, method = unit_thresholds(acts, 0.01, "compexp")  # dissect(thresholds="compexp")
    assert method == "compexp" and values.tolist() == got.tolist()
    assert not np.array_equal(got, quantile_thresholds(acts, 0.01))  # not the exact quantile


# --------------------------------------------------------------------------- plumbing


@pytest.fixture
def world():
    rng = np.random.default_rng(7)
    n, size = 24, 12
    concepts = rng.random((4, n, size, size)) < 0.3
    store = pyneuron.ConceptStore.from_masks(concepts, ["a", "b", "c", "d"])
    acts = np.maximum(rng.standard_normal((n, 3, 4, 4)), 0).astype(np.float32)
    return store, acts


def test_explain_activations_uses_both_rules(world):
    store, acts = world
    table, masks = explain_activations(
        acts,
        store,
        layer="l",
        ranges=3,
        ranges_method="sklearn",
        upsample="torch",
        length=1,
        progress=False,
    )
    bounds = ovce_ranges(acts, 3)
    for row in table.itertuples():
        assert (row.lower, row.upper) == tuple(bounds[row.unit, row.range])
    for k, range_masks in enumerate(masks):
        for u in range(3):
            expected = ovce_bitmaps(torch.from_numpy(acts)[:, u], tuple(bounds[u, k]), (12, 12))
            np.testing.assert_array_equal(range_masks.mask(u), expected)
    split = explain_activations_split(
        acts, store, layer="l", holdout=0.25, upsample="torch", thresholds=0.5, progress=False
    )
    assert len(split) == 3
    for options, message in [
        (dict(ranges_method="lloyd"), "unknown ranges method"),
        (dict(upsample="bicubic"), "unknown upsample"),
    ]:
        with pytest.raises(pyneuron.PyneuronError, match=message):
            explain_activations(acts, store, layer="l", progress=False, **options)
        with pytest.raises(pyneuron.PyneuronError, match=message):
            explain_activations_split(acts, store, layer="l", holdout=0.25, **options)
        with pytest.raises(pyneuron.PyneuronError, match=message):  # before any capture
            pyneuron.dissect(None, "0", acts, store, **options)


def test_layer_units_and_ray_parts_upsample_with_torch(tmp_path):
    from PIL import Image

    files = [tmp_path / f"{i}.png" for i in range(4)]
    for i, f in enumerate(files):
        Image.fromarray(np.full((8, 8, 3), 50 * i + 10, np.uint8)).save(f)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, stride=2), torch.nn.ReLU())
    acts = pyneuron.capture(model, "1", files, progress=False)["1"]
    here = layer_units(acts, (7, 7), quantile=0.1, upsample="torch", progress=False)
    expected = unit_masks_from_activations(acts, here.thresholds, (7, 7), upsample="torch")
    on_parts = layer_units_on_ray(
        lambda: model,
        "1",
        files,
        size=(7, 7),
        quantile=0.1,
        upsample="torch",
        backend="local",
        parts_dir=tmp_path / "parts",
        part_images=2,
        progress=False,
    )["1"]
    for u in range(2):
        np.testing.assert_array_equal(here.masks.mask(u), expected.mask(u))
        np.testing.assert_array_equal(on_parts.masks.mask(u), expected.mask(u))
    with pytest.raises(pyneuron.PyneuronError, match="unknown upsample"):
        layer_units(acts, (7, 7), upsample="Torch")
    with pytest.raises(pyneuron.PyneuronError, match="unknown upsample"):
        layer_units_on_ray(
            lambda: model, "1", files, size=(7, 7), upsample=None, parts_dir=Path(tmp_path)
        )


def test_layer_ranges_are_ovces(world, tmp_path):
    _, acts = world
    acts = acts.copy()
    acts[:, 2] = np.where(acts[:, 2] > 0, acts[:, 2], -acts[:, 2] / 4)  # signed, no zeros
    acts[:, 2] -= 0.5
    found = layer_ranges(
        acts,
        (10, 11),
        4,
        ranges_method="sklearn",
        upsample="torch",
        top_k=3,
        path=tmp_path / "units",
        progress=False,
    )
    bounds = ovce_ranges(acts, 4)
    np.testing.assert_array_equal(found.ranges, bounds)
    assert found.ranges_method == "sklearn" and found.map_size == (4, 4)
    assert found.top_images.tolist() == layer_units(acts, (2, 2), top_k=3).top_images.tolist()
    assert len(found.masks) == 4
    for k, masks in enumerate(found.masks):
        reopened = pyneuron.UnitMasks.open(tmp_path / "units" / f"range{k}")
        for u in range(3):
            expected = ovce_bitmaps(torch.from_numpy(acts)[:, u], tuple(bounds[u, k]), (10, 11))
            np.testing.assert_array_equal(masks.mask(u), expected)
            np.testing.assert_array_equal(reopened.mask(u), expected)
    default = layer_ranges(acts, (10, 11), 4, top_k=3, progress=False)
    np.testing.assert_array_equal(default.ranges, activation_ranges(acts, 4))
    assert default.ranges_method == "pyneuron"
    for options, message in [
        (dict(ranges_method="ovce"), "unknown ranges method"),
        (dict(upsample="area"), "unknown upsample"),
        (dict(top_k=0), "top_k"),
    ]:
        with pytest.raises(pyneuron.PyneuronError, match=message):
            layer_ranges(acts, (4, 4), **options)
