"""Synthetic probing sets for the search benchmark: ADE20K / Broden-like statistics
(:class:`Synthetic`, sizes ``small``, ``medium``, ``ade``), open-vocabulary concept
groups where every pixel takes one concept per group (:class:`DenseSynthetic`, ``dense``)
or independent blob concepts (:class:`BlobSynthetic`, ``dense-units``, ``ranges`` and the
sweep of :data:`DENSITIES` x :data:`PRESENCES`).

A probing set is N images x H x W pixels. With ADE20K / Broden-like statistics it has
C concepts of five kinds:

- **objects** (most concepts): ellipses and rectangles painted into a per-image label map
  (one object per pixel, bigger objects first, so small ones sit on top; pixels no object
  covers are unlabelled). Object frequency is Zipf-like: a few objects (the "wall",
  "floor" and "sky" of ADE) are in most images, most objects in a handful.
- **parts**: each part belongs to one of the common objects and, when that object is in
  an image, covers a sub-ellipse of it (clipped to the visible object).
- **scenes**: one per image (Zipf-like), a full-image mask.
- **textures**: an image-level label on about a quarter of the images.
- **colors**: the 11 Broden colors; each image has a small palette and its objects (and
  its unlabelled background) take colors from it, so colors cover chunks of pixels.

Units come in two kinds:

- **planted** units: the mask of a known formula over actual concepts (for example
  ``((obj0012 OR obj0031) AND NOT red-c)``), with noise: 5 % of its pixels dropped, 30 %
  of the one-pixel ring around it added, and random false-positive blobs in 2 % of images.
- **random** units: blobs firing in a few percent of the images (partly at the location of
  a preferred object), about 0.5 % of all pixels, like top-0.5 % activation masks. The
  share of images and of pixels come from the size (:attr:`SizeSpec.unit_images`,
  :attr:`SizeSpec.unit_pixels`): ``dense-units`` has units that fire in about 70 % of the
  images at 2-3 % of the pixels, as early-layer units at low thresholds.

A size's ``units`` says which: ``"mixed"`` (one planted unit in eight, the rest random),
``"blobs"`` (random units only) or ``"ranges"``: the activation ranges of a synthetic ReLU
layer (:meth:`Synthetic.layer_activations`: each channel responds to a few concepts, plus
smooth noise, at a quarter of the grid's resolution), clustered per channel by
:func:`pyneuron.activation_ranges` (KMeans, OVCE's 5 ranges) and upsampled to the grid by
``range_unit_masks`` -- one unit per (range, channel); the low ranges cover tens of
percent of the pixels.

Everything is generated image by image with vectorized numpy from a per-image seed
(``numpy.random.default_rng((seed, image))``), so it is reproducible, never dense over
the whole probing set, and the concept masks of any image can be regenerated alone
(:meth:`Synthetic.image`). The store is written with :meth:`pyneuron.ConceptStore.writer`
and the units with :meth:`pyneuron.UnitMasks.writer`, in chunks of units.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import pyneuron
from pyneuron import And, Concept, Formula, Not, Or
from pyneuron.model.layer_units import range_unit_masks

COLORS = (
    "black",
    "blue",
    "brown",
    "green",
    "grey",
    "orange",
    "pink",
    "purple",
    "red",
    "white",
    "yellow",
)


@dataclass(frozen=True)
class SizeSpec:
    """A benchmark size: grid, number of concepts and default number of units, the
    concept statistics and the kind of units.

    ``n_units`` counts units, except for ``units="ranges"``, where it counts the
    synthetic layer's channels, each giving ``n_ranges`` units.
    """

    n_images: int
    height: int
    width: int
    n_concepts: int
    n_units: int
    # "ade": ADE20K / Broden-like; "dense": open-vocabulary groups; "blobs": independent
    # blob concepts, each in a share of the images drawn from `concept_presence`.
    statistics: str = "ade"
    units: str = "mixed"  # "mixed": planted + random; "blobs": random only; "ranges"
    unit_images: tuple[float, float] = (0.02, 0.1)  # random units: share of images (log-unif.)
    unit_pixels: tuple[float, float] = (0.0035, 0.0035)  # ... and of all pixels (log-unif.)
    concept_presence: tuple[float, float] = (0.05, 0.5)  # "blobs": share of images (log-unif.)
    n_ranges: int = 5  # "ranges": KMeans ranges per channel (OVCE: 5)


#: The sweep's unit densities: (share of images, share of all pixels) ranges of random
#: units, from top-0.5 % activation masks to early-layer units at low thresholds;
#: ``ranges`` stands for the activation-range units of the ``ranges`` size.
DENSITIES: dict[str, dict] = {
    "top-0.5%": dict(units="blobs", unit_images=(0.04, 0.12), unit_pixels=(0.004, 0.006)),
    "top-1%": dict(units="blobs", unit_images=(0.2, 0.4), unit_pixels=(0.008, 0.012)),
    "dense": dict(units="blobs", unit_images=(0.6, 0.8), unit_pixels=(0.02, 0.03)),
    "denser": dict(units="blobs", unit_images=(0.8, 0.95), unit_pixels=(0.04, 0.06)),
    "ranges": dict(units="ranges"),
}

SIZES = {
    "small": SizeSpec(2_000, 56, 56, 200, 64),
    "medium": SizeSpec(2_000, 56, 56, 1_000, 64),
    "ade": SizeSpec(22_210, 112, 112, 1_200, 512),
    "dense": SizeSpec(2_000, 56, 56, 1_000, 64, statistics="dense"),
    # The dense-unit regime: units in about 70 % of the images at 2-3 % of the pixels.
    "dense-units": SizeSpec(2_000, 56, 56, 1_000, 32, statistics="blobs", **DENSITIES["dense"]),
    "ranges": SizeSpec(2_000, 56, 56, 1_000, 8, statistics="blobs", units="ranges"),
}

#: The sweep's concept presences: share of the images each blob concept is in.
PRESENCES: dict[str, tuple[float, float]] = {
    "5%": (0.04, 0.06),
    "15%": (0.12, 0.18),
    "50%": (0.4, 0.6),
}


def regime(base: SizeSpec, density: str, presence: str) -> SizeSpec:
    """``base`` (grid, concepts, units) with blob concepts of a :data:`PRESENCES` and units
    of a :data:`DENSITIES`: one cell of the sweep.

    Examples
    --------
    >>> spec = regime(SIZES["dense-units"], "top-0.5%", "50%")
    >>> spec.units, spec.unit_pixels, spec.concept_presence
    ('blobs', (0.004, 0.006), (0.4, 0.6))
    """
    if density not in DENSITIES or presence not in PRESENCES:
        raise ValueError(
            f"unknown sweep cell ({density!r}, {presence!r}); densities: {', '.join(DENSITIES)};"
            f" presences: {', '.join(PRESENCES)}"
        )
    return dataclasses.replace(
        base, statistics="blobs", concept_presence=PRESENCES[presence], **DENSITIES[density]
    )


# -- formulas planted in units -------------------------------------------------------
# A planted formula is a nested tuple: ("leaf", c), ("or", l, r), ("and", l, r),
# ("andnot", l, r) with concept ids c.


def _render(node: tuple, names: list[str]) -> Formula:
    kind = node[0]
    if kind == "leaf":
        return Concept(names[node[1]])
    left, right = _render(node[1], names), _render(node[2], names)
    if kind == "or":
        return Or(left, right)
    if kind == "and":
        return And(left, right)
    return And(left, Not(right))


def _possible(node: tuple, present: set[int]) -> bool:
    """False when the formula is certainly empty on an image with these concepts."""
    kind = node[0]
    if kind == "leaf":
        return node[1] in present
    if kind == "or":
        return _possible(node[1], present) or _possible(node[2], present)
    if kind == "and":
        return _possible(node[1], present) and _possible(node[2], present)
    return _possible(node[1], present)


# -- per-image data ------------------------------------------------------------------


@dataclass
class ImageConcepts:
    """The concepts of one image: pixel masks by concept id, and image-level labels."""

    masks: dict[int, np.ndarray]  # concept id -> bool (H, W), never empty
    labels: list[int]  # image-level concepts (full-image masks)
    object_centers: dict[int, tuple[float, float]] = field(default_factory=dict)

    def mask(self, concept: int, shape: tuple[int, int]) -> np.ndarray:
        if concept in self.masks:
            return self.masks[concept]
        if concept in self.labels:
            return np.ones(shape, dtype=bool)
        return np.zeros(shape, dtype=bool)

    def present(self) -> set[int]:
        return set(self.masks) | set(self.labels)


def _paint_ellipse(canvas: np.ndarray, cy: float, cx: float, ry: float, rx: float, value) -> None:
    """Paint an axis-aligned ellipse (bool canvas: OR; int canvas: assign ``value``)."""
    h, w = canvas.shape
    y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 2, h)
    x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return
    yy = (np.arange(y0, y1) + 0.5 - cy) / ry
    xx = (np.arange(x0, x1) + 0.5 - cx) / rx
    inside = yy[:, None] ** 2 + xx[None, :] ** 2 <= 1.0
    if canvas.dtype == bool:
        canvas[y0:y1, x0:x1] |= inside
    else:
        canvas[y0:y1, x0:x1][inside] = value


def _paint_rectangle(canvas: np.ndarray, cy: float, cx: float, ry: float, rx: float, value) -> None:
    h, w = canvas.shape
    y0, y1 = max(int(cy - ry), 0), min(int(math.ceil(cy + ry)), h)
    x0, x1 = max(int(cx - rx), 0), min(int(math.ceil(cx + rx)), w)
    if y0 < y1 and x0 < x1:
        canvas[y0:y1, x0:x1] = value


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


class Synthetic:
    """A synthetic probing set: vocabulary, per-concept and per-unit parameters, and a
    deterministic per-image generator.

    Parameters
    ----------
    spec
        Grid, number of concepts and units.
    seed
        Everything derives from it.
    n_planted
        Units with a planted formula (the first ``n_planted`` units); default
        ``n_units // 8`` for ``units="mixed"``, else none.
    """

    at_preferred = 0.7  # chance a random unit fires at its preferred object when present

    def __init__(self, spec: SizeSpec, seed: int = 0, n_planted: int | None = None) -> None:
        rng = self._start(spec, seed, 1 << 40)
        c = spec.n_concepts
        n_scenes = max(8, round(0.08 * c))
        n_textures = min(47, max(4, round(0.05 * c)))
        rest = c - len(COLORS) - n_scenes - n_textures
        n_parts = round(0.2 * rest)
        n_objects = rest - n_parts
        self.objects = np.arange(n_objects)
        self.parts = n_objects + np.arange(n_parts)
        self.scenes = n_objects + n_parts + np.arange(n_scenes)
        self.textures = n_objects + n_parts + n_scenes + np.arange(n_textures)
        self.colors = n_objects + n_parts + n_scenes + n_textures + np.arange(len(COLORS))
        self.names = (
            [f"obj{i:04d}" for i in range(n_objects)]
            + [f"part{i:03d}" for i in range(n_parts)]
            + [f"scene{i:03d}-s" for i in range(n_scenes)]
            + [f"tex{i:02d}-t" for i in range(n_textures)]
            + [f"{name}-c" for name in COLORS]
        )
        self.categories = (
            ["object"] * n_objects
            + ["part"] * n_parts
            + ["scene"] * n_scenes
            + ["texture"] * n_textures
            + ["color"] * len(COLORS)
        )
        assert len(self.names) == c

        # Zipf-like frequencies: objects per image ~ 1 + Poisson(7), drawn by p ~ 1/rank.
        self.object_p = _zipf(n_objects, 1.0)
        self.scene_p = _zipf(n_scenes, 0.9)
        self.color_p = _zipf(len(COLORS), 0.5)[rng.permutation(len(COLORS))]
        # Common objects are big ("stuff"), rare ones smaller; per-object size and shape.
        rank = np.arange(n_objects)
        self.object_size = np.exp(rng.uniform(np.log(0.08), np.log(0.35), n_objects)) * (
            1.0 + 1.2 / (1.0 + rank / 5.0)
        )
        self.object_rect = rng.random(n_objects) < 0.4
        # Parts hang off the most common objects, about three parts each.
        n_parents = max(1, min(n_objects, math.ceil(n_parts / 3)))
        self.part_parent = np.arange(n_parts) % n_parents
        self.parts_of: dict[int, np.ndarray] = {
            o: self.parts[self.part_parent == o] for o in range(n_parents)
        }

        self._init_units(rng, n_planted, min(n_objects, 100))

    def _init_units(self, rng: np.random.Generator, n_planted: int | None, pool: int) -> None:
        """Planted formulas and random-unit parameters; random units prefer the location
        of one of the concepts ``0 .. pool - 1`` half of the time. For ``units="ranges"``,
        the synthetic layer's channels instead."""
        spec = self.spec
        self.n_units = spec.n_units
        if spec.units == "ranges":
            n_planted = 0
        elif n_planted is None:
            n_planted = spec.n_units // 8 if spec.units == "mixed" else 0
        self.n_planted = min(spec.n_units, n_planted)
        self.planted = [self._planted_formula(rng, k) for k in range(self.n_planted)]
        n_random = 0 if spec.units == "ranges" else spec.n_units - self.n_planted
        self.fire_p = np.exp(rng.uniform(*np.log(spec.unit_images), n_random))
        self.preferred = np.where(rng.random(n_random) < 0.5, rng.integers(0, pool, n_random), -1)
        # Drawn last (the sets of the sizes with one unit density stay as they were).
        lo, hi = spec.unit_pixels
        density = lo * (hi / lo) ** rng.random(n_random)
        self.blob_radius = np.sqrt(density / self.fire_p / np.pi)  # fraction of the side
        if spec.units == "ranges":
            self._init_layer(rng, pool)

    #: The synthetic layer (``units="ranges"``): its maps are this many times coarser than
    #: the grid, each channel sums this many concepts' pooled masks, with smooth noise
    #: interpolated from a square of this many control points per side.
    layer_stride, layer_sources, layer_noise_points = 4, 3, 4

    def _init_layer(self, rng: np.random.Generator, pool: int) -> None:
        """Per channel: the concepts it responds to (of ``0 .. pool - 1``), their weights,
        the noise scale and the bias before the ReLU."""
        n, k = self.spec.n_units, self.layer_sources
        h, w = self.shape
        self.layer_shape = (max(1, h // self.layer_stride), max(1, w // self.layer_stride))
        self.sources = rng.integers(0, pool, (n, k))
        self.source_weight = rng.uniform(0.5, 2.0, (n, k))
        self.noise_scale = rng.uniform(0.5, 1.0, n)
        self.bias = rng.uniform(-0.6, 0.0, n)
        self._pool_y = _pool_matrix(self.layer_shape[0], h)
        self._pool_x = _pool_matrix(self.layer_shape[1], w)
        self._noise_y = _lerp_matrix(self.layer_shape[0], self.layer_noise_points)
        self._noise_x = _lerp_matrix(self.layer_shape[1], self.layer_noise_points)

    def layer_activations(self, image: ImageConcepts, rng: np.random.Generator) -> np.ndarray:
        """The synthetic ReLU layer's maps (U, h, w) float32 on an image: per channel,
        the weighted sum of its concepts' masks (area-pooled to the map) plus smooth
        Gaussian noise plus a bias, clipped at zero."""
        sources = np.unique(self.sources)
        pooled = np.stack(
            [self._pool_y @ image.mask(int(c), self.shape) @ self._pool_x.T for c in sources]
        )
        drive = np.einsum("uk,ukyx->uyx", self.source_weight,
                          pooled[np.searchsorted(sources, self.sources)])  # fmt: skip
        points = self.layer_noise_points
        noise = rng.normal(0.0, 1.0, (self.spec.n_units, points, points))
        noise = np.einsum("yi,uij,xj->uyx", self._noise_y, noise, self._noise_x)
        values = drive + self.noise_scale[:, None, None] * noise + self.bias[:, None, None]
        return np.maximum(values, 0.0).astype(np.float32)

    def range_units(
        self, activations: np.ndarray, path: Path | None, progress: bool
    ) -> list[pyneuron.UnitMasks]:
        """The unit masks of the layer's activation ranges (``spec.n_ranges`` KMeans
        ranges per channel), one :class:`pyneuron.UnitMasks` per range (``path/range<k>``
        when ``path`` is given)."""
        ranges = pyneuron.activation_ranges(activations, self.spec.n_ranges)
        return range_unit_masks(activations, ranges, self.shape, path=path, progress=progress)

    def _start(self, spec: SizeSpec, seed: int, stream: int) -> np.random.Generator:
        """Check and keep the size and seed; the generator of the set-wide parameters."""
        if spec.n_concepts < 40:
            raise ValueError("a synthetic probing set needs at least 40 concepts")
        self.spec = spec
        self.seed = seed
        self.shape = (spec.height, spec.width)
        return np.random.default_rng((seed, stream))

    # -- vocabulary and formulas -------------------------------------------------------
    def planted_formula(self, unit: int) -> str:
        """The planted formula of a planted unit, as pyneuron prints it."""
        return str(_render(self.planted[unit], self.names))

    def _planted_formula(self, rng: np.random.Generator, k: int) -> tuple:
        n_objects = len(self.objects)
        # Objects of rank 3-30: in roughly 3-20 % of the images, so that conjunctions with
        # a scene or a color are not empty.
        lo, hi = min(3, n_objects - 1), min(30, n_objects)

        used: set[int] = set()  # distinct objects within one formula

        def obj() -> tuple:
            o = int(rng.integers(lo, hi))
            while o in used and len(used) < hi - lo:
                o = int(rng.integers(lo, hi))
            used.add(o)
            return ("leaf", o)

        def color() -> tuple:
            return ("leaf", int(rng.choice(self.colors)))

        def scene() -> tuple:
            return ("leaf", int(rng.choice(self.scenes[:4])))

        def obj_and_part() -> tuple[tuple, tuple]:
            # An object that has parts (the common ones) and one of its parts.
            parents = [o for o in range(lo, hi) if len(self.parts_of.get(o, ())) > 0]
            o = int(rng.choice(parents or [lo]))
            parts = self.parts_of.get(o, self.parts)
            return ("leaf", o), ("leaf", int(rng.choice(parts)))

        templates = [
            lambda: ("andnot", ("or", obj(), obj()), color()),
            lambda: ("and", obj(), color()),
            lambda: ("or", obj(), obj()),
            lambda: ("andnot", *obj_and_part()),
            lambda: ("and", obj(), scene()),
            lambda: ("or", ("or", obj(), obj()), obj()),
            lambda: obj(),
            lambda: ("or", ("and", obj(), scene()), obj()),
        ]
        return templates[k % len(templates)]()

    # -- one image -----------------------------------------------------------------------
    def image(self, i: int) -> tuple[ImageConcepts, np.random.Generator]:
        """The concepts of image ``i`` (deterministic) and its generator for the units."""
        rng = np.random.default_rng((self.seed, i))
        h, w = self.shape
        side = min(h, w)
        # Objects: 1 + Poisson(7) instances, drawn with replacement (two chairs happen).
        n_inst = 1 + int(rng.poisson(7))
        concepts = rng.choice(len(self.objects), size=n_inst, p=self.object_p)
        sizes = self.object_size[concepts] * np.exp(rng.normal(0.0, 0.25, n_inst)) * side / 2
        aspect = np.exp(rng.normal(0.0, 0.3, n_inst))
        centers = rng.random((n_inst, 2)) * (h, w)
        order = np.argsort(-sizes, kind="stable")
        instances = np.full((h, w), -1, dtype=np.int32)
        boxes = []
        for k, j in enumerate(order):
            cy, cx = centers[j]
            ry, rx = sizes[j] * aspect[j], sizes[j] / aspect[j]
            paint = _paint_rectangle if self.object_rect[concepts[j]] else _paint_ellipse
            paint(instances, cy, cx, max(ry, 1.0), max(rx, 1.0), k)
            boxes.append((cy, cx, ry, rx))
        inst_concept = concepts[order]
        # Colors: a palette of 1-4 colors; each instance (and the background) may take one.
        palette = rng.choice(self.colors, size=1 + int(rng.integers(0, 4)), p=self.color_p)
        colored = rng.random(n_inst + 1) < 0.55
        color_lut = np.where(colored, rng.choice(palette, size=n_inst + 1), -1)
        masks: dict[int, np.ndarray] = {}
        object_centers: dict[int, tuple[float, float]] = {}
        # Object masks from the instance map: instances of one concept merge.
        present_inst = np.flatnonzero(
            np.bincount(instances.reshape(-1) + 1, minlength=n_inst + 1)[1:]
        )
        for k in present_inst:
            c = int(inst_concept[k])
            visible = instances == k
            masks[c] = masks[c] | visible if c in masks else visible
            object_centers.setdefault(c, boxes[k][:2])
            # Parts of this instance: sub-ellipses inside its box, clipped to what is visible.
            for p in self.parts_of.get(c, ()):
                if rng.random() < 0.6:
                    cy, cx, ry, rx = boxes[k]
                    sub = np.zeros((h, w), dtype=bool)
                    _paint_ellipse(
                        sub,
                        cy + rng.uniform(-0.5, 0.5) * ry,
                        cx + rng.uniform(-0.5, 0.5) * rx,
                        max(ry * rng.uniform(0.25, 0.5), 1.0),
                        max(rx * rng.uniform(0.25, 0.5), 1.0),
                        True,
                    )
                    sub &= visible
                    if sub.any():
                        p = int(p)
                        masks[p] = masks[p] | sub if p in masks else sub
        color_map = color_lut[instances + 1]
        for col in np.unique(palette):
            m = color_map == col
            if m.any():
                masks[int(col)] = m
        labels = [int(rng.choice(self.scenes, p=self.scene_p))]
        if rng.random() < 0.25:
            labels.append(int(rng.choice(self.textures)))
        return ImageConcepts(masks, labels, object_centers), rng

    def unit_masks(
        self, image: ImageConcepts, rng: np.random.Generator, out: np.ndarray
    ) -> np.ndarray:
        """Paint image's unit masks into ``out`` (U, H, W), all False on entry; return the
        ids of the units painted (the only rows that may be non-zero)."""
        h, w = self.shape
        side = min(h, w)
        touched = []
        present = image.present()
        for u, formula in enumerate(self.planted):
            m = None
            if _possible(formula, present):
                m = self._evaluate(formula, image)
                if m.any():
                    noise = rng.random((h, w))
                    ring = _dilate(m) & ~m
                    m = (m & (noise >= 0.05)) | (ring & (noise < 0.3))
                else:
                    m = None
            if rng.random() < 0.02:  # a false-positive blob
                if m is None:
                    m = np.zeros((h, w), dtype=bool)
                r = rng.uniform(0.05, 0.15) * side
                _paint_ellipse(m, rng.random() * h, rng.random() * w, r, r, True)
            if m is not None and m.any():
                out[u] = m
                touched.append(u)
        n_random = len(self.fire_p)
        if n_random:
            fire = rng.random(n_random) < self.fire_p
            pref_here = np.array([p in image.object_centers for p in self.preferred])
            at_object = pref_here & (rng.random(n_random) < self.at_preferred)
            jitter = np.exp(rng.normal(0.0, 0.3, (n_random, 2)))
            where = rng.random((n_random, 2)) * (h, w)
            for j in np.flatnonzero(fire | at_object):
                if at_object[j]:
                    cy, cx = image.object_centers[int(self.preferred[j])]
                    cy, cx = cy + rng.normal(0, 0.05 * h), cx + rng.normal(0, 0.05 * w)
                else:
                    cy, cx = where[j]
                r = self.blob_radius[j] * side
                u = self.n_planted + int(j)
                _paint_ellipse(
                    out[u], cy, cx, max(r * jitter[j, 0], 1.0), max(r * jitter[j, 1], 1.0), True
                )
                touched.append(u)
        return np.array(sorted(set(touched)), dtype=np.int64)

    def _evaluate(self, node: tuple, image: ImageConcepts) -> np.ndarray:
        kind = node[0]
        if kind == "leaf":
            return image.mask(node[1], self.shape).copy()
        left = self._evaluate(node[1], image)
        right = self._evaluate(node[2], image)
        if kind == "or":
            return left | right
        if kind == "and":
            return left & right
        return left & ~right


class DenseSynthetic(Synthetic):
    """A probing set with open-vocabulary (OVCE-style) concept statistics: ``dense``.

    Concepts come in :data:`DENSE_GROUPS` groups of equal size, as an open-vocabulary
    segmenter's argmax over each group's concept list produces them: every pixel of every
    image takes exactly one concept of each group. Per image, each concept of a group is
    drawn with its own probability (log-uniform in 6-50 %, modulated by the image's scene;
    a drawn concept can lose all its pixels to its neighbours, so concepts end up in about
    4-50 % of the images), owns one or more seed points, and the group's label map is the
    weighted Voronoi argmin of the (smoothly warped) distance to the seeds: blob-shaped
    regions with wavy boundaries. Then 4 % of the pixels take the label of a pixel up to
    two pixels away (argmax speckle along boundaries). Besides, each image has one of a
    few scene labels (image-level, full-image masks, Zipf-like in about 5-25 % of images).

    Units are made as in :class:`Synthetic`: planted formulas over these concepts plus
    noise, and random top-0.5 % blobs (half of them near a concept of the first group).
    """

    at_preferred = 0.1  # concepts of a group are common: fire at few of them
    speckle = 0.04  # share of pixels flipped to the label of a nearby pixel
    warp_points = 5  # control points per side of the smooth warp of the Voronoi cells

    def __init__(self, spec: SizeSpec, seed: int = 0, n_planted: int | None = None) -> None:
        rng = self._start(spec, seed, 1 << 41)
        n_groups = len(DENSE_GROUPS)
        n_scenes = min(10, max(2, spec.n_concepts // 100))
        sizes = np.full(n_groups, (spec.n_concepts - n_scenes) // n_groups)
        sizes[: (spec.n_concepts - n_scenes) % n_groups] += 1
        starts = np.concatenate([[0], np.cumsum(sizes)])
        n_grouped = int(starts[-1])
        self.groups = [np.arange(starts[g], starts[g + 1]) for g in range(n_groups)]
        self.group = np.repeat(np.arange(n_groups), sizes)  # group of each grouped concept
        self.scenes = n_grouped + np.arange(n_scenes)
        self.names = [
            f"{DENSE_GROUPS[g]}{j:03d}" for g in range(n_groups) for j in range(sizes[g])
        ] + [f"scene{j:02d}-s" for j in range(n_scenes)]
        self.categories = [DENSE_GROUPS[g] for g in self.group] + ["scene"] * n_scenes
        assert len(self.names) == spec.n_concepts

        self.scene_p = _zipf(n_scenes, 0.7)
        self.frequency = np.exp(rng.uniform(np.log(0.06), np.log(0.5), n_grouped))
        # Presence given the scene: frequency x a scene factor, normalised so that the
        # marginal image frequency stays `frequency` (up to the 0.95 cap).
        factor = np.exp(rng.normal(0.0, 0.6, (n_scenes, n_grouped)))
        factor /= self.scene_p @ factor
        self.present_p = np.minimum(self.frequency * factor, 0.95)
        self.concept_scale = np.exp(rng.normal(0.0, 0.3, n_grouped))  # Voronoi weight
        h, w = self.shape
        self._warp_y = _lerp_matrix(h, self.warp_points)
        self._warp_x = _lerp_matrix(w, self.warp_points)
        self._grid_yx = np.stack(
            np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
        ).reshape(2, -1)
        self._init_units(rng, n_planted, len(self.groups[0]))

    def _planted_formula(self, rng: np.random.Generator, k: int) -> tuple:
        used: set[int] = set()  # distinct concepts within one formula

        def pick(group: int) -> tuple:
            # Concepts in 10-35 % of the images, so that conjunctions are not empty.
            members = self.groups[group]
            freq = self.frequency[members]
            pool = [int(c) for c in members[(freq >= 0.1) & (freq <= 0.35)] if c not in used]
            c = int(rng.choice(pool or members))
            used.add(c)
            return ("leaf", c)

        def scene() -> tuple:
            return ("leaf", int(rng.choice(self.scenes[:4])))

        templates = [
            lambda: ("andnot", ("or", pick(0), pick(0)), pick(4)),
            lambda: ("and", pick(0), pick(3)),
            lambda: ("or", pick(1), pick(1)),
            lambda: ("andnot", pick(0), pick(2)),
            lambda: ("and", pick(0), scene()),
            lambda: ("or", ("or", pick(0), pick(1)), pick(2)),
            lambda: pick(0),
            lambda: ("or", ("and", pick(1), scene()), pick(0)),
        ]
        return templates[k % len(templates)]()

    def image(self, i: int) -> tuple[ImageConcepts, np.random.Generator]:
        """The concepts of image ``i`` (deterministic) and its generator for the units."""
        rng = np.random.default_rng((self.seed, i))
        h, w = self.shape
        n_pixels, n_groups = h * w, len(self.groups)
        scene = int(rng.choice(len(self.scenes), p=self.scene_p))
        present = rng.random(self.group.size) < self.present_p[scene]
        for members in self.groups:  # every pixel takes one concept of each group
            if not present[members].any():
                present[rng.choice(members)] = True
        ids = np.flatnonzero(present)  # group-major, since groups are consecutive ids
        n_seeds = 1 + rng.poisson(0.6, ids.size)
        seed_concept = np.repeat(ids, n_seeds)
        seeds = rng.random((seed_concept.size, 2)) * (h, w)
        weight = self.concept_scale[seed_concept] * np.exp(rng.normal(0.0, 0.3, seeds.shape[0]))
        # Warped pixel coordinates per group: a smooth random displacement field.
        control = rng.normal(0.0, 0.06 * min(h, w), (n_groups, 2, *(2 * [self.warp_points])))
        warp = np.einsum("yi,gaij,xj->gayx", self._warp_y, control, self._warp_x)
        coords = self._grid_yx[None] + warp.reshape(n_groups, 2, n_pixels)
        bounds = np.searchsorted(self.group[seed_concept], np.arange(n_groups + 1))
        labels = np.empty((n_groups, n_pixels), dtype=np.int64)
        for g in range(n_groups):
            s = slice(bounds[g], bounds[g + 1])
            d2 = (coords[g, 0][None] - seeds[s, 0, None]) ** 2
            d2 += (coords[g, 1][None] - seeds[s, 1, None]) ** 2
            d2 /= weight[s, None] ** 2
            labels[g] = seed_concept[s][np.argmin(d2, axis=0)]
        # Speckle: some pixels take the label of a pixel up to two pixels away.
        flat = labels.reshape(-1)
        flip = np.flatnonzero(rng.random(flat.size) < self.speckle)
        g, pix = np.divmod(flip, n_pixels)
        y = np.clip(pix // w + rng.integers(-2, 3, flip.size), 0, h - 1)
        x = np.clip(pix % w + rng.integers(-2, 3, flip.size), 0, w - 1)
        flat[flip] = flat[g * n_pixels + y * w + x]
        concepts = np.unique(labels)
        masks = labels[self.group[concepts]] == concepts[:, None]
        first = np.searchsorted(seed_concept, ids)
        centers = dict(zip(ids.tolist(), map(tuple, seeds[first].tolist())))
        return (
            ImageConcepts(
                dict(zip(concepts.tolist(), masks.reshape(-1, h, w))),
                [int(self.scenes[scene])],
                centers,
            ),
            rng,
        )


DENSE_GROUPS = ("object", "stuff", "part", "material", "color")


def _lerp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights that linearly interpolate n_in control points (spread evenly
    over the n_out pixels, ends included)."""
    at = np.linspace(0.0, n_in - 1, n_out)
    lo = np.minimum(at.astype(int), n_in - 2)
    frac = at - lo
    out = np.zeros((n_out, n_in))
    out[np.arange(n_out), lo] = 1.0 - frac
    out[np.arange(n_out), lo + 1] = frac
    return out


def _pool_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights that average n_in pixels over n_out consecutive bins (the
    last bins take the remainder)."""
    edges = np.arange(n_out + 1) * n_in // n_out
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        out[i, edges[i] : edges[i + 1]] = 1.0 / (edges[i + 1] - edges[i])
    return out


class BlobSynthetic(Synthetic):
    """A probing set of independent blob concepts: ``blobs`` statistics.

    Each concept is in a share of the images drawn log-uniformly from
    :attr:`SizeSpec.concept_presence` (independently of the other concepts); where it is,
    it covers 1 + Poisson(0.5) ellipses around its own radius, log-uniform from 2 % to
    half of the side (blobs of every size; the concept's category says which third of
    that scale it is in: ``small``, ``medium``, ``large``), jittered per blob. Concepts
    overlap freely; there are no image-level labels. Units are random blobs (``units=
    "blobs"``, at the location of a preferred concept :attr:`at_preferred` of the time
    it is in the image) or activation ranges (``units="ranges"``); no planted formulas.
    """

    at_preferred = 0.3
    radius_range = (0.02, 0.5)  # concept radii, as a share of the side

    def __init__(self, spec: SizeSpec, seed: int = 0, n_planted: int | None = None) -> None:
        if spec.units == "mixed" or n_planted:
            raise ValueError("blob statistics have no planted formulas: use units 'blobs'")
        rng = self._start(spec, seed, 1 << 42)
        c = spec.n_concepts
        self.presence = np.exp(rng.uniform(*np.log(spec.concept_presence), c))
        scale = rng.random(c)  # position of the radius on the log scale
        lo, hi = self.radius_range
        self.radius = lo * (hi / lo) ** scale
        self.names = [f"blob{j:04d}" for j in range(c)]
        self.categories = [("small", "medium", "large")[int(3 * x)] for x in scale]
        self._init_units(rng, 0, c)

    def image(self, i: int) -> tuple[ImageConcepts, np.random.Generator]:
        """The concepts of image ``i`` (deterministic) and its generator for the units."""
        rng = np.random.default_rng((self.seed, i))
        h, w = self.shape
        ids = np.flatnonzero(rng.random(self.spec.n_concepts) < self.presence)
        owner = np.repeat(ids, 1 + rng.poisson(0.5, ids.size))
        centers = rng.random((owner.size, 2)) * (h, w)
        radius = self.radius[owner] * min(h, w) * np.exp(rng.normal(0.0, 0.25, owner.size))
        aspect = np.exp(rng.normal(0.0, 0.3, owner.size))
        masks = {int(c): np.zeros((h, w), dtype=bool) for c in ids}
        for c, (cy, cx), r, a in zip(owner.tolist(), centers, radius, aspect):
            # At least one pixel across: the pixel of the center is always inside.
            _paint_ellipse(masks[c], cy, cx, max(r * a, 1.0), max(r / a, 1.0), True)
        first = np.searchsorted(owner, ids)
        centers_of = dict(zip(ids.tolist(), map(tuple, centers[first].tolist())))
        return ImageConcepts(masks, [], centers_of), rng


def synthetic_for(spec: SizeSpec, seed: int = 0) -> Synthetic:
    """The generator of a size's concept statistics (``ade``, ``dense`` or ``blobs``).

    Examples
    --------
    >>> type(synthetic_for(SIZES["dense-units"])).__name__
    'BlobSynthetic'
    """
    kinds = {"ade": Synthetic, "dense": DenseSynthetic, "blobs": BlobSynthetic}
    if spec.statistics not in kinds or spec.units not in ("mixed", "blobs", "ranges"):
        raise ValueError(
            f"unknown statistics {spec.statistics!r} or units {spec.units!r}; statistics: "
            f"{', '.join(kinds)}; units: mixed, blobs, ranges"
        )
    return kinds[spec.statistics](spec, seed)


def _zipf(n: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1) ** exponent
    return p / p.sum()


# -- building a probing set ------------------------------------------------------------


@dataclass
class Built:
    """A built synthetic probing set."""

    synthetic: Synthetic
    store: pyneuron.ConceptStore
    units: list[pyneuron.UnitMasks]  # chunks, units numbered consecutively
    concept_pixels: np.ndarray  # expected per-concept pixel counts (from the generator)
    concept_images: np.ndarray
    unit_pixels: np.ndarray
    unit_images: np.ndarray
    seconds: dict[str, float]

    @property
    def n_units(self) -> int:
        return sum(len(chunk) for chunk in self.units)

    def check_counts(self) -> None:
        """Check that the store and unit masks hold what the generator produced."""
        checks = [
            ("concept pixels", self.store.pixel_counts, self.concept_pixels),
            ("concept images", self.store.image_counts, self.concept_images),
            ("unit pixels", np.concatenate([u.pixel_counts for u in self.units]), self.unit_pixels),
            ("unit images", np.concatenate([u.image_counts for u in self.units]), self.unit_images),
        ]
        for what, got, expected in checks:
            if not np.array_equal(got, expected):
                bad = np.flatnonzero(got != expected)
                raise AssertionError(f"{what} differ from the generator at {bad[:10].tolist()}")


def build(
    spec: SizeSpec,
    *,
    seed: int = 0,
    chunk_units: int = 64,
    directory: str | Path | None = None,
    progress: bool = True,
) -> Built:
    """Generate the probing set image by image and write the store and unit chunks.

    With ``directory`` the store (``directory/store``) and unit chunks
    (``directory/units-KK``) stream to disk and come back memory-mapped, so the bitsets
    never sit twice in memory; without, everything stays in memory.

    For ``units="ranges"`` the layer's activations (N, U, h, w) float32 are kept in
    memory, and the chunks are the ranges (``directory/range<k>``, ``chunk_units``
    unused); their expected counts are those of the masks made (nothing to check them
    against).
    """
    syn = synthetic_for(spec, seed)
    ranges = spec.units == "ranges"
    grid = pyneuron.Grid(spec.n_images, spec.height, spec.width)
    directory = Path(directory) if directory is not None else None
    store_writer = pyneuron.ConceptStore.writer(
        grid,
        syn.names,
        syn.categories,
        path=directory / "store" if directory else None,
        metadata={"synthetic": True, "seed": seed},
    )
    bounds = [0] if ranges else list(range(0, spec.n_units, chunk_units)) + [spec.n_units]
    unit_writers = [
        pyneuron.UnitMasks.writer(
            grid, hi - lo, path=directory / f"units-{k:02d}" if directory else None
        )
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]
    if ranges:
        activations = np.zeros((spec.n_images, spec.n_units, *syn.layer_shape), np.float32)
    h, w = syn.shape
    pixels = h * w
    concept_pixels = np.zeros(spec.n_concepts, dtype=np.int64)
    concept_images = np.zeros(spec.n_concepts, dtype=np.int64)
    unit_pixels = np.zeros(spec.n_units, dtype=np.int64)
    unit_images = np.zeros(spec.n_units, dtype=np.int64)
    canvas = np.zeros((0 if ranges else spec.n_units, h, w), dtype=bool)
    names = syn.names
    write_seconds = 0.0
    start = time.perf_counter()
    for i in _progress(range(spec.n_images), progress, "synthetic images"):
        image, rng = syn.image(i)
        if ranges:
            activations[i] = syn.layer_activations(image, rng)
        touched = syn.unit_masks(image, rng, canvas)
        t0 = time.perf_counter()
        store_writer.add_image(
            i,
            masks={names[c]: m for c, m in image.masks.items()},
            labels=[names[c] for c in image.labels],
        )
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            mine = touched[(touched >= lo) & (touched < hi)]
            if mine.size:
                # Only the units that fire in this image: UnitMasksWriter.add_image takes
                # all of a chunk's units and would scan 64 x H x W bools per image.
                unit_writers[k].writer.add_image(i, mine - lo, canvas[mine])
        write_seconds += time.perf_counter() - t0
        for c, m in image.masks.items():
            concept_pixels[c] += np.count_nonzero(m)
            concept_images[c] += 1
        concept_pixels[image.labels] += pixels
        concept_images[image.labels] += 1
        if touched.size:
            counts = np.count_nonzero(canvas[touched].reshape(touched.size, -1), axis=1)
            unit_pixels[touched] += counts
            unit_images[touched] += counts > 0
            canvas[touched] = False
    t0 = time.perf_counter()
    store = store_writer.close()
    units = [writer.close() for writer in unit_writers]
    close_seconds = time.perf_counter() - t0
    if ranges:  # part of generating: the ranges and their masks
        units = syn.range_units(activations, directory, progress)
        unit_pixels = np.concatenate([u.pixel_counts for u in units])
        unit_images = np.concatenate([u.image_counts for u in units])
    total = time.perf_counter() - start
    return Built(
        syn,
        store,
        units,
        concept_pixels,
        concept_images,
        unit_pixels,
        unit_images,
        {
            "total": total,
            "writers": write_seconds + close_seconds,
            "generate": total - write_seconds - close_seconds,
        },
    )


CACHE_FORMAT = 1
#: The fields of :class:`SizeSpec` that a cache key digests when not the default ones.
REGIME_FIELDS = ("units", "unit_images", "unit_pixels", "concept_presence", "n_ranges")


def cache_key(spec: SizeSpec, seed: int, chunk_units: int) -> str:
    """Directory name of a cached probing set (generator version, size, seed, chunking,
    and a digest of the regime when the units or concepts are not the default ones).

    Examples
    --------
    >>> cache_key(SIZES["small"], 0, 64)
    'v1-2000x56x56-c200-u64-s0-k64'
    """
    statistics = "" if spec.statistics == "ade" else f"-{spec.statistics}"
    fields = [f for f in dataclasses.fields(spec) if f.name in REGIME_FIELDS]
    regime = tuple(getattr(spec, f.name) for f in fields)
    if regime != tuple(f.default for f in fields):
        statistics += f"-{spec.units}-{hashlib.sha1(repr(regime).encode()).hexdigest()[:8]}"
    return (
        f"v{CACHE_FORMAT}-{spec.n_images}x{spec.height}x{spec.width}-c{spec.n_concepts}"
        f"-u{spec.n_units}-s{seed}-k{chunk_units}{statistics}"
    )


def save_cache(built: Built, directory: str | Path) -> None:
    """Record what :func:`load_cache` needs next to a probing set built into ``directory``."""
    directory = Path(directory)
    np.savez(
        directory / "expected.npz",
        concept_pixels=built.concept_pixels,
        concept_images=built.concept_images,
        unit_pixels=built.unit_pixels,
        unit_images=built.unit_images,
    )
    (directory / "seconds.json").write_text(json.dumps(built.seconds))


def load_cache(
    spec: SizeSpec, directory: str | Path, *, seed: int = 0, chunk_units: int = 64
) -> Built | None:
    """Open a probing set :func:`build` wrote to ``directory`` (memory-mapped), or None
    if it is not there or incomplete. Edit the generator -> bump ``CACHE_FORMAT``."""
    directory = Path(directory)
    if not (directory / "expected.npz").exists():
        return None
    if spec.units == "ranges":
        chunks = [f"range{k}" for k in range(spec.n_ranges)]
    else:
        chunks = [f"units-{k:02d}" for k in range(math.ceil(spec.n_units / chunk_units))]
    try:
        store = pyneuron.ConceptStore.open(directory / "store")
        units = [pyneuron.UnitMasks.open(directory / chunk) for chunk in chunks]
        expected = np.load(directory / "expected.npz")
        seconds = json.loads((directory / "seconds.json").read_text())
    except (OSError, ValueError, pyneuron.PyneuronError):
        return None
    return Built(
        synthetic_for(spec, seed), store, units,
        expected["concept_pixels"], expected["concept_images"],
        expected["unit_pixels"], expected["unit_images"],
        {**seconds, "cached": True},
    )  # fmt: skip


def _progress(items: range, enabled: bool, desc: str) -> Iterator[int]:
    """A light progress line on stderr (every ~5 %), whether or not it is a terminal."""
    n = len(items)
    step = max(1, n // 20)
    start = time.perf_counter()
    for k in items:
        if enabled and k % step == 0 and k:
            rate = k / (time.perf_counter() - start)
            print(f"\r{desc}: {k}/{n} ({rate:.0f}/s)", end="", file=sys.stderr, flush=True)
        yield k
    if enabled:
        print(f"\r{desc}: {n}/{n} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
