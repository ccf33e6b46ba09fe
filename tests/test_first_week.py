"""What a researcher meets in the first week (issue 21): no lost files, portable runs,
progress in logs, errors that say what to do. Each test fails without its fix."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import pyneuron
from pyneuron.cli import app

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
