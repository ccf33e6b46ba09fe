"""Two sets of explanations side by side: how formulas found on two concept sources (human
annotations, a segmenter) agree, unit by unit and per layer, and how the two sources'
concept masks agree, concept by concept.

Agreement of two formulas of one unit:

- ``exact``: the same formula up to the order and repetition of the operands of AND and
  OR and double negation (:func:`canonical_formula`);
- ``same_concepts``: the same set of concept names, whatever the operators;
- ``formula_iou``: |F_a ∧ F_b| / |F_a ∨ F_b|, each formula evaluated on its own concept
  store, over the images both sources cover (the plain ratio: 1 for equal masks, NaN
  when both are empty);
- with a lexicon (:class:`pyneuron.concepts.lexicon.Lexicon`), ``hypernym_exact`` and
  ``hypernym_same_concepts``: the same after mapping the names of the two formulas to
  their lowest meaningful common hypernyms (``oak`` and ``tree`` meet at ``tree``;
  :meth:`~pyneuron.concepts.lexicon.Lexicon.align`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from ..engine.formula import And, BinaryOp, Concept, Formula, Not, Or
from ..engine.store import ConceptStore
from ..errors import GridMismatchError, PyneuronError
from ..progress import progress_bar

#: Pixels of one dense formula mask per image block (bounds the memory of comparisons).
BLOCK_PIXELS = 2**23
#: The columns of the per-layer summary: column -> (header, meaning).
LAYER_COLUMNS = {
    "layer": ("layer", ""),
    "units": ("units", "units in both runs"),
    "compared": ("compared", "units explained in both runs"),
    "exact": ("exact", "share of compared units with the same formula (operand order aside)"),
    "same_concepts": (
        "same concepts",
        "share of compared units whose formulas use the same concepts",
    ),
    "mean_formula_iou": ("mean formula IoU", "mean IoU of the two formulas' masks"),
    "median_formula_iou": ("median formula IoU", "median IoU of the two formulas' masks"),
    "hypernym_exact": (
        "exact (hypernyms)",
        "share with the same formula once names meet at common hypernyms",
    ),
    "hypernym_same_concepts": (
        "same concepts (hypernyms)",
        "share with the same concepts once names meet at common hypernyms",
    ),
    "only_a": ("only in A", "units only in run A"),
    "only_b": ("only in B", "units only in run B"),
}
#: The columns of the per-unit table: column -> (header, meaning).
UNIT_COLUMNS = {
    "layer": ("layer", ""),
    "unit": ("unit", ""),
    "range": ("range", "activation range"),
    "runs": ("in", "the runs holding the unit"),
    "formula_a": ("formula A", "run A's explanation"),
    "formula_b": ("formula B", "run B's explanation"),
    "exact": ("exact", "the same formula (operand order aside)"),
    "same_concepts": ("same concepts", "the formulas use the same concepts"),
    "formula_iou": ("formula IoU", "IoU of the two formulas' masks on the shared images"),
    "pixels_a": ("pixels A", "pixels of formula A's mask on the shared images"),
    "pixels_b": ("pixels B", "pixels of formula B's mask on the shared images"),
    "intersection": ("both", "pixels in both formulas' masks"),
    "iou_a": ("IoU A", "run A's formula against the unit"),
    "iou_b": ("IoU B", "run B's formula against the unit"),
    "hypernym_a": ("hypernyms A", "formula A with names mapped to common hypernyms"),
    "hypernym_b": ("hypernyms B", "formula B with names mapped to common hypernyms"),
    "hypernym_exact": ("exact (hypernyms)", "the same formula once names are mapped"),
    "hypernym_same_concepts": ("same concepts (hypernyms)", "the same concepts once mapped"),
}
#: The columns of the per-concept table: column -> (header, meaning).
CONCEPT_COLUMNS = {
    "concept_a": ("concept A", "the concept in run A's store"),
    "concept_b": ("concept B", "the concept in run B's store"),
    "category_a": ("category A", ""),
    "category_b": ("category B", ""),
    "iou": ("IoU", "IoU of the two masks over the shared images"),
    "pixels_a": ("pixels A", "pixels of the concept in A over the shared images"),
    "pixels_b": ("pixels B", "pixels of the concept in B over the shared images"),
    "intersection": ("both", "pixels where both masks hold"),
}

ImagePairs = tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]


class Aligner(Protocol):
    """What compares names through a taxonomy (:class:`~pyneuron.concepts.lexicon.Lexicon`)."""

    def align(self, names_a: Sequence[str], names_b: Sequence[str]) -> Mapping[str, str]:
        """Each name of both lists -> the name it shares with the other list."""
        ...


def canonical_formula(formula: Formula | str) -> Formula:
    """A formula in a canonical form: chains of AND (and of OR) flattened, their operands
    canonical, repeated operands dropped, sorted (plain before negated, then by text), and
    rebuilt left-deep; double negations removed. Equal canonical forms mean equivalent
    formulas (not the converse: distributivity and De Morgan are not applied).

    Examples
    --------
    >>> str(canonical_formula("(water OR river) AND NOT blue"))
    '((river OR water) AND NOT blue)'
    >>> str(canonical_formula("NOT NOT b OR (a OR b)"))
    '(a OR b)'
    """
    tree = Formula.parse(formula) if isinstance(formula, str) else formula
    if isinstance(tree, Concept):
        return tree
    if isinstance(tree, Not):
        inner = canonical_formula(tree.operand)
        return inner.operand if isinstance(inner, Not) else Not(inner)
    if not isinstance(tree, BinaryOp):
        raise PyneuronError(f"not a formula: {tree!r}")
    kind = type(tree)
    operands: list[Formula] = []
    pending: list[Formula] = [tree]
    while pending:  # flatten the chain of `kind` (left operands first)
        node = pending.pop()
        if not isinstance(node, kind):
            node = canonical_formula(node)  # may collapse into a chain of `kind`
        if isinstance(node, kind):
            pending += [node.right, node.left]
        else:
            operands.append(node)
    unique = {str(f): f for f in operands}
    ordered = sorted(unique.values(), key=lambda f: (isinstance(f, Not), str(f)))
    result = ordered[0]
    for operand in ordered[1:]:
        result = kind(result, operand)
    return result


def renamed_formula(formula: Formula | str, mapping: Mapping[str, str]) -> Formula:
    """The formula with concept names replaced through ``mapping`` (others kept).

    Examples
    --------
    >>> str(renamed_formula("oak OR NOT sky", {"oak": "tree"}))
    '(tree OR NOT sky)'
    """
    tree = Formula.parse(formula) if isinstance(formula, str) else formula
    if isinstance(tree, Concept):
        return Concept(mapping.get(tree.name, tree.name))
    if isinstance(tree, Not):
        return Not(renamed_formula(tree.operand, mapping))
    if isinstance(tree, (And, Or)):
        return type(tree)(renamed_formula(tree.left, mapping), renamed_formula(tree.right, mapping))
    raise PyneuronError(f"not a formula: {tree!r}")


def mask_overlaps(
    pairs: Sequence[tuple[Formula, Formula]],
    store_a: ConceptStore,
    store_b: ConceptStore,
    *,
    images: ImagePairs | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Pixel counts of pairs of formulas, the first of each pair evaluated on ``store_a``,
    the second on ``store_b``, over matched images.

    Parameters
    ----------
    pairs
        (formula on ``store_a``, formula on ``store_b``) pairs.
    store_a, store_b
        Concept stores on images of one height and width.
    images
        (image ids of ``store_a``, image ids of ``store_b``): the images compared, the
        k-th of one with the k-th of the other, each distinct. ``None``: all images,
        image ``i`` with image ``i`` (the stores must hold as many).
    progress
        Show a progress bar over image blocks.

    Returns
    -------
    pandas.DataFrame
        One row per pair: ``pixels_a``, ``pixels_b``, ``intersection`` (int64) and
        ``iou`` (intersection / union; NaN when both masks are empty).

    Examples
    --------
    >>> masks = np.zeros((2, 2, 2, 2), dtype=bool); masks[0, :, 0] = True; masks[1, 0] = True
    >>> a = ConceptStore.from_masks(masks, ["top", "first"])
    >>> b = ConceptStore.from_masks(masks[::-1], ["all", "upper"])
    >>> mask_overlaps([(Concept("top"), Concept("upper"))], a, b)
       pixels_a  pixels_b  intersection  iou
    0         4         4             4  1.0
    """
    ids_a, ids_b = _matched_images(store_a, store_b, images)
    counts = np.zeros((len(pairs), 3), dtype=np.int64)
    step = max(1, BLOCK_PIXELS // store_a.grid.pixels)
    blocks = range(0, ids_a.shape[0] if pairs else 0, step)
    with progress_bar(total=len(blocks), desc="masks", unit="block", enabled=progress) as bar:
        for start in blocks:
            part_a = store_a.take_images(ids_a[start : start + step])
            part_b = store_b.take_images(ids_b[start : start + step])
            for k, (formula_a, formula_b) in enumerate(pairs):
                mask_a, mask_b = formula_a.mask(part_a), formula_b.mask(part_b)
                counts[k] += (
                    np.count_nonzero(mask_a),
                    np.count_nonzero(mask_b),
                    np.count_nonzero(mask_a & mask_b),
                )
            bar.update(1)
    union = counts[:, 0] + counts[:, 1] - counts[:, 2]
    iou = np.full(len(pairs), np.nan)
    np.divide(counts[:, 2], union, out=iou, where=union > 0)
    return pd.DataFrame(
        {
            "pixels_a": counts[:, 0],
            "pixels_b": counts[:, 1],
            "intersection": counts[:, 2],
            "iou": iou,
        }
    )


def _matched_images(
    store_a: ConceptStore, store_b: ConceptStore, images: ImagePairs | None
) -> tuple[np.ndarray, np.ndarray]:
    """The checked image ids (int64) of ``images`` (see :func:`mask_overlaps`)."""
    grid_a, grid_b = store_a.grid, store_b.grid
    if (grid_a.height, grid_a.width) != (grid_b.height, grid_b.width):
        raise GridMismatchError(
            f"the concept stores are on {grid_a.height}x{grid_a.width} and "
            f"{grid_b.height}x{grid_b.width} grids; masks are compared pixel by pixel, so "
            "build both at the same grid size"
        )
    if images is None:
        if grid_a.n_images != grid_b.n_images:
            raise PyneuronError(
                f"the concept stores cover {grid_a.n_images} and {grid_b.n_images} images; "
                "give the matching images (images=(ids_a, ids_b))"
            )
        everything = np.arange(grid_a.n_images, dtype=np.int64)
        return everything, everything
    found = []
    for ids, grid, side in zip(images, (grid_a, grid_b), "ab", strict=True):
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise PyneuronError(f"image ids of store {side} must be a 1-D array of integers")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= grid.n_images):
            raise PyneuronError(f"image ids of store {side} must lie in [0, {grid.n_images})")
        if np.unique(ids).shape[0] != ids.shape[0]:
            raise PyneuronError(f"image ids of store {side} must be distinct")
        found.append(ids)
    if found[0].shape != found[1].shape:
        raise PyneuronError(
            f"{found[0].shape[0]} image ids of store a but {found[1].shape[0]} of store b; "
            "give them in matching pairs"
        )
    if not found[0].size:
        raise PyneuronError("no images to compare: the two sources share none")
    return found[0], found[1]


def formula_agreement(
    results_a: pd.DataFrame,
    results_b: pd.DataFrame,
    store_a: ConceptStore,
    store_b: ConceptStore,
    *,
    images: ImagePairs | None = None,
    lexicon: Aligner | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """The formulas of two results tables, unit by unit, with their agreement (see the
    module docstring).

    Parameters
    ----------
    results_a, results_b
        Results with ``layer``, ``unit`` and ``formula`` (and ``iou``) columns, and a
        ``range`` column in both or neither (activation ranges): rows are matched on
        (layer, unit[, range]).
    store_a, store_b
        The concept stores each table's formulas were found on.
    images
        The images compared, as for :func:`mask_overlaps`.
    lexicon
        Compare names through their common hypernyms too (adds the ``hypernym_*``
        columns).
    progress
        Show progress.

    Returns
    -------
    pandas.DataFrame
        One row per (layer, unit[, range]) of either table, in layer order of
        appearance, then unit (and range), with the columns of :data:`UNIT_COLUMNS`:
        the keys, ``runs`` (``"both"``, ``"a"`` or ``"b"``), ``formula_a``,
        ``formula_b``, ``exact`` and ``same_concepts`` (nullable booleans, missing
        unless both formulas are there), ``formula_iou``, ``pixels_a``, ``pixels_b``,
        ``intersection`` (nullable integers), ``iou_a`` and ``iou_b`` (each formula's
        own IoU with its unit, when the tables have ``iou``), and with a lexicon
        ``hypernym_a``, ``hypernym_b`` (the canonical formulas after mapping),
        ``hypernym_exact`` and ``hypernym_same_concepts``.

    Examples
    --------
    >>> masks = np.zeros((3, 2, 2, 2), dtype=bool)
    >>> masks[0, :, 0] = True; masks[1, 0] = True; masks[2, :, :, 0] = True
    >>> store = ConceptStore.from_masks(masks, ["top", "first", "left"])
    >>> a = pd.DataFrame({"layer": "l", "unit": [0, 1], "formula": ["top OR left", "first"]})
    >>> b = pd.DataFrame({"layer": "l", "unit": [0, 1], "formula": ["left OR top", "left"]})
    >>> formula_agreement(a, b, store, store)[["unit", "exact", "formula_iou"]]
       unit  exact  formula_iou
    0     0   True     1.000000
    1     1  False     0.333333
    """
    keys = _keys(results_a, results_b)
    kept = [*keys, "formula"] + (["iou"] if "iou" in results_a and "iou" in results_b else [])
    table = pd.merge(
        _unique(results_a, keys, "a")[kept],
        _unique(results_b, keys, "b")[kept],
        on=keys,
        how="outer",
        suffixes=("_a", "_b"),
        indicator="runs",
        sort=False,
    )
    table["runs"] = (
        table["runs"].astype(object).map({"both": "both", "left_only": "a", "right_only": "b"})
    )
    order = {
        layer: k
        for k, layer in enumerate(dict.fromkeys([*results_a["layer"], *results_b["layer"]]))
    }
    table = table.sort_values(keys, key=lambda c: c.map(order) if c.name == "layer" else c)
    table = table.reset_index(drop=True)
    both = table["formula_a"].notna() & table["formula_b"].notna()
    formulas_a = [Formula.parse(f) for f in table.loc[both, "formula_a"]]
    formulas_b = [Formula.parse(f) for f in table.loc[both, "formula_b"]]
    _check_concepts(formulas_a, store_a, "a")
    _check_concepts(formulas_b, store_b, "b")
    overlaps = mask_overlaps(
        list(zip(formulas_a, formulas_b)), store_a, store_b, images=images, progress=progress
    )
    pairs = list(zip(formulas_a, formulas_b))
    _fill_agreement(table, both, "", pairs)
    _fill(table, both, "formula_iou", overlaps["iou"], "float64")
    for column in ("pixels_a", "pixels_b", "intersection"):
        _fill(table, both, column, overlaps[column], "Int64")
    if lexicon is not None:
        mapped = []
        for fa, fb in pairs:
            names = lexicon.align(fa.concepts(), fb.concepts())
            mapped.append((renamed_formula(fa, names), renamed_formula(fb, names)))
        _fill(table, both, "hypernym_a", [str(canonical_formula(f)) for f, _ in mapped], "object")
        _fill(table, both, "hypernym_b", [str(canonical_formula(f)) for _, f in mapped], "object")
        _fill_agreement(table, both, "hypernym_", mapped)
    return table[[c for c in UNIT_COLUMNS if c in table.columns]]


def layer_agreement(units: pd.DataFrame) -> pd.DataFrame:
    """Per layer, the agreement of a :func:`formula_agreement` table: one row per layer
    (in order of appearance) with the columns of :data:`LAYER_COLUMNS` (the
    ``hypernym_*`` ones only when ``units`` has them; shares are NaN for a layer with
    no compared unit).

    Examples
    --------
    >>> units = pd.DataFrame({"layer": ["l", "l", "l"], "runs": ["both", "both", "a"],
    ...     "formula_a": ["a", "b", "c"], "formula_b": ["a", "c", None],
    ...     "exact": pd.array([True, False, None], dtype="boolean"),
    ...     "same_concepts": pd.array([True, False, None], dtype="boolean"),
    ...     "formula_iou": [1.0, 0.5, np.nan]})
    >>> layer_agreement(units)[["layer", "units", "compared", "exact", "mean_formula_iou"]]
      layer  units  compared  exact  mean_formula_iou
    0     l      2         2    0.5              0.75
    """
    rows = []
    shares = [
        c
        for c in ("exact", "same_concepts", "hypernym_exact", "hypernym_same_concepts")
        if c in units
    ]
    for layer, group in units.groupby("layer", sort=False):
        compared = group["formula_a"].notna() & group["formula_b"].notna()
        ious = group.loc[compared, "formula_iou"].to_numpy(dtype=np.float64)
        ious = ious[np.isfinite(ious)]
        row: dict[str, Any] = {
            "layer": layer,
            "units": int((group["runs"] == "both").sum()),
            "compared": int(compared.sum()),
        }
        for column in shares:
            values = group.loc[compared, column].astype(bool)
            row[column] = float(values.mean()) if len(values) else np.nan
        row["mean_formula_iou"] = float(ious.mean()) if ious.size else np.nan
        row["median_formula_iou"] = float(np.median(ious)) if ious.size else np.nan
        row["only_a"] = int((group["runs"] == "a").sum())
        row["only_b"] = int((group["runs"] == "b").sum())
        rows.append(row)
    columns = [c for c in LAYER_COLUMNS if not c.startswith("hypernym_") or c in units]
    return pd.DataFrame(rows, columns=columns)


def concept_agreement(
    store_a: ConceptStore,
    store_b: ConceptStore,
    *,
    mapping: Mapping[str, str] | None = None,
    images: ImagePairs | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """How two concept sources agree on each concept they share: the IoU of its two masks
    over the matched images (e.g. a segmenter's masks against human annotations).

    Parameters
    ----------
    store_a, store_b
        The two stores, on images of one height and width.
    mapping
        Names of ``store_a`` -> names of ``store_b`` for concepts named differently
        (default: concepts of the same name are compared).
    images
        The images compared, as for :func:`mask_overlaps`.
    progress
        Show progress.

    Returns
    -------
    pandas.DataFrame
        One row per concept of ``store_a`` whose (mapped) name is a concept of
        ``store_b``, in ``store_a``'s order: ``concept_a``, ``concept_b``,
        ``category_a``, ``category_b``, ``pixels_a``, ``pixels_b``, ``intersection``
        and ``iou`` (as for :func:`mask_overlaps`).

    Examples
    --------
    >>> masks = np.zeros((2, 1, 2, 2), dtype=bool); masks[0, 0, 0] = True; masks[1, 0] = True
    >>> human = ConceptStore.from_masks(masks, ["sky", "sea"])
    >>> model = ConceptStore.from_masks(masks[::-1], ["sky", "water"])
    >>> concept_agreement(human, model, mapping={"sea": "water"})[["concept_a", "iou"]]
      concept_a  iou
    0       sky  0.5
    1       sea  0.5
    """
    mapping = dict(mapping or {})
    for name in mapping:
        store_a.index(name)  # an unknown name fails here, with close names
    known = set(store_b.names)
    pairs = [(a, mapping.get(a, a)) for a in store_a.names if mapping.get(a, a) in known]
    overlaps = mask_overlaps(
        [(Concept(a), Concept(b)) for a, b in pairs],
        store_a,
        store_b,
        images=images,
        progress=progress,
    )
    categories_a, categories_b = store_a.categories, store_b.categories
    table = pd.DataFrame(
        {
            "concept_a": [a for a, _ in pairs],
            "concept_b": [b for _, b in pairs],
            "category_a": [categories_a[store_a.index(a)] for a, _ in pairs],
            "category_b": [categories_b[store_b.index(b)] for _, b in pairs],
        }
    )
    return pd.concat([table, overlaps], axis=1)


def _keys(results_a: pd.DataFrame, results_b: pd.DataFrame) -> list[str]:
    for table, side in ((results_a, "a"), (results_b, "b")):
        if not isinstance(table, pd.DataFrame):
            raise PyneuronError(f"results {side} must be a DataFrame, got {type(table).__name__}")
        for column in ("layer", "unit", "formula"):
            if column not in table.columns:
                raise PyneuronError(f"results {side} have no {column!r} column")
    ranges = ["range" in results_a.columns, "range" in results_b.columns]
    if ranges[0] != ranges[1]:
        side = "a" if ranges[0] else "b"
        raise PyneuronError(
            f"results {side} explain activation ranges (a 'range' column) and the others do "
            "not; compare runs made with the same ranges"
        )
    return ["layer", "unit", "range"] if ranges[0] else ["layer", "unit"]


def _unique(results: pd.DataFrame, keys: list[str], side: str) -> pd.DataFrame:
    repeated = results.duplicated(keys)
    if repeated.any():
        first = results.loc[repeated, keys].iloc[0].tolist()
        raise PyneuronError(
            f"results {side} hold {dict(zip(keys, first))} more than once; give one row per "
            "unit (the best of each beam)"
        )
    return results


def _check_concepts(formulas: list[Formula], store: ConceptStore, side: str) -> None:
    known = set(store.names)
    missing = sorted({name for f in formulas for name in f.concepts()} - known)
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise PyneuronError(
            f"formulas of {side} use concepts that its concept store lacks ({shown}): give "
            "the store the formulas were found on"
        )


def _fill_agreement(
    table: pd.DataFrame, rows: pd.Series, prefix: str, pairs: list[tuple[Formula, Formula]]
) -> None:
    """Add ``{prefix}exact`` and ``{prefix}same_concepts`` of formula pairs on ``rows``."""
    exact = [str(canonical_formula(a)) == str(canonical_formula(b)) for a, b in pairs]
    same = [set(a.concepts()) == set(b.concepts()) for a, b in pairs]
    _fill(table, rows, f"{prefix}exact", exact, "boolean")
    _fill(table, rows, f"{prefix}same_concepts", same, "boolean")


def _fill(table: pd.DataFrame, rows: pd.Series, column: str, values: Any, dtype: str) -> None:
    """Add ``column`` to ``table``: ``values`` on ``rows``, missing elsewhere."""
    full = pd.Series(pd.array([None] * len(table), dtype=dtype), index=table.index)
    full[rows] = pd.array(list(values), dtype=dtype)
    table[column] = full
