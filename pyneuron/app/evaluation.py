"""``pyneuron evaluate RUN``: held-out scores, null baselines and faithfulness for the
explanations of a run directory, added to its results and report.

Files it writes into the run (each replaced atomically, the report last):

    results.parquet / .csv   gains split_formula, split_iou, *_heldout, iou_drop,
                             null_mean_iou, z_score, p_value, above_null,
                             activation_drop, activation_drop_random, faithfulness_images
    null.parquet / .csv      the control units' explanations (layer, unit, source_unit, ...)
    summary.json             gains an "evaluation" section
    report/                  rewritten with the plots (IoU vs null, held-out vs in-sample)

The run's unit masks were thresholded on all images, so held-out scoring here
re-explains the units on part of the images (``split_formula``, ``split_iou``) and scores
those formulas on the rest; ``dissect(..., holdout=...)`` also sets the thresholds on
the explaining part only.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from ..engine.atomic import write_atomically
from ..engine.heldout import HELDOUT_COLUMNS
from ..engine.null import NULL_COLUMNS, null_baseline, significance
from ..errors import PyneuronError
from ..model.dissect import explain_split
from ..model.faithfulness import FAITHFULNESS_COLUMNS, faithfulness
from .rundir import (
    NULL,
    RESULTS,
    SUMMARY,
    demo_model_inputs,
    open_run_store,
    read_config,
    read_results,
    run_file,
    run_image_files,
    run_unit_masks,
    write_run_report,
)

SPLIT_COLUMNS = ("split_formula", "split_iou")
EVALUATION_COLUMNS = (*SPLIT_COLUMNS, *HELDOUT_COLUMNS, *NULL_COLUMNS, *FAITHFULNESS_COLUMNS)


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Settings of :func:`evaluate_run`.

    Attributes
    ----------
    holdout
        Share of images held out (0: no held-out scoring).
    controls
        Control units per layer (0: no null baseline).
    alpha
        p-value below which a unit counts as above the null.
    faithfulness
        Run the concept-masking check (needs the model).
    top_k, random_regions, fill
        As in :func:`pyneuron.model.faithfulness`.
    seed
        Seed of the split, the controls and the random regions.
    device
        Where the model runs for faithfulness (``"cpu"``, ``"cuda:0"``; None: where it is).
    """

    holdout: float = 0.2
    controls: int = 1000
    alpha: float = 0.05
    faithfulness: bool = True
    top_k: int = 8
    random_regions: int = 4
    fill: str = "mean"
    seed: int = 0
    device: str | None = None


def evaluate_run(
    run: str | os.PathLike[str],
    config: EvaluationConfig = EvaluationConfig(),
    *,
    model: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Add held-out scores, null baselines and faithfulness to a run (see module doc).

    ``model`` / ``weights`` default to the run's own (``pyneuron dissect`` runs name
    them); without a model the faithfulness check is skipped with a note. Running
    it again replaces the earlier evaluation. Returns the summary's ``evaluation``.
    """
    run = Path(run)
    results = read_results(run)
    settings = read_config(run)
    if "range" in results.columns:
        raise PyneuronError(
            f"{run} explains activation ranges (--ranges): pyneuron evaluate covers "
            "thresholded units only; score ranges on held-out images with "
            "pyneuron.dissect(..., ranges=K, holdout=0.2) in Python"
        )
    results, unit_masks = run_unit_masks(run, results, settings)
    results = results.drop(columns=[c for c in EVALUATION_COLUMNS if c in results.columns])
    summary = json.loads((run / SUMMARY).read_text())
    store = open_run_store(run, settings)
    search = _search_options(summary)
    notes: list[str] = []
    check_faithfulness = _faithfulness_check(
        config, Path(run), settings, model, weights, images, notes, progress
    )

    frames, nulls, facts = [], [], {}
    for layer in dict.fromkeys(results["layer"]):
        rows = results[results["layer"] == layer].reset_index(drop=True)
        masks = unit_masks[layer]
        layer_facts: dict[str, Any] = {}
        if config.holdout:
            split = explain_split(
                masks,
                store,
                holdout=config.holdout,
                seed=config.seed,
                progress=progress,
                **search,
            )
            split = split.rename(columns={"formula": "split_formula", "iou": "split_iou"})
            rows = rows.merge(split[["unit", *SPLIT_COLUMNS, *HELDOUT_COLUMNS]], on="unit")
            layer_facts["mean held-out IoU"] = round(float(rows["iou_heldout"].mean()), 4)
            layer_facts["mean IoU drop"] = round(float(rows["iou_drop"].mean()), 4)
        if config.controls:
            null = null_baseline(
                masks,
                store,
                controls=config.controls,
                seed=config.seed,
                progress=progress,
                **search,
            )
            null.insert(0, "layer", layer)
            nulls.append(null)
            rows = significance(rows, null, alpha=config.alpha)
            layer_facts["above null"] = f"{int(rows['above_null'].sum())}/{len(rows)}"
        if check_faithfulness is not None:
            rows = check_faithfulness(layer, store, rows)
            for column in ("activation_drop", "activation_drop_random"):
                value = rows[column].mean()
                layer_facts[f"mean {column}"] = round(float(value), 4) if pd.notna(value) else None
        frames.append(rows)
        facts[layer] = layer_facts

    evaluation: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "search": search,
        "layers": facts,
        "notes": notes,
    }
    new_results = pd.concat(frames, ignore_index=True)
    write_atomically(run / f"{RESULTS}.parquet", lambda p: new_results.to_parquet(p, index=False))
    write_atomically(run / f"{RESULTS}.csv", lambda p: new_results.to_csv(p, index=False))
    if nulls:
        null_table = pd.concat(nulls, ignore_index=True)
        write_atomically(run / f"{NULL}.parquet", lambda p: null_table.to_parquet(p, index=False))
        write_atomically(run / f"{NULL}.csv", lambda p: null_table.to_csv(p, index=False))
    else:
        for suffix in (".parquet", ".csv"):
            (run / f"{NULL}{suffix}").unlink(missing_ok=True)
    if (run / "report").is_dir():
        try:
            evaluation["report"] = str(write_run_report(run, images=images, progress=progress))
        except (PyneuronError, OSError) as error:
            notes.append(f"report not rewritten: {error}")
    summary["evaluation"] = evaluation
    write_atomically(
        run / SUMMARY, lambda p: p.write_text(json.dumps(summary, indent=2, default=str))
    )
    return evaluation


def _search_options(summary: dict[str, Any]) -> dict[str, Any]:
    """The run's search settings (``summary.json``), to search controls the same way."""
    search = summary.get("search")
    if not isinstance(search, dict):
        raise PyneuronError("the run's summary.json has no search settings")
    options = {k: search[k] for k in ("length", "beam_size", "operators") if k in search}
    if "operators" in options:
        options["operators"] = tuple(options["operators"])
    return options


def _faithfulness_check(
    config: EvaluationConfig,
    run: Path,
    settings: dict[str, Any],
    model: str | None,
    weights: str | os.PathLike[str] | None,
    images: str | os.PathLike[str] | None,
    notes: list[str],
    progress: bool = True,
) -> Callable[[str, Any, pd.DataFrame], pd.DataFrame] | None:
    """A (layer, store, rows) -> rows function adding faithfulness, or None (with a note)."""
    if not config.faithfulness:
        return None
    spec = model or settings.get("model")
    if spec is None:
        notes.append("faithfulness skipped: the run names no model (pass --model)")
        return None
    from ..model.models import image_transform, load_model

    net, processor = load_model(spec, weights if model else run_file(run, settings.get("weights")))
    pixels: Any
    if "demo" in settings and images is None:
        pixels, transform = demo_model_inputs(settings), None  # the arrays the demo captured
    else:
        pixels = run_image_files(settings, images)
        transform = processor or image_transform(int(settings.get("image_size", 224)))

    def check(layer: str, store: Any, rows: pd.DataFrame) -> pd.DataFrame:
        return faithfulness(
            net,
            layer,
            pixels,
            store,
            rows,
            top_k=config.top_k,
            random_regions=config.random_regions,
            fill=config.fill,
            seed=config.seed,
            transform=transform,
            device=config.device,
            progress=progress,
        )

    return check
