"""bench/stages.py at a tiny size on its local-only path (``--no-ray``: parts with
``backend="local"``, no cluster, whose start alone takes longer than a smoke test
should): so the benchmark of the expensive stages keeps running against the functions
it measures, and its checks (outputs byte-identical, damaged part recomputed) hold."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import stages  # noqa: E402


def test_stages_benchmark_runs_locally_at_a_tiny_size(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the benchmark's CNN")
    out = tmp_path / "stages.json"
    report = stages.main(
        [
            "--no-ray", "--images", "12", "--image-size", "16", "--grid", "8",
            "--batch-size", "4", "--part-sizes", "4,8", "--delay-ms", "1", "--repeat", "1",
            "--out", str(out), "--tmpdir", str(tmp_path),
        ]
    )  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    assert report["identical"]
    assert set(report["stages"]) == {"segment", "layer_units"}
    for stage in report["stages"].values():
        assert stage["backend"] == "local backend" and stage["workers"] == 1
        assert {entry["parts"] for entry in stage["parts"].values()} == {3, 2}
        assert stage["local"]["seconds"] > 0 and "per_part_s" in stage["fit"]
        faults = stage["faults"]
        assert set(faults) == {"rerun_all_done", "damaged_part"}  # no worker to kill
        assert faults["damaged_part"]["log"][0] == "2 of 3 parts already done; computing 1"
        assert all(fault["ok"] and fault["identical"] for fault in faults.values())
    # The unit masks round reuses all its parts: only the activations were damaged.
    layer_log = report["stages"]["layer_units"]["faults"]["damaged_part"]["log"]
    assert layer_log[1] == "3 of 3 parts already done; computing 0"
    assert not any(tmp_path.glob("pyneuron-bench-stages-*")), "the temporary folder stayed"


def test_same_tree_finds_a_flipped_byte(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub" / "x.bin").write_bytes(b"\x00\x01")
    assert stages.same_tree(tmp_path / "a", tmp_path / "b") is None
    (tmp_path / "b" / "sub" / "x.bin").write_bytes(b"\x00\x00")
    assert stages.same_tree(tmp_path / "a", tmp_path / "b") == "sub/x.bin differs"
    (tmp_path / "b" / "y").write_text("")
    assert "other files" in stages.same_tree(tmp_path / "a", tmp_path / "b")
