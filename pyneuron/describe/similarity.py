"""CLIP-Dissect's math: unit-concept similarity matrices from two cached matrices.

Everything here is pure array math (torch on the CPU or a GPU, numpy in and out) over

- ``summary`` (N images, U units): each unit's activation summary per image (the spatial
  mean of its map, :func:`activation_summary`), and
- ``clip_similarities`` (N images, C concepts): CLIP cosine similarities between each
  probing image and each concept text (unit-normalized image and text embeddings),

so that it can be tested against numpy and benchmarked without any model. All units of
a layer are handled at once; soft-WPMI gathers the top images of blocks of units at a
time to bound memory.

The functions reproduce ``similarity.py`` of CLIP-Dissect (Oikarinen & Weng, ICLR 2023,
github.com/Trustworthy-ML-Lab/CLIP-dissect), with the differences noted in each
docstring (deterministic tie-breaking and guards against division by zero).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import PyneuronError

SIMILARITIES = ("soft_wpmi", "wpmi", "cos", "cos3", "rank_reorder")
_ALIASES = {
    "wpmi": "wpmi",
    "hard_wpmi": "wpmi",
    "hard-wpmi": "wpmi",
    "soft_wpmi": "soft_wpmi",
    "soft-wpmi": "soft_wpmi",
    "softwpmi": "soft_wpmi",
    "cos": "cos",
    "cos_similarity": "cos",
    "cos3": "cos3",
    "cos^3": "cos3",
    "cos_cubed": "cos3",
    "cos_similarity_cubed": "cos3",
    "rank_reorder": "rank_reorder",
    "rank-reorder": "rank_reorder",
}

#: CLIP-Dissect's softmax temperature: ``softmax(a * cos)`` with ``a = 10`` on raw cosines.
TEMPERATURE = 0.1
#: Weight of the concept prior in soft-WPMI (CLIP-Dissect's ``lam``).
LAMBDA = 1.0
#: Per-example probabilities of soft-WPMI: linear from ``P_START`` (best image) down.
P_START, P_END = 0.998, 0.97
#: Added inside the logarithm of soft-WPMI (CLIP-Dissect's ``min_prob``).
MIN_PROB = 1e-7
#: Hard WPMI's defaults in CLIP-Dissect's ``wpmi``: ``top_k=28``, ``a=2`` (softmax
#: temperature 1/a = 0.5), ``lam=0.6`` (``min_prob`` is :data:`MIN_PROB` for both).
WPMI_TOP_K, WPMI_TEMPERATURE, WPMI_LAMBDA = 28, 0.5, 0.6
#: How tied activation summaries are ordered when picking a unit's top images:
#: ``"lowest"`` (default) puts the lower image id first (deterministic everywhere);
#: ``"torch"`` takes ``torch.topk``'s order on the CPU, as CLIP-Dissect does.
TIES = ("lowest", "torch")


def _torch() -> Any:
    import torch

    return torch


def similarity_name(name: str) -> str:
    """Canonical name of a similarity function (``soft_wpmi``, ``wpmi``, ``cos``, ``cos3``,
    ``rank_reorder``); accepts CLIP-Dissect's names (``cos_similarity_cubed``) too."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise PyneuronError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITIES)}")
    return _ALIASES[key]


#: How :func:`activation_summary` pools a unit's map into one number per image.
POOLS = ("mean", "max")


def activation_summary(activations: Any, *, pool: str = "mean", block: int = 1024) -> np.ndarray:
    """Per-image activation summary of every unit: the mean (or max) of its map.

    Parameters
    ----------
    activations
        (N, U, h, w) maps as returned by :func:`pyneuron.capture` (memory-mapped arrays
        are read ``block`` images at a time), or an (N, U) matrix, returned as is.
    pool
        ``"mean"`` (CLIP-Dissect's "avg", the default) or ``"max"`` over the h x w
        positions (for transformer layers folded by :func:`pyneuron.capture`: over the
        patch tokens; the class token is not in the maps).

    Returns
    -------
    numpy.ndarray
        (N, U) float32 (means accumulated in float64).

    Examples
    --------
    >>> a = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    >>> activation_summary(a)
    array([[1.5],
           [5.5]], dtype=float32)
    >>> activation_summary(a, pool="max")
    array([[3.],
           [7.]], dtype=float32)
    """
    if pool not in POOLS:
        raise PyneuronError(
            f"unknown pool {pool!r} for activation maps; choose {' or '.join(POOLS)} (the class "
            "token of a transformer layer is not in its folded maps)"
        )
    if hasattr(activations, "detach"):
        activations = activations.detach().cpu().numpy()
    array = activations if isinstance(activations, np.ndarray) else np.asarray(activations)
    if array.ndim == 2:
        return np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim != 4:
        raise PyneuronError(
            f"activations must be (images, units, h, w) maps or an (images, units) matrix, "
            f"got shape {array.shape}"
        )
    out = np.empty(array.shape[:2], dtype=np.float32)
    for start in range(0, array.shape[0], block):
        chunk = np.asarray(array[start : start + block])
        if pool == "max":
            out[start : start + block] = chunk.max(axis=(2, 3))
        else:
            out[start : start + block] = chunk.mean(axis=(2, 3), dtype=np.float64)
    return out


def _as_tensor(array: Any, name: str, device: Any = None) -> Any:
    torch = _torch()
    tensor = torch.as_tensor(np.asarray(array) if not torch.is_tensor(array) else array)
    tensor = tensor.to(device=device, dtype=torch.float32)
    if tensor.ndim != 2:
        raise PyneuronError(f"{name} must be a 2-D matrix, got shape {tuple(tensor.shape)}")
    if tensor.numel():
        low, high = torch.aminmax(tensor)  # NaN propagates; no temporary the size of tensor
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            raise PyneuronError(f"{name} holds NaN or infinite values")
    return tensor


def _check_pair(summary: Any, other: Any, other_name: str) -> None:
    if summary.shape[0] != other.shape[0]:
        raise PyneuronError(
            f"the activation summary covers {summary.shape[0]} images but {other_name} "
            f"covers {other.shape[0]}; both must be over the same probing images, in order"
        )
    if summary.shape[0] == 0 or summary.shape[1] == 0 or other.shape[1] == 0:
        raise PyneuronError(
            f"empty input: summary {tuple(summary.shape)}, {other_name} {tuple(other.shape)}"
        )


def concept_probabilities(
    clip_similarities: Any, temperature: float = TEMPERATURE, *, device: Any = None
) -> np.ndarray:
    """P = softmax over concepts of ``clip_similarities / temperature`` (per image).

    CLIP-Dissect applies ``softmax(10 * cos)`` to the raw cosine similarities of
    unit-normalized CLIP image and text embeddings: a temperature of 0.1 (not CLIP's
    own logit scale of 100, i.e. 0.01, used for zero-shot classification).

    Examples
    --------
    >>> concept_probabilities(np.array([[0.3, 0.1]]), 0.1).round(4)
    array([[0.8808, 0.1192]], dtype=float32)
    """
    sims = _as_tensor(clip_similarities, "clip_similarities", device)
    return _probabilities(sims, temperature).cpu().numpy()


def _probabilities(similarities: Any, temperature: float, block_rows: int = 256) -> Any:
    """Row softmax of ``similarities / temperature`` into a new tensor, a block of rows at
    a time (cache-sized temporaries instead of whole-matrix ones)."""
    torch = _torch()
    if not temperature > 0:
        raise PyneuronError(f"temperature must be positive, got {temperature}")
    out = torch.empty_like(similarities, dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, similarities.shape[0], block_rows):
            block = similarities[start : start + block_rows] * (1.0 / temperature)
            out[start : start + block_rows] = torch.softmax(block, dim=1)
    return out


def check_ties(ties: str) -> str:
    """The tie rule, checked: one of :data:`TIES`."""
    if ties not in TIES:
        raise PyneuronError(f"unknown ties rule {ties!r}; choose 'lowest' or 'torch'")
    return ties


def top_images_by_unit(summary: Any, k: int, ties: str = "lowest") -> Any:
    """(k, U) image ids of each unit's k highest summaries, best first.

    ``ties="lowest"``: equal summaries in image-id order (a stable sort).
    ``ties="torch"``: ``torch.topk(summary, k, dim=0)`` computed on the CPU, exactly what
    CLIP-Dissect's ``soft_wpmi`` does (it loads the saved activations with
    ``map_location='cpu'``); its order among ties is PyTorch's CPU implementation detail.
    """
    torch = _torch()
    if check_ties(ties) == "torch":
        return torch.topk(summary.cpu(), k, dim=0).indices.to(summary.device)
    return torch.sort(summary, dim=0, descending=True, stable=True).indices[:k]


def soft_wpmi_weights(top_k: int, p_start: float = P_START, p_end: float = P_END) -> np.ndarray:
    """Soft-WPMI's per-example probabilities: ``p_start - i / top_k * (p_start - p_end)``.

    As in CLIP-Dissect's code, the last (k-th) image gets ``p_start - (k-1)/k *
    (p_start - p_end)`` (0.97028 for k = 100), not exactly ``p_end``.

    Examples
    --------
    >>> soft_wpmi_weights(4).round(4)
    array([0.998, 0.991, 0.984, 0.977], dtype=float32)
    """
    torch = _torch()
    steps = torch.arange(top_k, dtype=torch.float32) / top_k
    return (p_start - steps * (p_start - p_end)).numpy()


def soft_wpmi(
    summary: Any,
    probabilities: Any,
    *,
    top_k: int = 100,
    lam: float = LAMBDA,
    p_start: float = P_START,
    p_end: float = P_END,
    min_prob: float = MIN_PROB,
    ties: str = "lowest",
    device: Any = None,
    block_bytes: int = 1 << 23,
) -> np.ndarray:
    """Soft-WPMI scores of every (unit, concept): CLIP-Dissect's default similarity.

    For unit u, let E_u be its ``top_k`` images by activation summary (best first) and
    p_i the weights of :func:`soft_wpmi_weights`. Then

    - log P(d | E_u) = sum_i log(1 + p_i (P[E_u[i], d] - 1) + min_prob)  (image i is "in"
      the example set with probability p_i),
    - log P(d) = log mean_u P(d | E_u), the prior averaged over *all units given* (pass the
      whole layer; computed with logsumexp),
    - score = log P(d | E_u) - lam * log P(d).

    Parameters
    ----------
    summary
        (N, U) activation summaries.
    probabilities
        (N, C) concept probabilities per image (:func:`concept_probabilities`).
    top_k
        Images per unit (clipped to N; the weights then use the clipped k).
    lam
        Prior weight (CLIP-Dissect: 1).
    ties
        Order of tied summaries among the top images (:data:`TIES`): ``"lowest"``
        (lower image id first, the default) or ``"torch"`` (``torch.topk``'s order, to
        reproduce CLIP-Dissect's published numbers). Ties are common for dead, constant
        or quantized units, and through the prior (averaged over all units) a different
        top-k of one unit shifts every unit's scores.
    block_bytes
        Memory for the gathered (k, units, C) rows; sets how many units go at once.

    Returns
    -------
    numpy.ndarray
        (U, C) float32.

    Notes
    -----
    Differences from CLIP-Dissect's code: image ties in the top-k go to the lower image
    id unless ``ties="torch"`` (``torch.topk`` leaves their order unspecified); the
    term is computed as ``(1 - p_i + min_prob) + p_i P``, logarithms are taken of
    products of groups of terms and accumulated in float64 (see ``_soft_wpmi``). The
    result is closer to a float64 evaluation than CLIP-Dissect's float32 code (on random
    2,000 x 64 x 3,000 data: max abs error 1.7e-5 against 1.8e-4), so units whose two
    best concepts are within ~1e-4 may get a different label.

    Examples
    --------
    >>> summary = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> probabilities = np.array([[0.9, 0.1], [0.2, 0.8]])
    >>> soft_wpmi(summary, probabilities, top_k=1).argmax(axis=1)
    array([0, 1])
    """
    acts, probs = _summary_and_probabilities(summary, probabilities, device)
    return _soft_wpmi(
        acts, probs, top_k=top_k, lam=lam, p_start=p_start, p_end=p_end, min_prob=min_prob,
        ties=ties, block_bytes=block_bytes,
    ).cpu().numpy()  # fmt: skip


def _summary_and_probabilities(summary: Any, probabilities: Any, device: Any) -> tuple[Any, Any]:
    """(N, U) summaries and (N, C) probabilities as tensors on ``device``, checked: the same
    images, probabilities in [0, 1]."""
    acts = _as_tensor(summary, "summary", device)
    probs = _as_tensor(probabilities, "probabilities", device)
    _check_pair(acts, probs, "probabilities")
    if float(probs.min()) < 0 or float(probs.max()) > 1 + 1e-6:
        raise PyneuronError("probabilities must lie in [0, 1] (see concept_probabilities)")
    return acts, probs


def _soft_wpmi(
    acts: Any,
    probs: Any,
    *,
    top_k: int,
    lam: float,
    p_start: float = P_START,
    p_end: float = P_END,
    min_prob: float = MIN_PROB,
    ties: str = "lowest",
    block_bytes: int = 1 << 23,
) -> Any:
    """Soft-WPMI on checked tensors; returns a (U, C) float32 tensor.

    The sum of k logarithms is computed as a sum of logarithms of products of ``group``
    consecutive terms: every term is at least ``min_j(1 - p_j) + min_prob`` (0.002 with
    the defaults) and at most 1 + min_prob, and ``group`` is chosen so that a product
    stays above 1e-30 (a normal float32), i.e. about k / 11 logarithms instead of k. The
    gathered rows go through one preallocated buffer of ``block_bytes``. The group
    logarithms are accumulated, and the prior subtracted, in float64: the score is a small
    difference of two large sums (about -350 each for k = 100).
    """
    torch = _torch()
    if top_k < 1:
        raise PyneuronError(f"top_k must be at least 1, got {top_k}")
    if not 0 <= p_end <= p_start <= 1:
        raise PyneuronError(f"need 0 <= p_end <= p_start <= 1, got {p_start}, {p_end}")
    n_images, n_units = acts.shape
    n_concepts = probs.shape[1]
    k = min(int(top_k), n_images)
    order = top_images_by_unit(acts, k, ties)
    weights = torch.from_numpy(soft_wpmi_weights(k, p_start, p_end)).to(probs.device)
    offset = 1.0 - weights + min_prob
    smallest = float(offset.min())
    if smallest <= 0:  # a zero term: log gives -inf, as in CLIP-Dissect
        group = 1
    elif smallest >= 1:
        group = k
    else:
        group = max(1, int(math.log(1e-30) / math.log(smallest)))
    offset, weights = offset[:, None, None], weights[:, None, None]
    log_given = torch.empty((n_units, n_concepts), dtype=torch.float64, device=probs.device)
    units_per_block = max(1, min(n_units, int(block_bytes // (4 * k * n_concepts))))
    buffer = torch.empty(k * units_per_block * n_concepts, dtype=torch.float32, device=probs.device)
    with torch.inference_mode():
        for start in range(0, n_units, units_per_block):
            ids = order[:, start : start + units_per_block]
            count = ids.shape[1]
            rows = buffer[: k * count * n_concepts].view(k * count, n_concepts)
            torch.index_select(probs, 0, ids.reshape(-1), out=rows)
            rows = rows.view(k, count, n_concepts)
            rows.mul_(weights).add_(offset)
            target = log_given[start : start + count]
            target.zero_()
            for chunk in rows.split(group):
                target.add_(chunk.prod(dim=0).log_())
        prior = torch.logsumexp(log_given, dim=0, keepdim=True) - math.log(n_units)
        log_given.sub_(lam * prior)
    return log_given.float()


def wpmi(
    summary: Any,
    probabilities: Any,
    *,
    top_k: int = WPMI_TOP_K,
    lam: float = WPMI_LAMBDA,
    min_prob: float = MIN_PROB,
    ties: str = "lowest",
    device: Any = None,
    block_bytes: int = 1 << 23,
) -> np.ndarray:
    """Hard WPMI scores of every (unit, concept): CLIP-Dissect's ``wpmi``.

    For unit u with top ``top_k`` images E_u (by activation summary):

    - log P(d | E_u) = sum_i log(P[E_u[i], d] + min_prob) (every top image is "in" the
      example set),
    - log P(d) = log mean_u P(d | E_u) over *all units given* (computed with logsumexp),
    - score = log P(d | E_u) - lam * log P(d).

    This is :func:`soft_wpmi` with every per-example probability equal to 1, computed by
    the same code (same grouping of logarithms, float64 accumulation, ``ties`` rule).
    CLIP-Dissect's defaults differ from soft-WPMI's: ``top_k`` 28, ``lam`` 0.6, and
    probabilities ``softmax(2 * cos)`` (temperature 0.5, :data:`WPMI_TEMPERATURE`; pass
    ``concept_probabilities(sims, WPMI_TEMPERATURE)``).

    Parameters
    ----------
    summary
        (N, U) activation summaries.
    probabilities
        (N, C) concept probabilities per image (:func:`concept_probabilities`).
    top_k, lam, min_prob
        As CLIP-Dissect's ``wpmi`` (``top_k`` is clipped to N).
    ties, device, block_bytes
        As :func:`soft_wpmi`.

    Returns
    -------
    numpy.ndarray
        (U, C) float32.

    Notes
    -----
    Against a float64 evaluation of the formula the error is below CLIP-Dissect's
    float32 sum of logarithms (the same reasons as :func:`soft_wpmi`); with
    ``ties="torch"`` the top images are exactly CLIP-Dissect's (``torch.topk`` on the CPU).

    Examples
    --------
    >>> summary = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> probabilities = np.array([[0.9, 0.1], [0.2, 0.8]])
    >>> wpmi(summary, probabilities, top_k=1).argmax(axis=1)
    array([0, 1])
    """
    acts, probs = _summary_and_probabilities(summary, probabilities, device)
    return _wpmi(
        acts, probs, top_k=top_k, lam=lam, min_prob=min_prob, ties=ties, block_bytes=block_bytes
    ).cpu().numpy()  # fmt: skip


def _wpmi(acts: Any, probs: Any, *, top_k: int, lam: float, **options: Any) -> Any:
    """Hard WPMI on checked tensors: soft-WPMI with all per-example probabilities 1 (each
    term is then ``P + min_prob``, as in CLIP-Dissect)."""
    return _soft_wpmi(acts, probs, top_k=top_k, lam=lam, p_start=1.0, p_end=1.0, **options)


def cos_similarity(summary: Any, clip_similarities: Any, *, device: Any = None) -> np.ndarray:
    """Cosine between each unit's summary column and each concept's similarity column.

    Columns are L2-normalized over images (not centred), as in CLIP-Dissect. A column of
    zeros (a dead unit) gives 0 here; CLIP-Dissect divides by its zero norm and gets NaN
    for every concept of that unit (its label is then whatever ``argmax`` makes of NaN).

    Examples
    --------
    >>> cos_similarity(np.array([[1.0], [0.0]]), np.array([[0.5, 0.0], [0.0, 0.5]]))
    array([[1., 0.]], dtype=float32)
    """
    torch = _torch()
    acts = _as_tensor(summary, "summary", device)
    sims = _as_tensor(clip_similarities, "clip_similarities", device)
    _check_pair(acts, sims, "clip_similarities")
    eps = torch.finfo(torch.float32).tiny
    acts = acts / acts.norm(dim=0, keepdim=True).clamp_min(eps)
    sims = sims / sims.norm(dim=0, keepdim=True).clamp_min(eps)
    return (acts.T @ sims).cpu().numpy()


def cos_cubed(
    summary: Any, clip_similarities: Any, *, min_norm: float = 1e-3, device: Any = None
) -> np.ndarray:
    """CLIP-Dissect's cos³: centre each column over images, cube it, normalize
    (norm clipped below at ``min_norm``), then take the cosine.

    Examples
    --------
    >>> acts = np.array([[2.0], [0.0], [0.0]])
    >>> sims = np.array([[0.9, 0.1], [0.1, 0.5], [0.1, 0.4]])
    >>> cos_cubed(acts, sims).argmax(axis=1)
    array([0])
    """
    acts = _as_tensor(summary, "summary", device)
    sims = _as_tensor(clip_similarities, "clip_similarities", device)
    _check_pair(acts, sims, "clip_similarities")

    def prepare(x: Any) -> Any:
        x = (x - x.mean(dim=0, keepdim=True)) ** 3
        return x / x.norm(dim=0, keepdim=True).clamp_min(min_norm)

    return (prepare(acts).T @ prepare(sims)).cpu().numpy()


def rank_reorder(
    summary: Any,
    clip_similarities: Any,
    *,
    top_fraction: float = 0.05,
    p: float = 3.0,
    scale_p: float = 0.5,
    device: Any = None,
    block_bytes: int = 1 << 26,
) -> np.ndarray:
    """CLIP-Dissect's rank-reorder score (higher is better; it is a negated error).

    For unit u with top ``n = max(2, int(N * top_fraction))`` images (activations t,
    descending): reorder t by the images' CLIP similarity to concept d (the image with
    the j-th lowest similarity gets the j-th lowest activation), take the mean
    ``|t - reordered|^p``, divide by the baseline ``mean_{i,j} |t_i - t_j|^p`` and by
    ``mean_i sim(i, d) ^ scale_p``, and negate.

    Notes
    -----
    Differences from CLIP-Dissect's code: the baseline is the exact expectation over
    random permutations instead of a 5-permutation sample (so results are
    deterministic); a zero baseline (all top activations equal) gives a score of 0; the
    mean similarity is clamped at 1e-6 before the power (CLIP cosines are positive in
    practice); ties are broken by image id (stable sorts); ``n`` is at least 2.
    """
    torch = _torch()
    acts = _as_tensor(summary, "summary", device)
    sims = _as_tensor(clip_similarities, "clip_similarities", device)
    _check_pair(acts, sims, "clip_similarities")
    if not 0 < top_fraction <= 1:
        raise PyneuronError(f"top_fraction must be in (0, 1], got {top_fraction}")
    n_images, n_units = acts.shape
    n_concepts = sims.shape[1]
    n = min(n_images, max(2, int(n_images * top_fraction)))
    top, order = torch.sort(acts, dim=0, descending=True, stable=True)
    top, order = top[:n], order[:n]  # (n, U)
    ascending = torch.flip(top, dims=[0])
    scores = torch.empty((n_units, n_concepts), dtype=torch.float32, device=sims.device)
    units_per_block = max(1, int(block_bytes // (8 * n * n_concepts)))
    with torch.inference_mode():
        for start in range(0, n_units, units_per_block):
            stop = min(n_units, start + units_per_block)
            ids = order[:, start:stop]
            rows = sims.index_select(0, ids.reshape(-1)).reshape(n, stop - start, n_concepts)
            mean_sim = rows.mean(dim=0)
            ranks = torch.argsort(torch.argsort(rows, dim=0, stable=True), dim=0, stable=True)
            values = ascending[:, start:stop, None].expand(-1, -1, n_concepts)
            reordered = values.gather(0, ranks)
            error = (top[:, start:stop, None] - reordered).abs_().pow_(p).mean(dim=0)
            block = ascending[:, start:stop]
            base = (block[:, None, :] - block[None, :, :]).abs_().pow_(p).mean(dim=(0, 1))[:, None]
            error = torch.where(base > 0, error / base.clamp_min(1e-30), torch.zeros_like(error))
            scores[start:stop] = -error / mean_sim.clamp_min(1e-6).pow(scale_p)
    return scores.cpu().numpy()


def similarity_defaults(similarity: str) -> tuple[int, float, float]:
    """CLIP-Dissect's ``(top_k, temperature, lam)`` for a similarity: hard WPMI's
    (28, 0.5, 0.6) for ``wpmi``, soft-WPMI's (100, 0.1, 1.0) otherwise (only the WPMI
    functions use them).

    Examples
    --------
    >>> similarity_defaults("wpmi"), similarity_defaults("soft_wpmi")
    ((28, 0.5, 0.6), (100, 0.1, 1.0))
    """
    if similarity_name(similarity) == "wpmi":
        return WPMI_TOP_K, WPMI_TEMPERATURE, WPMI_LAMBDA
    return 100, TEMPERATURE, LAMBDA


def similarity_matrix(
    summary: Any,
    clip_similarities: Any,
    similarity: str = "soft_wpmi",
    *,
    top_k: int | None = None,
    temperature: float | None = None,
    lam: float | None = None,
    top_fraction: float = 0.05,
    ties: str = "lowest",
    device: Any = None,
) -> np.ndarray:
    """(U, C) unit-concept scores from cached summaries and CLIP similarities.

    ``soft_wpmi`` and ``wpmi`` first turn the cosine similarities into probabilities with
    :func:`concept_probabilities` (``temperature``); ``cos``, ``cos3`` and
    ``rank_reorder`` use the raw cosines, as CLIP-Dissect does. ``top_k``,
    ``temperature`` and ``lam`` default (``None``) to CLIP-Dissect's values for the
    similarity (:func:`similarity_defaults`). ``ties`` orders tied summaries in the WPMI
    top images (see :func:`soft_wpmi`).

    Examples
    --------
    >>> summary = np.array([[3.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    >>> sims = np.array([[0.3, 0.1], [0.1, 0.3], [0.2, 0.2]])
    >>> similarity_matrix(summary, sims, top_k=1).argmax(axis=1)
    array([0, 1])
    >>> similarity_matrix(summary, sims, "wpmi", top_k=1).argmax(axis=1)
    array([0, 1])
    >>> similarity_matrix(summary, sims, "cos").argmax(axis=1)
    array([0, 1])
    """
    name = similarity_name(similarity)
    check_ties(ties)
    if name in ("soft_wpmi", "wpmi"):
        default_k, default_temperature, default_lam = similarity_defaults(name)
        acts = _as_tensor(summary, "summary", device)
        sims = _as_tensor(clip_similarities, "clip_similarities", device)
        _check_pair(acts, sims, "clip_similarities")
        probabilities = _probabilities(
            sims, default_temperature if temperature is None else temperature
        )
        del sims
        score = _wpmi if name == "wpmi" else _soft_wpmi
        return score(
            acts, probabilities, top_k=default_k if top_k is None else top_k,
            lam=default_lam if lam is None else lam, ties=ties,
        ).cpu().numpy()  # fmt: skip
    if name == "cos":
        return cos_similarity(summary, clip_similarities, device=device)
    if name == "cos3":
        return cos_cubed(summary, clip_similarities, device=device)
    return rank_reorder(summary, clip_similarities, top_fraction=top_fraction, device=device)


def top_concepts(scores: Any, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` best concepts of every unit: (ids, scores), each (U, n), best first.

    Among the returned concepts, equal scores are ordered by concept id; the first
    column is the first maximum of each row (``argmax``).

    Examples
    --------
    >>> ids, values = top_concepts(np.array([[0.1, 0.5, 0.5, 0.2]]), 3)
    >>> ids
    array([[1, 2, 3]])
    """
    torch = _torch()
    tensor = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    if tensor.ndim != 2 or tensor.shape[1] == 0:
        raise PyneuronError(f"scores must be a (units, concepts) matrix, got {tuple(tensor.shape)}")
    n = max(1, min(int(n), tensor.shape[1]))
    values, ids = torch.topk(tensor, n, dim=1, sorted=True)
    ids_np, values_np = ids.numpy(), values.numpy()
    order = np.lexsort((ids_np, -values_np), axis=1)  # value desc, then id asc
    ids_np = np.take_along_axis(ids_np, order, axis=1)
    values_np = np.take_along_axis(values_np, order, axis=1)
    first = tensor.argmax(dim=1).numpy()  # torch: the first maximal index
    fix = ids_np[:, 0] != first
    if fix.any():  # more ties at the top than n: keep argmax first
        ids_np[fix, 0] = first[fix]
    return ids_np.astype(np.int64), values_np
