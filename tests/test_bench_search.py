"""bench/synthetic.py's dense-unit regimes (blob concepts, dense units, activation-range
units of a synthetic ReLU layer) against literal references and their stated statistics,
and bench/search.py's ``dense-units``, ``ranges`` and ``sweep`` runs at a tiny scale: the
JSON they write, and pyneuron's answers identical to the baselines'."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import search  # noqa: E402
import synthetic  # noqa: E402


def _tiny(size: str, **overrides) -> synthetic.SizeSpec:
    return dataclasses.replace(synthetic.SIZES[size], **overrides)


# -- the generator ---------------------------------------------------------------------


def test_existing_sizes_keep_their_units_and_cache_keys():
    for name, key in (
        ("small", "v1-2000x56x56-c200-u64-s0-k64"),
        ("dense", "v1-2000x56x56-c1000-u64-s0-k64-dense"),
    ):
        spec = synthetic.SIZES[name]
        syn = synthetic.synthetic_for(spec)
        assert synthetic.cache_key(spec, 0, 64) == key
        assert syn.n_planted == spec.n_units // 8
        # Random units of today's sizes: 2-10 % of the images, 0.35 % of the pixels.
        assert np.array_equal(syn.blob_radius, np.sqrt(0.0035 / syn.fire_p / np.pi))
        assert syn.fire_p.min() >= 0.02 and syn.fire_p.max() <= 0.1
    keys = {
        synthetic.cache_key(synthetic.regime(synthetic.SIZES["dense-units"], d, p), 0, 64)
        for d in synthetic.DENSITIES
        for p in synthetic.PRESENCES
    }
    assert len(keys) == len(synthetic.DENSITIES) * len(synthetic.PRESENCES)


@pytest.mark.parametrize("n_out, n_in", [(1, 1), (2, 5), (3, 8), (7, 56), (4, 4)])
def test_pool_matrix_averages_consecutive_bins(n_out, n_in):
    values = np.random.default_rng(n_in).random(n_in)
    edges = [i * n_in // n_out for i in range(n_out + 1)]
    literal = [values[lo:hi].sum() / (hi - lo) for lo, hi in zip(edges[:-1], edges[1:])]
    assert np.allclose(synthetic._pool_matrix(n_out, n_in) @ values, literal)


def _literal_layer(syn, image, noise_points: np.ndarray) -> np.ndarray:
    """The layer's maps pixel by pixel: concept masks averaged over each map cell,
    bilinear noise from control points spread evenly over the map (ends included)."""
    (height, width), (lh, lw), p = syn.shape, syn.layer_shape, syn.layer_noise_points
    out = np.zeros((syn.spec.n_units, lh, lw))

    def lerp(at: float, grid: np.ndarray) -> float:
        i = min(int(at), p - 2)
        return (1 - (at - i)) * grid[i] + (at - i) * grid[i + 1]

    for u in range(syn.spec.n_units):
        for y in range(lh):
            y0, y1 = y * height // lh, (y + 1) * height // lh
            ay = y * (p - 1) / (lh - 1) if lh > 1 else 0.0
            for x in range(lw):
                x0, x1 = x * width // lw, (x + 1) * width // lw
                ax = x * (p - 1) / (lw - 1) if lw > 1 else 0.0
                drive = sum(
                    w * image.mask(int(c), syn.shape)[y0:y1, x0:x1].mean()
                    for c, w in zip(syn.sources[u], syn.source_weight[u])
                )
                rows = [lerp(ax, noise_points[u, i]) for i in range(p)]
                noise = lerp(ay, np.array(rows))
                out[u, y, x] = max(0.0, drive + syn.noise_scale[u] * noise + syn.bias[u])
    return out


@pytest.mark.parametrize("grid", [(16, 16), (10, 13)])
def test_layer_activations_match_a_literal_relu_layer(grid):
    spec = _tiny("ranges", n_images=6, height=grid[0], width=grid[1], n_concepts=40, n_units=3)
    syn = synthetic.synthetic_for(spec)
    assert syn.layer_shape == (grid[0] // 4, grid[1] // 4)
    zero = 0
    for i in range(spec.n_images):
        image, rng = syn.image(i)
        _, same = syn.image(i)  # the same generator state: the noise draws to expect
        points = same.normal(0.0, 1.0, (spec.n_units, 4, 4))
        got = syn.layer_activations(image, rng)
        assert got.dtype == np.float32
        assert np.allclose(got, _literal_layer(syn, image, points), atol=1e-5)
        zero += int((got == 0).sum())
    assert 0 < zero < 6 * 3 * (grid[0] // 4) * (grid[1] // 4)  # the ReLU clips some


def test_blob_concepts_and_dense_units_follow_their_regime():
    spec = _tiny("dense-units", n_images=300, height=24, width=24, n_concepts=60, n_units=16)
    built = synthetic.build(spec, progress=False)
    built.check_counts()
    syn, store = built.synthetic, built.store
    assert syn.n_planted == 0 and set(syn.categories) == {"small", "medium", "large"}
    # Each concept in about its share of the images (binomial, 5 standard deviations).
    frequency = store.image_counts / spec.n_images
    sigma = np.sqrt(syn.presence * (1 - syn.presence) / spec.n_images)
    assert np.all(np.abs(frequency - syn.presence) < 5 * sigma + 1e-9)
    assert syn.presence.min() >= 0.05 and syn.presence.max() <= 0.5
    # Units in ~70 % of the images at 2-3 % of the pixels (a bit more where they fire at
    # their preferred concept, a bit fewer pixels where blobs leave the image).
    images = built.unit_images / spec.n_images
    density = built.unit_pixels / store.grid.total_pixels
    assert 0.6 <= images.mean() <= 0.85 and 0.015 <= density.mean() <= 0.035
    # The store holds what the generator makes of an image regenerated alone.
    for i in (0, 117, 299):
        image, _ = syn.image(i)
        for c in range(spec.n_concepts):
            assert np.array_equal(store.mask(c)[i], image.mask(c, syn.shape))


def test_range_units_come_back_from_the_cache(tmp_path):
    spec = _tiny("ranges", n_images=40, height=16, width=16, n_concepts=40, n_units=3)
    directory = tmp_path / synthetic.cache_key(spec, 0, 64)
    built = synthetic.build(spec, directory=directory, progress=False)
    synthetic.save_cache(built, directory)
    again = synthetic.load_cache(spec, directory)
    assert built.n_units == again.n_units == 15 and len(again.units) == spec.n_ranges
    for a, b in zip(built.units, again.units):
        assert np.array_equal(a.mask(0), b.mask(0)) and np.array_equal(a.mask(2), b.mask(2))
    again.check_counts()
    # Ranges are sorted by their lower end: the lowest covers most pixels.
    lowest, highest = built.units[0].pixel_counts, built.units[-1].pixel_counts
    assert np.all(lowest > highest)


def test_bad_regimes_are_refused():
    with pytest.raises(ValueError, match="densities"):
        synthetic.regime(synthetic.SIZES["dense-units"], "dense", "70%")
    with pytest.raises(ValueError, match="statistics"):
        synthetic.synthetic_for(_tiny("dense-units", statistics="voronoi"))
    with pytest.raises(ValueError, match="planted"):
        synthetic.synthetic_for(_tiny("dense-units", units="mixed"))


# -- the benchmark ---------------------------------------------------------------------

TINY = ["--images", "40", "--concepts", "40", "--repeat", "1", "--compexp-units", "0"]


def test_dense_units_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "dense-units.json"
    report = search.main(
        ["--size", "dense-units", "--units", "4", "--numba-units", "0", "--numpy-units", "2",
         "--output", str(out), *TINY]
    )  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    assert report["spec"]["units"] == "blobs" and report["spec"]["n_images"] == 40
    assert report["build"]["unit_images_mean_fraction"] > 0.5
    assert report["numpy"]["agreement"] == {"units": 2, "identical": True, "disagreements": []}
    run = report["pyneuron"]["runs"][0]
    assert run["units"] == 4 and run["per_unit_seconds"] > 0
    pruning = report["pruning"]
    assert math.isclose(sum(pruning[f"fraction_{k}"] for k in ("derived", "pruned", "counted")), 1)
    peak = report["popcount_peak"]
    assert peak["peak_bytes_per_second_per_core"] > 0
    assert 0 <= peak["counting_fraction_of_peak"] < 1.5
    assert len(report["machine"]["engine_build"]["sha256"]) == 16


def test_ranges_benchmark_explains_every_range(tmp_path):
    out = tmp_path / "ranges.json"
    report = search.main(
        ["--size", "ranges", "--units", "2", "--numba-units", "0", "--numpy-units", "1",
         "--output", str(out), *TINY]
    )  # fmt: skip
    assert report["pyneuron"]["runs"][0]["units"] == 10  # 2 channels x 5 ranges
    by_range = report["build"]["unit_density_by_chunk"]
    assert len(by_range) == 5 and by_range[0] > by_range[-1]
    assert report["numpy"]["agreement"]["identical"]


def test_sweep_reports_every_cell_and_the_lowest_ratio(tmp_path):
    pytest.importorskip("numba", reason="the sweep's ratios are to numba (the bench extra)")
    out = tmp_path / "sweep.json"
    report = search.main(
        ["--size", "sweep", "--densities", "top-0.5%", "dense", "ranges", "--presences", "5%",
         "50%", "--units", "5", "--output", str(out), *TINY]
    )  # fmt: skip
    assert json.loads(out.read_text())["table"] == json.loads(json.dumps(report["table"]))
    table = report["table"]
    assert [(r["density"], r["presence"]) for r in table] == [
        (d, p) for d in ("top-0.5%", "dense", "ranges") for p in ("5%", "50%")
    ]
    for row, cell in zip(table, report["cells"]):
        assert row["identical"] and row["numba_units"] == row["units"] == 5
        assert cell["numba"]["agreement"]["identical"]
        ratio = row["numba_per_unit_seconds"] / row["pyneuron_per_unit_seconds"]
        assert math.isclose(row["pyneuron_vs_numba"], ratio)
        peak = cell["popcount_peak"]
        assert row["counting_fraction_of_peak"] == peak["counting_fraction_of_peak"]
    assert report["lowest_ratio"] == min(table, key=lambda r: r["pyneuron_vs_numba"])
    # The cells are the regimes they are named after.
    cells = {(r["density"], r["presence"]): r for r in table}
    for p in ("5%", "50%"):
        sparse, dense = cells["top-0.5%", p], cells["dense", p]
        assert sparse["unit_density_mean"] < 0.01 < dense["unit_density_mean"]
        assert sparse["unit_images_mean_fraction"] < 0.5 < dense["unit_images_mean_fraction"]
    for d in ("top-0.5%", "dense"):
        assert cells[d, "5%"]["concept_images_mean_fraction"] < 0.1
        assert cells[d, "50%"]["concept_images_mean_fraction"] > 0.35
