"""The compexp beam search compiled with numba on dense packed bitsets: the strong
compiled baseline :mod:`bench.search` times pyneuron against (``pip install ".[bench]"``).

Same data and semantics as :mod:`bench.numpy_search` (dense (C, words) uint64 concept
matrix, DESIGN.md's rules), but each count is one compiled loop: per (beam formula F,
concept C) a single pass over the words computes |F∧C| and |F∧A∧C| together (fused
AND + popcount, ``llvm.ctpop``), the operators follow by inclusion-exclusion, and the new
beam is kept by a stable top-k insertion while candidates stream in order (old beam
entries, then parent, concept, operator; a candidate enters only with a score strictly
above the worst kept one, so ties keep that order, as a stable descending sort does).
Units run in parallel (``numba.prange``, ``numba.set_num_threads``); no sparsity, no
bounds, no pruning: every (F, C) pair is counted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic
from numpy_search import EPSILON, OPERATORS, Entry, PackedConcepts, Result


@intrinsic
def _popcount(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@njit(nogil=True, cache=False)
def _counts(matrix, present, f, fa, fc, fca):
    """fc[j] = |C∧F| and fca[j] = |C∧FA| for C = matrix[present[j]], in one pass each."""
    for j in range(present.size):
        row = matrix[present[j]]
        s1 = np.uint64(0)
        s2 = np.uint64(0)
        for w in range(row.size):
            x = row[w]
            s1 += _popcount(f[w] & x)
            s2 += _popcount(fa[w] & x)
        fc[j] = s1
        fca[j] = s2


@njit(nogil=True)
def _keep(scores, ids, n, k, score, ident):
    """Stable top-k insertion; returns the new count of kept entries."""
    if n == k and not score > scores[n - 1]:
        return n
    pos = min(n, k - 1)
    while pos > 0 and scores[pos - 1] < score:
        pos -= 1
    for j in range(min(n, k - 1), pos, -1):
        scores[j] = scores[j - 1]
        ids[j] = ids[j - 1]
    scores[pos] = score
    ids[pos] = ident
    return min(n + 1, k)


@njit(nogil=True)
def _search_unit(matrix, sizes, present, valid, total, unit, length, k, ops, penalty, out):
    """One unit; ``out`` = this unit's rows of the result arrays (see :func:`beam_search`)."""
    concepts, op_out, lengths, score_out, iou_out, size, inter, counts = out
    n_words, n_present, n_ops = unit.size, present.size, ops.size
    a = _count_and(unit, unit)
    ca, fc, fca = (
        np.zeros(n_present, np.int64),
        np.zeros(n_present, np.int64),
        np.zeros(n_present, np.int64),
    )
    _counts(matrix, present, unit, unit, ca, fc)  # |C∧A| (twice: one kernel for all counts)
    kept, ids, n = np.zeros(k), np.zeros(k, np.int64), 0
    for j in range(n_present):  # primitives: IoU > 0, stable by IoU (ties: smaller id)
        iou = ca[j] / (sizes[present[j]] + a - ca[j] + EPSILON)
        if iou > 0:
            n = _keep(kept, ids, n, k, iou, j)
    masks, terms = np.zeros((k, n_words), np.uint64), np.ones(k, np.int64)
    for b in range(n):
        c = present[ids[b]]
        concepts[b, 0], lengths[b], score_out[b] = c, 1, kept[b]
        size[b], inter[b], masks[b] = sizes[c], ca[ids[b]], matrix[c]
    counts[0] = n_present
    fa = unit.copy()
    block = n_present * n_ops
    for _ in range(1, length):
        nb, n = n, 0
        for b in range(nb):  # old beam entries first
            n = _keep(kept, ids, n, k, score_out[b], b)
        for p in range(nb):  # then candidates in order parent, concept, operator
            for w in range(n_words):
                fa[w] = masks[p, w] & unit[w]
            _counts(matrix, present, masks[p], fa, fc, fca)
            counts[0] += n_present
            for j in range(n_present):
                c = present[j]
                for o in range(n_ops):
                    op = ops[o]
                    if op == 0:  # OR
                        i, s = inter[p] + ca[j] - fca[j], size[p] + sizes[c] - fc[j]
                    elif op == 1:  # AND
                        i, s = fca[j], fc[j]
                    elif op == 2:  # AND NOT
                        i, s = inter[p] - fca[j], size[p] - fc[j]
                    else:  # OR NOT
                        i, s = a - ca[j] + fca[j], total - sizes[c] + fc[j]
                    score = i / (s + a - i + EPSILON) * penalty ** float(lengths[p] + (op >= 2))
                    n = _keep(kept, ids, n, k, score, nb + p * block + j * n_ops + o)
        old_concepts, old_ops, old_lengths = concepts.copy(), op_out.copy(), lengths.copy()
        old_masks, old_size, old_inter = masks.copy(), size.copy(), inter.copy()
        old_terms = terms.copy()
        for b in range(n):
            ident = ids[b]
            p = ident if ident < nb else (ident - nb) // block
            concepts[b], op_out[b], lengths[b] = old_concepts[p], old_ops[p], old_lengths[p]
            masks[b], score_out[b] = old_masks[p], kept[b]
            size[b], inter[b], terms[b] = old_size[p], old_inter[p], old_terms[p]
            if ident >= nb:
                j, o = divmod((ident - nb) % block, n_ops)
                c, op = present[j], ops[o]
                concepts[b, terms[b]], op_out[b, terms[b] - 1] = c, op
                terms[b] += 1
                lengths[b] += 1 + (op >= 2)
                for w in range(n_words):
                    x = matrix[c, w] if op < 2 else ~matrix[c, w] & valid[w]
                    masks[b, w] = masks[b, w] | x if op % 3 == 0 else masks[b, w] & x
                size[b], inter[b] = _count_and(masks[b], masks[b]), _count_and(masks[b], unit)
    for b in range(n):
        iou_out[b] = inter[b] / (size[b] + a - inter[b] + EPSILON)
    counts[1] = n


@njit(nogil=True)
def _count_and(x, y):
    total = np.uint64(0)
    for w in range(x.size):
        total += _popcount(x[w] & y[w])
    return np.int64(total)


@njit(parallel=True)
def _search_all(matrix, sizes, present, valid, total, units, length, k, ops, penalty, out):
    concepts, op_out, lengths, scores, ious, sizes_out, inters, counts = out
    for u in prange(units.shape[0]):
        row = (
            concepts[u],
            op_out[u],
            lengths[u],
            scores[u],
            ious[u],
            sizes_out[u],
            inters[u],
            counts[u],
        )
        _search_unit(matrix, sizes, present, valid, total, units[u], length, k, ops, penalty, row)


def beam_search(
    units: np.ndarray,
    concepts: PackedConcepts,
    *,
    length: int = 3,
    beam_size: int = 5,
    operators: Sequence[str] = ("OR", "AND", "AND NOT"),
    penalty: float = 1.0,
) -> list[Result]:
    """Exhaustive compexp beam search of packed unit masks ``units`` (U, W) uint64, units
    in parallel on ``numba.get_num_threads()`` threads; one :class:`numpy_search.Result`
    per unit (final beam best first, formula masks not kept)."""
    for op in operators:
        if op not in OPERATORS:
            raise ValueError(f"unknown operator {op!r}")
    if length < 1 or beam_size < 1:
        raise ValueError(f"length and beam_size must be >= 1, got {length}, {beam_size}")
    units = np.ascontiguousarray(units, dtype=np.uint64).reshape(len(units), -1)
    n = units.shape[0]
    ops = np.array([OPERATORS.index(op) for op in operators], dtype=np.int64)
    valid = concepts.valid
    if valid is None:
        valid = np.full(concepts.words.shape[1], ~np.uint64(0), dtype=np.uint64)
    out = (
        np.full((n, beam_size, length), -1, np.int64),
        np.full((n, beam_size, max(length - 1, 1)), -1, np.int64),
        np.zeros((n, beam_size), np.int64),
        np.zeros((n, beam_size)),
        np.zeros((n, beam_size)),
        np.zeros((n, beam_size), np.int64),
        np.zeros((n, beam_size), np.int64),
        np.zeros((n, 2), np.int64),
    )
    present = np.flatnonzero(concepts.sizes > 0).astype(np.int64)
    _search_all(
        np.ascontiguousarray(concepts.words), np.ascontiguousarray(concepts.sizes, np.int64),
        present, np.ascontiguousarray(valid), concepts.total, units,
        length, beam_size, ops, float(penalty), out,
    )  # fmt: skip
    results = []
    for u in range(n):
        beam = []
        for b in range(out[7][u, 1]):
            terms = int(np.count_nonzero(out[0][u, b] >= 0))
            beam.append(
                Entry(
                    out[0][u, b, :terms].tolist(),
                    [OPERATORS[op] for op in out[1][u, b, : terms - 1]],
                    int(out[2][u, b]),
                    float(out[3][u, b]),
                    float(out[4][u, b]),
                    int(out[5][u, b]),
                    int(out[6][u, b]),
                    None,
                )
            )
        results.append(Result(beam, concepts.names, int(out[7][u, 0])))
    return results


def warm_up() -> float:
    """Compile the kernels on a tiny problem (not timed with the search); seconds taken."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**63, size=(4, 3), dtype=np.uint64)
    sizes = np.bitwise_count(words).sum(axis=1).astype(np.int64)
    tiny = PackedConcepts(words, sizes, ["a", "b", "c", "d"], 192, None)
    t0 = time.perf_counter()
    beam_search(words[:2] & words[2:], tiny, length=2, beam_size=2)
    return time.perf_counter() - t0


def num_threads() -> int:
    """Threads the parallel unit loop uses."""
    return numba.get_num_threads()
