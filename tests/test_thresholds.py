"""Thresholds: exact streaming quantiles against np.quantile, KMeans ranges, user values."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pyneuron
from pyneuron.errors import PyneuronError
from pyneuron.model import thresholds
from pyneuron.model.thresholds import (
    StreamingQuantiles,
    activation_ranges,
    compexp_level,
    kmeans_1d,
    quantile_thresholds,
    user_thresholds,
)


def reference(acts: np.ndarray, level: float) -> np.ndarray:
    """The definition: np.quantile of each unit's values, as float64."""
    return np.array(
        [np.quantile(acts[:, u].astype(np.float64).ravel(), level) for u in range(acts.shape[1])]
    )


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float64 and got.shape == want.shape
    assert got.tobytes() == want.tobytes(), (got, want)


def mixed_units(shape: tuple[int, ...], dtype: type, seed: int = 0) -> np.ndarray:
    """Units of different kinds: normal, integer ties, constant, all zeros, ReLU-like."""
    rng = np.random.default_rng(seed)
    n, _, *spatial = shape
    size = (n, *spatial)
    units = [
        rng.standard_normal(size) * 3.0,
        rng.integers(-3, 4, size).astype(np.float64),
        np.full(size, 1.5),
        np.zeros(size),
        np.maximum(rng.standard_normal(size), 0.0),
        rng.integers(0, 2, size) * 7.25,
    ]
    return np.stack(units[: shape[1]], axis=1).astype(dtype)


# ----------------------------------------------------------------------------- levels


@pytest.mark.parametrize(
    ("q", "idx"), [(0.005, 994), (0.01, 989), (0.2, 799), (0.0, 999), (0.9999, 0)]
)
def test_compexp_level(q, idx):
    assert idx == int(1000 * (1 - q) - 1)
    assert compexp_level(q) == idx / 999 == float(np.linspace(0, 1, 1000)[idx])


def test_compexp_level_default_and_numpy_scalar():
    assert compexp_level() == 994 / 999
    assert compexp_level(np.float64(0.01)) == 989 / 999


@pytest.mark.parametrize("q", [1.0, -0.1, float("nan"), float("inf"), "0.005", True, None])
def test_compexp_level_rejects(q):
    with pytest.raises(PyneuronError, match="q must be"):
        compexp_level(q)


# ----------------------------------------------------------------------------- exact quantiles

SHAPES = [(1, 6, 1, 1), (2, 6, 1, 1), (7, 6, 3, 4), (40, 6, 6, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("q", [0.005, 0.01, 0.2])
def test_quantile_thresholds_match_numpy_bit_for_bit(shape, dtype, q):
    acts = mixed_units(shape, dtype)
    want = reference(acts, compexp_level(q))
    for batch in (1, 3, shape[0], None):
        assert_bits_equal(quantile_thresholds(acts, q, batch_images=batch), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_many_levels_both_sides_and_both_lerp_branches(dtype):
    acts = mixed_units((13, 6, 5, 3), dtype, seed=1)
    rng = np.random.default_rng(2)
    levels = [0.0, 1.0, 0.5, 1e-9, 1 - 1e-12, 0.25, 0.75, *rng.random(40).tolist()]
    for level in levels:
        for batch in (2, 5, None):
            got = quantile_thresholds(acts, level=level, batch_images=batch)
            assert_bits_equal(got, reference(acts, level))


def test_level_overrides_q():
    acts = mixed_units((9, 6, 2, 2), np.float64)
    assert_bits_equal(quantile_thresholds(acts, 0.2, level=0.5), reference(acts, 0.5))


def test_integer_activations_read_as_float64():
    acts = np.random.default_rng(3).integers(-5, 9, (11, 3, 4, 4)).astype(np.int32)
    assert_bits_equal(quantile_thresholds(acts, 0.01, batch_images=4), reference(acts, 989 / 999))


@pytest.mark.parametrize("shape", [(20, 4), (20, 4, 7)])
def test_other_layouts(shape):
    acts = np.random.default_rng(4).standard_normal(shape)
    level = compexp_level(0.01)
    want = np.array([np.quantile(acts[:, u].ravel(), level) for u in range(shape[1])])
    assert_bits_equal(quantile_thresholds(acts, 0.01, batch_images=3), want)


def test_memmap(tmp_path):
    acts = mixed_units((25, 6, 4, 4), np.float32, seed=5)
    mm = np.memmap(tmp_path / "acts.f32", dtype=np.float32, mode="w+", shape=acts.shape)
    mm[:] = acts
    mm.flush()
    ro = np.memmap(tmp_path / "acts.f32", dtype=np.float32, mode="r", shape=acts.shape)
    assert_bits_equal(quantile_thresholds(ro, batch_images=4), reference(acts, 994 / 999))


def test_does_not_modify_input():
    acts = mixed_units((10, 6, 3, 3), np.float32)
    copy = acts.copy()
    quantile_thresholds(acts, batch_images=1)
    assert np.array_equal(acts, copy)


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=6),
        elements=st.floats(-1e6, 1e6, allow_nan=False, width=32) | st.sampled_from([0.0, 1.0]),
    ),
    st.floats(0.0, 1.0),
    st.integers(1, 7),
)
def test_property_matches_numpy(acts, level, batch):
    acts = acts + 0.0  # numpy's choice among -0.0 and +0.0 ties is unspecified
    got = quantile_thresholds(acts, level=level, batch_images=batch)
    assert_bits_equal(got, reference(acts, level))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("batch", [1, 4, None])
def test_non_finite_names_unit_and_image(bad, batch):
    acts = np.zeros((9, 5, 2, 2), dtype=np.float32)
    acts[6, 3, 1, 0] = bad
    with pytest.raises(PyneuronError, match=r"unit 3 .* image 6; .*check the model"):
        quantile_thresholds(acts, batch_images=batch)


@pytest.mark.parametrize(
    ("acts", "message"),
    [
        (np.zeros(5), "shape"),
        (np.zeros((0, 3, 2, 2)), "no values"),
        (np.zeros((3, 0, 2, 2)), "no values"),
        (np.zeros((3, 2, 2), dtype=complex), "real numbers"),
        (np.array([["a"]]), "real numbers"),
    ],
)
def test_bad_activations(acts, message):
    with pytest.raises(PyneuronError, match=message):
        quantile_thresholds(acts)


def test_torch_tensor_that_requires_grad():
    torch = pytest.importorskip("torch")
    plain = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert_bits_equal(quantile_thresholds(plain, level=0.5), reference(plain.numpy(), 0.5))
    with pytest.raises(PyneuronError, match=r"detach\(\)\.cpu\(\)\.numpy\(\)"):
        quantile_thresholds(plain.requires_grad_())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(q=1.0), "q must be"),
        (dict(level=1.5), "level must be"),
        (dict(level=float("nan")), "level must be"),
        (dict(batch_images=0), "batch_images"),
        (dict(batch_images=2.0), "batch_images"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(PyneuronError, match=message):
        quantile_thresholds(np.ones((2, 2, 2, 2)), **options)


# ----------------------------------------------------------------------------- streaming object


def test_streaming_keeps_only_what_it_needs():
    m = 40 * 36
    level = compexp_level(0.005)
    lo = math.floor((m - 1) * level)
    top = StreamingQuantiles(6, level, m)
    assert top.kept_per_unit == m - lo == 9
    bottom = StreamingQuantiles(6, 0.01, m)
    assert bottom.kept_per_unit == math.floor((m - 1) * 0.01) + 2
    acts = mixed_units((40, 6, 6, 6), np.float32)
    for sq, lev in ((top, level), (bottom, 0.01)):
        for start in range(0, 40, 3):
            sq.update(acts[start : start + 3])
            kept = 0 if sq._kept is None else sq._kept.shape[1]
            assert kept <= sq.kept_per_unit
            assert sq.values_seen == min(start + 3, 40) * 36
        assert sq.exact
        assert_bits_equal(sq.result(), reference(acts, lev))
        low, high = sq.bounds()
        assert_bits_equal(low, sq.result())
        assert_bits_equal(high, sq.result())


def test_streaming_uneven_batches_and_mixed_dtypes():
    acts = mixed_units((30, 6, 3, 3), np.float64, seed=7)
    level = compexp_level(0.01)
    sq = StreamingQuantiles(6, level, 30 * 9)
    for i, (start, stop) in enumerate([(0, 1), (1, 8), (8, 8), (8, 21), (21, 30)]):
        part = acts[start:stop]
        sq.update(part.astype(np.float32).astype(np.float64) if i % 2 else part)
    want = acts.copy()
    want[1:8] = want[1:8].astype(np.float32)
    want[8:21] = want[8:21].astype(np.float32)
    assert_bits_equal(sq.result(), reference(want, level))
    assert sq.result().tobytes() == sq.result().tobytes()  # result() can be called again


def test_streaming_unknown_count_exact_when_cap_suffices():
    acts = mixed_units((40, 6, 6, 6), np.float32, seed=8)
    level = compexp_level(0.005)
    sq = StreamingQuantiles(6, level, None, max_values_per_unit=50)
    for start in range(0, 40, 7):
        sq.update(acts[start : start + 7])
    assert sq.total_values is None and sq.exact
    assert_bits_equal(sq.result(), reference(acts, level))


def test_streaming_unknown_count_raises_and_bounds_when_cap_too_small():
    acts = mixed_units((40, 6, 6, 6), np.float64, seed=9)
    sq = StreamingQuantiles(6, 0.5, None, max_values_per_unit=50)
    for start in range(0, 40, 7):
        sq.update(acts[start : start + 7])
    assert not sq.exact
    with pytest.raises(PyneuronError, match=r"needs the top 721 values .*total_values=1440"):
        sq.result()
    low, high = sq.bounds()
    want = reference(acts, 0.5)
    assert np.all(low <= want) and np.all(want <= high)
    assert np.array_equal(low, acts.min(axis=(0, 2, 3)))
    assert np.array_equal(high, np.sort(acts.transpose(1, 0, 2, 3).reshape(6, -1))[:, -50])


def test_streaming_errors():
    with pytest.raises(PyneuronError, match="max_values_per_unit"):
        StreamingQuantiles(2, 0.5, None)
    with pytest.raises(PyneuronError, match="needs 51 values per unit, more than"):
        StreamingQuantiles(2, 0.5, 100, max_values_per_unit=10)
    with pytest.raises(PyneuronError, match="n_units"):
        StreamingQuantiles(0, 0.5, 10)
    with pytest.raises(PyneuronError, match="total_values"):
        StreamingQuantiles(2, 0.5, 0)
    sq = StreamingQuantiles(2, 0.5, 8)
    with pytest.raises(PyneuronError, match="no activations seen"):
        sq.result()
    with pytest.raises(PyneuronError, match="batch has 3 units"):
        sq.update(np.zeros((1, 3, 2, 2)))
    sq.update(np.zeros((1, 2, 2, 2)))
    with pytest.raises(PyneuronError, match="saw 4 values per unit, but total_values=8"):
        sq.result()
    with pytest.raises(PyneuronError, match="more than total_values=8"):
        sq.update(np.zeros((2, 2, 2, 2)))
    sq.update(np.ones((1, 2, 2, 2)))
    assert_bits_equal(sq.result(), np.array([0.5, 0.5]))
    sq2 = StreamingQuantiles(2, 0.5, 8)
    sq2.update(np.zeros((1, 2, 2, 2)))
    bad = np.zeros((1, 2, 2, 2))
    bad[0, 1, 0, 1] = np.nan
    with pytest.raises(PyneuronError, match="unit 1 .* image 1;"):
        sq2.update(bad)


# ----------------------------------------------------------------------------- KMeans ranges

CLUSTERS = [(1.0, 2.0), (10.0, 12.0), (100.0, 130.0), (1000.0, 1010.0), (5000.0, 6000.0)]


def clustered(sizes: list[int], n_units: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Activations (N, U, 4, 4) with well separated clusters and zeros; and true ranges."""
    rng = np.random.default_rng(seed)
    n_images = 50
    acts = np.zeros((n_images, n_units, 16))
    truth = np.zeros((n_units, len(CLUSTERS), 2))
    for u in range(n_units):
        values = []
        for (lo, hi), size in zip(CLUSTERS, sizes):
            v = rng.uniform(lo, hi, size)
            v[:2] = lo, hi  # the exact extremes are present
            values.append(v)
        flat = np.concatenate(values) * (u + 1)
        slots = rng.choice(n_images * 16, flat.size, replace=False)
        unit = np.zeros(n_images * 16)
        unit[slots] = flat
        acts[:, u] = unit.reshape(n_images, 16)
        truth[u, :, 0] = [lo * (u + 1) for lo, _ in CLUSTERS]
        truth[u, :, 1] = [hi * (u + 1) for _, hi in CLUSTERS]
    return acts.reshape(n_images, n_units, 4, 4), truth


def test_ranges_recover_separated_clusters():
    acts, truth = clustered([30, 50, 80, 40, 60], n_units=3, seed=0)
    for batch in (1, 7, None):
        ranges = activation_ranges(acts, 5, batch_images=batch)
        assert ranges.shape == (3, 5, 2) and ranges.dtype == np.float64
        assert np.array_equal(ranges, truth)


def test_ranges_float32():
    acts, truth = clustered([30, 50, 80, 40, 60], n_units=2, seed=1)
    ranges = activation_ranges(acts.astype(np.float32), 5)
    assert np.array_equal(ranges, truth.astype(np.float32).astype(np.float64))


def test_ranges_subsampled_still_cover_all_values():
    acts, truth = clustered([150] * 5, n_units=3, seed=2)
    ranges = activation_ranges(acts, 5, max_samples=200, batch_images=9)
    assert np.array_equal(ranges, truth)


def test_ranges_deterministic_and_batch_independent():
    rng = np.random.default_rng(3)
    acts = np.maximum(rng.standard_normal((30, 4, 5, 5)), 0) ** 2
    first = activation_ranges(acts, 5, max_samples=100, seed=11, batch_images=4)
    assert np.array_equal(first, activation_ranges(acts, 5, max_samples=100, seed=11))
    assert np.array_equal(
        first, activation_ranges(acts, 5, max_samples=100, seed=11, batch_images=1)
    )
    assert not np.isnan(first).any()
    # ranges are ordered, disjoint, and made of actual non-zero activations
    assert np.all(first[:, :, 0] <= first[:, :, 1])
    assert np.all(first[:, 1:, 0] > first[:, :-1, 1])
    nonzero = set(acts[acts != 0].tolist())
    assert set(first.ravel().tolist()) <= nonzero


def test_ranges_without_subsampling_are_kmeans_clusters():
    rng = np.random.default_rng(4)
    acts = np.maximum(rng.standard_normal((20, 3, 4, 4)), 0)
    ranges = activation_ranges(acts, 4)
    for u in range(3):
        v = acts[:, u].ravel()
        v = v[v != 0]
        centers, labels = kmeans_1d(v, 4)
        want = [(v[labels == j].min(), v[labels == j].max()) for j in range(4)]
        assert np.array_equal(ranges[u], np.array(want))


def test_ranges_nan_rows():
    acts = np.zeros((6, 3, 2, 2))
    acts[0, 0, 0, 0] = 3.0
    acts[1, 0, 1, 1] = 2.0
    acts[2, 0, 0, 1] = 2.0
    acts[3, 2] = [[4.0, 5.0], [6.0, 7.0]]
    ranges = activation_ranges(acts, 5)
    assert np.array_equal(ranges[0, :2], [[2.0, 2.0], [3.0, 3.0]])
    assert np.isnan(ranges[0, 2:]).all()
    assert np.isnan(ranges[1]).all()  # all zeros
    assert np.array_equal(ranges[2, :4], [[4, 4], [5, 5], [6, 6], [7, 7]])
    assert np.isnan(ranges[2, 4]).all()


def test_ranges_errors():
    acts = np.ones((3, 2, 2, 2))
    for options, message in [
        (dict(n_clusters=0), "n_clusters"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(max_samples=0), "max_samples"),
        (dict(max_iter=0), "max_iter"),
    ]:
        with pytest.raises(PyneuronError, match=message):
            activation_ranges(acts, **options)
    acts[2, 1, 0, 0] = np.inf
    for max_samples in (1, 100):  # with and without the counting pass
        with pytest.raises(PyneuronError, match=r"unit 1 .* image 2;"):
            activation_ranges(acts, max_samples=max_samples)


def test_kmeans_fixed_point():
    rng = np.random.default_rng(5)
    for _ in range(20):
        v = np.concatenate([rng.gamma(2.0, 1.0, 300), rng.integers(0, 5, 100).astype(float)])
        k = int(rng.integers(2, 8))
        centers, labels = kmeans_1d(v, k)
        kept = centers[~np.isnan(centers)]
        assert np.all(np.diff(kept) > 0)
        assert set(labels.tolist()) == set(range(kept.size))
        for j, c in enumerate(kept):
            members = np.sort(v[labels == j])  # the mean is taken in sorted order
            assert c == min(max(np.mean(members), members.min()), members.max())
        distance = np.abs(v[:, None] - kept[None, :])
        assert np.allclose(distance[np.arange(v.size), labels], distance.min(axis=1))


def test_kmeans_deterministic_and_input_order_independent():
    v = np.random.default_rng(6).standard_normal(500)
    centers, labels = kmeans_1d(v, 5)
    perm = np.random.default_rng(7).permutation(500)
    centers2, labels2 = kmeans_1d(v[perm], 5)
    assert np.array_equal(centers, centers2)
    assert np.array_equal(labels[perm], labels2)


def test_kmeans_errors():
    with pytest.raises(PyneuronError, match="1-D"):
        kmeans_1d(np.zeros((2, 2)), 2)
    with pytest.raises(PyneuronError, match="finite"):
        kmeans_1d([1.0, np.nan], 2)
    centers, labels = kmeans_1d([], 3)
    assert np.isnan(centers).all() and labels.size == 0


# ----------------------------------------------------------------------------- user thresholds


def test_user_thresholds():
    assert np.array_equal(user_thresholds(0.25, 3), [0.25, 0.25, 0.25])
    assert np.array_equal(user_thresholds(np.float32(2), 2), [2.0, 2.0])
    values = np.array([1.0, 2.0, 3.0])
    out = user_thresholds(values, 3)
    assert out.dtype == np.float64 and np.array_equal(out, values) and out is not values
    assert np.array_equal(user_thresholds((1, 2), 2), [1.0, 2.0])


@pytest.mark.parametrize(
    ("values", "n_units", "message"),
    [
        ([1.0, 2.0], 3, r"one per unit \(3 units\), got shape \(2,\)"),
        (np.ones((2, 2)), 2, "one per unit"),
        ([1.0, np.nan], 2, "threshold of unit 1 is nan"),
        (np.inf, 2, "threshold of unit 0 is inf"),
        ("0.5", 2, "a number or a sequence of 2 numbers"),
        (None, 2, "a number or a sequence"),
        (True, 2, "a number or a sequence"),
        ([1.0, "a"], 2, "a number or a sequence"),
        (0.5, 0, "n_units"),
    ],
)
def test_user_thresholds_errors(values, n_units, message):
    with pytest.raises(PyneuronError, match=message):
        user_thresholds(values, n_units)


# ----------------------------------------------------------------------------- docs


def test_docstring_examples():
    result = doctest.testmod(thresholds, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_errors_are_value_errors():
    assert issubclass(PyneuronError, ValueError)
    assert pyneuron.PyneuronError is PyneuronError
