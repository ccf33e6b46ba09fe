"""Issue 21, items 5 and 6: reports that keep their label-free descriptions and work for
`pyneuron explain` runs; faithfulness that batches across units, forwards each unmasked
image once and shows its progress."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_cli import check_report, invoke

import pyneuron
from pyneuron.app.evaluation import EvaluationConfig, evaluate_run
from pyneuron.app.rundir import write_run_report
from pyneuron.engine.null import roll_masks
from pyneuron.model.activations import capture
from pyneuron.model.faithfulness import _blur, _fill, _Pixels, _resize_mask, _top_images
from pyneuron.report.html import DEFAULT_TOP_IMAGES

N_IMAGES = 24
CONCEPTS = ["top", "even", "stripes", "blob"]


# -- a tiny project: images, a concept store and a random CNN ------------------------------


def tiny_images(n: int = N_IMAGES, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def tiny_store(n: int = N_IMAGES, grid: int = 8, seed: int = 1) -> pyneuron.ConceptStore:
    """Concepts on a grid coarser than the images (masks are resized to the images)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, n, grid, grid), dtype=bool)
    masks[0, :, : grid // 2] = True
    masks[1, ::2] = True
    masks[2, :, :, ::3] = True
    masks[3] = rng.random((n, grid, grid)) < 0.2
    return pyneuron.ConceptStore.from_masks(masks, CONCEPTS)


def tiny_net() -> torch.nn.Module:
    """A random CNN whose 5 units of layer "3" all fire (positive biases)."""
    torch.manual_seed(0)
    last = torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)
    with torch.no_grad():
        last.bias.fill_(0.3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), last, torch.nn.ReLU()
    ).eval()


NET_SOURCE = (
    "import torch\n"
    "def build():\n"
    "    torch.manual_seed(0)\n"
    "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1),"
    " torch.nn.ReLU())\n"
)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Image files, a saved store and a model file, dissected by `pyneuron dissect`."""
    root = tmp_path_factory.mktemp("project")
    (root / "images").mkdir()
    for i, image in enumerate(tiny_images()):
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
    tiny_store().save(root / "store")
    (root / "net.py").write_text(NET_SOURCE)
    return root


def dissect(project: Path, out: Path) -> Path:
    result = invoke(
        "dissect", "--model", f"{project / 'net.py'}:build", "--layer", "1",
        "--images", project / "images", "--concepts", project / "store", "--out", out,
        "--image-size", 16, "--grid", 8, "--length", 2, "--quantile", 0.2, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def unit_pages(run: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run / "report" / "units").rglob("*.html")))


# -- item 5a: the descriptions of `report --describe` survive later rewrites ---------------


def test_descriptions_survive_evaluate_and_report(project, tmp_path):
    run = dissect(project, tmp_path / "run")
    described = tmp_path / "described"
    described.mkdir()
    labels = pd.DataFrame(
        {
            "layer": ["1"] * 4,
            "unit": [0, 1, 2, 3],
            "method": ["clip-dissect"] * 4,
            "label": [f"zebrawords{u}" for u in range(4)],
            "score": [0.5, 0.4, 0.3, 0.2],
        }
    )
    labels.to_parquet(described / "results.parquet", index=False)
    result = invoke("report", run, "--describe", described, "--quiet")
    assert result.exit_code == 0, result.output
    assert "zebrawords0" in unit_pages(run)
    assert (run / "report" / "comparison.csv").is_file()

    result = invoke("evaluate", run, "--controls", 20, "--holdout", 0, "--no-faithfulness", "-q")
    assert result.exit_code == 0, result.output
    assert "p-value" in (run / "report" / "index.html").read_text()  # the report was rewritten
    pages = unit_pages(run)
    assert "Label-free descriptions" in pages and "zebrawords3" in pages
    assert (run / "report" / "comparison.csv").is_file()

    result = invoke("report", run, "--quiet")  # no --describe: the kept ones are shown
    assert result.exit_code == 0, result.output
    assert "zebrawords1" in unit_pages(run)
    assert check_report(run / "report") > 1

    write_run_report(run, descriptions=labels.iloc[:0], progress=False)  # empty: removed
    assert "zebrawords" not in unit_pages(run)
    assert not (run / "descriptions.parquet").exists()
    assert not (run / "report" / "comparison.csv").exists()


# -- item 5b: `pyneuron report` on a run of `pyneuron explain` ------------------------------


def test_report_of_an_explain_run(project, tmp_path):
    run = dissect(project, tmp_path / "run")
    units = run / "units" / "1"
    explained = tmp_path / "explained"
    result = invoke(
        "explain", "--units", units, "--concepts", project / "store", "--out", explained,
        "--length", 2, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (explained / "top_images.npz").exists()

    result = invoke("report", explained, "--quiet")
    assert result.exit_code == 0, result.output
    report = explained / "report"
    assert check_report(report) > 1
    results = pd.read_parquet(explained / "results.parquet")
    index = (report / "index.html").read_text()
    formulas = [f for f in results["formula"] if isinstance(f, str)]
    assert formulas and all(pyneuron.Formula.parse(f).concepts()[0] in index for f in formulas)
    assert any((report / "concepts").glob("*.html"))
    # No activations: a unit's top images are those where its mask covers the most pixels.
    masks = pyneuron.UnitMasks.open(units)
    best = results.sort_values("iou", ascending=False).iloc[0]
    unit = int(best["unit"])
    counts = masks.mask(unit).reshape(N_IMAGES, -1).sum(axis=1)
    fired = np.flatnonzero(counts)
    expected = fired[np.lexsort((fired, -counts[fired]))][:DEFAULT_TOP_IMAGES]
    page = next(report.rglob(f"units/*/{unit}.html")).read_text()
    shown = [int(i) for i in dict.fromkeys(re.findall(rf"{unit}-(\d+)\.png", page))]
    assert sorted(shown) == sorted(expected.tolist())
    # Without images the pictures are grey; with --images they are the images.
    picture = np.asarray(Image.open(report / "img" / "images" / f"{shown[0]}.png"))
    assert (picture == 128).all()
    result = invoke("report", explained, "--images", project / "images", "--quiet")
    assert result.exit_code == 0, result.output
    picture = np.asarray(Image.open(report / "img" / "images" / f"{shown[0]}.png"))
    assert not (picture == 128).all()

    # Unit masks that moved away: a clear error naming the path and what to do.
    moved = tmp_path / "moved-units"
    units.rename(moved)
    try:
        result = invoke("report", explained, "--quiet")
    finally:
        moved.rename(units)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "units" in result.output and "does not exist" in result.output
    bad = invoke("report", explained, "--images", project / "store", "--quiet")
    assert bad.exit_code == 1 and "images" in bad.output


# -- item 6: faithfulness batched across units ----------------------------------------------


def reference_faithfulness(
    model, layer, images, store, table, *, top_k=8, random_regions=4, fill="mean",
    blur_sigma=None, seed=0, batch_size=32,
) -> pd.DataFrame:  # fmt: skip
    """The one-unit-at-a-time loop faithfulness ran before item 6 (a slow reference)."""
    pixels = _Pixels(images)
    activations = capture(model, layer, pixels.source, batch_size=batch_size, progress=False)
    peaks = activations[layer].reshape(len(pixels), activations[layer].shape[1], -1).max(axis=2)
    plans = [_top_images(row, peaks, store, top_k) for row in table.itertuples()]
    fill_value = _fill(fill, pixels, sorted({i for plan in plans for i, _ in plan}))
    rng = np.random.default_rng(seed)
    drops = np.full((len(plans), 2), np.nan)
    counts = np.zeros(len(plans), dtype=np.int64)
    for r, (plan, unit) in enumerate(zip(plans, table["unit"].to_numpy())):
        if not plan:
            continue
        variants = []
        for image, grid_mask in plan:
            original = pixels.get(image)
            region = _resize_mask(grid_mask, original.shape[:2])
            h, w = region.shape
            offsets = rng.integers(1, max(2, h * w), size=random_regions)
            shifted = roll_masks(
                np.repeat(region[None], random_regions, axis=0), offsets // w, offsets % w
            )
            filler = _blur(original, blur_sigma) if fill_value is None else fill_value
            variants.append(original)
            variants.extend(np.where(m[..., None], filler, original) for m in [region, *shifted])
        maps = capture(model, layer, pixels.build(variants), batch_size=batch_size, progress=False)[
            layer
        ]
        measured = maps[:, int(unit)].reshape(len(plan), 2 + random_regions, -1).max(axis=2)
        base = measured[:, 0].mean()
        if base > 0:
            drops[r] = 1.0 - measured[:, 1].mean() / base, 1.0 - measured[:, 2:].mean() / base
        counts[r] = len(plan)
    result = table.copy()
    result["activation_drop"] = drops[:, 0]
    result["activation_drop_random"] = drops[:, 1]
    result["faithfulness_images"] = counts
    return result


def tiny_table() -> pd.DataFrame:
    """Units 0 and 1 share a formula (and so top-image variants), unit 3 has none, one
    formula holds nowhere, and unit 2 appears twice."""
    return pd.DataFrame(
        {
            "unit": [0, 1, 2, 3, 4, 2],
            "formula": ["top", "top", "(even OR blob)", None, "top AND NOT top", "stripes"],
        }
    )


@pytest.mark.parametrize(
    ("fill", "batch_size", "source"),
    [("mean", 32, "array"), ("mean", 7, "files"), ("blur", 5, "array"), ((0, 90, 200), 1, "pil")],
)
def test_batched_faithfulness_matches_the_per_unit_loop(fill, batch_size, source, tmp_path):
    images, store, model = tiny_images(), tiny_store(), tiny_net()
    if source == "files":
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
        pixels = sorted(tmp_path.glob("*.png"))
    elif source == "pil":
        pixels = [Image.fromarray(image) for image in images]
    else:
        pixels = images
    options = dict(top_k=5, random_regions=3, fill=fill, seed=7, batch_size=batch_size)
    expected = reference_faithfulness(model, "3", pixels, store, tiny_table(), **options)
    got = pyneuron.faithfulness(model, "3", pixels, store, tiny_table(), progress=False, **options)
    assert got["activation_drop"].notna().sum() >= 4
    pd.testing.assert_frame_equal(got, expected, check_exact=True)


class Recorder:
    """Forward pre-hook recording every batch the model is shown."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.batches: list[torch.Tensor] = []
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, _module, inputs) -> None:
        self.batches.append(inputs[0].detach().clone())


def test_each_unmasked_image_is_forwarded_once_in_full_batches():
    images, store, model = tiny_images(), tiny_store(), tiny_net()
    top_k, regions, batch_size = 6, 3, 8
    activations = capture(model, "3", images, progress=False)["3"]  # no ranking pass below
    table = tiny_table()
    peaks = activations.reshape(N_IMAGES, 5, -1).max(axis=2)
    plans = [_top_images(row, peaks, store, top_k) for row in table.itertuples()]
    users = pd.Series([i for plan in plans for i, _ in plan]).value_counts()
    assert users.max() >= 3  # images that several units use
    recorder = Recorder(model)
    out = pyneuron.faithfulness(
        model, "3", images, store, table, top_k=top_k, random_regions=regions,
        batch_size=batch_size, activations=activations, progress=False,
    )  # fmt: skip
    recorder.handle.remove()
    assert out["faithfulness_images"].sum() == users.sum()

    shown = torch.cat(recorder.batches)
    pairs = int(users.sum())
    assert len(users) + pairs * 2 <= len(shown) <= len(users) + pairs * (1 + regions)
    # ~ceil(images / batch_size) forward passes: all full but the last.
    assert len(recorder.batches) == math.ceil(len(shown) / batch_size)
    assert all(len(batch) == batch_size for batch in recorder.batches[:-1])
    # Each used image unmasked exactly once (not once per unit), unused ones never.
    for image in range(N_IMAGES):
        tensor = torch.from_numpy(images[image].astype(np.float32) / 255).permute(2, 0, 1)
        times = int((shown == tensor).flatten(1).all(dim=1).sum())
        assert times == (1 if image in users.index else 0), (image, times)


def test_faithfulness_progress_and_estimate(capfd):
    images, store, model = tiny_images(), tiny_store(), tiny_net()
    options = dict(top_k=4, random_regions=2, batch_size=4)
    quiet = pyneuron.faithfulness(
        model, "3", images, store, tiny_table(), progress=False, **options
    )
    assert capfd.readouterr().err == ""
    loud = pyneuron.faithfulness(model, "3", images, store, tiny_table(), progress=True, **options)
    err = capfd.readouterr().err
    pd.testing.assert_frame_equal(loud, quiet)
    assert "faithfulness 3: 100%" in err  # the bar's last line (output is not a terminal)
    estimate = re.search(r"faithfulness 3: 4 units x up to 4 images x 3 variants = (\d+) mask", err)
    assert estimate and "forward passes of 4" in err and "at the measured rate" in err


def test_evaluate_shows_faithfulness_progress(project, tmp_path, capfd):
    run = dissect(project, tmp_path / "run")
    config = EvaluationConfig(holdout=0, controls=0, top_k=2, random_regions=2)
    capfd.readouterr()
    evaluate_run(run, config, progress=False)
    assert "faithfulness" not in capfd.readouterr().err
    evaluation = evaluate_run(run, config, progress=True)
    err = capfd.readouterr().err
    assert "faithfulness 1: 100% 30/30" in err  # 6 units x 2 images x 3 - 6 shared + 12
    assert "mean activation_drop" in evaluation["layers"]["1"]


def test_evaluate_of_an_explain_run(project, tmp_path):
    """`pyneuron explain` runs carry a layer (their unit masks' folder) and the search they
    used, so `evaluate` checks them as it checks dissect runs (no model: no faithfulness)."""
    run = dissect(project, tmp_path / "run")
    explained = tmp_path / "explained"
    result = invoke(
        "explain", "--units", run / "units" / "1", "--concepts", project / "store",
        "--out", explained, "--length", 2, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert set(pd.read_parquet(explained / "results.parquet")["layer"]) == {"1"}
    result = invoke("evaluate", explained, "--controls", 5, "--holdout", 0.25, "--quiet")
    assert result.exit_code == 0, result.output
    results = pd.read_parquet(explained / "results.parquet")
    assert {"iou_heldout", "above_null"} <= set(results.columns)
    notes = json.loads((explained / "summary.json").read_text())["evaluation"]["notes"]
    assert any("faithfulness skipped" in note for note in notes)
    assert invoke("report", explained, "--quiet").exit_code == 0
