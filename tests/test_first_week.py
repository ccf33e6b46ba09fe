"""What a researcher meets in the first week (issue 21): no lost files, portable runs,
progress in logs, errors that say what to do. Each test fails without its fix."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import pyneuron
from pyneuron.app.cli import app

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def small_store() -> pyneuron.ConceptStore:
    masks = np.zeros((2, 4, 8, 8), dtype=bool)
    masks[0, :, :4] = True
    masks[1, ::2] = True
    return pyneuron.ConceptStore.from_masks(masks, ["top", "even"])


# -- 1. --overwrite replaces only an earlier output of the same kind -----------------------


def test_overwrite_keeps_a_folder_of_other_files(tiny_project, tmp_path):
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    thesis = project / "src" / "thesis.tex"
    thesis.write_text("x")
    sources = ("--units", tmp_path / "units", "--concepts", tiny_project / "store")
    masks = np.zeros((1, 12, 8, 8), dtype=bool)
    masks[0, :, :4] = True
    pyneuron.UnitMasks.from_masks(masks).save(tmp_path / "units")
    result = invoke("explain", *sources, "--out", project, "--overwrite", "--quiet")
    assert result.exit_code == 1
    assert "not a pyneuron run directory" in result.output
    assert thesis.read_text() == "x" and sorted(os.listdir(project)) == ["src"]
    # An earlier run at the same path is replaced.
    run = tmp_path / "run"
    assert invoke("explain", *sources, "--out", run, "--quiet").exit_code == 0
    again = invoke("explain", *sources, "--out", run, "--overwrite", "--quiet", "--length", 1)
    assert again.exit_code == 0, again.output


def test_store_save_never_replaces_a_file_or_another_kind(tmp_path):
    store = small_store()
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(pyneuron.OutputExistsError, match="is a file, not a pyneuron concept"):
        store.save(notes, overwrite=True)
    assert notes.read_text() == "keep me"
    units = pyneuron.UnitMasks.from_masks(np.zeros((1, 4, 8, 8), dtype=bool))
    units.save(tmp_path / "units")
    with pytest.raises(pyneuron.OutputExistsError, match="not a pyneuron concept store"):
        store.save(tmp_path / "units", overwrite=True)
    assert pyneuron.UnitMasks.open(tmp_path / "units").grid == units.grid
    store.save(tmp_path / "store")
    store.save(tmp_path / "store", overwrite=True)  # its own kind: replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    store.save(empty)  # an empty directory is free
    assert len(pyneuron.ConceptStore.open(empty)) == 2


def test_dissect_and_store_build_refuse_foreign_folders(tiny_project, tmp_path):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "keep.csv").write_text("1,2\n")
    model = f"{tiny_project / 'net.py'}:build"
    result = invoke(
        "dissect", "--model", model, "--layer", "1", "--images", tiny_project / "images",
        "--concepts", tiny_project / "store", "--out", foreign, "--overwrite", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 1 and "not a pyneuron run directory" in result.output
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("red\nblue\n")
    built = invoke(
        "store", "build", "--source", concepts, "--images", tiny_project / "images",
        "--out", foreign, "--overwrite", "--quiet",
    )  # fmt: skip
    assert built.exit_code == 1 and "not a pyneuron concept store" in built.output
    assert (foreign / "keep.csv").read_text() == "1,2\n" and len(os.listdir(foreign)) == 1


def test_out_dot_is_refused_with_a_message(tiny_project, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    masks = np.zeros((1, 12, 8, 8), dtype=bool)
    pyneuron.UnitMasks.from_masks(masks).save(tmp_path / "units")
    sources = ("--units", tmp_path / "units", "--concepts", tiny_project / "store")
    result = invoke("explain", *sources, "--out", ".", "--overwrite", "--quiet")
    assert result.exit_code == 1
    assert "it is the current directory" in result.output and "Errno" not in result.output
    assert Path(work).is_dir()


# -- 2. images in another order than the store's are refused -------------------------------


def _segmented_project(root: Path) -> tuple[Path, Path]:
    """Eight images and a store segmented from them (a stand-in segmenter: no model)."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            images / f"{i:02d}.png"
        )

    def segmenter(batch, concepts):
        return np.stack(
            [np.stack([np.asarray(im, dtype=np.float32)[..., k] for k in range(2)]) for im in batch]
        )

    store = pyneuron.concepts.segment(
        images, ["red", "green"], segmenter=segmenter, grid=8, progress=False
    )
    store.save(root / "store")
    return images, root / "store"


def test_images_renamed_and_reversed_are_refused(tmp_path, tiny_project):
    images, store_dir = _segmented_project(tmp_path)
    files = sorted(images.iterdir())
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for i, file in enumerate(reversed(files)):
        (shuffled / f"img{i}.png").write_bytes(file.read_bytes())
    model = f"{tiny_project / 'net.py'}:build"
    args = ("dissect", "--model", model, "--layer", "1", "--concepts", store_dir, "--quiet")
    result = invoke(*args, "--images", shuffled, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert "image 0 of the folder is" in result.output and "'00.png'" in result.output
    assert not (tmp_path / "run").exists()
    # Same names, other contents (reversed): the store's content hashes catch it.
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for file, source in zip(files, reversed(files)):
        (swapped / file.name).write_bytes(source.read_bytes())
    result = invoke(*args, "--images", swapped, "--out", tmp_path / "run")
    assert result.exit_code == 1 and "its content differs" in result.output
    # The Python entry point checks a folder too; the right folder passes.
    store = pyneuron.ConceptStore.open(store_dir)
    net = torch_model()
    with pytest.raises(pyneuron.PyneuronError, match="image 0 of the folder"):
        pyneuron.dissect(net, "0", shuffled, store, progress=False)
    table = pyneuron.dissect(net, "0", images, store, progress=False, length=1)
    assert len(table) == 2


def test_broden_style_names_are_matched_by_relative_path(tmp_path):
    from pyneuron.concepts.sources import check_image_order

    store = small_store()
    store.metadata["images"] = ["ade/a.png", "ade/b.png", "ade/c.png", "ade/d.png"]
    root = tmp_path / "images" / "ade"
    files = [root / n for n in ("a.png", "b.png", "c.png", "d.png")]
    check_image_order(store, files)
    with pytest.raises(pyneuron.PyneuronError, match="image 2 of the folder"):
        check_image_order(store, [files[0], files[1], files[3], files[2]])
    store.metadata["images"] = ["a", "b", "c", "d"]  # stems (mask folders, label maps)
    check_image_order(store, files)


def torch_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.ReLU())


# -- 8, 9, 10. transformers models: -q, the vision tower of CLIP, errors that say what to do --


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A whole (random, tiny) transformers CLIP model saved to a folder, as users have."""
    transformers = pytest.importorskip("transformers")
    text = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
            "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 16,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # fmt: skip
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
              "num_hidden_layers": 2, "image_size": 32, "patch_size": 8}  # fmt: skip
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    folder = tmp_path_factory.mktemp("clip") / "clip"
    transformers.CLIPModel(config).save_pretrained(folder)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


def test_a_whole_clip_folder_is_dissected_through_its_vision_tower(
    tiny_clip, tiny_project, tmp_path
):
    out = tmp_path / "run"
    result = invoke(
        "dissect", "--model", tiny_clip, "--layer", "vision_model.encoder.layers.1",
        "--images", tiny_project / "images", "--concepts", tiny_project / "store",
        "--out", out, "--length", 1, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.output  # -q hides transformers' bars too
    import pandas as pd

    assert len(pd.read_parquet(out / "results.parquet")) == 16  # hidden size of the tower
    net, _ = __import__("pyneuron.model.models", fromlist=["load_model"]).load_model(str(tiny_clip))
    assert not hasattr(net, "text_model")


def test_a_missing_model_path_says_what_a_model_can_be(tiny_project, tmp_path):
    result = invoke(
        "dissect", "--model", tmp_path / "models" / "resnet", "--layer", "x",
        "--images", tiny_project / "images", "--concepts", tiny_project / "store",
        "--out", tmp_path / "run", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "does not exist" in result.output and "torchvision" not in result.output.split(":")[1]
    assert "transformers model directory" in result.output


def test_concept_list_errors_come_before_the_segmenter_loads(tiny_project, tmp_path):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("red\nred\n")
    result = invoke(
        "store", "build", "--source", concepts, "--images", tiny_project / "images",
        "--out", tmp_path / "store", "--segmenter", tmp_path / "no-such-model", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 1 and "duplicate concept name 'red'" in result.output


def test_the_default_segmenter_offline_names_the_model_and_the_option(tiny_project, tmp_path):
    import subprocess
    import sys

    concepts = tmp_path / "concepts.txt"
    concepts.write_text("red\nblue\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-m", "pyneuron", "store", "build", "--source", str(concepts),
         "--images", str(tiny_project / "images"), "--out", str(tmp_path / "s"), "-q"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    error = done.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert "CIDAS/clipseg-rd64-refined" in error and "--segmenter clipseg:DIR" in error


# -- 4. a run works from any directory ---------------------------------------------------


def test_a_run_made_with_relative_paths_is_reported_from_elsewhere(tiny_project, tmp_path):
    import shutil
    import tomllib

    project = tmp_path / "project"
    shutil.copytree(tiny_project, project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    here = os.getcwd()
    os.chdir(project)
    try:
        result = invoke(
            "dissect", "--model", "net.py:build", "--layer", "1", "--images", "images",
            "--concepts", "store", "--out", "run", "--length", 1, "--quantile", 0.1, "--quiet",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        explained = invoke(
            "explain", "--units", "run/units/1", "--concepts", "store", "--out", "explained",
            "--length", 1, "--quiet",
        )  # fmt: skip
        assert explained.exit_code == 0, explained.output
    finally:
        os.chdir(here)
    config = tomllib.loads((project / "run" / "config.toml").read_text())
    assert config["images"] == str(project / "images")
    assert config["concepts"] == str(project / "store")
    assert config["model"] == f"{project / 'net.py'}:build"
    assert all(Path(f).is_absolute() for f in config["image_files"])
    explained_config = tomllib.loads((project / "explained" / "config.toml").read_text())
    assert explained_config["units"] == str(project / "run" / "units" / "1")
    os.chdir(elsewhere)
    try:
        report = invoke("report", project / "run", "--quiet")
        assert report.exit_code == 0, report.output
        evaluated = invoke(
            "evaluate", project / "run", "--controls", 5, "--holdout", 0.25, "--quiet"
        )
        assert evaluated.exit_code == 0, evaluated.output
    finally:
        os.chdir(here)


# -- 7. progress is printed as lines where output is not a terminal ------------------------


def test_progress_is_printed_as_lines_in_a_log(tiny_project, tmp_path, monkeypatch):
    import io

    from pyneuron.progress import progress_bar

    monkeypatch.setenv("PYNEURON_PROGRESS_INTERVAL", "0")
    log = io.StringIO()
    for _ in progress_bar(range(4), desc="work", unit="step", file=log):
        pass
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("work:   0% 0/4") and lines[-1].startswith("work: 100% 4/4")
    assert "\r" not in log.getvalue() and len(lines) == len(set(lines))
    silent = io.StringIO()
    for _ in progress_bar(range(4), desc="work", file=silent, enabled=False):
        pass
    assert silent.getvalue() == ""
    # The CLI (its output captured, not a terminal) prints lines too, unless -q.
    out = tmp_path / "run"
    args = ("dissect", "--model", f"{tiny_project / 'net.py'}:build", "--layer", "1",
            "--images", tiny_project / "images", "--concepts", tiny_project / "store",
            "--length", 1, "--quantile", 0.1)  # fmt: skip
    result = invoke(*args, "--out", out)
    assert result.exit_code == 0, result.output
    assert "capture: 100% 12/12" in result.output and "report: 100%" in result.output
    quiet = invoke(*args, "--out", tmp_path / "quiet", "--quiet")
    assert "capture:" not in quiet.output


# -- 13. names, help, store info, bench -----------------------------------------------------


def test_concepts_and_length_columns_are_named_precisely():
    masks = np.zeros((3, 6, 4, 4), dtype=bool)
    masks[0, :3] = True
    masks[1, :, :2] = True
    masks[2, :, :, :1] = True
    store = pyneuron.ConceptStore.from_masks(masks, ["a", "b", "c"])
    unit = pyneuron.UnitMasks.from_masks((masks[0] & ~masks[2])[None])
    row = pyneuron.explain(unit, store, length=2, progress=False).iloc[0]
    assert row["formula"] == "(a AND NOT c)"
    assert row["concepts"] == 2 and row["length"] == 3  # NOT counts once more in `length`
    help_text = invoke("explain", "--help").output
    assert "concepts" in help_text and "compexp" in help_text


def test_flags_take_no_value_in_help():
    for command in ("explain", "dissect", "demo", "evaluate"):
        lines = invoke(command, "--help").output.splitlines()
        flags = [line for line in lines if "--overwrite" in line or "--quiet" in line]
        assert flags and not any("<bool>" in line for line in flags), flags


def test_store_info_summarises_long_image_lists(tmp_path):
    store = small_store()
    store.metadata["images"] = [f"images/{i:05d}.jpg" for i in range(500)]
    store.save(tmp_path / "store")
    output = invoke("store", "info", tmp_path / "store").output
    assert "images/00000.jpg" in output and "500 in all" in output
    assert "images/00250.jpg" not in output


def test_bench_writes_where_it_is_told(tmp_path):
    import pyneuron as package

    checkout = Path(package.__file__).resolve().parent.parent / "bench" / "results"
    tracked = (
        {p: p.stat().st_mtime_ns for p in checkout.glob("*.json")} if checkout.is_dir() else {}
    )
    out = tmp_path / "bench"
    result = invoke(
        "bench", "--out", out, "--units", 2, "--images", 60, "--concepts", 40,
        "--numpy-units", 1, "--numba-units", 0, "--compexp-units", 0, "--repeat", 1,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    import json

    report = json.loads((out / "search-small.json").read_text())
    assert report["numpy"]["agreement"]["identical"]
    assert {p: p.stat().st_mtime_ns for p in tracked} == tracked


# -- 14. the README explains concept groups with an example that loads ------------------------


def test_readme_concept_list_examples_load_as_described(tmp_path):
    import re

    from pyneuron.concepts import load_vocabulary

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Concept lists", 1)[1].split("\n## ", 1)[0]
    assert "mutually exclusive per pixel" in section
    text, toml = re.findall(r"```(?:text|toml)\n(.*?)```", section, flags=re.S)
    (tmp_path / "concepts.txt").write_text(text)
    (tmp_path / "concepts.toml").write_text(toml)
    for name in ("concepts.txt", "concepts.toml"):
        vocabulary = load_vocabulary(tmp_path / name)
        assert [g.name for g in vocabulary.groups] == ["objects", "colours"]
        assert vocabulary.groups[0].concepts == ("car", "tree", "person", "background")
    assert load_vocabulary(tmp_path / "concepts.toml").groups[1].mode == "threshold"
