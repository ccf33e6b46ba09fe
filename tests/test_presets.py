"""Presets: `pyneuron dissect --preset ovce` / `dissect(..., preset="ovce")` apply every
setting the preset fixes (checked against literal implementations of OVCE's rules), an
option given explicitly wins and is recorded, and the run and its report name the preset."""

from __future__ import annotations

import json
import tomllib
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import pyneuron
from pyneuron.app.cli import app
from pyneuron.concepts import CLIPSegSegmenter, segment
from pyneuron.engine.units import UnitMasks
from pyneuron.errors import PyneuronError
from pyneuron.presets import PRESETS, get_preset

sklearn_cluster = pytest.importorskip("sklearn.cluster")
pytest.importorskip("transformers")

from test_segment import save_tiny_clipseg  # noqa: E402

runner = CliRunner()


def ovce_ranges(unit: np.ndarray, k: int) -> list[tuple[float, float]]:
    """OVCE's ``compute_activation_ranges`` for one unit, literally: KMeans over the
    unit's values (zeros dropped when none is negative), each cluster's (min, max),
    sorted as ``run_fast.py`` iterates them."""
    values = torch.from_numpy(unit).reshape(-1, 1)
    if torch.all(values >= 0):
        values = values[values > 0].reshape(-1, 1)
    labels = sklearn_cluster.KMeans(n_clusters=k, random_state=0).fit(values).labels_
    found = []
    for label in range(k):
        members = values[labels == label]
        found.append((torch.min(members).item(), torch.max(members).item()))
    return sorted(found)


def ovce_bitmaps(unit: np.ndarray, lower: float, upper: float, size: int) -> np.ndarray:
    """OVCE's ``compute_bitmaps``: bilinear interpolate to the mask shape, then strict."""
    up = torch.nn.functional.interpolate(
        torch.from_numpy(unit).unsqueeze(1), size=(size, size), mode="bilinear"
    ).squeeze(1)
    return ((up > lower) & (up < upper)).numpy()


def test_presets_resolve_and_record_overrides():
    preset = get_preset("ovce")
    assert get_preset(preset) is preset
    resolved, overrides = preset.apply(
        {"length": 3, "beam_size": 2, "quantile": 0.005}, explicit={"beam_size"}
    )
    assert resolved["beam_size"] == 2 and resolved["ranges"] == 5 and overrides == {"beam_size": 2}
    assert resolved["quantile"] == 0.005  # not a setting of this preset
    same, none = preset.apply({"length": 3}, explicit={"length"})
    assert same["length"] == 3 and none == {}  # given, but equal to the preset's
    assert preset.summary(overrides)["overrides"] == {"beam_size": 2}
    with pytest.raises(PyneuronError, match="unknown preset 'ovc'.*ovce, ovce-classic"):
        get_preset("ovc")
    assert PRESETS["ovce-classic"].settings["thresholds"] == "compexp"
    with pytest.raises(TypeError):
        PRESETS["ovce"].settings["grid"] = 56  # presets cannot be edited


def test_python_dissect_applies_the_preset_and_explicit_options_win(tiny_project):
    root = tiny_project
    store = pyneuron.ConceptStore.open(root / "store")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.ReLU())
    images = sorted((root / "images").iterdir())
    with pytest.warns(UserWarning, match="112x112 concept grid; this store's is 8x8"):
        table = pyneuron.dissect(model, "1", images, store, preset="ovce", progress=False)
    assert set(table["range"]) <= set(range(5)) and "lower" in table.columns
    assert table.attrs["preset"]["name"] == "ovce" and table.attrs["preset"]["overrides"] == {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classic = pyneuron.dissect(
            model, "1", images, store, preset="ovce-classic", length=1, progress=False
        )
    assert "range" not in classic.columns and classic["concepts"].max() <= 1
    assert classic.attrs["preset"]["overrides"] == {"length": 1}
    # the same as giving OVCE's classic settings by hand
    by_hand = pyneuron.dissect(
        model, "1", images, store, thresholds="compexp", quantile=0.01, upsample="torch",
        length=1, progress=False,
    )  # fmt: skip
    pd.testing.assert_frame_equal(classic, by_hand, check_like=True)


def test_cli_preset_ovce_sets_every_setting_it_fixes(tiny_project, tmp_path):
    root = tiny_project
    clipseg = save_tiny_clipseg(tmp_path / "clipseg")
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("[things]\nsky\ntree\nbackground\n\n[colours]\nred\nblue\nother\n")
    out = tmp_path / "run"
    common = [
        "dissect", "--model", f"{root / 'net.py'}:build", "--layer", "1",
        "--images", root / "images", "--concepts", concepts,
        "--segmenter", f"clipseg:{clipseg}", "--image-size", 32, "--quiet",
    ]  # fmt: skip
    result = runner.invoke(
        app, [str(a) for a in [*common, "--preset", "ovce", "--out", out, "--keep-activations"]]
    )
    assert result.exit_code == 0, result.output

    # the run records the preset and every resolved setting
    config = tomllib.loads((out / "config.toml").read_text())
    expected = {
        "preset": "ovce", "grid": 112, "semantics": "ovce", "ranges": 5,
        "ranges_method": "sklearn", "upsample": "torch", "length": 3, "beam": 5,
        "operators": "OR,AND,AND NOT", "search": "beam", "iou": "dataset",
    }  # fmt: skip
    assert {key: config[key] for key in expected} == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"]["name"] == "ovce" and summary["preset"]["overrides"] == {}
    assert summary["layers"]["1"]["ranges_method"] == "sklearn"
    assert {key: summary["search"][key] for key in ("ranges", "ranges_method", "upsample")} == {
        "ranges": 5, "ranges_method": "sklearn", "upsample": "torch"
    }  # fmt: skip
    assert "preset: ovce" in (out / "report" / "index.html").read_text()

    # masks: OVCE's segmentation semantics on a 112 x 112 grid
    store = pyneuron.ConceptStore.open(out / "concepts")
    assert store.metadata["segment"]["semantics"] == "ovce"
    assert (store.grid.height, store.grid.width) == (112, 112)
    files = sorted((root / "images").iterdir())
    model = CLIPSegSegmenter.from_pretrained(str(clipseg), device="cpu")
    by_hand = {
        semantics: segment(files, concepts, model, grid=112, semantics=semantics, progress=False)
        for semantics in ("ovce", "pyneuron")
    }
    for name in store.names:
        np.testing.assert_array_equal(store.mask(name), by_hand["ovce"].mask(name), name)
    assert any(  # the test can tell the two semantics apart
        not np.array_equal(store.mask(name), by_hand["pyneuron"].mask(name)) for name in store.names
    )

    # ranges and unit masks: OVCE's rules, literally
    activations = np.load(out / "activations" / "1.npy")
    results = pd.read_parquet(out / "results.parquet")
    checked = 0
    for unit in range(activations.shape[1]):
        literal = ovce_ranges(activations[:, unit], 5)
        rows = results[results["unit"] == unit].sort_values("range")
        got = list(zip(rows["lower"].tolist(), rows["upper"].tolist()))
        assert got == literal, unit  # exactly
        for k, (lower, upper) in enumerate(literal[:2]):
            masks = UnitMasks.open(out / "units" / "1" / f"range{k}")
            expected_mask = ovce_bitmaps(activations[:, unit], lower, upper, 112)
            np.testing.assert_array_equal(masks.mask(unit), expected_mask)
            checked += 1
    assert checked == 2 * activations.shape[1]

    # an option given as well wins, and is recorded as an override
    override = tmp_path / "override"
    result = runner.invoke(
        app,
        [str(a) for a in [*common, "--preset", "ovce", "--beam", 2, "--ranges", 3,
                          "--out", override, "--no-report"]],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((override / "summary.json").read_text())
    assert summary["preset"]["overrides"] == {"beam_size": 2, "ranges": 3}
    assert summary["search"]["beam_size"] == 2 and summary["search"]["ranges"] == 3
    assert summary["search"]["upsample"] == "torch"  # the rest of the preset stays

    bad = runner.invoke(
        app, [str(a) for a in [*common, "--preset", "nope", "--out", tmp_path / "x"]]
    )
    assert bad.exit_code == 1 and "unknown preset 'nope'" in bad.output
    assert not (tmp_path / "x").exists()
