"""The demo's synthetic probing set: images of shapes, colours, scenes and textures
with exact concept masks, generated from a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.store import ConceptStore
from ..progress import progress_bar

SHAPES = ("circle", "square", "triangle", "star")


COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
}


SCENES = ("plain", "gradient", "noise", "checker")


TEXTURES = ("stripes", "dots")


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
