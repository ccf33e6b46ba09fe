"""Comparing explanations across concept sources: formula agreement of two runs unit by
unit against literal numpy evaluations, per-layer summaries, per-concept mask agreement,
merging concepts (against a numpy OR), the page and the `compare` command."""

from __future__ import annotations

import doctest
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import pyneuron
from pyneuron import And, Concept, ConceptStore, Formula, Not, Or
from pyneuron.app.cli import app
from pyneuron.app.compare import compare_runs
from pyneuron.app.pipeline import dissect_run
from pyneuron.app.rundir import to_toml
from pyneuron.engine import store as store_module
from pyneuron.errors import GridMismatchError, PyneuronError, UnknownConceptError
from pyneuron.model.models import image_transform
from pyneuron.report import compare as compare_module
from pyneuron.report.compare import (
    canonical_formula,
    concept_agreement,
    formula_agreement,
    layer_agreement,
    mask_overlaps,
    renamed_formula,
)

NAMES = ["oak", "pine", "grass", "sky", "road", "car"]
MERGE = {"oak": "tree", "pine": "tree"}


def evaluate(formula: Formula, masks: dict[str, np.ndarray]) -> np.ndarray:
    """A formula's mask, literally, from dense concept masks."""
    if isinstance(formula, Concept):
        return masks[formula.name]
    if isinstance(formula, Not):
        return ~evaluate(formula.operand, masks)
    left, right = evaluate(formula.left, masks), evaluate(formula.right, masks)
    return left & right if isinstance(formula, And) else left | right


def random_masks(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Bool masks (concepts, images, h, w) with empty, full and partial images."""
    kind = rng.integers(0, 4, shape[:2])
    masks = rng.random(shape) < rng.random((shape[0], 1, 1, 1)) * 0.6
    masks[kind == 0] = False
    masks[kind == 1] = True
    return masks


def random_formula(rng: np.random.Generator, names: list[str], size: int) -> Formula:
    if size <= 1:
        leaf = Concept(str(rng.choice(names)))
        return Not(leaf) if rng.random() < 0.3 else leaf
    left = int(rng.integers(1, size))
    node = (And, Or)[int(rng.integers(2))](
        random_formula(rng, names, left), random_formula(rng, names, size - left)
    )
    return Not(node) if rng.random() < 0.15 else node


def shuffled(rng: np.random.Generator, formula: Formula) -> Formula:
    """An equivalent formula: operands of AND/OR swapped at random, double negations
    added."""
    if isinstance(formula, Concept):
        return Not(Not(formula)) if rng.random() < 0.2 else formula
    if isinstance(formula, Not):
        return Not(shuffled(rng, formula.operand))
    left, right = shuffled(rng, formula.left), shuffled(rng, formula.right)
    if rng.random() < 0.5:
        left, right = right, left
    return type(formula)(left, right)


# -- two runs of one model on two concept sources -----------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Images, concept masks, and three runs of one model: ``a`` on store A, ``b`` on the
    same images with oak and pine merged into tree, ``c`` on a shuffled subset of the
    images copied elsewhere (B's masks there)."""
    root = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(0)
    n = 14
    (root / "images").mkdir()
    files = []
    for i in range(n):
        files.append(root / "images" / f"{i:02d}.png")
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        pixels[..., i % 3] = 255 * (np.arange(16) % (2 + i % 4) == 0)[None, :]
        Image.fromarray(pixels).save(files[-1])
    masks = random_masks(rng, (len(NAMES), n, 8, 8))
    store_a = ConceptStore.from_masks(masks, NAMES, ["plant", "plant", "plant", "", "", ""])
    store_a.save(root / "store_a")
    store_b = store_a.merge_concepts(MERGE, path=root / "store_b")
    subset = np.array([9, 2, 13, 5, 0, 7, 11, 4])
    (root / "other").mkdir()
    copies = []
    for k, i in enumerate(subset):
        copies.append(root / "other" / f"x{k:02d}.png")
        shutil.copyfile(files[i], copies[-1])
    store_b.take_images(subset).save(root / "store_c")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU())
    runs = {}
    for name, images, store in (
        ("a", files, "store_a"),
        ("b", files, "store_b"),
        ("c", copies, "store_c"),
    ):
        runs[name] = root / f"run_{name}"
        dissect_run(
            model,
            ["1"],
            images,
            ConceptStore.open(root / store),
            runs[name],
            settings=pyneuron.SearchSettings(length=3, beam_size=4),
            quantile=0.1,
            transform=image_transform(32),
            report=False,
            progress=False,
            config={"concepts": str(root / store), "image_files": [str(f) for f in images]},
        )
    dense = {
        "a": dict(zip(NAMES, masks)),
        "b": {name: store_b.mask(name) for name in store_b.names},
    }
    return {"root": root, "runs": runs, "subset": subset, "masks": dense, "model": model}


def literal_rows(units: pd.DataFrame, masks_a: dict, masks_b: dict, ids_a, ids_b) -> None:
    """Check the mask columns of ``units`` against literal evaluations."""
    compared = units[units["formula_a"].notna() & units["formula_b"].notna()]
    assert len(compared) > 0
    for row in compared.itertuples():
        fa, fb = Formula.parse(row.formula_a), Formula.parse(row.formula_b)
        mask_a = evaluate(fa, masks_a)[ids_a]
        mask_b = evaluate(fb, masks_b)[ids_b]
        both = int((mask_a & mask_b).sum())
        union = int((mask_a | mask_b).sum())
        assert (row.pixels_a, row.pixels_b, row.intersection) == (mask_a.sum(), mask_b.sum(), both)
        if union:
            assert row.formula_iou == both / union
        else:
            assert np.isnan(row.formula_iou)
        assert row.same_concepts == (set(fa.concepts()) == set(fb.concepts()))
        if row.exact:  # equal formulas on equal concept masks: equal masks
            assert row.formula_iou == 1.0 or union == 0
        if row.formula_a == row.formula_b:
            assert row.exact


def test_a_run_agrees_with_itself_exactly(project):
    run = project["runs"]["a"]
    units, layers = compare_runs(run, run)
    results = pd.read_parquet(run / "results.parquet")
    assert len(units) == len(results) and (units["runs"] == "both").all()
    explained = units["formula_a"].notna()
    assert explained.sum() > 3
    assert units.loc[explained, "exact"].all() and units.loc[explained, "same_concepts"].all()
    assert (units.loc[explained, "formula_iou"] == 1.0).all()
    assert units.loc[~explained, "exact"].isna().all()
    assert units.attrs["images"] == {"shared": 14, "matched_by": "files"}
    row = layers.iloc[0]
    assert (row["exact"], row["same_concepts"], row["mean_formula_iou"]) == (1.0, 1.0, 1.0)
    assert (row["units"], row["compared"], row["only_a"], row["only_b"]) == (
        8,
        explained.sum(),
        0,
        0,
    )


def test_human_against_merged_concepts_matches_numpy(project):
    runs, masks = project["runs"], project["masks"]
    units, layers = compare_runs(runs["a"], runs["b"])
    everything = np.arange(14)
    literal_rows(units, masks["a"], masks["b"], everything, everything)
    compared = units["formula_a"].notna() & units["formula_b"].notna()
    expected = {
        "compared": int(compared.sum()),
        "exact": units.loc[compared, "exact"].astype(bool).mean(),
        "same_concepts": units.loc[compared, "same_concepts"].astype(bool).mean(),
        "mean_formula_iou": np.nanmean(units.loc[compared, "formula_iou"].to_numpy(float)),
    }
    for key, value in expected.items():
        assert layers.iloc[0][key] == pytest.approx(value, abs=0, rel=1e-15), key


def test_runs_on_other_image_lists_are_matched_by_content(project):
    runs, masks, subset = project["runs"], project["masks"], project["subset"]
    units, _ = compare_runs(runs["a"], runs["c"])
    assert units.attrs["images"] == {"shared": 8, "matched_by": "content"}
    order = np.argsort(subset)  # A's order: its image ids ascending
    literal_rows(units, masks["a"], masks["b"], subset[order], subset[order])
    flipped, _ = compare_runs(runs["c"], runs["a"])
    assert flipped["formula_iou"].equals(units["formula_iou"])


def rewritten(run: Path, to: Path, **changes) -> Path:
    """A copy of a run with its config changed (``None`` removes a key)."""
    shutil.copytree(run, to)
    config = {**tomllib.loads((to / "config.toml").read_text()), **changes}
    (to / "config.toml").write_text(to_toml({k: v for k, v in config.items() if v is not None}))
    return to


def test_images_matched_by_path_by_position_or_not_at_all(project, tmp_path):
    runs, subset = project["runs"], project["subset"]
    nowhere = [f"/nowhere/{i:02d}.png" for i in range(14)]
    a = rewritten(runs["a"], tmp_path / "a", image_files=nowhere)
    c = rewritten(runs["c"], tmp_path / "c", image_files=[nowhere[i] for i in subset])
    by_path, _ = compare_runs(a, c)
    assert by_path.attrs["images"] == {"shared": 8, "matched_by": "path"}
    by_content, _ = compare_runs(runs["a"], runs["c"])
    pd.testing.assert_frame_equal(by_path, by_content)

    plain_a = rewritten(runs["a"], tmp_path / "plain_a", image_files=None)
    plain_b = rewritten(runs["b"], tmp_path / "plain_b", image_files=None)
    by_position, _ = compare_runs(plain_a, plain_b)
    assert by_position.attrs["images"] == {"shared": 14, "matched_by": "position"}
    pd.testing.assert_frame_equal(by_position, compare_runs(runs["a"], runs["b"])[0])
    plain_c = rewritten(runs["c"], tmp_path / "plain_c", image_files=None)
    with pytest.raises(PyneuronError, match="cannot tell which images.*14 and 8"):
        compare_runs(plain_a, plain_c)
    elsewhere = rewritten(runs["c"], tmp_path / "e", image_files=[f"/x/{i}.png" for i in range(8)])
    with pytest.raises(PyneuronError, match=r"share no images \(matched by path\)"):
        compare_runs(a, elsewhere)


def test_activation_ranges_are_compared_range_by_range(project, tmp_path):
    root, masks = project["root"], project["masks"]
    files = sorted((root / "images").glob("*.png"))
    runs = {}
    for name in ("a", "b"):
        runs[name] = tmp_path / name
        dissect_run(
            project["model"],
            ["1"],
            files,
            ConceptStore.open(root / f"store_{name}"),
            runs[name],
            settings=pyneuron.SearchSettings(length=2, beam_size=3),
            ranges=2,
            transform=image_transform(32),
            report=False,
            progress=False,
            config={
                "concepts": str(root / f"store_{name}"),
                "image_files": [str(f) for f in files],
            },
        )
    units, layers = compare_runs(runs["a"], runs["b"])
    results = pd.read_parquet(runs["a"] / "results.parquet")
    assert units[["unit", "range"]].values.tolist() == results[["unit", "range"]].values.tolist()
    assert units["range"].nunique() == 2 and layers.iloc[0]["units"] == len(results)
    everything = np.arange(14)
    literal_rows(units, masks["a"], masks["b"], everything, everything)


def test_blocks_of_images_give_the_same_counts(project, monkeypatch):
    runs = project["runs"]
    whole, _ = compare_runs(runs["a"], runs["c"])
    monkeypatch.setattr(compare_module, "BLOCK_PIXELS", 130)  # two images per block
    blocks, _ = compare_runs(runs["a"], runs["c"])
    pd.testing.assert_frame_equal(whole, blocks)


def test_hypernyms_let_oak_and_tree_agree(tmp_path):
    pytest.importorskip("wn")
    import wn

    from pyneuron.concepts.lexicon import Lexicon, write_taxonomy

    saved = wn.config.database_path.parent
    wn.config.data_directory = tmp_path / "wn"
    try:
        taxonomy = {"oak": "tree", "pine": "tree", "tree": "plant", "grass": "plant"}
        lexicon = Lexicon.from_file(write_taxonomy(tmp_path / "t.xml", taxonomy), min_depth=1)
    finally:
        wn.config.data_directory = saved
    rng = np.random.default_rng(5)
    masks = random_masks(rng, (6, 5, 4, 4))
    human = ConceptStore.from_masks(masks, NAMES)
    model = human.merge_concepts(MERGE)
    a = pd.DataFrame(
        {
            "layer": "l",
            "unit": [0, 1, 2, 3, 4],
            "formula": ["oak OR sky", "pine AND NOT road", "grass", "oak", "car"],
        }
    )
    b = pd.DataFrame(
        {
            "layer": "l",
            "unit": [0, 1, 2, 3, 5],
            "formula": ["sky OR tree", "NOT road AND tree", "tree", "road", "car"],
        }
    )
    units = formula_agreement(a, b, human, model, lexicon=lexicon)
    assert units["runs"].tolist() == ["both"] * 4 + ["a", "b"]
    assert units["exact"].tolist()[:4] == [False, False, False, False]
    assert units["hypernym_a"].tolist()[:4] == [
        "(sky OR tree)",
        "(tree AND NOT road)",
        "grass",  # grass meets tree at plant only: depth 0, not meaningful
        "oak",
    ]
    assert units["hypernym_exact"].tolist()[:4] == [True, True, False, False]
    assert units["hypernym_same_concepts"].tolist()[:4] == [True, True, False, False]
    assert units.loc[4:, "hypernym_exact"].isna().all()
    layers = layer_agreement(units)
    assert layers.iloc[0][["hypernym_exact", "only_a", "only_b"]].tolist() == [0.5, 1, 1]


def test_canonical_forms_preserve_meaning_and_ignore_operand_order():
    rng = np.random.default_rng(11)
    names = ["a", "b", "c", "d"]
    masks = random_masks(rng, (4, 3, 4, 4))
    store = ConceptStore.from_masks(masks, names)
    dense = dict(zip(names, masks))
    for _ in range(300):
        formula = random_formula(rng, names, int(rng.integers(1, 7)))
        canonical = canonical_formula(formula)
        np.testing.assert_array_equal(canonical.mask(store), evaluate(formula, dense))
        assert str(canonical_formula(canonical)) == str(canonical)  # idempotent
        assert str(canonical_formula(shuffled(rng, formula))) == str(canonical)
        assert Formula.parse(str(canonical)) == canonical  # prints as a valid formula
    assert str(canonical_formula("(b OR a) AND NOT c")) == "((a OR b) AND NOT c)"
    assert str(canonical_formula("(a AND b) OR (b AND a) OR NOT NOT a")) == "((a AND b) OR a)"
    assert str(canonical_formula("a OR NOT (b OR a)")) == "(a OR NOT (a OR b))"
    assert (
        str(renamed_formula("(oak OR pine) AND NOT oak", MERGE)) == "((tree OR tree) AND NOT tree)"
    )


def test_concept_agreement_matches_numpy():
    rng = np.random.default_rng(2)
    human = random_masks(rng, (5, 9, 6, 5))
    segmented = random_masks(rng, (4, 7, 6, 5))
    segmented[0, :, :3] = True  # "sky" of the segmenter
    store_a = ConceptStore.from_masks(human, ["sky", "sea", "dog", "cat", "car"], list("ssoop"))
    store_b = ConceptStore.from_masks(segmented, ["sky", "water", "dog", "bus"], list("sxoo"))
    ids_a, ids_b = np.array([8, 1, 3, 0, 6]), np.array([2, 6, 0, 4, 5])
    table = concept_agreement(store_a, store_b, mapping={"sea": "water"}, images=(ids_a, ids_b))
    assert table["concept_a"].tolist() == ["sky", "sea", "dog"]
    assert table["concept_b"].tolist() == ["sky", "water", "dog"]
    assert table["category_a"].tolist() == ["s", "s", "o"]
    assert table["category_b"].tolist() == ["s", "x", "o"]
    for row in table.itertuples():
        a = human[store_a.index(row.concept_a)][ids_a]
        b = segmented[store_b.index(row.concept_b)][ids_b]
        assert (row.pixels_a, row.pixels_b, row.intersection) == (a.sum(), b.sum(), (a & b).sum())
        union = (a | b).sum()
        assert row.iou == (a & b).sum() / union if union else np.isnan(row.iou)
    with pytest.raises(UnknownConceptError, match="did you mean 'sea'"):
        concept_agreement(store_a, store_b, mapping={"seaa": "water"}, images=(ids_a, ids_b))
    with pytest.raises(PyneuronError, match="cover 9 and 7 images"):
        concept_agreement(store_a, store_b)
    with pytest.raises(PyneuronError, match="matching pairs"):
        concept_agreement(store_a, store_b, images=(ids_a, ids_b[:3]))
    with pytest.raises(PyneuronError, match="distinct"):
        concept_agreement(store_a, store_b, images=([1, 1], [0, 2]))
    with pytest.raises(PyneuronError, match=r"lie in \[0, 7\)"):
        concept_agreement(store_a, store_b, images=([1, 2], [0, 7]))
    small = ConceptStore.from_masks(np.ones((1, 9, 3, 5), dtype=bool), ["sky"])
    with pytest.raises(GridMismatchError, match="6x5 and 3x5"):
        concept_agreement(store_a, small)


def test_mask_overlaps_of_empty_masks_are_nan():
    store = ConceptStore.from_masks(np.zeros((1, 2, 2, 2), dtype=bool), ["none"])
    table = mask_overlaps([(Concept("none"), Concept("none"))], store, store)
    assert table[["pixels_a", "pixels_b", "intersection"]].iloc[0].tolist() == [0, 0, 0]
    assert np.isnan(table["iou"].iloc[0])


# -- merging concepts ---------------------------------------------------------------------


def test_merge_concepts_is_a_numpy_or(tmp_path):
    rng = np.random.default_rng(7)
    for trial in range(40):
        n_concepts = int(rng.integers(1, 8))
        shape = (
            n_concepts,
            int(rng.integers(1, 6)),
            int(rng.integers(1, 9)),
            int(rng.integers(1, 9)),
        )
        masks = random_masks(rng, shape)
        names = [f"c{i}" for i in range(n_concepts)]
        categories = [str(rng.choice(["x", "y"])) for _ in names]
        store = ConceptStore.from_masks(masks, names, categories)
        mapping = {name: f"g{rng.integers(3)}" for name in names if rng.random() < 0.7}
        if n_concepts > 1 and rng.random() < 0.3:
            mapping[names[0]] = names[-1]  # onto a concept left as it is
        target = [mapping.get(name, name) for name in names]
        path = tmp_path / f"merged{trial}" if trial % 2 else None
        merged = store.merge_concepts(mapping, path=path)
        assert merged.names == list(dict.fromkeys(target))
        for new, category in zip(merged.names, merged.categories):
            members = [i for i, t in enumerate(target) if t == new]
            expected = np.zeros(shape[1:], dtype=bool)
            for i in members:
                expected |= masks[i]
            np.testing.assert_array_equal(merged.mask(new), expected)
            kinds = {categories[i] for i in members}
            assert category == (kinds.pop() if len(kinds) == 1 else "merged")
        merged.verify()
        if path is not None:
            reopened = ConceptStore.open(path)
            assert reopened.names == merged.names and reopened.metadata == merged.metadata
            np.testing.assert_array_equal(reopened.pixel_counts, merged.pixel_counts)


def test_merge_concepts_in_small_chunks():
    rng = np.random.default_rng(8)
    masks = random_masks(rng, (6, 7, 9, 9))
    store = ConceptStore.from_masks(masks, list("abcdef"))
    groups = np.array([0, 1, 0, 2, 1, 0])
    whole = ConceptStore.writer(store.grid, ["x", "y", "z"])
    with whole as writer:
        store_module._add_unions(store, groups, writer.writer)
    chunked = ConceptStore.writer(store.grid, ["x", "y", "z"])
    with chunked as writer:
        store_module._add_unions(store, groups, writer.writer, chunk_bytes=16)
    for g, name in enumerate(["x", "y", "z"]):
        expected = np.logical_or.reduce(masks[groups == g])
        np.testing.assert_array_equal(chunked.store.mask(name), expected)
        np.testing.assert_array_equal(whole.store.mask(name), expected)


def test_merge_concepts_records_mappings_and_refuses_bad_ones(tmp_path):
    masks = np.zeros((3, 2, 2, 2), dtype=bool)
    store = ConceptStore.from_masks(masks, ["oak", "pine", "sky"])
    store.metadata["source"] = "test"
    once = store.merge_concepts({"oak": "tree", "sky": "sky"})
    twice = once.merge_concepts({"tree": "plant", "pine": "plant"})
    assert twice.names == ["plant", "sky"]
    assert twice.metadata == {
        "source": "test",
        "merges": [{"oak": "tree"}, {"tree": "plant", "pine": "plant"}],
    }
    assert store.metadata == {"source": "test"}  # the original is unchanged
    with pytest.raises(UnknownConceptError, match="did you mean 'oak'"):
        store.merge_concepts({"oaks": "tree"})
    for bad in ("", None, 3):
        with pytest.raises(PyneuronError, match="new names must be non-empty strings"):
            store.merge_concepts({"oak": bad})
    with pytest.raises(PyneuronError, match="mapping must be a mapping"):
        store.merge_concepts([("oak", "tree")])
    store.merge_concepts({}, path=tmp_path / "m")
    with pytest.raises(FileExistsError):
        store.merge_concepts({}, path=tmp_path / "m")
    assert store.merge_concepts({"oak": "x"}, path=tmp_path / "m", overwrite=True).names[0] == "x"


# -- errors, the page and the command -------------------------------------------------------


def test_runs_without_what_is_needed_say_what_is_missing(project, tmp_path):
    runs, root = project["runs"], project["root"]
    broken = tmp_path / "broken"
    shutil.copytree(runs["b"], broken)
    config = (broken / "config.toml").read_text()
    (broken / "config.toml").write_text(
        config.replace(str(root / "store_b"), str(tmp_path / "gone"))
    )
    with pytest.raises(PyneuronError, match=r"run B .*concept store.*--concepts-b"):
        compare_runs(runs["a"], broken)
    units, _ = compare_runs(runs["a"], broken, store_b=root / "store_b")
    assert units["formula_iou"].equals(compare_runs(runs["a"], runs["b"])[0]["formula_iou"])
    with pytest.raises(PyneuronError, match="run A: .*results.parquet is missing"):
        compare_runs(tmp_path, runs["a"])
    with pytest.raises(PyneuronError, match="lists 14 images but its concept store covers 8"):
        compare_runs(runs["a"], runs["b"], store_a=root / "store_c")
    with pytest.raises(
        PyneuronError, match=r"formulas of a use concepts that its concept store lacks \('oak'"
    ):
        formula_agreement(
            pd.DataFrame({"layer": "l", "unit": [0], "formula": ["oak"]}),
            pd.DataFrame({"layer": "l", "unit": [0], "formula": ["tree"]}),
            ConceptStore.open(root / "store_b"),
            ConceptStore.open(root / "store_b"),
        )
    ranged = pd.DataFrame({"layer": "l", "unit": [0], "range": [0], "formula": ["sky"]})
    with pytest.raises(PyneuronError, match="explain activation ranges"):
        formula_agreement(ranged, ranged.drop(columns="range"), None, None)
    with pytest.raises(PyneuronError, match="more than once"):
        formula_agreement(pd.concat([ranged, ranged]), ranged, None, None)


def test_the_compare_command(project, tmp_path):
    pytest.importorskip("wn")
    import wn

    from pyneuron.concepts.lexicon import write_taxonomy

    runs, root = project["runs"], project["root"]
    taxonomy = write_taxonomy(tmp_path / "t.xml", {"oak": "tree", "pine": "tree", "tree": "plant"})
    out = tmp_path / "cmp"
    runner = CliRunner()
    saved = wn.config.database_path.parent
    wn.config.data_directory = tmp_path / "wn"
    try:
        args = ["compare", str(runs["a"]), str(runs["c"]), "--out", str(out), "-q"]
        done = runner.invoke(app, [*args, "--wordnet", str(taxonomy), "--min-depth", "1"])
        assert done.exit_code == 0, done.output
        again = runner.invoke(app, args)
        assert again.exit_code == 1 and "already exists" in again.output
        assert len(again.output.strip().splitlines()) == 1 and "Traceback" not in again.output
        assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    finally:
        wn.config.data_directory = saved
    assert sorted(p.name for p in out.iterdir()) == [
        "compare.csv",
        "compare.html",
        "concepts.csv",
        "layers.csv",
    ]
    units, layers = compare_runs(runs["a"], runs["c"])
    written = pd.read_csv(out / "compare.csv")
    np.testing.assert_array_equal(written["formula_iou"], units["formula_iou"].to_numpy(float))
    assert "hypernym_exact" not in written  # the last run had no --wordnet
    assert pd.read_csv(out / "layers.csv")["exact"].tolist() == layers["exact"].tolist()
    concepts = pd.read_csv(out / "concepts.csv")
    assert concepts["concept_a"].tolist() == ["grass", "sky", "road", "car"]
    masks, subset = project["masks"]["a"], np.sort(project["subset"])
    for row in concepts.itertuples():
        pixels = masks[row.concept_a][subset].sum()  # B's masks there are A's
        assert (row.pixels_a, row.pixels_b, row.intersection) == (pixels, pixels, pixels)
        assert row.iou == 1.0 if pixels else np.isnan(row.iou)
    page = (out / "compare.html").read_text()
    assert "Agreement per layer" in page and "matched by content" in page
    assert page.count("<tr>") == 1 + len(layers) + 1 + len(units) + 1 + len(concepts)

    with_lexicon = tmp_path / "with-lexicon"
    saved = wn.config.database_path.parent
    wn.config.data_directory = tmp_path / "wn"
    try:
        done = runner.invoke(
            app, ["compare", str(runs["a"]), str(runs["b"]), "--out", str(with_lexicon), "-q",
                  "--wordnet", str(taxonomy), "--min-depth", "1"],
        )  # fmt: skip
    finally:
        wn.config.data_directory = saved
    assert done.exit_code == 0, done.output
    assert "hypernym_exact" in pd.read_csv(with_lexicon / "compare.csv")
    assert "exact (hypernyms)" in (with_lexicon / "compare.html").read_text()

    broken = tmp_path / "broken"
    shutil.copytree(runs["a"], broken)
    config = (broken / "config.toml").read_text()
    (broken / "config.toml").write_text(
        config.replace(str(root / "store_a"), str(tmp_path / "gone"))
    )
    failed = runner.invoke(
        app, ["compare", str(broken), str(runs["b"]), "--out", str(tmp_path / "x")]
    )
    assert failed.exit_code == 1 and "--concepts-a" in failed.output
    assert len(failed.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    fixed = runner.invoke(
        app, ["compare", str(broken), str(runs["b"]), "--out", str(tmp_path / "x"), "-q",
              "--concepts-a", str(root / "store_a")],
    )  # fmt: skip
    assert fixed.exit_code == 0, fixed.output


def test_docstring_examples():
    result = doctest.testmod(compare_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
