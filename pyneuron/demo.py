"""The built-in demo: synthetic images with exact concept masks, a small CNN trained on
them on the CPU, and compositional explanations of every unit of two of its layers.

Nothing is downloaded. ``pyneuron demo`` runs :func:`run_demo`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .progress import progress_bar
from .store import ConceptStore

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
}
SCENES = ("plain", "gradient", "noise", "checker")
TEXTURES = ("stripes", "dots")
DEMO_LAYERS = ("features.6", "features.10")
# The shapes cover a large part of the small images, so the demo thresholds units at
# their top 5 % (compexp's 0.5 % gives masks far smaller than any concept here).
DEMO_QUANTILE = 0.05


@dataclass(frozen=True)
class DemoConfig:
    """Size of the demo run.

    Attributes
    ----------
    n_images
        Probing (and training) images.
    size
        Image side in pixels; also the concept grid.
    epochs
        Training epochs of the small CNN.
    seed
        Seed of the data and of the training.
    """

    n_images: int = 2000
    size: int = 48
    epochs: int = 4
    seed: int = 0


@dataclass(frozen=True)
class DemoData:
    """Synthetic images, their labels (shape x color class) and the concept store."""

    images: np.ndarray  # (N, size, size, 3) uint8
    labels: np.ndarray  # (N, len(SHAPES) + len(COLORS)) presence of each shape and colour
    store: ConceptStore


def _shape_mask(shape: str, size: int, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] + 0.5
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    theta = np.arctan2(dy, dx) - angle
    dist = np.hypot(dy, dx)
    if shape == "triangle":
        # inside a regular triangle: distance to each edge along its normal
        normals = angle + np.pi / 2 + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        proj = dy[..., None] * np.sin(normals) + dx[..., None] * np.cos(normals)
        return (proj <= r * 0.55).all(-1)
    # star: radius oscillates with the angle
    return dist <= r * (0.55 + 0.45 * np.cos(5 * theta) ** 2)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _background(scene: str, texture: str | None, size: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(60, 200, 3)
    yy, xx = np.mgrid[:size, :size]
    if scene == "plain":
        image = np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    elif scene == "gradient":
        ramp = (xx + yy)[..., None] / (2 * size)
        image = base * (0.5 + ramp)
    elif scene == "noise":
        image = base + rng.normal(0, 25, (size, size, 3))
    else:  # checker
        cell = ((yy // 6 + xx // 6) % 2)[..., None]
        image = base * (0.7 + 0.5 * cell)
    if texture == "stripes":
        image = image * (0.75 + 0.25 * ((yy + xx) // 3 % 2))[..., None]
    elif texture == "dots":
        image = image * (1 - 0.35 * (((yy % 5) < 2) & ((xx % 5) < 2)))[..., None]
    return image


def make_data(config: DemoConfig = DemoConfig(), *, progress: bool = True) -> DemoData:
    """Generate the synthetic probing set with its exact concept masks.

    Concepts: scenes (image-level backgrounds), textures (image-level), objects (the
    shapes' filled masks), parts (``outline`` and ``interior`` of the shapes) and colors
    (the filled pixels of each colour).
    """
    rng = np.random.default_rng(config.seed)
    size = config.size
    names = [*SCENES, *TEXTURES, *SHAPES, "outline", "interior", *COLORS]
    categories = (
        ["scene"] * len(SCENES)
        + ["texture"] * len(TEXTURES)
        + ["object"] * len(SHAPES)
        + ["part"] * 2
        + ["color"] * len(COLORS)
    )
    images = np.zeros((config.n_images, size, size, 3), dtype=np.uint8)
    labels = np.zeros((config.n_images, len(SHAPES) + len(COLORS)), dtype=np.float32)
    color_names = list(COLORS)
    with ConceptStore.writer(
        (config.n_images, size, size),
        names,
        categories,
        metadata={"source": "pyneuron demo", "seed": config.seed},
    ) as writer:
        for i in progress_bar(range(config.n_images), desc="demo data", enabled=progress):
            scene = SCENES[rng.integers(len(SCENES))]
            texture = TEXTURES[rng.integers(len(TEXTURES))] if rng.random() < 0.4 else None
            canvas = _background(scene, texture, size, rng)
            masks: dict[str, np.ndarray] = {}
            n_shapes = 1 + int(rng.random() < 0.35)
            for _ in range(n_shapes):
                shape = SHAPES[rng.integers(len(SHAPES))]
                color = color_names[rng.integers(len(COLORS))]
                r = rng.uniform(0.16, 0.3) * size
                cy, cx = rng.uniform(r, size - r, 2)
                mask = _shape_mask(shape, size, cy, cx, r, rng.uniform(0, 2 * np.pi))
                for other in masks.values():
                    other &= ~mask  # later shapes occlude earlier ones
                canvas[mask] = np.array(COLORS[color]) + rng.normal(0, 8, 3)
                masks[shape] = masks.get(shape, np.zeros_like(mask)) | mask
                masks[color] = masks.get(color, np.zeros_like(mask)) | mask
                labels[i, SHAPES.index(shape)] = 1.0
                labels[i, len(SHAPES) + color_names.index(color)] = 1.0
            objects = np.zeros((size, size), dtype=bool)
            for shape in SHAPES:
                if shape in masks:
                    objects |= masks[shape]
            masks["outline"] = _outline(objects)
            masks["interior"] = objects & ~masks["outline"]
            images[i] = np.clip(canvas, 0, 255).astype(np.uint8)
            writer.add_image(i, masks=masks, labels=[scene] + ([texture] if texture else []))
    assert writer.store is not None
    return DemoData(images, labels, writer.store)


def model_inputs(data: DemoData) -> np.ndarray:
    """The demo images as the CNN takes them: float32 (N, 3, H, W) in [0, 1]."""
    return data.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0


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
    from .run import MODEL_FILE, dissect_run

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
