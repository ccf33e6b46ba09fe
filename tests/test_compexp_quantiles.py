"""``quantile_thresholds(method="compexp")``: compexp's own streaming estimator, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from compexp_quantile_port import QuantileVectorReference, compexp_threshold

import pyneuron
from pyneuron.model.compexp_quantiles import CompexpQuantiles
from pyneuron.model.thresholds import quantile_thresholds


def _layer(rng, n_images, units, h, w):
    acts = np.maximum(rng.standard_normal((n_images, units, h, w)), 0).astype(np.float32)
    acts[:, 0] = 0.0  # a dead unit
    acts[:, 1] = np.round(acts[:, 1] * 4) / 4  # quantized: many ties
    acts[:, 2] = 1.5  # constant
    return acts


def test_matches_compexp_at_its_resolution():
    """Enough values per unit (230,400) for three new levels at resolution 24,576."""
    acts = _layer(np.random.default_rng(0), 400, 5, 24, 24)
    expected = compexp_threshold(acts)
    got = quantile_thresholds(acts, method="compexp")
    assert got.view(np.uint64).tolist() == expected.view(np.uint64).tolist()
    again = quantile_thresholds(acts, method="compexp", batch_images=13)
    assert again.view(np.uint64).tolist() == got.view(np.uint64).tolist()
    exact = quantile_thresholds(acts)
    assert got[0] == exact[0] == 0.0 and got[2] == exact[2] == 1.5
    assert abs(got[3] - exact[3]) < 0.02 and got[3] != exact[3]  # an estimate, not exact
    assert quantile_thresholds(acts, 0.01, method="compexp")[3] < got[3]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_readout_level_matches_with_many_levels(seed):
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((37, 3, 7, 9)).astype(np.float32)  # 2,331 values per unit
    acts[:, 1] = np.round(acts[:, 1])
    reference = QuantileVectorReference(3, resolution=64, seed=seed)
    estimator = CompexpQuantiles(3, seed=seed, resolution=64)
    for start in range(0, 37, 5):
        batch = acts[start : start + 5]
        reference.add(np.transpose(batch, (0, 2, 3, 1)).reshape(-1, 3))
        estimator.update(batch)
    assert len(estimator._buffers) >= 6  # the test exercises many levels and compactions
    levels = np.linspace(0.0, 1.0, 1000)
    expected = reference.readout(1000)
    for index in (0, 1, 250, 500, 989, 994, 998, 999):
        got = estimator.quantile_at(float(levels[index]))
        assert got.tolist() == expected[:, index].tolist(), index


def test_seed_and_order_matter():
    acts = np.random.default_rng(4).standard_normal((60, 2, 9, 9)).astype(np.float32)
    one = CompexpQuantiles(2, resolution=64)
    one.update(acts)
    other_seed = CompexpQuantiles(2, seed=2, resolution=64)
    other_seed.update(acts)
    reordered = CompexpQuantiles(2, resolution=64)
    reordered.update(acts[::-1])
    assert not np.array_equal(one.quantile(0.3), other_seed.quantile(0.3))
    assert not np.array_equal(one.quantile(0.3), reordered.quantile(0.3))


def test_errors():
    acts = np.random.default_rng(5).standard_normal((4, 2, 3, 3)).astype(np.float32)
    with pytest.raises(pyneuron.PyneuronError, match="give q, not level"):
        quantile_thresholds(acts, level=0.9, method="compexp")
    with pytest.raises(pyneuron.PyneuronError, match="unknown method"):
        quantile_thresholds(acts, method="kll")
    acts[1, 1, 0, 0] = np.nan
    with pytest.raises(pyneuron.PyneuronError, match="unit 1 has a non-finite"):
        quantile_thresholds(acts, method="compexp")
    with pytest.raises(pyneuron.PyneuronError, match="units"):
        CompexpQuantiles(3).update(acts)
    tiny = CompexpQuantiles(1, resolution=8)  # new levels get capacity < 2 quickly
    with pytest.raises(pyneuron.PyneuronError, match="subsampling"):
        tiny.update(np.zeros((100_000, 1, 1, 1), dtype=np.float32))
    assert np.isnan(CompexpQuantiles(2).quantile(0.005)).all()
