"""bench/segment.py's ``families`` part at its smallest (``--quick``): every segmenter family
runs on the tests' tiny models, the JSON section is written (other sections kept), and the
part timer attributes nested calls the way its docstring says."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import segment as bench_segment  # noqa: E402


def test_families_quick_run_writes_its_section(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("scipy", reason="OWLv2's image processor needs scipy")
    out = tmp_path / "segment.json"
    out.write_text(json.dumps({"clipseg": {"kept": True}}))
    report = bench_segment.main(
        ["--quick", "--images", "2", "--concept-counts", "1,3", "--out", str(out)]
    )
    written = json.loads(out.read_text())
    assert written["clipseg"] == {"kept": True}
    assert written["families"] == json.loads(json.dumps(report))
    assert report["settings"]["quick"] and report["settings"]["concept_counts"] == [1, 3]
    assert set(report["results"]) == set(bench_segment.FAMILIES)
    assert set(report["models"]) == set(bench_segment.FAMILIES)
    for family, rows in report["results"].items():
        assert set(rows) == {"1", "3"}
        assert report["models"][family]["parameters"] > 0
        for row in rows.values():
            assert row["images_per_s"] == pytest.approx(2 / row["seconds"])
            assert sum(row["share"].values()) == pytest.approx(1.0)
            assert row["share"]["vision"] > 0 and row["share"]["prompt"] > 0
            by_part = sum(row["ms_per_image_by_part"].values())
            assert by_part == pytest.approx(row["ms_per_image"])
    # one image encoding per batch, whatever the concept count
    for family in ("clipseg", "sam3"):
        assert [r["vision_calls_per_batch"] for r in report["results"][family].values()] == [1, 1]
    assert report["growth_ms_per_image_last_vs_first_count"].keys() == report["results"].keys()


def test_part_timer_subtracts_nested_calls() -> None:
    torch = pytest.importorskip("torch")

    class Sleep(torch.nn.Module):
        def __init__(self, seconds: float, inner: torch.nn.Module | None = None) -> None:
            super().__init__()
            self.seconds, self.inner = seconds, inner

        def forward(self, x):
            time.sleep(self.seconds)
            return self.inner(x) if self.inner is not None else x

    class Owner:
        def helper(self, x):
            time.sleep(0.02)
            return x

    inner = Sleep(0.05)
    outer = Sleep(0.03, inner)
    owner = Owner()
    timer = bench_segment.PartTimer()
    timer.module(outer, "prompt")
    timer.module(inner, "vision")
    timer.method(owner, "helper", "text")
    outer(1)
    owner.helper(2)
    assert timer.calls == {"vision": 1, "text": 1, "prompt": 1}
    assert 0.05 <= timer.seconds["vision"] < 0.05 + 0.04
    assert 0.03 <= timer.seconds["prompt"] < 0.03 + 0.04  # its own time, not inner's
    assert 0.02 <= timer.seconds["text"] < 0.02 + 0.04
    timer.reset()
    assert timer.seconds == {"vision": 0.0, "text": 0.0, "prompt": 0.0}
