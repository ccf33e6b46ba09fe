"""The built-in demo: synthetic images with exact concept masks, a small CNN trained on
them on the CPU, and compositional explanations of every unit of two of its layers.

Nothing is downloaded. ``pyneuron demo`` runs :func:`run_demo`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from ..concepts.synthetic import (
    COLORS,
    SHAPES,
    DemoConfig,
    DemoData,
    make_data,
    model_inputs,
)
from ..progress import progress_bar

DEMO_LAYERS = ("features.6", "features.10")
# The shapes cover a large part of the small images, so the demo thresholds units at
# their top 5 % (compexp's 0.5 % gives masks far smaller than any concept here).
DEMO_QUANTILE = 0.05


def make_model() -> Any:
    """The demo CNN: predicts which shapes and colours an image holds (multi-label)."""
    from collections import OrderedDict

    from torch import nn

    features = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
    )  # fmt: skip
    n_classes = len(SHAPES) + len(COLORS)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_classes))
    return nn.Sequential(OrderedDict(features=features, classifier=head))


def train(data: DemoData, config: DemoConfig = DemoConfig(), *, progress: bool = True) -> Any:
    """Train the demo CNN to tell which shapes and colours are present; returns it in eval
    mode with its per-label training accuracy in ``train_accuracy``."""
    import torch

    torch.manual_seed(config.seed)
    model = make_model()
    x = torch.from_numpy(model_inputs(data))
    y = torch.from_numpy(data.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    steps = range(config.epochs)
    for _ in progress_bar(steps, desc="train CNN", unit="epoch", enabled=progress):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = ((model(x) > 0).float() == y).float().mean().item()
    model.train_accuracy = accuracy  # type: ignore[attr-defined]
    return model


def run_demo(
    out: str | Path = "pyneuron-demo",
    config: DemoConfig = DemoConfig(),
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the whole demo and write results and the HTML report to ``out``.

    Returns the run summary (also written to ``out/summary.json``).
    """
    from .pipeline import dissect_run
    from .rundir import MODEL_FILE

    started = time.perf_counter()
    data = make_data(config, progress=progress)
    model = train(data, config, progress=progress)
    summary = dissect_run(
        model,
        list(DEMO_LAYERS),
        model_inputs(data),
        data.store,
        out,
        quantile=DEMO_QUANTILE,
        image_source=lambda i: data.images[i],
        config={
            "demo": dataclasses.asdict(config),
            "model": f"{__name__}:make_model",
            "weights": MODEL_FILE,  # in the run directory
            "layers": list(DEMO_LAYERS),
            "quantile": DEMO_QUANTILE,
        },
        save_model=True,
        overwrite=overwrite,
        progress=progress,
        extra_summary={"train_accuracy": model.train_accuracy, "concept_source": "synthetic demo"},
    )
    summary["total_seconds"] = time.perf_counter() - started
    return summary
