"""bench/pipeline.py at a tiny size (20 images of 32 x 32, one layer; the segmenter run is
left out here: the CLI's segmentation is tested elsewhere), so the pipeline benchmark
keeps running against the CLI it measures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import pipeline  # noqa: E402


def test_pipeline_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    pipeline.main(
        [
            "--images", "20", "--image-size", "32", "--grid", "8", "--concepts", "5",
            "--layers", "layer1", "--single-layer", "layer1", "--threads", "1",
            "--skip-segmenter",
            "--out", str(out),
        ]
    )  # fmt: skip
    results = json.loads(out.read_text())
    runs = results["sizes"]["20"]
    assert set(runs) == {"forward", "dissect", "dissect_layer1"}
    for run in runs.values():
        assert run["wall_s"] > 0 and run["peak_rss_mb"] > 0
    assert runs["forward"]["forward_s"] > 0
    for name in ("dissect", "dissect_layer1"):
        timings = runs[name]["timings_seconds"]
        assert {"capture", "total"} <= set(timings)
        assert runs[name]["layer_stages_s"]["layer1"] > 0
    assert runs["dissect"]["overhead"] > -1
    assert runs["dissect"]["single_layer_stage_over_forward"] > 0
    assert results["peak_rss_growth"]["dissect"] == 0  # one size: no growth
