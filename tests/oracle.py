"""Slow, obviously-correct references in plain numpy on dense masks (no cleverness)."""

from __future__ import annotations

import numpy as np

OPERATOR_NOT = {"OR": False, "AND": False, "AND NOT": True, "OR NOT": True}


def iou(mask: np.ndarray, unit: np.ndarray) -> float:
    inter = np.int64(np.logical_and(mask, unit).sum())
    return inter / (np.int64(mask.sum()) + np.int64(unit.sum()) - inter + 1e-10)


def combine(left: np.ndarray, right: np.ndarray, op: str) -> np.ndarray:
    if op == "OR":
        return left | right
    if op == "AND":
        return left & right
    if op == "AND NOT":
        return left & ~right
    if op == "OR NOT":
        return left | ~right
    raise ValueError(op)


def brute_force_beam(
    unit: np.ndarray,
    concepts: np.ndarray,
    names: list[str],
    *,
    length: int = 3,
    beam_size: int = 5,
    operators: tuple[str, ...] = ("OR", "AND", "AND NOT"),
    penalty: float = 1.0,
) -> list[tuple[str, float, float]]:
    """Literal compexp beam search: returns the final beam as (formula, score, iou)."""
    unit = unit.reshape(-1)
    flat = concepts.reshape(concepts.shape[0], -1)
    present = [c for c in range(flat.shape[0]) if flat[c].any()]
    # entries: (formula text, mask, score, iou, length)
    primitives = []
    for c in present:
        value = iou(flat[c], unit)
        if value > 0:
            primitives.append((names[c], flat[c], value * 1.0, value, 1))
    beam = sorted(primitives, key=lambda e: e[2], reverse=True)[:beam_size]  # stable: ties by id
    for _ in range(length - 1):
        pool = list(beam)
        for text, mask, _, _, size in beam:
            for c in present:
                for op in operators:
                    new_mask = combine(mask, flat[c], op)
                    new_length = size + 1 + OPERATOR_NOT[op]
                    value = iou(new_mask, unit)
                    score = value * (penalty ** (new_length - 1))
                    pool.append((f"({text} {op} {names[c]})", new_mask, score, value, new_length))
        beam = sorted(pool, key=lambda e: e[2], reverse=True)[:beam_size]
    return [(text, score, value) for text, _, score, value, _ in beam]


def metrics(formula_mask: np.ndarray, unit: np.ndarray) -> dict[str, float]:
    """Every metric by its definition, image by image."""
    n_images = unit.shape[0]
    f = formula_mask.reshape(n_images, -1)
    a = unit.reshape(n_images, -1)
    both = f & a

    def ratio(x: float, y: float) -> float:
        return x / y if y > 0 else float("nan")

    return {
        "iou": iou(f, a),
        "detection_accuracy": ratio(both.sum(), a.sum()),
        "activation_coverage": ratio(both.sum(), f.sum()),
        "samples_coverage": ratio(both.any(1).sum(), a.any(1).sum()),
        "explanation_coverage": ratio(both.any(1).sum(), f.any(1).sum()),
    }


def random_case(
    rng: np.random.Generator, n_images: int, height: int, width: int, n_concepts: int, n_units: int
) -> tuple[np.ndarray, np.ndarray]:
    """Concepts and units with the hard cases: ties, duplicates, empty and full-image
    concepts, units that never fire or fire everywhere, planted formulas."""
    shape = (n_images, height, width)
    concepts = np.zeros((n_concepts, *shape), dtype=bool)
    for c in range(n_concepts):
        kind = rng.integers(0, 6)
        if kind == 0:  # image-level concept: full images
            concepts[c, rng.random(n_images) < 0.3] = True
        elif kind == 1 and c > 0:  # duplicate of an earlier concept
            concepts[c] = concepts[rng.integers(0, c)]
        elif kind == 2:  # absent from the data
            pass
        else:  # blobs in a few images at some density
            images = rng.random(n_images) < rng.uniform(0.1, 0.8)
            density = rng.uniform(0.05, 0.9)
            concepts[c, images] = rng.random((int(images.sum()), height, width)) < density
    units = np.zeros((n_units, *shape), dtype=bool)
    for u in range(n_units):
        kind = u % 6
        if kind == 0:
            pass  # never fires
        elif kind == 1:
            units[u] = True  # fires everywhere
        elif kind == 2 and n_concepts >= 3:  # planted formula plus noise
            a, b, c = rng.choice(n_concepts, 3, replace=False)
            units[u] = (concepts[a] | concepts[b]) & ~concepts[c]
            units[u] ^= rng.random(shape) < 0.02
        elif kind == 3 and n_concepts >= 1:  # exactly one concept
            units[u] = concepts[rng.integers(0, n_concepts)]
        else:
            units[u] = rng.random(shape) < rng.uniform(0.01, 0.5)
    return concepts, units


def brute_force_optimal(
    unit: np.ndarray,
    concepts: np.ndarray,
    names: list[str],
    *,
    length: int = 3,
    operators: tuple[str, ...] = ("OR", "AND", "AND NOT"),
) -> tuple[str | None, float]:
    """Every left-deep formula of at most ``length`` concepts present in the data (concepts
    may repeat): the best (formula, IoU) by IoU, then fewer concepts, then the sequence
    (c1, op1, c2, op2, ...) smallest, operators ranked as listed. (None, 0.0) if no
    formula has IoU > 0."""
    unit = unit.reshape(-1)
    flat = concepts.reshape(concepts.shape[0], -1)
    present = [c for c in range(flat.shape[0]) if flat[c].any()]
    best: tuple[float, int, tuple[int, ...], str] = (0.0, 0, (), "")

    def visit(mask: np.ndarray, text: str, sequence: tuple[int, ...]) -> None:
        nonlocal best
        value = iou(mask, unit)
        n = (len(sequence) + 1) // 2
        if value > 0 and (-value, n, sequence) < (-best[0], best[1] or 10**9, best[2]):
            best = (value, n, sequence, text)
        if n == length:
            return
        for k, op in enumerate(operators):
            for c in present:
                visit(combine(mask, flat[c], op), f"({text} {op} {names[c]})", (*sequence, k, c))

    for c in present:
        visit(flat[c], names[c], (c,))
    return (best[3], best[0]) if best[1] else (None, 0.0)
