"""Explaining units: compositional beam search, NetDissect IoU tables, formula scores."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
from pandas.api.types import pandas_dtype
from pandas.arrays import ArrowStringArray

try:  # pandas >= 3: a table straight from its blocks, without per-column inference
    from pandas.api.internals import create_dataframe_from_blocks
except ImportError:  # pragma: no cover - pandas 2: built from a dict of columns
    create_dataframe_from_blocks = None

from ..errors import EmptyStoreError, PyneuronError
from ..progress import progress_bar
from . import _native
from .checks import positive_int
from .formula import Formula, quote_name
from .metrics import METRIC_COLUMNS, iou, metrics
from .netdissect import category_codes, category_unit_pixels, check_mode, netdissect_iou
from .settings import OPERATORS, SearchSettings
from .store import ConceptStore
from .units import UnitMasks

UnitSource = UnitMasks | Iterable[UnitMasks]

#: Stores of up to this many concepts get a co-occurrence table (8 bytes per pair of
#: concepts: 512 MiB here), which lets the search skip most counting; larger ones are
#: searched without it, with the same results.
COOCCURRENCE_MAX_CONCEPTS = 8192
#: What the engine's searches return: per-unit arrays, unit first, named by
#: ``SearchResult.FIELDS`` (``OptimalSearchResult`` adds the optimal search's); moved as
#: ``to_arrays()`` / ``from_arrays``, or pickled; :func:`result_table` makes the table.
SearchResult = _native.SearchResult
OptimalSearchResult = _native.OptimalSearchResult
#: Columns the optimal search adds to the result table: the fields its result adds.
OPTIMAL_COLUMNS = tuple(f for f in OptimalSearchResult.FIELDS if f not in SearchResult.FIELDS)


class SearchBackend(Protocol):
    """Where :func:`explain` runs the beam search when not in this process (e.g.
    :class:`pyneuron.RayBackend`): given the checked inputs, it returns the same table
    :func:`explain` would (``search`` is ``(length, beam_size, operator codes, penalty)``)."""

    def explain_units(
        self,
        units: UnitSource,
        store: ConceptStore,
        *,
        search: tuple[int, int, Sequence[int], float],
        full_beam: bool,
        progress: bool,
    ) -> pd.DataFrame: ...


def explain(
    units: UnitSource,
    store: ConceptStore,
    settings: SearchSettings | None = None,
    *,
    full_beam: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    backend: str | SearchBackend | None = "local",
    **options: Any,
) -> pd.DataFrame:
    """Explain every unit by the best formula over the store's concepts (exact beam search,
    or with ``search="optimal"`` the guaranteed best formula).

    Semantics are compexp's: primitives are the concepts with IoU > 0 (ties to the
    smaller concept id); each of ``length - 1`` steps combines every beam formula
    with every concept present in the data by each operator, in the order given,
    and keeps the best ``beam_size`` (a stable sort: ties keep the older entry).
    The score is IoU * penalty ** (length - 1), NOT counting as one more.

    The engine searches blocks of units together: each expansion step screens every
    (beam formula, concept) pair with exact score ranges (from the store's
    :meth:`~ConceptStore.cooccurrence` table, computed on first use and kept), counts
    ``|F AND C AND unit|`` for the pairs left and ``|F AND C|`` for the pairs still in
    question, each in one batched pass over the concepts. Results are identical to a
    literal brute-force search.

    ``search="optimal"`` gives for each unit the formula of maximum IoU over *every*
    left-deep formula of at most ``length`` concepts present in the data with the given
    operators (concepts may repeat), found by exact branch and bound (the beam's answer
    is its starting point, so its IoU is never lower). Ties go to the shorter formula,
    then to the smaller concept ids read left to right, then to the operator listed
    first. Length 3 takes milliseconds per unit; lengths of 4 and more can take hours
    without a ``time_limit`` or ``max_nodes``. ``mode="netdissect"`` (``length=1``) ranks
    concepts by NetDissect-Lite's IoU, counting the unit's pixels per concept category
    only in images where that category meets the unit (see
    :mod:`pyneuron.engine.netdissect`); ``score``, ``iou`` and ``primitive_iou`` hold it,
    the other metrics stay dataset-wide.

    Parameters
    ----------
    units
        A :class:`UnitMasks`, or an iterable of them (chunks of a layer too big for
        memory); units are numbered consecutively across chunks.
    store
        The concepts, on the same grid as the units.
    settings
        The search (:class:`~pyneuron.engine.settings.SearchSettings`): ``length``
        (3), ``beam_size`` (5), ``operators`` (OR, AND, AND NOT), ``penalty`` (1.0),
        ``search`` (``"beam"`` or ``"optimal"``), ``time_limit`` and ``max_nodes``
        (optimal search budgets per unit), ``mode`` (``"dataset"`` or
        ``"netdissect"``).
    **options
        The same fields as keywords, replacing those of ``settings`` (or of the
        defaults): ``explain(units, store, length=2, beam_size=10)``.
    full_beam
        Return the whole final beam: one row per (unit, rank) with a ``rank`` and a
        ``score`` column (the optimal search: its one optimum with ``rank`` 0).
    batch_size
        Units per engine call (progress granularity); default scales with threads.
    progress
        Show progress (a bar on a terminal, lines in a log) when there are several blocks
        of units (``batch_size``).
    backend
        ``"local"`` or None (this process), or a :class:`SearchBackend` object such as
        :class:`pyneuron.RayBackend` (shards of units on a Ray cluster, identical
        results) with its settings (cluster address, unit block, resumable shard
        directory). :func:`pyneuron.explain` also takes the string ``"ray"``.
        ``mode="netdissect"`` runs here only (another backend is refused).

    Returns
    -------
    pandas.DataFrame
        One row per unit: ``unit``, ``formula``, ``concepts`` (concepts in the
        formula, at most ``length``), ``length`` (compexp's formula length: concepts,
        each NOT counting one more; the exponent of ``penalty`` is ``length - 1``),
        ``score``, ``iou``, ``detection_accuracy``, ``activation_coverage``, ``samples_coverage``,
        ``explanation_coverage``, ``primitive``, ``primitive_iou``, ``unit_pixels``,
        ``unit_images``. A unit no concept overlaps has a missing ``formula`` (NA) and IoU 0.
        The optimal search adds ``optimal`` (bool: proven), ``upper_bound`` (equal to
        ``iou`` when proven), ``nodes`` and ``seconds`` (per unit).

    Examples
    --------
    >>> import numpy as np, pyneuron
    >>> rng = np.random.default_rng(0)
    >>> concepts = rng.random((4, 20, 8, 8)) < 0.3
    >>> store = pyneuron.ConceptStore.from_masks(concepts, ["a", "b", "c", "d"])
    >>> units = pyneuron.UnitMasks.from_masks((concepts[0] | concepts[1])[None])
    >>> row = pyneuron.explain(units, store, progress=False).loc[0]
    >>> row["formula"], round(float(row["iou"]), 6)   # "b" overlaps more, so it leads
    ('(b OR a)', 1.0)
    >>> best = pyneuron.explain(units, store, search="optimal", progress=False).loc[0]
    >>> best["formula"], bool(best["optimal"])    # the tie rule puts "a" first
    ('(a OR b)', True)
    """
    settings = _settings(settings, options)
    length, beam_size, penalty = settings.length, settings.beam_size, settings.penalty
    ops, optimal = settings.operator_codes, settings.optimal
    seconds, nodes = settings.seconds, settings.nodes
    _check_store(store)
    remote = _remote_backend(backend)
    if settings.mode == "netdissect":
        if remote is not None:
            raise PyneuronError(
                "mode='netdissect' runs in this process only; use backend='local' with it"
            )
        return _explain_netdissect(units, store, beam_size, full_beam, batch_size, progress)
    if optimal and len(store) > COOCCURRENCE_MAX_CONCEPTS:
        raise PyneuronError(
            f"the optimal search needs the store's co-occurrence table, kept for up to "
            f"{COOCCURRENCE_MAX_CONCEPTS:,} concepts; this store has {len(store):,}: build one "
            "with fewer concepts or use search='beam'"
        )
    if remote is not None:
        if optimal:
            raise PyneuronError("the optimal search runs in this process; use backend='local'")
        spec = (length, beam_size, ops, float(penalty))
        return remote.explain_units(
            units, store, search=spec, full_beam=full_beam, progress=progress
        )
    names = store.names
    cooccurrence = store.cooccurrence() if optimal else search_cooccurrence(store, length)
    frames = []
    for first_unit, chunk, batch in _batches(units, store, batch_size, progress, "explain"):
        args = (chunk._native, batch.start, batch.stop, store._native, length)
        if optimal:
            raw = _native.optimal_search(*args, ops, beam_size, seconds, nodes, cooccurrence)
        else:
            raw = _native.beam_search(*args, beam_size, ops, float(penalty), cooccurrence)
        frames.append(result_table(raw, first_unit + batch.start, names, full_beam, optimal))
    if len(frames) > 1:
        return pd.concat(frames, ignore_index=True)
    return frames[0] if frames else result_table(None, 0, names, full_beam, optimal)


#: Verdicts of :func:`compare_searches`, per unit.
AUDIT_VERDICTS = ("same formula", "same IoU", "beam worse", "no formula")


def compare_searches(
    units: UnitSource,
    store: ConceptStore,
    settings: SearchSettings | None = None,
    *,
    progress: bool = True,
    **options: Any,
) -> pd.DataFrame:
    """Optimality audit of the beam: beam and optimal search on the same units, side by side.

    Parameters
    ----------
    units, store, settings, progress, **options
        As for :func:`explain`: both searches use these settings, the beam without the
        budget (``time_limit``, ``max_nodes``), which applies to the optimal search.

    Returns
    -------
    pandas.DataFrame
        One row per unit: ``unit``, ``beam_formula``, ``beam_iou``, ``optimal_formula``,
        ``optimal_iou``, ``optimal`` (the optimum is proven), ``upper_bound``, ``gap``
        (optimal IoU minus beam IoU, never negative) and ``audit``: ``"same formula"``,
        ``"same IoU"`` (a different formula, equally good), ``"beam worse"`` or
        ``"no formula"`` (no formula overlaps the unit). Where ``optimal`` is False the
        verdict compares the beam with the best formula found within the budget.

    Examples
    --------
    >>> import numpy as np, pyneuron
    >>> rng = np.random.default_rng(0)
    >>> concepts = rng.random((4, 20, 8, 8)) < 0.3
    >>> store = pyneuron.ConceptStore.from_masks(concepts, ["a", "b", "c", "d"])
    >>> units = pyneuron.UnitMasks.from_masks((concepts[0] | concepts[1])[None])
    >>> pyneuron.compare_searches(units, store, progress=False)["audit"].tolist()
    ['same IoU']
    """
    SearchSettings.check_names(options)
    chosen = {**dataclasses.asdict(settings or SearchSettings()), **options}
    beam_settings = {**chosen, "search": "beam", "time_limit": None, "max_nodes": None}
    beam = explain(units, store, SearchSettings(**beam_settings), progress=progress)
    best = explain(
        units, store, SearchSettings(**{**chosen, "search": "optimal"}), progress=progress
    )
    gap = (best["iou"] - beam["iou"]).clip(lower=0.0)
    audit = np.select(
        [best["formula"].isna(), best["formula"] == beam["formula"], gap == 0],
        ["no formula", "same formula", "same IoU"],
        "beam worse",
    )
    return pd.DataFrame(
        {
            "unit": beam["unit"],
            "beam_formula": beam["formula"],
            "beam_iou": beam["iou"],
            "optimal_formula": best["formula"],
            "optimal_iou": best["iou"],
            "optimal": best["optimal"],
            "upper_bound": best["upper_bound"],
            "gap": gap,
            "audit": audit,
        }
    )


def iou_table(
    units: UnitSource, store: ConceptStore, *, mode: str = "dataset", progress: bool = True
) -> np.ndarray:
    """IoU of every unit with every concept: float64 (units, concepts) — NetDissect.

    Parameters
    ----------
    units, store
        The unit masks (or an iterable of chunks) and the concepts, on one grid.
    mode
        ``"dataset"`` (default, compexp's): |C∧A| / (|C| + |A| - |C∧A| + 1e-10) over all
        pixels. ``"netdissect"``: NetDissect-Lite's, where |A| counts the unit's pixels
        only in images where the concept's category meets the unit (see
        :mod:`pyneuron.engine.netdissect`); bit for bit what its ``tally`` computes.
    progress
        Show a progress bar (on a terminal) when there are several blocks of units.

    Examples
    --------
    >>> import numpy as np, pyneuron
    >>> masks = np.zeros((2, 1, 2, 2), dtype=bool); masks[0, 0, 0] = True; masks[1, 0] = True
    >>> store = pyneuron.ConceptStore.from_masks(masks, ["top", "all"])
    >>> pyneuron.iou_table(pyneuron.UnitMasks.from_masks(masks[:1]), store, progress=False)
    array([[1. , 0.5]])
    """
    _check_store(store)
    netdissect = check_mode(mode) == "netdissect"
    codes, n_categories = _category_codes(store)
    sizes = store.pixel_counts
    rows = []
    for _, chunk, batch in _batches(units, store, None, progress, "IoU table"):
        counts = _native.intersection_counts(chunk._native, batch.start, batch.stop, store._native)
        if netdissect:
            per_category = category_unit_pixels(chunk, batch, store, codes, n_categories)
            rows.append(netdissect_iou(counts, sizes[None, :], per_category[:, codes]))
        else:
            rows.append(iou(counts, sizes[None, :], chunk.pixel_counts[batch][:, None]))
    return np.concatenate(rows) if rows else np.zeros((0, len(store)))


def _explain_netdissect(
    units: UnitSource,
    store: ConceptStore,
    beam_size: int,
    full_beam: bool,
    batch_size: int | None,
    progress: bool,
) -> pd.DataFrame:
    """Length-1 explanations ranked by NetDissect-Lite's IoU.

    Every concept with a positive NetDissect IoU overlaps the unit, so it is among the
    engine's primitives (all concepts with dataset-wide IoU > 0) when the beam holds every
    concept; those are re-scored and re-ranked here.
    """
    names = store.names
    codes, n_categories = _category_codes(store)
    frames = []
    for first_unit, chunk, batch in _batches(units, store, batch_size, progress, "explain"):
        raw = _native.beam_search(
            chunk._native, batch.start, batch.stop, store._native, 1, len(store), [], 1.0
        )
        per_category = category_unit_pixels(chunk, batch, store, codes, n_categories)
        concepts = raw.concepts[:, :, 0]
        units_column = np.arange(len(concepts))[:, None]
        have = np.arange(concepts.shape[1])[None, :] < raw.beam_count[:, None]
        safe = np.where(have, concepts, 0)
        scores = netdissect_iou(raw.intersection, raw.size, per_category[units_column, codes[safe]])
        scores = np.where(have, scores, -np.inf)
        order = np.lexsort((np.where(have, concepts, np.iinfo(np.int32).max), -scores), axis=1)
        order = order[:, :beam_size]
        # Every (unit, beam) array in the new order, but the scores, replaced below; the
        # per-unit ones as they are.
        rescored = ("score", "iou")
        ranked = {
            key: array[units_column, order] if array.ndim > 1 and key not in rescored else array
            for key, array in raw.to_arrays().items()
        }
        best = scores[units_column, order]
        ranked["score"] = ranked["iou"] = np.where(np.isfinite(best), best, np.nan)
        ranked["beam_count"] = np.minimum(raw.beam_count, beam_size)
        ranked["primitive"] = np.where(ranked["beam_count"] > 0, ranked["concepts"][:, 0, 0], -1)
        ranked["primitive_iou"] = np.where(ranked["beam_count"] > 0, best[:, 0], 0.0)
        first = first_unit + batch.start
        data = _table_data(SearchResult.from_arrays(ranked), first, names, full_beam)
        data["iou"] = data["score"]
        frames.append(_frame(data, _columns(full_beam, False)))
    if len(frames) > 1:
        return pd.concat(frames, ignore_index=True)
    return frames[0] if frames else result_table(None, 0, names, full_beam)


def score(formula: Formula | str, units: UnitSource, store: ConceptStore) -> pd.DataFrame:
    """Score one formula against every unit: a row per unit with all metrics.

    Examples
    --------
    >>> import numpy as np, pyneuron
    >>> masks = np.zeros((2, 1, 2, 2), dtype=bool); masks[0, 0, 0] = True; masks[1, 0] = True
    >>> store = pyneuron.ConceptStore.from_masks(masks, ["top", "all"])
    >>> units = pyneuron.UnitMasks.from_masks(masks[:1])
    >>> pyneuron.score("all AND NOT top", units, store)["iou"].tolist()
    [0.0]
    """
    if not isinstance(formula, Formula):
        formula = Formula.parse(formula)
    program = formula.program(store)
    frames = []
    for first_unit, chunk in unit_chunks(units, store):
        raw = _native.formula_counts(program, store._native, chunk._native)
        n = len(chunk)
        values = metrics(
            raw["intersection"].astype(np.int64),
            np.full(n, raw["size"]),
            chunk.pixel_counts,
            raw["intersection_images"].astype(np.int64),
            np.full(n, raw["size_images"]),
            chunk.image_counts,
        )
        frame = pd.DataFrame(
            {"unit": np.arange(first_unit, first_unit + n), "formula": str(formula)}
        )
        for column in METRIC_COLUMNS:
            frame[column] = values[column]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def best_of_beam(beam: pd.DataFrame) -> pd.DataFrame:
    """The one-row-per-unit table from a ``full_beam=True`` table (its rank-0 rows)."""
    return beam[beam["rank"] == 0].drop(columns="rank").reset_index(drop=True)


# -- helpers ---------------------------------------------------------------------------


def raw_beam_search(
    units: UnitMasks, store: ConceptStore, search: tuple[int, int, Sequence[int], float]
) -> SearchResult:
    """The engine's raw beam-search result for every unit of ``units`` (turned into a table
    by :func:`result_table`); ``search`` is ``(length, beam_size, operator codes,
    penalty)``, as a backend receives it."""
    length, beam_size, ops, penalty = search
    cooccurrence = search_cooccurrence(store, length)
    return _native.beam_search(
        units._native, 0, len(units), store._native, length, beam_size, list(ops),
        float(penalty), cooccurrence,
    )  # fmt: skip


def _remote_backend(backend: str | SearchBackend | None) -> SearchBackend | None:
    """None for this process, else the backend object (anything else is refused)."""
    if backend is None or (isinstance(backend, str) and backend == "local"):
        return None
    if isinstance(backend, str) or not hasattr(backend, "explain_units"):
        raise PyneuronError(
            f"unknown backend {backend!r}: pass 'local' or a backend object such as "
            "pyneuron.RayBackend() (pyneuron.explain, dissect and the CLI also take 'ray')"
        )
    return backend


def search_cooccurrence(store: ConceptStore, length: int) -> np.ndarray | None:
    """The co-occurrence table the beam search screens with (None: searched without)."""
    return store.cooccurrence() if length > 1 and len(store) <= COOCCURRENCE_MAX_CONCEPTS else None


#: Stores :func:`_check_store` accepted (a store never changes), dropped with them.
_USABLE_STORES: weakref.WeakSet[ConceptStore] = weakref.WeakSet()


def _check_store(store: ConceptStore) -> None:
    if not isinstance(store, ConceptStore):
        raise PyneuronError(
            f"expected a ConceptStore, got {type(store).__name__}; build one with "
            "ConceptStore.from_masks, ConceptStore.writer or ConceptStore.open"
        )
    if store in _USABLE_STORES:
        return
    if len(store) == 0:
        raise EmptyStoreError("the concept store holds no concepts; add concepts before explaining")
    if not store.pixel_counts.any():
        raise EmptyStoreError(
            "no concept of the store is present in any image; nothing can explain a unit"
        )
    _USABLE_STORES.add(store)


def _settings(settings: SearchSettings | None, options: Mapping[str, Any]) -> SearchSettings:
    """``SearchSettings.from_options(settings, options)``, built and checked once for
    each hashable combination (keyed by the options' types too: ``1`` is not ``True``)."""
    key = (settings, tuple((name, type(value), value) for name, value in options.items()))
    try:
        hash(key)
    except TypeError:  # e.g. operators given as a list
        return SearchSettings.from_options(settings, options)
    return _checked_settings(key)


@functools.lru_cache(maxsize=256)
def _checked_settings(
    key: tuple[SearchSettings | None, tuple[tuple[str, type, Any], ...]],
) -> SearchSettings:
    settings, options = key
    return SearchSettings.from_options(settings, {name: value for name, _, value in options})


def unit_chunks(units: UnitSource, store: ConceptStore) -> Iterator[tuple[int, UnitMasks]]:
    """(number of the chunk's first unit, chunk) for a UnitMasks or an iterable of them."""
    chunks = [units] if isinstance(units, UnitMasks) else units
    if isinstance(chunks, (str, bytes)) or not isinstance(chunks, Iterable):
        raise PyneuronError(
            f"units must be UnitMasks or an iterable of UnitMasks, got {type(units).__name__}; "
            "build them with UnitMasks.from_masks or UnitMasks.writer"
        )
    first = 0
    for chunk in chunks:
        if not isinstance(chunk, UnitMasks):
            raise PyneuronError(f"expected UnitMasks, got {type(chunk).__name__}")
        store.grid.require_same(chunk.grid, "unit masks vs concept store")
        yield first, chunk
        first += len(chunk)


def _batches(
    units: UnitSource, store: ConceptStore, batch_size: int | None, progress: bool, desc: str
) -> Iterator[tuple[int, UnitMasks, slice]]:
    if batch_size is None:
        batch_size = max(64, 8 * _native.num_threads())
    batch_size = positive_int(batch_size, "batch_size")
    total = len(units) if isinstance(units, UnitMasks) else None
    # A bar over one block would only jump from 0 to 100 %: none then.
    shown = progress and (total is None or total > batch_size)
    with (
        progress_bar(total=total, desc=desc, unit="unit") if shown else contextlib.nullcontext()
    ) as bar:
        for first, chunk in unit_chunks(units, store):
            for start in range(0, len(chunk), batch_size):
                batch = slice(start, min(start + batch_size, len(chunk)))
                yield first, chunk, batch
                if bar is not None:
                    bar.update(batch.stop - batch.start)


#: Category codes of stores (see :func:`_category_codes`), dropped with their store.
_CATEGORY_CODES: weakref.WeakKeyDictionary[ConceptStore, tuple[np.ndarray, int]] = (
    weakref.WeakKeyDictionary()
)


def _category_codes(store: ConceptStore) -> tuple[np.ndarray, int]:
    """:func:`~pyneuron.engine.netdissect.category_codes` of ``store``, computed once per
    store (its categories never change) and kept while the store lives (read-only)."""
    known = _CATEGORY_CODES.get(store)
    if known is None:
        codes, n_categories = category_codes(store)
        codes.setflags(write=False)
        known = _CATEGORY_CODES[store] = (codes, n_categories)
    return known


@functools.cache
def _columns(full_beam: bool, optimal: bool) -> tuple[str, ...]:
    """Columns of the explanations table (see :func:`result_table`)."""
    return (
        "unit",
        *(["rank"] if full_beam else []),
        "formula",
        "concepts",
        "length",
        "score",
        *METRIC_COLUMNS,
        "primitive",
        "primitive_iou",
        "unit_pixels",
        "unit_images",
        *(OPTIMAL_COLUMNS if optimal else []),
    )


#: Column indexes by (columns, storage of their str dtype or None: object).
_COLUMN_INDEXES: dict[tuple[tuple[str, ...], str | None], pd.Index] = {}


def _column_index(columns: tuple[str, ...], text: pd.StringDtype | None) -> pd.Index:
    """The column index pandas makes of ``columns`` (labels of dtype ``text`` or object),
    made once."""
    key = (columns, None if text is None else text.storage)
    index = _COLUMN_INDEXES.get(key)
    if index is None:
        index = _COLUMN_INDEXES[key] = pd.Index(columns, dtype=text if text is not None else object)
    return index


def _text_dtype() -> pd.StringDtype | None:
    """The dtype pandas gives a column of strings (None: object), per its options."""
    dtype = pandas_dtype(str)
    return dtype if isinstance(dtype, pd.StringDtype) else None


def _frame(data: Mapping[str, Any], columns: tuple[str, ...]) -> pd.DataFrame:
    """``pd.DataFrame({c: data[c] for c in columns})`` (same values, dtypes, index and
    column index) built in one step: one 2-D block per numpy dtype, and each text column
    (a ``list`` of str or None) typed as pandas infers it (object when all None)."""
    n = len(data[columns[0]])
    if create_dataframe_from_blocks is None or n == 0:
        return pd.DataFrame({c: data[c] for c in columns})
    text = _text_dtype()
    blocks: list[tuple[Any, np.ndarray]] = []
    places: dict[np.dtype, list[int]] = {}
    strings: list[int] = []  # text columns holding a str
    for place, column in enumerate(columns):
        values = data[column]
        if not isinstance(values, list):
            places.setdefault(values.dtype, []).append(place)
        elif text is not None and any(v is not None for v in values):
            strings.append(place)
        else:
            blocks.append((np.array(values, dtype=object)[None, :], np.array([place])))
    for dtype, where in places.items():
        block = np.empty((len(where), n), dtype=dtype)
        for row, place in enumerate(where):
            block[row] = data[columns[place]]
        blocks.append((block, np.array(where)))
    if text is not None and strings:
        typed = _text_arrays([data[columns[p]] for p in strings], text)
        blocks += [(array, np.array([place])) for array, place in zip(typed, strings)]
    # A view: the labels are shared, a name given to one table's columns is not.
    return create_dataframe_from_blocks(
        blocks, pd.RangeIndex(n), _column_index(columns, text).view()
    )


def _text_arrays(columns: list[list[str | None]], text: pd.StringDtype) -> list[Any]:
    """Equal-length columns of str and None as arrays of dtype ``text``, converted
    together (the conversion's fixed cost dominates small tables)."""
    n = len(columns[0])
    joined = [value for values in columns for value in values]
    if text.storage == "pyarrow":  # as pd.array would make them, without its checks
        typed = pa.array(joined, type=pa.large_string())
        return [ArrowStringArray(typed.slice(k * n, n), dtype=text) for k in range(len(columns))]
    array = pd.array(joined, dtype=text)
    return [array[k * n : (k + 1) * n] for k in range(len(columns))]


def _formula_text(
    concept_ids: Sequence[int],
    op_codes: Sequence[int],
    quoted: dict[int, str],
    names: Sequence[str],
) -> str:
    """``str()`` of the left-deep formula concepts[0] ops[0] concepts[1] ... (up to the
    first negative id), written directly (``quoted``: concept id -> name as written,
    filled on first use)."""
    text = ""
    for k, concept in enumerate(concept_ids):
        if concept < 0:
            break
        name = quoted.get(concept)
        if name is None:
            name = quoted[concept] = quote_name(names[concept])
        text = f"({text} {OPERATORS[op_codes[k - 1]]} {name})" if k else name
    return text


def _formulas(
    concepts: np.ndarray, ops: np.ndarray, has: np.ndarray, names: Sequence[str]
) -> list[str | None]:
    """The formula of each row of ``concepts`` and ``ops`` (None where ``has`` is False)."""
    quoted: dict[int, str] = {}
    return [
        _formula_text(ids, codes, quoted, names) if present else None
        for ids, codes, present in zip(concepts.tolist(), ops.tolist(), has.tolist())
    ]


def result_table(
    raw: SearchResult | None,
    first_unit: int,
    names: Sequence[str],
    full_beam: bool,
    optimal: bool = False,
) -> pd.DataFrame:
    """The explanations table of a search result (``optimal``: an
    :class:`OptimalSearchResult`, whose columns it adds); units numbered from
    ``first_unit``; an empty table with the columns when ``raw`` is None."""
    columns = _columns(full_beam, optimal)
    if raw is None:
        return pd.DataFrame({c: [] for c in columns})
    return _frame(_table_data(raw, first_unit, names, full_beam, optimal), columns)


def _table_data(
    raw: SearchResult,
    first_unit: int,
    names: Sequence[str],
    full_beam: bool = False,
    optimal: bool = False,
) -> dict[str, Any]:
    """The columns of :func:`result_table` (and ``rank``), as arrays, text as lists."""
    n_units, beam = raw.score.shape
    if full_beam:  # each unit's beam, at least one row per unit, unit by unit
        rows = np.arange(beam)[None, :] < np.maximum(raw.beam_count, 1)[:, None]
        unit_idx, rank_idx = np.nonzero(rows)

        def ranked(array: np.ndarray) -> np.ndarray:
            return array[rows]

        def per_unit(array: np.ndarray) -> np.ndarray:
            return array[unit_idx]

    else:  # the best formula of each unit
        unit_idx = np.arange(n_units)
        rank_idx = np.zeros_like(unit_idx)

        def ranked(array: np.ndarray) -> np.ndarray:
            return array[:, 0]

        def per_unit(array: np.ndarray) -> np.ndarray:
            return array

    has = rank_idx < per_unit(raw.beam_count)
    values = metrics(
        ranked(raw.intersection),
        ranked(raw.size),
        per_unit(raw.unit_size),
        ranked(raw.intersection_images),
        ranked(raw.size_images),
        per_unit(raw.unit_images),
    )
    concepts = ranked(raw.concepts)
    data = {
        "unit": first_unit + unit_idx,
        "rank": rank_idx,
        "formula": _formulas(concepts, ranked(raw.ops), has, names),
        "concepts": np.where(has, (concepts >= 0).sum(axis=-1), 0),
        "length": ranked(raw.length),
        "score": np.where(has, ranked(raw.score), 0.0),
        **{column: values[column] for column in METRIC_COLUMNS},
        "primitive": [names[p] if p >= 0 else None for p in per_unit(raw.primitive).tolist()],
        "primitive_iou": per_unit(raw.primitive_iou),
        "unit_pixels": per_unit(raw.unit_size),
        "unit_images": per_unit(raw.unit_images),
        **{c: per_unit(getattr(raw, c)) for c in (OPTIMAL_COLUMNS if optimal else ())},
    }
    data["iou"] = np.where(has, data["iou"], 0.0)
    return data
