"""Checks of explanations: held-out scoring, null baselines of control units, concept-masking
faithfulness, and `pyneuron evaluate RUN` — against brute force and planted truths."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pandas as pd
import pytest
import torch
from oracle import metrics as oracle_metrics
from oracle import random_case
from PIL import Image

import pyneuron
from pyneuron.engine.metrics import METRIC_COLUMNS
from pyneuron.engine.null import roll_masks
from pyneuron.model.dissect import explain_activations, explain_split

GREY, RED, BLUE = (128, 128, 128), (255, 0, 0), (0, 0, 255)


# -- a tiny world with known truth: coloured squares and a CNN that detects them ----------


def scenes(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, pyneuron.ConceptStore]:
    """Grey images with a red and a blue square in some of them, plus pixel noise; concepts
    on the pixel grid: red, blue, an image-level 'even' label and two random-blob concepts.
    Red and blue cover about 5 % of the pixels each, so the top-10 % quantile threshold
    of a colour detector is 0 and its unit mask is exactly its colour's pixels."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    images[:] = GREY
    masks = np.zeros((5, n, size, size), dtype=bool)
    for i in range(n):
        for c in (0, 1):
            if rng.random() < 0.7:
                side = int(rng.integers(3, 7))
                y, x = rng.integers(0, size - side, size=2)
                masks[c, i, y : y + side, x : x + side] = True
        masks[1, i] &= ~masks[0, i]  # red is drawn on top
        images[i][masks[1, i]] = BLUE
        images[i][masks[0, i]] = RED
    noise = rng.normal(0.0, 8.0, images.shape)
    images = np.clip(images + noise, 0, 255).astype(np.uint8)
    masks[2, ::2] = True
    masks[3:] = rng.random((2, n, size, size)) < 0.1
    store = pyneuron.ConceptStore.from_masks(masks, ["red", "blue", "even", "noise1", "noise2"])
    return images, store


def colour_net() -> torch.nn.Module:
    """Unit 0 = R - G - B (red), unit 1 = B - R - G (blue), unit 2 = fixed random weights."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight[0, :, 0, 0] = torch.tensor([1.0, -1.0, -1.0])
        conv.weight[1, :, 0, 0] = torch.tensor([-1.0, -1.0, 1.0])
        conv.bias[:2] = 0.0
    return torch.nn.Sequential(conv, torch.nn.ReLU()).eval()


@pytest.fixture(scope="module")
def world():
    images, store = scenes(60)
    return images, store, colour_net()


# -- subsets of mask sets -------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(7, 9), (10, 10)])
def test_take_images_and_units_match_the_dense_masks(height, width):
    rng = np.random.default_rng(height)
    concepts, units = random_case(rng, 13, height, width, 6, 8)
    store = pyneuron.ConceptStore.from_masks(concepts, [f"c{i}" for i in range(6)])
    masks = pyneuron.UnitMasks.from_masks(units)
    images = rng.permutation(13)[:7]  # not ascending: renumbered in the order given
    taken = store.take_images(images)
    assert taken.grid.shape == (7, height, width) and taken.names == store.names
    for c in range(6):
        np.testing.assert_array_equal(taken.mask(c), concepts[c][images])
    picked = np.array([5, 0, 5, 3])
    sub = masks.take_units(picked).take_images(images)
    for k, u in enumerate(picked):
        np.testing.assert_array_equal(sub.mask(k), units[u][images])
    assert masks.take_units([]).grid == masks.grid and len(masks.take_units([])) == 0


def test_take_rejects_bad_ids():
    masks = pyneuron.UnitMasks.from_masks(np.ones((2, 3, 2, 2), dtype=bool))
    with pytest.raises(pyneuron.PyneuronError, match="distinct"):
        masks.take_images([1, 1])
    with pytest.raises(pyneuron.PyneuronError, match=r"image ids must lie in \[0, 3\)"):
        masks.take_images([3])
    with pytest.raises(pyneuron.PyneuronError, match=r"mask ids must lie in \[0, 2\)"):
        masks.take_units([-1])
    with pytest.raises(pyneuron.PyneuronError, match="integers"):
        masks.take_units([0.5])


# -- held-out scoring -----------------------------------------------------------------------


def assert_heldout_metrics(table: pd.DataFrame, store: pyneuron.ConceptStore, unit_mask) -> None:
    """Every explained row's held-out metrics equal those of the formula's dense mask
    against ``unit_mask(row)`` (a dense bool array over the held-out images)."""
    explained = table.dropna(subset=["formula"]).to_dict("records")
    assert explained, "no row has a formula: nothing would be checked"
    for row in explained:
        formula_mask = pyneuron.Formula.parse(row["formula"]).mask(store)
        expected = oracle_metrics(formula_mask, unit_mask(row))
        for m in METRIC_COLUMNS:
            value, truth = row[f"{m}_heldout"], expected[m]
            assert (np.isnan(value) and np.isnan(truth)) or value == pytest.approx(truth, abs=1e-12)
        assert row["iou_drop"] == row["iou"] - row["iou_heldout"]


@pytest.mark.parametrize("seed", [0, 1])
def test_held_out_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    concepts, units = random_case(rng, 40, 5, 13, 7, 12)
    store = pyneuron.ConceptStore.from_masks(concepts, [f"c{i}" for i in range(7)])
    masks = pyneuron.UnitMasks.from_masks(units)
    table = explain_split(masks, store, holdout=0.3, seed=seed, length=3, progress=False)
    fit, held = pyneuron.split_images(40, 0.3, seed)
    assert len(held) == 12 and not set(fit) & set(held)
    assert_heldout_metrics(table, store.take_images(held), lambda row: units[row["unit"]][held])
    silent = table[table["formula"].isna()]
    assert len(silent) and (silent["iou_heldout"] == 0).all()  # the unit that never fires
    assert silent["detection_accuracy_heldout"].isna().all()


def test_planted_unit_keeps_its_iou_on_held_out_images():
    rng = np.random.default_rng(3)
    concepts = rng.random((6, 200, 12, 12)) < 0.25
    unit = (concepts[0] | concepts[1]) & ~concepts[2]
    unit ^= rng.random(unit.shape) < 0.01
    noise = rng.random(unit.shape) < 0.2
    store = pyneuron.ConceptStore.from_masks(concepts, list("abcdef"))
    masks = pyneuron.UnitMasks.from_masks(np.stack([unit, noise]))
    table = explain_split(masks, store, holdout=0.25, length=3, progress=False)
    planted = table.loc[0]
    assert set(pyneuron.Formula.parse(planted["formula"]).concepts()) == {"a", "b", "c"}
    assert planted["iou"] > 0.9 and abs(planted["iou_drop"]) < 0.03


def test_dissect_holdout_sets_thresholds_on_the_explaining_images_only(world):
    images, store, model = world
    table = pyneuron.dissect(
        model, "1", images, store, quantile=0.1, length=2, holdout=0.25, progress=False
    )
    acts = pyneuron.capture(model, "1", images, progress=False)["1"]
    fit, held = pyneuron.split_images(len(images), 0.25)
    expected, _ = explain_activations(
        acts[fit], store.take_images(fit), layer="1", quantile=0.1, length=2, progress=False
    )
    pd.testing.assert_frame_equal(table[expected.columns], expected)
    np.testing.assert_array_equal(table["threshold"], pyneuron.quantile_thresholds(acts[fit], 0.1))
    held_masks = pyneuron.unit_masks_from_activations(
        acts[held], table["threshold"].to_numpy(), (16, 16), progress=False
    )
    assert_heldout_metrics(table, store.take_images(held), lambda row: held_masks.mask(row["unit"]))
    red = table.loc[0]
    assert "red" in red["formula"] and red["iou_heldout"] > 0.5 and abs(red["iou_drop"]) < 0.15


def test_dissect_holdout_with_activation_ranges(world):
    images, store, model = world
    table = pyneuron.dissect(
        model, "1", images, store, ranges=2, length=1, holdout=0.3, progress=False
    )
    acts = pyneuron.capture(model, "1", images, progress=False)["1"]
    _, held = pyneuron.split_images(len(images), 0.3)
    assert {"range", "lower", "upper", "iou_heldout"} <= set(table.columns)

    def unit_mask(row: dict) -> np.ndarray:
        lower, upper = np.full(3, np.inf), np.full(3, -np.inf)
        lower[row["unit"]], upper[row["unit"]] = row["lower"], row["upper"]
        masks = pyneuron.unit_masks_from_activations(
            acts[held], lower, (16, 16), upper=upper, progress=False
        )
        return masks.mask(row["unit"])

    assert_heldout_metrics(table, store.take_images(held), unit_mask)


def test_held_out_errors(world):
    images, store, model = world
    masks = pyneuron.UnitMasks.from_masks(np.zeros((2, 60, 16, 16), dtype=bool))
    table = pd.DataFrame({"unit": [0, 5], "formula": ["red", "blue"], "iou": [0.1, 0.2]})
    with pytest.raises(pyneuron.PyneuronError, match="names unit 5 but the held-out masks hold 2"):
        pyneuron.evaluate(table, masks, store)
    with pytest.raises(pyneuron.PyneuronError, match="lacks the column"):
        pyneuron.evaluate(table.drop(columns="iou"), masks, store)
    with pytest.raises(pyneuron.PyneuronError, match="several layers"):
        pyneuron.evaluate(table.assign(layer=["a", "b"]), masks, store)
    with pytest.raises(pyneuron.PyneuronError, match="one UnitMasks per range"):
        pyneuron.evaluate(table.assign(range=[0, 0]), masks, store)
    with pytest.raises(pyneuron.PyneuronError, match="must be UnitMasks"):
        pyneuron.evaluate(table, "masks", store)
    with pytest.raises(pyneuron.UnknownConceptError):
        pyneuron.evaluate(table.assign(formula=["sky", None]).iloc[:1], masks, store)
    for bad in (0.0, 1.0, True, "0.2"):
        with pytest.raises(pyneuron.PyneuronError, match="holdout must be a share"):
            pyneuron.split_images(10, bad)
    with pytest.raises(pyneuron.GridMismatchError, match="captured 5 images"):
        pyneuron.dissect(model, "1", images[:5], store, holdout=0.2, progress=False)


# -- null baselines -------------------------------------------------------------------------


def test_roll_masks_is_np_roll_per_mask():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 4, 7)) < 0.3
    dy, dx = rng.integers(-9, 9, 5), rng.integers(-9, 9, 5)
    rolled = roll_masks(masks, dy, dx)
    for k in range(5):
        np.testing.assert_array_equal(rolled[k], np.roll(masks[k], (dy[k], dx[k]), axis=(0, 1)))


def test_control_units_keep_each_units_per_image_pixel_counts():
    rng = np.random.default_rng(1)
    _, units = random_case(rng, 30, 6, 11, 4, 12)
    masks = pyneuron.UnitMasks.from_masks(units)
    sources, chunks = pyneuron.control_units(masks, 25, seed=4, chunk=7)
    controls = list(chunks)
    assert [len(c) for c in controls] == [7, 7, 7, 4]
    assert (masks.pixel_counts[sources] > 0).all()  # silent units are no source
    flat = [(c, k) for c in controls for k in range(len(c))]
    changed = 0
    for (chunk, k), source in zip(flat, sources):
        control = chunk.mask(k)
        per_image = np.sort(control.reshape(30, -1).sum(1))
        truth = np.sort(units[source].reshape(30, -1).sum(1))
        np.testing.assert_array_equal(per_image, truth)
        changed += not np.array_equal(control, units[source])
    assert changed >= 20  # all but full-image units move
    again = next(pyneuron.control_units(masks, 25, seed=4, chunk=7)[1])
    np.testing.assert_array_equal(again.mask(3), controls[0].mask(3))
    other = next(pyneuron.control_units(masks, 25, seed=5, chunk=7)[1])
    assert any(not np.array_equal(other.mask(k), controls[0].mask(k)) for k in range(7))


def test_planted_units_are_significant_and_shuffled_units_are_not():
    rng = np.random.default_rng(2)
    concepts = np.zeros((8, 150, 12, 12), dtype=bool)
    for c in range(8):  # blobs: a square per image where present
        for i in np.flatnonzero(rng.random(150) < 0.4):
            y, x = rng.integers(0, 8, 2)
            concepts[c, i, y : y + 4, x : x + 4] = True
    names = [f"c{i}" for i in range(8)]
    store = pyneuron.ConceptStore.from_masks(concepts, names)
    planted = np.stack([concepts[0] | concepts[1], concepts[2] & ~concepts[3], concepts[4]])
    planted ^= rng.random(planted.shape) < 0.005
    _, chunks = pyneuron.control_units(pyneuron.UnitMasks.from_masks(planted), 30, seed=77)
    shuffled = np.stack([m for chunk in chunks for m in map(chunk.mask, range(len(chunk)))])
    units = pyneuron.UnitMasks.from_masks(np.concatenate([planted, shuffled]))
    search = {"length": 2, "beam_size": 3}
    table = pyneuron.explain(units, store, progress=False, **search)
    null = pyneuron.null_baseline(units, store, controls=400, seed=1, progress=False, **search)
    assert len(null) == 400 and set(null["source_unit"]) == set(range(33))
    out = pyneuron.significance(table, null)
    assert out.loc[:2, "above_null"].all() and (out.loc[:2, "p_value"] == 1 / 401).all()
    assert out.loc[:2, "z_score"].min() > 5
    assert out.loc[3:, "above_null"].sum() <= 3  # about 5 % of 30 pass by chance
    # p-value and z-score by their definitions
    reference = null["iou"].to_numpy()
    for row in out.itertuples():
        assert row.p_value == (1 + (reference >= row.iou).sum()) / (1 + reference.size)
        expected_z = (row.iou - reference.mean()) / reference.std(ddof=1)
        assert row.z_score == pytest.approx(expected_z, rel=1e-9, abs=1e-12)


def test_null_errors():
    store = pyneuron.ConceptStore.from_masks(np.ones((1, 3, 2, 2), dtype=bool), ["all"])
    silent = pyneuron.UnitMasks.from_masks(np.zeros((2, 3, 2, 2), dtype=bool))
    with pytest.raises(pyneuron.PyneuronError, match="no unit fires"):
        pyneuron.null_baseline(silent, store, controls=5, progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="n_controls must be an integer >= 1"):
        pyneuron.control_units(silent, 0)
    table = pd.DataFrame({"unit": [0], "iou": [0.5]})
    with pytest.raises(pyneuron.PyneuronError, match="non-empty null_baseline table"):
        pyneuron.significance(table, table.iloc[:0])
    with pytest.raises(pyneuron.PyneuronError, match="alpha"):
        pyneuron.significance(table, table, alpha=2.0)


# -- faithfulness ---------------------------------------------------------------------------


def test_masking_the_concept_silences_the_unit_far_more_than_random_regions(world, tmp_path):
    images, store, model = world
    table = pyneuron.dissect(model, "1", images, store, quantile=0.1, length=1, progress=False)
    assert table.loc[:1, "formula"].tolist() == ["red", "blue"]
    out = pyneuron.faithfulness(model, "1", images, store, table, top_k=6, progress=False)
    assert (out.loc[:1, "faithfulness_images"] == 6).all()
    for unit in (0, 1):
        assert out.loc[unit, "activation_drop"] > 0.9
        assert out.loc[unit, "activation_drop_random"] < 0.4
    # The same from files and from PIL images (default transform: pixels / 255).
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    pil = [Image.fromarray(image) for image in images]
    for source in (folder, pil):
        again = pyneuron.faithfulness(model, "1", source, store, table, top_k=6, progress=False)
        pd.testing.assert_frame_equal(again, out)
    blurred = pyneuron.faithfulness(
        model, "1", images, store, table.iloc[:1], fill="blur", blur_sigma=3.0, progress=False
    )
    assert blurred.loc[0, "activation_drop"] > blurred.loc[0, "activation_drop_random"] + 0.3
    grey = pyneuron.faithfulness(
        model, "1", images, store, table.iloc[:1], fill=GREY, progress=False
    )
    assert grey.loc[0, "activation_drop"] == 1.0


def test_faithfulness_of_rows_without_a_formula_or_images(world):
    images, store, model = world
    table = pd.DataFrame({"unit": [0, 1], "formula": [None, "red AND blue"]})
    out = pyneuron.faithfulness(model, "1", images, store, table, progress=False)
    assert out["activation_drop"].isna().all() and (out["faithfulness_images"] == 0).all()


def test_faithfulness_errors(world):
    images, store, model = world
    table = pd.DataFrame({"unit": [0], "formula": ["red"]})
    with pytest.raises(pyneuron.PyneuronError, match="10 images but the concept store covers 60"):
        pyneuron.faithfulness(model, "1", images[:10], store, table, progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="fill must be one of mean, blur"):
        pyneuron.faithfulness(model, "1", images, store, table, fill="black", progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="needs 3 finite values"):
        pyneuron.faithfulness(model, "1", images, store, table, fill=(0, 0), progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="activation ranges"):
        pyneuron.faithfulness(model, "1", images, store, table.assign(range=0), progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="unit 7 is not a unit"):
        pyneuron.faithfulness(model, "1", images, store, table.assign(unit=7), progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="needs the images' pixels"):
        pyneuron.faithfulness(model, "1", 42, store, table, progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="top_k must be an integer >= 1"):
        pyneuron.faithfulness(model, "1", images, store, table, top_k=0, progress=False)


# -- pyneuron evaluate RUN --------------------------------------------------------------------


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A `pyneuron dissect` run of the colour CNN over PNG files."""
    from test_cli import invoke

    root = tmp_path_factory.mktemp("colours")
    images, store = scenes(48, seed=5)
    (root / "images").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
    store.save(root / "store")
    source = inspect.getsource(colour_net)
    (root / "net.py").write_text(f"import torch\n\n\n{source}\n\nbuild = colour_net\n")
    out = root / "run"
    result = invoke(
        "dissect", "--model", f"{root / 'net.py'}:build", "--layer", "1",
        "--images", root / "images", "--concepts", root / "store", "--out", out,
        "--image-size", 16, "--grid", 16, "--length", 2, "--quantile", 0.1, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_evaluate_command_adds_checks_to_results_and_report(colour_run):
    from test_cli import check_report, invoke

    run = colour_run
    args = ("evaluate", run, "--controls", 200, "--holdout", 0.25, "--top-k", 4, "--quiet")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "above null" in result.output and "report:" in result.output
    results = pd.read_parquet(run / "results.parquet")
    for column in (
        "split_formula", "split_iou", "iou_heldout", "iou_drop", "p_value", "z_score",
        "above_null", "activation_drop", "activation_drop_random",
    ):  # fmt: skip
        assert column in results.columns, column
    red = results.loc[results["unit"] == 0].iloc[0]
    assert red["above_null"] and red["iou_heldout"] > 0.5
    assert red["activation_drop"] > red["activation_drop_random"] + 0.5
    null = pd.read_parquet(run / "null.parquet")
    assert len(null) == 200 and set(null["layer"]) == {"1"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluation"]["config"]["controls"] == 200
    assert summary["evaluation"]["search"] == {
        "length": 2, "beam_size": 5, "operators": ["OR", "AND", "AND NOT"],
    }  # fmt: skip
    plots = {p.name for p in (run / "report" / "img" / "plots").iterdir()}
    assert {"1-null.png", "1-heldout.png"} <= plots
    index = (run / "report" / "index.html").read_text()
    assert "held-out IoU" in index and "p-value" in index and "act. drop" in index
    assert check_report(run / "report") > 1
    pd.testing.assert_frame_equal(pd.read_csv(run / "results.csv")[["iou"]], results[["iou"]])

    # Again without checks: the columns and the null go away; nothing is duplicated.
    result = invoke("evaluate", run, "--controls", 0, "--holdout", 0, "--no-faithfulness", "-q")
    assert result.exit_code == 0, result.output
    bare = pd.read_parquet(run / "results.parquet")
    assert "p_value" not in bare.columns and "iou_heldout" not in bare.columns
    assert not (run / "null.parquet").exists()
    assert "1-null.png" not in {p.name for p in (run / "report" / "img" / "plots").iterdir()}


def test_evaluate_command_errors(tmp_path):
    from test_cli import invoke

    result = invoke("evaluate", tmp_path, "--quiet")
    assert result.exit_code == 1 and "holds no pyneuron results" in result.output
    assert "Traceback" not in result.output
