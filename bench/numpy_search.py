"""The compexp beam search in plain numpy on dense packed bitsets ("numpy packed
exhaustive"): the baseline :mod:`bench.search` times pyneuron against and checks it with.

Concepts are a dense (C, words) uint64 matrix, one row per concept over the whole probing
set (image-major, row-major inside an image, bit p of an image in bit p % 64 of word
p // 64, as :mod:`pyneuron.engine.grid` packs). Per unit, every count is an AND + popcount
(``np.bitwise_and`` + ``np.bitwise_count``, numpy >= 2) over all concepts at once: no
bounds, no pruning, no sparsity. Semantics follow DESIGN.md exactly:

- primitives: concepts present in the data with IoU > 0, by IoU descending, ties to the
  smaller concept id; the beam is the first ``beam_size`` of them;
- ``length - 1`` steps: every beam formula F with every concept C present in the data
  (pixel count > 0) by each operator in order (default OR, AND, AND NOT); the new beam is
  the first ``beam_size`` of a stable descending sort on score of (old beam entries in
  order, then the candidates in order parent, concept, operator);
- IoU = |F∧A| / (|F| + |A| - |F∧A| + 1e-10) in float64 from integer counts;
  score = IoU * penalty ** (length - 1), with NOT counting as one more in the length.

Candidate counts come from two popcounts per (F, C) by inclusion-exclusion (the table in
DESIGN.md); the masks of the formulas that enter the beam are then built and counted
directly, which cross-checks the inclusion-exclusion on every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import pyneuron
from pyneuron import And, Concept, Formula, Not, Or
from pyneuron.engine.grid import pack_bits

if not hasattr(np, "bitwise_count"):  # pragma: no cover
    raise ImportError(
        f"bench.numpy_search needs numpy >= 2 (np.bitwise_count), got {np.__version__}"
    )

OPERATORS = ("OR", "AND", "AND NOT", "OR NOT")
NEGATED = {"OR": False, "AND": False, "AND NOT": True, "OR NOT": True}
EPSILON = 1e-10


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Dense bool (N, H, W) -> packed (N * words_per_image,) uint64 (pyneuron's layout)."""
    n = mask.shape[0]
    pixels = int(np.prod(mask.shape[1:]))
    if pixels % 64 == 0:
        flat = np.packbits(mask.reshape(-1), bitorder="little")
        return flat.view("<u8").astype(np.uint64, copy=False)
    return pack_bits(mask.reshape(n, pixels), pixels).reshape(-1)


def dense_bytes(grid: pyneuron.Grid, n_masks: int) -> int:
    """Bytes of a dense packed matrix of ``n_masks`` masks on ``grid``."""
    return n_masks * grid.n_images * grid.words_per_image * 8


@dataclass
class PackedConcepts:
    """Dense packed concept matrix and what the search needs besides."""

    words: np.ndarray  # (C, W) uint64
    sizes: np.ndarray  # (C,) int64: |C|
    names: list[str]
    total: int  # pixels of the probing set
    valid: np.ndarray | None  # (W,) uint64 mask of real (non-padding) bits, None if none

    @classmethod
    def from_store(cls, store: pyneuron.ConceptStore) -> PackedConcepts:
        """Unpack every concept with :meth:`ConceptStore.mask` and pack it densely."""
        grid = store.grid
        n_words = grid.n_images * grid.words_per_image
        words = np.empty((len(store), n_words), dtype=np.uint64)
        for c in range(len(store)):
            words[c] = pack_mask(store.mask(c))
        valid = None
        if grid.pixels % 64:
            valid = pack_mask(np.ones(grid.shape, dtype=bool))
        sizes = popcounts(words, None)
        return cls(words, sizes, store.names, grid.total_pixels, valid)


# Words per block of work: rows x columns of the matrix small enough (2 MiB) that the
# temporaries stay in cache; long rows (large probing sets) are cut into column blocks.
BLOCK_WORDS = 1 << 18


def _blocks(n: int, w: int):
    """(row slice, column slice) blocks covering an (n, w) matrix, row blocks outermost."""
    cols = min(w, BLOCK_WORDS)
    rows = max(1, min(n, BLOCK_WORDS // cols))
    for s in range(0, n, rows):
        for c in range(0, w, cols):
            yield slice(s, min(n, s + rows)), slice(c, min(w, c + cols))


def popcounts(matrix: np.ndarray, row: np.ndarray | None) -> np.ndarray:
    """|matrix[c] AND row| (or |matrix[c]| when row is None) for every row c."""
    n, w = matrix.shape
    out = np.zeros(n, dtype=np.int64)
    tmp = np.empty(BLOCK_WORDS, dtype=np.uint64)
    bits = np.empty(BLOCK_WORDS, dtype=np.uint8)
    for rs, cs in _blocks(n, w):
        shape = (rs.stop - rs.start, cs.stop - cs.start)
        t = tmp[: shape[0] * shape[1]].reshape(shape)
        b = bits[: t.size].reshape(shape)
        if row is None:
            np.bitwise_count(matrix[rs, cs], out=b)
        else:
            np.bitwise_and(matrix[rs, cs], row[cs], out=t)
            np.bitwise_count(t, out=b)
        out[rs] += b.sum(axis=1, dtype=np.int64)
    return out


def popcounts_pair(
    matrix: np.ndarray, f: np.ndarray, fa: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(|C∧F|, |C∧F∧A|) for every concept row C, reading the matrix once (``fa`` = F∧A)."""
    n, w = matrix.shape
    fc = np.zeros(n, dtype=np.int64)
    fca = np.zeros(n, dtype=np.int64)
    tmp = np.empty(BLOCK_WORDS, dtype=np.uint64)
    bits = np.empty(BLOCK_WORDS, dtype=np.uint8)
    for rs, cs in _blocks(n, w):
        shape = (rs.stop - rs.start, cs.stop - cs.start)
        t = tmp[: shape[0] * shape[1]].reshape(shape)
        b = bits[: t.size].reshape(shape)
        block = matrix[rs, cs]
        np.bitwise_and(block, f[cs], out=t)
        np.bitwise_count(t, out=b)
        fc[rs] += b.sum(axis=1, dtype=np.int64)
        np.bitwise_and(block, fa[cs], out=t)
        np.bitwise_count(t, out=b)
        fca[rs] += b.sum(axis=1, dtype=np.int64)
    return fc, fca


def iou(intersection: np.ndarray, size: np.ndarray, unit_size: int) -> np.ndarray:
    """float64 IoU from integer counts, exactly as pyneuron computes it."""
    intersection = np.asarray(intersection, dtype=np.int64)
    union = np.asarray(size, dtype=np.int64) + np.int64(unit_size) - intersection
    return intersection / (union + EPSILON)


@dataclass
class Entry:
    """A beam entry: a left-deep formula and its counts against the unit."""

    concepts: list[int]
    ops: list[str]
    length: int
    score: float
    iou: float
    size: int  # |F|
    intersection: int  # |F∧A|
    mask: np.ndarray | None  # F, packed (None where a search keeps it elsewhere)

    def formula(self, names: Sequence[str]) -> Formula:
        formula: Formula = Concept(names[self.concepts[0]])
        for op, c in zip(self.ops, self.concepts[1:]):
            right: Formula = Concept(names[c])
            if NEGATED[op]:
                right = Not(right)
            formula = And(formula, right) if op.startswith("AND") else Or(formula, right)
        return formula


@dataclass
class Result:
    """Search result of one unit: the final beam (best first) and work counts."""

    beam: list[Entry]
    names: list[str]
    counted: int  # (formula, concept) pairs counted (all of them: exhaustive)

    @property
    def formula(self) -> str | None:
        return str(self.beam[0].formula(self.names)) if self.beam else None

    @property
    def iou(self) -> float:
        return self.beam[0].iou if self.beam else 0.0

    def rows(self) -> list[tuple[str, float, float]]:
        """The final beam as (formula, score, iou)."""
        return [(str(e.formula(self.names)), e.score, e.iou) for e in self.beam]


def _combine(f: np.ndarray, c: np.ndarray, op: str, valid: np.ndarray | None) -> np.ndarray:
    if op == "OR":
        return f | c
    if op == "AND":
        return f & c
    if op == "AND NOT":
        return f & ~c
    out = f | ~c  # OR NOT: clear the padding bits the complement set
    return out & valid if valid is not None else out


def beam_search(
    unit: np.ndarray,
    concepts: PackedConcepts,
    *,
    length: int = 3,
    beam_size: int = 5,
    operators: Sequence[str] = ("OR", "AND", "AND NOT"),
    penalty: float = 1.0,
) -> Result:
    """Exhaustive compexp beam search of one packed unit mask ``unit`` (W,) uint64."""
    ops = list(operators)
    for op in ops:
        if op not in OPERATORS:
            raise ValueError(f"unknown operator {op!r}")
    matrix, sizes = concepts.words, concepts.sizes
    a = int(np.bitwise_count(unit).sum())
    present = np.flatnonzero(sizes > 0)
    ca = popcounts(matrix, unit)
    counted = len(present)

    # Primitives: IoU > 0, by IoU descending, ties to the smaller id (stable sort of ids).
    prim_iou = iou(ca[present], sizes[present], a)
    keep = present[prim_iou > 0]
    keep_iou = prim_iou[prim_iou > 0]
    order = np.argsort(-keep_iou, kind="stable")[:beam_size]
    beam = []
    for j in order:
        c = int(keep[j])
        beam.append(
            Entry(
                [c],
                [],
                1,
                float(keep_iou[j]),
                float(keep_iou[j]),
                int(sizes[c]),
                int(ca[c]),
                matrix[c],
            )
        )
    if not beam:
        return Result([], concepts.names, counted)

    n_ops = len(ops)
    c_p, ca_p = sizes[present], ca[present]
    for _ in range(length - 1):
        scores = [np.array([e.score for e in beam])]
        cand_inter, cand_size = [], []
        for parent in beam:
            f, fa = parent.size, parent.intersection
            fc_all, fca_all = popcounts_pair(matrix, parent.mask, parent.mask & unit)
            fc, fca = fc_all[present], fca_all[present]
            counted += len(present)
            inter = np.empty((len(present), n_ops), dtype=np.int64)
            size = np.empty((len(present), n_ops), dtype=np.int64)
            factor = np.empty(n_ops)
            for k, op in enumerate(ops):
                if op == "OR":
                    inter[:, k], size[:, k] = fa + ca_p - fca, f + c_p - fc
                elif op == "AND":
                    inter[:, k], size[:, k] = fca, fc
                elif op == "AND NOT":
                    inter[:, k], size[:, k] = fa - fca, f - fc
                else:  # OR NOT
                    inter[:, k], size[:, k] = a - ca_p + fca, concepts.total - c_p + fc
                factor[k] = penalty ** float(parent.length + NEGATED[op])
            score = iou(inter, size, a) * factor[None, :]
            scores.append(score.reshape(-1))
            cand_inter.append(inter.reshape(-1))
            cand_size.append(size.reshape(-1))
        all_scores = np.concatenate(scores)
        best = np.argsort(-all_scores, kind="stable")[:beam_size]
        new_beam = []
        per_parent = len(present) * n_ops
        for j in best:
            j = int(j)
            if j < len(beam):
                new_beam.append(beam[j])
                continue
            idx = j - len(beam)
            p, rest = divmod(idx, per_parent)
            ci, k = divmod(rest, n_ops)
            parent, c, op = beam[p], int(present[ci]), ops[k]
            mask = _combine(parent.mask, matrix[c], op, concepts.valid)
            size_x = int(np.bitwise_count(mask).sum())
            inter_x = int(np.bitwise_count(mask & unit).sum())
            if (inter_x, size_x) != (int(cand_inter[p][rest]), int(cand_size[p][rest])):
                raise AssertionError("inclusion-exclusion counts disagree with the built mask")
            new_beam.append(
                Entry(
                    parent.concepts + [c],
                    parent.ops + [op],
                    parent.length + 1 + NEGATED[op],
                    float(all_scores[j]),
                    float(iou(inter_x, size_x, a)),
                    size_x,
                    inter_x,
                    mask,
                )
            )
        beam = new_beam
    return Result(beam, concepts.names, counted)


def unit_words(units: pyneuron.UnitMasks, unit: int) -> np.ndarray:
    """Packed mask of one unit, from :meth:`UnitMasks.mask`."""
    return pack_mask(units.mask(unit))
