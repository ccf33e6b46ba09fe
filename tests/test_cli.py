"""The `pyneuron` command end to end on tiny inputs, and the errors a user will make."""

from __future__ import annotations

import json
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import pyneuron
from pyneuron.app.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("href", "src") and value and not value.startswith(("http", "#", "data:")):
                self.links.append(value.split("#")[0])


def check_report(report: Path) -> int:
    pages = list(report.rglob("*.html"))
    assert (report / "index.html") in pages
    for page in pages:
        parser = Links()
        parser.feed(page.read_text())
        for link in parser.links:
            assert (page.parent / link).exists(), f"{page} links to missing {link}"
    return len(pages)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    result = invoke("demo", "--out", out, "--images", 240, "--epochs", 3, "--quiet")
    assert result.exit_code == 0, result.output
    return out, result.output


def test_demo_explains_units_with_the_planted_concepts(demo_run):
    out, output = demo_run
    assert "report:" in output and "best-explained units" in output
    results = pd.read_parquet(out / "results.parquet")
    assert set(results["layer"]) == {"features.6", "features.10"}
    assert len(results) == 32 + 64  # every unit of both layers
    best = results.sort_values("iou", ascending=False).iloc[0]
    # Shapes and colours cover ~10 % of the pixels: IoU far above that of chance overlap.
    assert best["iou"] > 0.4
    concepts = set(pyneuron.Formula.parse(best["formula"]).concepts())
    assert concepts & {"red", "green", "blue", "yellow", "circle", "square", "triangle", "star"}
    csv = pd.read_csv(out / "results.csv")
    assert csv["formula"].fillna("").tolist() == results["formula"].fillna("").tolist()
    np.testing.assert_allclose(csv["iou"], results["iou"])
    summary = (out / "summary.json").read_text()
    assert '"versions"' in summary and '"timings_seconds"' in summary
    assert tomllib.loads((out / "config.toml").read_text())["quantile"] == 0.05
    assert check_report(out / "report") > 3


def report_files(report: Path) -> dict[Path, bytes]:
    return {p.relative_to(report): p.read_bytes() for p in report.rglob("*") if p.is_file()}


def test_report_of_a_demo_run_is_rewritten_identically_and_atomically(demo_run, monkeypatch):
    out, _ = demo_run
    before = report_files(out / "report")
    again = invoke("report", out, "--quiet")
    assert again.exit_code == 0, again.output  # demo data are regenerated from the seed
    after = report_files(out / "report")
    assert after.keys() == before.keys()
    pngs = [p for p in before if p.suffix == ".png"]
    assert pngs and all(after[p] == before[p] for p in pngs)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    def broken(staging, *args, **kwargs):
        (Path(staging) / "index.html").parent.mkdir(parents=True, exist_ok=True)
        (Path(staging) / "index.html").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(pyneuron.report, "write_report", broken)
    failed = invoke("report", out, "--quiet")
    assert failed.exit_code == 1 and "disk full" in failed.output
    assert report_files(out / "report") == after
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_demo_run_can_be_evaluated(demo_run, tmp_path):
    # A demo run saves no concept store: `evaluate` regenerates it (and the images) from
    # the run's seed, like `report` does, and loads the model the demo saved.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run[0], run)
    result = invoke("evaluate", run, "--controls", 20, "--holdout", 0.25, "--quiet")
    assert result.exit_code == 0, result.output
    results = pd.read_parquet(run / "results.parquet")
    assert {"iou_heldout", "above_null"} <= set(results.columns)
    assert len(results) == 32 + 64
    notes = json.loads((run / "summary.json").read_text())["evaluation"]["notes"]
    assert not any("faithfulness skipped" in note for note in notes), notes
    # The demo saves its model: faithfulness ran on the regenerated images.
    assert (run / "model.pt").is_file()
    explained = results.dropna(subset=["formula"])
    assert explained["activation_drop"].notna().any()


def test_existing_output_is_refused_without_overwrite(demo_run):
    out, _ = demo_run
    before = sorted(p.name for p in out.iterdir())
    result = invoke("demo", "--out", out, "--images", 50, "--epochs", 1, "--quiet")
    assert result.exit_code == 1
    assert "already exists; pass --overwrite" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == before


def test_dissect_explain_report_and_store_info(tiny_project, tmp_path):
    root = tiny_project
    model = f"{root / 'net.py'}:build"
    out = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text("length = 2\nbeam = 3\nimage-size = 32\nquantile = 0.1\n")
    result = invoke(
        "dissect",
        "--model",
        model,
        "--layer",
        "1",
        "--images",
        root / "images",
        "--concepts",
        root / "store",
        "--out",
        out,
        "--config",
        config,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 4 and set(results["layer"]) == {"1"}
    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["length"] == 2 and resolved["beam"] == 3 and resolved["image_size"] == 32
    assert check_report(out / "report") > 1

    again = invoke("report", out, "--quiet")
    assert again.exit_code == 0, again.output
    assert check_report(out / "report") > 1

    explained = tmp_path / "explained"
    sources = ("--units", out / "units" / "1", "--concepts", root / "store", "--length", 2)
    result = invoke("explain", *sources, "--out", explained, "--beam", 3, "--quiet")
    assert result.exit_code == 0, result.output
    again = pd.read_parquet(explained / "results.parquet")
    assert again["formula"].fillna("").tolist() == results["formula"].fillna("").tolist()

    optimal = tmp_path / "optimal"
    result = invoke(
        "explain", *sources, "--out", optimal, "--search", "optimal", "--time-limit", 30, "--quiet"
    )
    assert result.exit_code == 0, result.output
    best = pd.read_parquet(optimal / "results.parquet")
    assert best["optimal"].all() and (best["iou"] >= again["iou"]).all()
    bad = invoke("explain", *sources, "--out", tmp_path / "bad", "--search", "greedy", "--quiet")
    assert bad.exit_code != 0 and "unknown search 'greedy'" in bad.output

    info = invoke("store", "info", root / "store")
    assert info.exit_code == 0 and "3 concepts" in info.output

    assert invoke("info").exit_code == 0


def test_netdissect_iou_through_dissect_explain_and_report(tiny_project, tmp_path):
    root = tiny_project
    out = tmp_path / "run"
    common = ("--length", 1, "--iou", "netdissect", "--quiet")
    result = invoke(
        "dissect", "--model", f"{root / 'net.py'}:build", "--layer", "1", "--images",
        root / "images", "--concepts", root / "store", "--out", out, "--image-size", 32,
        "--quantile", 0.1, *common,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    results = pd.read_parquet(out / "results.parquet")
    store = pyneuron.ConceptStore.open(root / "store")
    units = pyneuron.UnitMasks.open(out / "units" / "1")
    table = pyneuron.iou_table(units, store, mode="netdissect", progress=False)
    assert results["iou"].tolist() == table.max(axis=1).tolist()
    assert tomllib.loads((out / "config.toml").read_text())["iou"] == "netdissect"
    assert "NetDissect-Lite&#39;s IoU" in (out / "report" / "index.html").read_text()
    assert invoke("report", out, "--quiet").exit_code == 0
    assert "NetDissect-Lite&#39;s IoU" in (out / "report" / "index.html").read_text()

    explained = tmp_path / "explained"
    result = invoke(
        "explain", "--units", out / "units" / "1", "--concepts", root / "store", "--out",
        explained, *common,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert pd.read_parquet(explained / "results.parquet")["iou"].tolist() == results["iou"].tolist()
    bad = invoke(
        "explain", "--units", out / "units" / "1", "--concepts", root / "store", "--out",
        tmp_path / "bad", "--iou", "netdissect", "--quiet",
    )  # fmt: skip
    assert bad.exit_code != 0 and "length=1" in bad.output and "Traceback" not in bad.output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "no_such_module:build"}, "cannot import no_such_module"),
        ({"--layer": "9"}, "no layer '9'"),
        ({"--images": "EMPTY"}, "no images"),
        ({"--concepts": "MISMATCH"}, "captured 12 images but the concept store covers 5"),
        ({"--concepts": "MISSING"}, "no store at"),
    ],
)
def test_user_errors_are_one_line(tiny_project, tmp_path, change, message):
    root = tiny_project
    (tmp_path / "empty").mkdir()
    mismatch = tmp_path / "mismatch"
    pyneuron.ConceptStore.from_masks(np.ones((1, 5, 8, 8), dtype=bool), ["all"]).save(mismatch)
    values = {
        "--model": f"{root / 'net.py'}:build",
        "--layer": "1",
        "--images": root / "images",
        "--concepts": root / "store",
        "--out": tmp_path / "out",
    }
    values.update(change)
    replacements = {
        "EMPTY": tmp_path / "empty",
        "MISMATCH": mismatch,
        "MISSING": tmp_path / "missing",
    }
    args = [a for key, value in values.items() for a in (key, replacements.get(value, value))]
    result = invoke("dissect", *args, "--quiet")
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    debug = invoke("dissect", *args, "--quiet", "--debug")
    assert debug.exit_code != 0 and debug.exception is not None


def test_config_file_errors(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("lenght = 2\n")
    result = invoke("demo", "--config", config)
    assert result.exit_code != 0 and "unknown option 'lenght'" in result.output


def test_dissect_on_a_broden_folder_and_store_build(tiny_project, tmp_path):
    from test_broden import write_broden

    rng = np.random.default_rng(3)
    rows, pngs = [], {}
    for i in range(6):
        labels = rng.choice([0, 1, 2, 3], size=(8, 8))
        pngs[f"ade20k/seg{i}.png"] = labels
        rows.append(
            {"image": f"ade20k/img{i}.png", "sh": 8, "sw": 8, "object": f"ade20k/seg{i}.png"}
        )
    root = write_broden(tmp_path / "broden", rows, pngs)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / "images" / f"ade20k/img{i}.png"
        )
    out = tmp_path / "run"
    model = f"{tiny_project / 'net.py'}:build"
    result = invoke(
        "dissect",
        "--model",
        model,
        "--layer",
        "1",
        "--concepts",
        root,
        "--grid",
        8,
        "--out",
        out,
        "--length",
        2,
        "--image-size",
        16,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert (out / "concepts" / "manifest.json").is_file()
    assert len(pd.read_parquet(out / "results.parquet")) == 4
    again = invoke("report", out, "--quiet")
    assert again.exit_code == 0, again.output
    built = invoke(
        "store", "build", "--source", root, "--grid", 8, "--out", tmp_path / "store", "--quiet"
    )
    assert built.exit_code == 0, built.output
    assert pyneuron.ConceptStore.open(tmp_path / "store").grid.shape == (6, 8, 8)
