"""The HTML report: an index of layers and units, a page per unit, a page per concept."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ..engine.atomic import commit_entries
from ..engine.formula import BinaryOp, Concept, Formula, Not
from ..engine.netdissect import check_mode
from ..engine.search import AUDIT_VERDICTS
from ..engine.store import ConceptStore
from ..engine.units import UnitMasks
from ..errors import PyneuronError
from ..progress import progress_bar
from .images import (
    THUMBNAIL_SIZE,
    as_rgb,
    colors_css,
    image_iou,
    overlay,
    save_png,
    thumbnail,
    thumbnail_scale,
)
from .names import Slugger
from .plots import INTERPRETABLE_IOU, heldout_scatter, iou_histogram, iou_vs_null

#: What a report puts at the top of its directory (``index.html`` is written last).
ENTRIES = ("units", "concepts", "img", "static", "index.html")
#: Top images shown per unit when ``top_images`` has none for its layer.
DEFAULT_TOP_IMAGES = 8
#: Top images in a unit's strip of thumbnails on the index page.
INDEX_STRIP = 6
#: Width in CSS pixels of a thumbnail in the index strip.
INDEX_STRIP_WIDTH = 40
#: Example images on a concept page: those with the largest concept area among
#: up to ``CONCEPT_CANDIDATES`` images drawn where the concept is present.
CONCEPT_EXAMPLES = 6
CONCEPT_CANDIDATES = 64

# column -> (header, tooltip)
_COLUMNS: dict[str, tuple[str, str]] = {
    "iou": ("IoU", "intersection over union of unit mask and formula mask over all images"),
    "score": ("score", "the beam search objective: IoU times the length penalty"),
    "length": ("length", "concepts in the formula, each NOT counting as one more"),
    "detection_accuracy": (
        "detection acc.",
        "|F∧A| / |A|: share of the unit's pixels inside the formula mask",
    ),
    "activation_coverage": (
        "activation cov.",
        "|F∧A| / |F|: share of the formula's pixels where the unit fires",
    ),
    "samples_coverage": (
        "samples cov.",
        "images where unit and formula overlap / images where the unit fires",
    ),
    "explanation_coverage": (
        "explanation cov.",
        "images where unit and formula overlap / images where the formula holds",
    ),
    "primitive_iou": ("primitive IoU", "IoU of the best single concept"),
    "unit_pixels": ("unit pixels", "pixels where the unit fires, over all images"),
    "unit_images": ("unit images", "images where the unit fires"),
    "threshold": ("threshold", "activation threshold of the unit mask"),
    "lower": ("lower", "lower end of the activation range"),
    "upper": ("upper", "upper end of the activation range"),
    "split_iou": (
        "IoU (split)",
        "IoU of the formula found on the images not held out, on those images",
    ),
    "iou_heldout": ("held-out IoU", "IoU of the formula on images the search did not see"),
    "iou_drop": ("IoU drop", "in-sample IoU minus held-out IoU"),
    "p_value": (
        "p-value",
        "share of control units (shuffled, rolled masks) explained at least as well",
    ),
    "z_score": ("z", "(IoU − mean IoU of the control units) / their standard deviation"),
    "above_null": ("above null", "p-value below the chosen level: better than control units"),
    "activation_drop": (
        "act. drop",
        "relative drop of the peak activation on top images when the formula's pixels are filled",
    ),
    "activation_drop_random": (
        "act. drop (random)",
        "the same drop when random regions of the same area are filled",
    ),
}
#: Evaluation columns (``pyneuron evaluate``), shown wherever a table has them.
_EVALUATION_COLUMNS = (
    "iou_heldout",
    "iou_drop",
    "p_value",
    "z_score",
    "above_null",
    "activation_drop",
    "activation_drop_random",
)

_NETDISSECT_IOU = (
    "NetDissect-Lite's IoU: the unit's pixels count only in images where the concept's "
    "category meets the unit"
)


def _column_help(iou: str) -> dict[str, tuple[str, str]]:
    """Column headers and tooltips for results computed with IoU mode ``iou``."""
    if iou == "dataset":
        return _COLUMNS
    return {
        **_COLUMNS,
        "iou": ("IoU", _NETDISSECT_IOU),
        "primitive_iou": ("primitive IoU", _NETDISSECT_IOU),
    }


_INDEX_COLUMNS = (
    "iou",
    "detection_accuracy",
    "activation_coverage",
    "samples_coverage",
    "explanation_coverage",
    "length",
    "primitive_iou",
    "unit_pixels",
    "threshold",
    *_EVALUATION_COLUMNS,
)
_UNIT_METRICS = (
    "iou",
    "score",
    "length",
    "detection_accuracy",
    "activation_coverage",
    "samples_coverage",
    "explanation_coverage",
    "primitive_iou",
    "unit_pixels",
    "unit_images",
    "threshold",
    "lower",
    "upper",
    "split_iou",
    *_EVALUATION_COLUMNS,
)
_BEAM_COLUMNS = ("score", "iou", "detection_accuracy", "activation_coverage", "length")
_NO_EXPLANATION = "no explanation"

ImageSource = Callable[[int], np.ndarray]
UnitMaskSource = Mapping[str, "Sequence[UnitMasks] | UnitMasks"]


def write_report(
    out_dir: str | os.PathLike[str],
    results: pd.DataFrame,
    store: ConceptStore,
    *,
    unit_masks: UnitMaskSource,
    images: ImageSource | None,
    top_images: Mapping[str, np.ndarray],
    beam: pd.DataFrame | None = None,
    title: str = "pyneuron report",
    max_units: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    thumbnail_size: int = THUMBNAIL_SIZE,
    descriptions: pd.DataFrame | None = None,
    null: pd.DataFrame | None = None,
    iou: str = "dataset",
) -> Path:
    """Write a static HTML report of explained units.

    The report is a self-contained folder (relative links only, so it can be moved
    or zipped)::

        index.html                     layers: summary, IoU histogram, sortable unit table
        units/<layer>/<unit>.html      a unit: metrics, formula, beam, top images
        units/<layer>/<unit>-r<k>.html the same for activation range k
        concepts/<concept>.html        a concept: example masks, units whose formula uses it
        img/                           PNG thumbnails, overlays and plots
        static/report.css

    ``<layer>`` and ``<concept>`` are slugs (see :func:`pyneuron.report.slugify`),
    made unique with ``-2``, ``-3``, ... Each top image is drawn with the unit mask
    and the formula mask over it (colours: :mod:`pyneuron.report.images`); the index
    shows the first few of them as a strip under each unit's formula (lazy-loaded).

    Everything is written into a hidden temporary directory inside ``out_dir`` and
    moved into place at the end (``index.html`` last), so a failure leaves no
    report entries behind; other files in ``out_dir`` (result tables) are not touched.

    Parameters
    ----------
    out_dir
        Report directory (created if missing).
    results
        One row per (layer, unit) or (layer, unit, range): the table of
        :func:`pyneuron.explain` / :func:`pyneuron.dissect` (``unit``, ``formula`` and
        ``iou`` are required; ``layer`` may be left out for a single layer). A missing
        formula renders as "no explanation".
    store
        The concept store the formulas were searched on.
    unit_masks
        Layer -> its :class:`UnitMasks`, or for activation ranges a sequence of them
        indexed by ``range``. A layer left out is drawn with formula masks only.
    images
        Image id -> uint8 RGB image (height, width, 3) of any size; it is resized to
        the store's grid. ``None`` draws the masks on grey.
    top_images
        Layer -> int array (n_units, k) of image ids, best first (negative ids are
        padding), or (n_ranges, n_units, k) per activation range. A layer left out shows
        the images where the unit mask covers the most pixels. Where unit masks are
        given, only images where the unit fires (its mask is not empty) are shown.
    beam
        The full-beam table (``explain(..., full_beam=True)`` with a ``layer`` column):
        the runner-up formulas shown on each unit page.
    title
        Title of every page.
    max_units
        Only write unit pages for the best ``max_units`` rows per layer by IoU (the
        index still lists every row).
    progress
        Show a progress bar (on a terminal).
    overwrite
        Replace the entries of an earlier report in ``out_dir``; without it an
        existing report entry raises ``FileExistsError``.
    thumbnail_size
        Thumbnails are the grid scaled up by a whole factor until the longer side
        reaches this many pixels.

    descriptions
        Optional label-free descriptions (``pyneuron describe`` results: ``layer``,
        ``unit``, ``method``, ``label``, ``score``), shown on unit pages with their
        agreement with the formula (:func:`pyneuron.describe.agreement`).
    null
        Optional control-unit explanations (:func:`pyneuron.null_baseline` tables with a
        ``layer`` column): each layer gets a plot of its units' IoU against the controls'.
        Held-out columns (``iou_heldout``) add a held-out vs in-sample scatter, and rows
        with ``above_null`` false are marked.
    iou
        How the results' IoU was computed (``explain(..., mode=...)``): ``"dataset"``
        or ``"netdissect"``; only the column's explanation changes.

    Returns
    -------
    pathlib.Path
        The path of ``index.html``.

    Raises
    ------
    FileExistsError
        If ``out_dir`` already holds report entries and ``overwrite`` is false.
    PyneuronError
        On inconsistent inputs (missing columns, unknown concepts, unit masks on
        another grid, units or images out of range).
    """
    if not isinstance(store, ConceptStore):
        raise PyneuronError(f"expected a ConceptStore, got {type(store).__name__}")
    if not isinstance(results, pd.DataFrame):
        raise PyneuronError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    if max_units is not None and (
        isinstance(max_units, bool) or not isinstance(max_units, (int, np.integer)) or max_units < 0
    ):
        raise PyneuronError(f"max_units must be a non-negative integer or None, got {max_units!r}")
    if (
        isinstance(thumbnail_size, bool)
        or not isinstance(thumbnail_size, int)
        or thumbnail_size < 1
    ):
        raise PyneuronError(f"thumbnail_size must be a positive integer, got {thumbnail_size!r}")
    plan = _Plan(store, results, unit_masks, top_images, beam, max_units)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = [name for name in ENTRIES if os.path.lexists(out / name)]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a report ({', '.join(existing)}); "
            "pass overwrite=True to replace it"
        )
    staging = Path(tempfile.mkdtemp(prefix=".report.tmp-", dir=out))
    try:
        site = _Site(staging, title)
        pictures = _Pictures(store, images, staging, thumbnail_size)
        _render(
            plan,
            site,
            pictures,
            descriptions=_group_descriptions(descriptions),
            null=_group_null(null),
            column_help=_column_help(check_mode(iou)),
            progress=progress,
        )
        commit_entries(staging, out, ENTRIES)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "index.html"


def _group_null(table: pd.DataFrame | None) -> dict[str | None, np.ndarray]:
    """Control-unit IoUs per layer (key None: a table without a ``layer`` column)."""
    if table is None:
        return {}
    if not isinstance(table, pd.DataFrame) or "iou" not in table.columns:
        raise PyneuronError("null must be a DataFrame with an 'iou' column (null_baseline)")
    if "layer" not in table.columns:
        return {None: table["iou"].to_numpy(dtype=np.float64)}
    return {
        str(layer): group["iou"].to_numpy(dtype=np.float64)
        for layer, group in table.groupby("layer", sort=False)
    }


def _group_descriptions(table: pd.DataFrame | None) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Label-free descriptions (``pyneuron describe`` results) per (layer, unit)."""
    if table is None:
        return {}
    missing = {"layer", "unit", "method", "label"} - set(table.columns)
    if missing:
        raise PyneuronError(f"the descriptions table lacks {', '.join(sorted(missing))}")
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in table.to_dict("records"):
        key = (str(record["layer"]), int(record["unit"]))
        grouped.setdefault(key, []).append(record)
    return grouped


# -- planning: validate the inputs and decide every page and file name ----------------


@dataclass
class _Row:
    layer: str
    unit: int
    range: int | None
    values: dict[str, Any]
    formula: Formula | None
    text: str | None
    masks: UnitMasks | None = None
    top: list[int] = field(default_factory=list)
    dropped: int = 0  # given top images left out because the unit does not fire there
    overlays: list[tuple[int, str]] = field(default_factory=list)  # (image, path) drawn
    page: str | None = None  # path from the report root, when the page is written
    stem: str = ""


class _Plan:
    """Validated inputs: rows per layer, pages, concept usage, beam groups."""

    def __init__(
        self,
        store: ConceptStore,
        results: pd.DataFrame,
        unit_masks: UnitMaskSource,
        top_images: Mapping[str, np.ndarray],
        beam: pd.DataFrame | None,
        max_units: int | None,
    ) -> None:
        self.store = store
        self.max_units = max_units
        self._parsed: dict[str, Formula] = {}
        missing = {"unit", "formula", "iou"} - set(results.columns)
        if missing:
            raise PyneuronError(f"results lack the column(s) {', '.join(sorted(missing))}")
        unit_masks = dict(unit_masks or {})
        top_images = dict(top_images or {})
        self.default_layer = _default_layer(results, unit_masks)
        self.has_range = "range" in results.columns
        self.columns = [c for c in results.columns]
        self.concept_slug = Slugger(store.names)
        self.concept_names = set(store.names)
        self.layer_slug = Slugger()

        self.layers: dict[str, list[_Row]] = {}
        seen: set[tuple[str, int, int | None]] = set()
        for values in results.to_dict("records"):
            row = self._row(values)
            key = (row.layer, row.unit, row.range)
            if key in seen:
                raise PyneuronError(
                    f"results hold several rows for unit {row.unit} of layer {row.layer!r}"
                    + (f", range {row.range}" if row.range is not None else "")
                    + "; pass the full beam as beam=, and one row per unit as results"
                )
            seen.add(key)
            self.layers.setdefault(row.layer, []).append(row)
        for layer in self.layers:
            self.layer_slug(layer)

        for layer, rows in self.layers.items():
            for row in rows:
                row.masks = _unit_masks_for(unit_masks, row, store)
                given = _top_images_for(top_images, row, store.grid.n_images)
                row.top = _where_unit_fires(row, given)
                row.dropped = len(given) - len(row.top)
            rows.sort(key=_by_iou)
            chosen = rows if max_units is None else rows[:max_units]
            for row in chosen:
                row.stem = str(row.unit) if row.range is None else f"{row.unit}-r{row.range}"
                row.page = f"units/{self.layer_slug(layer)}/{row.stem}.html"

        self.beam_given = beam is not None
        self.beam = self._beam_groups(beam)
        self.uses: dict[str, list[_Row]] = defaultdict(list)
        self.primitive_of: dict[str, list[_Row]] = defaultdict(list)
        linked: set[str] = set()
        for rows in self.layers.values():
            for row in rows:
                if row.formula is not None:
                    for name in row.formula.concepts():
                        self.uses[name].append(row)
                primitive = row.values.get("primitive")
                if isinstance(primitive, str) and primitive in self.concept_names:
                    self.primitive_of[primitive].append(row)
        for rows in self.beam.values():
            for entry in rows:
                if entry["formula"] is not None:
                    linked.update(entry["formula"].concepts())
        linked.update(self.uses, self.primitive_of)
        #: concepts that get a page, in store order
        self.concepts = [name for name in store.names if name in linked]
        self.concept_pages = set(self.concepts)

    def concept_page(self, name: str) -> str:
        return f"concepts/{self.concept_slug(name)}.html"

    def parse(self, text: str, where: str) -> Formula:
        if text not in self._parsed:
            try:
                formula = Formula.parse(text)
            except PyneuronError as error:
                raise PyneuronError(f"{where}: {error}") from None
            for name in formula.concepts():
                try:
                    self.store.index(name)
                except KeyError as error:
                    raise PyneuronError(f"{where}: formula {text!r}: {error.args[0]}") from None
            self._parsed[text] = formula
        return self._parsed[text]

    def _row(self, values: dict[str, Any]) -> _Row:
        layer = values.get("layer", self.default_layer)
        layer = self.default_layer if _missing(layer) else str(layer)
        unit = _int(values["unit"], "unit")
        range_ = None
        if self.has_range and not _missing(values.get("range")):
            range_ = _int(values["range"], "range")
        text = values.get("formula")
        formula = None
        if not _missing(text) and str(text).strip():
            formula = self.parse(str(text), f"unit {unit} of layer {layer!r}")
            text = str(formula)
        else:
            text = None
        return _Row(layer, unit, range_, values, formula, text)

    def _beam_groups(self, beam: pd.DataFrame | None) -> dict[tuple, list[dict[str, Any]]]:
        if beam is None:
            return {}
        if not isinstance(beam, pd.DataFrame):
            raise PyneuronError(f"beam must be a pandas DataFrame, got {type(beam).__name__}")
        missing = {"unit", "formula"} - set(beam.columns)
        if missing:
            raise PyneuronError(f"the beam table lacks the column(s) {', '.join(sorted(missing))}")
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for position, values in enumerate(beam.to_dict("records")):
            layer = values.get("layer", self.default_layer)
            layer = self.default_layer if _missing(layer) else str(layer)
            unit = _int(values["unit"], "unit")
            range_ = None
            if "range" in values and not _missing(values["range"]):
                range_ = _int(values["range"], "range")
            text = values["formula"]
            formula = None
            if not _missing(text) and str(text).strip():
                formula = self.parse(str(text), f"beam of unit {unit} of layer {layer!r}")
            rank = values.get("rank", position)
            values["rank"] = position if _missing(rank) else _int(rank, "rank")
            values["formula"] = formula
            groups[(layer, unit, range_)].append(values)
        for rows in groups.values():
            rows.sort(key=lambda v: v["rank"])
        return dict(groups)


def _default_layer(results: pd.DataFrame, unit_masks: Mapping[str, Any]) -> str:
    if "layer" in results.columns:
        return ""
    if len(unit_masks) == 1:
        return str(next(iter(unit_masks)))
    if not unit_masks:
        return "units"
    raise PyneuronError(
        "results have no 'layer' column but unit_masks holds several layers; add a layer column"
    )


def _unit_masks_for(
    unit_masks: Mapping[str, Any], row: _Row, store: ConceptStore
) -> UnitMasks | None:
    value = unit_masks.get(row.layer)
    if value is None:
        return None
    where = f"layer {row.layer!r}"
    if isinstance(value, UnitMasks):
        if row.range not in (None, 0):
            raise PyneuronError(
                f"results of {where} have activation ranges; pass one UnitMasks per range index"
            )
        masks = value
    else:
        sequence = list(value)
        index = 0 if row.range is None else row.range
        if row.range is None and len(sequence) != 1:
            raise PyneuronError(
                f"results of {where} have no range column but {len(sequence)} unit masks are given"
            )
        if not 0 <= index < len(sequence):
            raise PyneuronError(
                f"results of {where} hold range {index} but {len(sequence)} unit masks are given"
            )
        masks = sequence[index]
        if not isinstance(masks, UnitMasks):
            raise PyneuronError(
                f"unit masks of {where} must be UnitMasks, got {type(masks).__name__}"
            )
    store.grid.require_same(masks.grid, f"unit masks of {where} vs concept store")
    if not 0 <= row.unit < len(masks):
        raise PyneuronError(
            f"results hold unit {row.unit} of {where} but its unit masks have {len(masks)} units"
        )
    return masks


def _top_images_for(top_images: Mapping[str, Any], row: _Row, n_images: int) -> list[int]:
    value = top_images.get(row.layer)
    where = f"top images of layer {row.layer!r}"
    if value is None:
        if row.masks is None:
            return []
        return _busiest_images(row.masks, row.unit, DEFAULT_TOP_IMAGES)
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.integer):
        raise PyneuronError(f"{where} must be integer image ids, got {array.dtype}")
    if array.ndim == 3:
        index = 0 if row.range is None else row.range
        if not 0 <= index < array.shape[0]:
            raise PyneuronError(f"{where} have {array.shape[0]} ranges, results hold range {index}")
        array = array[index]
    if array.ndim != 2:
        raise PyneuronError(f"{where} must have shape (units, k) or (ranges, units, k)")
    if not 0 <= row.unit < array.shape[0]:
        raise PyneuronError(f"{where} cover {array.shape[0]} units, results hold unit {row.unit}")
    ids = [int(i) for i in array[row.unit] if i >= 0]
    bad = [i for i in ids if i >= n_images]
    if bad:
        raise PyneuronError(f"{where}: image {bad[0]} is out of range for {n_images} images")
    return ids


def _where_unit_fires(row: _Row, images: list[int]) -> list[int]:
    """The images (in the order given) where the row's unit mask is not empty; all of
    them when the row has no unit masks."""
    if row.masks is None or not images:
        return images
    fires = np.isin(np.asarray(images, dtype=np.int64), row.masks.images_with(row.unit))
    return [image for image, keep in zip(images, fires.tolist()) if keep]


def _busiest_images(masks: UnitMasks, unit: int, k: int) -> list[int]:
    """The k images where a unit's mask covers the most pixels (ties: smaller id)."""
    arrays = masks.arrays
    begin, end = int(arrays.offsets[unit]), int(arrays.offsets[unit + 1])
    images = arrays.images[begin:end].astype(np.int64)
    counts = arrays.counts[begin:end].astype(np.int64)
    order = np.lexsort((images, -counts))[:k]
    return images[order].tolist()


def _by_iou(row: _Row) -> tuple[bool, float, int, int]:
    iou = row.values.get("iou")
    value = float(iou) if not _missing(iou) else math.nan
    missing = math.isnan(value)
    return (missing, -value if not missing else 0.0, row.unit, row.range or 0)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(np.ndim(value) == 0 and pd.isna(value))
    except (TypeError, ValueError):
        return False


def _int(value: Any, what: str) -> int:
    try:
        number = int(value)
        if number != value:
            raise ValueError
    except (TypeError, ValueError):
        raise PyneuronError(f"{what} values must be integers, got {value!r}") from None
    return number


# -- rendering --------------------------------------------------------------------------


def formula_parts(formula: Formula) -> list[tuple[str, str | None]]:
    """A formula as printed, cut into (text, concept name or None) pieces.

    Joining the texts gives ``str(formula)``; the pieces with a name are the concepts.

    Examples
    --------
    >>> formula_parts(Formula.parse("a AND NOT b"))
    [('(', None), ('a', 'a'), (' AND NOT ', None), ('b', 'b'), (')', None)]
    """
    parts: list[tuple[str, str | None]] = []
    _collect_parts(formula, parts)
    merged: list[tuple[str, str | None]] = []
    for text, name in parts:
        if name is None and merged and merged[-1][1] is None:
            merged[-1] = (merged[-1][0] + text, None)
        else:
            merged.append((text, name))
    return merged


def _collect_parts(formula: Formula, parts: list[tuple[str, str | None]]) -> None:
    if isinstance(formula, Concept):
        parts.append((str(formula), formula.name))
    elif isinstance(formula, Not):
        parts.append(("(NOT ", None))
        _collect_parts(formula.operand, parts)
        parts.append((")", None))
    elif isinstance(formula, BinaryOp):
        parts.append(("(", None))
        _collect_parts(formula.left, parts)
        parts.append((f" {formula.keyword} ", None))
        if isinstance(formula.right, Not):
            parts.append(("NOT ", None))
            _collect_parts(formula.right.operand, parts)
        else:
            _collect_parts(formula.right, parts)
        parts.append((")", None))
    else:  # pragma: no cover - all Formula subclasses are handled above
        parts.append((str(formula), None))


def _format(value: Any) -> tuple[str, str]:
    """(display text, sort key) of a table cell."""
    if _missing(value):
        return "–", ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower(), str(int(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}".replace(",", "\u2009"), str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isinf(number):
            return ("∞" if number > 0 else "−∞"), repr(number)
        text = f"{number:.4f}" if abs(number) < 100 else f"{number:.4g}"
        return text, repr(number)
    return str(value), str(value)


def _render(
    plan: _Plan,
    site: _Site,
    pictures: _Pictures,
    *,
    column_help: dict[str, tuple[str, str]],
    descriptions: dict[tuple[str, int], list[dict[str, Any]]],
    null: dict[str | None, np.ndarray],
    progress: bool,
) -> None:
    """Write every page of the report into ``site``: unit pages, concept pages, the index."""
    unit_pages = _UnitPages(plan, site, pictures, column_help, descriptions)
    concept_pages = _ConceptPages(plan, site, pictures)
    index = _IndexPage(plan, site, pictures, column_help, null)
    site.prepare()
    pages = [row for rows in plan.layers.values() for row in rows if row.page]
    total = len(pages) + len(plan.concepts) + 1
    with progress_bar(total=total, desc="report", unit="page", enabled=progress) as bar:
        for rows in plan.layers.values():
            for row, previous, following in _with_neighbours(rows):
                unit_pages.write(row, previous, following)
                bar.update(1)
        for name in plan.concepts:
            concept_pages.write(name)
            bar.update(1)
        index.write()
        bar.update(1)


def _with_neighbours(rows: list[_Row]) -> Iterator[tuple[_Row, _Row | None, _Row | None]]:
    """The rows of a layer that get a page, by unit and range, each with the rows before
    and after it (``None`` at the ends)."""
    ordered = sorted((r for r in rows if r.page), key=lambda r: (r.unit, r.range or 0))
    for i, row in enumerate(ordered):
        previous = ordered[i - 1] if i > 0 else None
        following = ordered[i + 1] if i + 1 < len(ordered) else None
        yield row, previous, following


class _Site:
    """The report's folder being written: its skeleton and pages rendered from templates."""

    def __init__(self, root: Path, title: str) -> None:
        from jinja2 import Environment, PackageLoader, StrictUndefined

        self.root = root
        self.env = Environment(
            loader=PackageLoader("pyneuron.report", "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self.env.globals.update(
            title=str(title),
            version=_version(),
            legend=colors_css(),
            no_explanation=_NO_EXPLANATION,
        )

    def prepare(self) -> None:
        """The stylesheet and the folders every report has."""
        static = self.root / "static"
        static.mkdir()
        css = resources.files("pyneuron.report").joinpath("static", "report.css")
        (static / "report.css").write_bytes(css.read_bytes())
        (self.root / "img" / "images").mkdir(parents=True)
        (self.root / "img" / "plots").mkdir(parents=True)
        (self.root / "units").mkdir()
        (self.root / "concepts").mkdir()

    def page(self, template: str, relative: str, **context: Any) -> None:
        """Render ``template`` to ``relative`` (its ``root``: the way back to the top)."""
        depth = relative.count("/")
        self._write(relative, self.env.get_template(template).render(root="../" * depth, **context))

    def _write(self, relative: str, text: str) -> None:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


class _Pictures:
    """The images drawn in the report: thumbnails of the probing images (each PNG written
    once, under ``img/images``), overlays, and the concept and formula masks drawn."""

    def __init__(
        self, store: ConceptStore, images: ImageSource | None, root: Path, thumbnail_size: int
    ) -> None:
        self.store = store
        self.images = images
        self.root = root
        grid = store.grid
        self.scale = thumbnail_scale(grid.height, grid.width, thumbnail_size)
        self.thumb_shape = (grid.height * self.scale, grid.width * self.scale)
        self.written_images: set[int] = set()
        self.thumbnail = lru_cache(maxsize=512)(self._thumbnail)
        self.concept_masks = lru_cache(maxsize=2048)(self._concept_mask)

    def folder(self, relative: str) -> None:
        """Create a folder for drawings (``relative`` to the report root)."""
        (self.root / relative).mkdir(parents=True, exist_ok=True)

    def plain(self, image: int) -> tuple[np.ndarray, str]:
        """An image's thumbnail and its PNG's path from the report root (written once)."""
        plain = f"img/images/{image}.png"
        base = self.thumbnail(image)
        if image not in self.written_images:
            save_png(base, self.root / plain)
            self.written_images.add(image)
        return base, plain

    def draw(
        self,
        relative: str,
        base: np.ndarray,
        unit_mask: np.ndarray | None,
        formula_mask: np.ndarray | None,
    ) -> None:
        """Write the masks drawn over a thumbnail to ``relative`` (from the report root)."""
        save_png(overlay(base, unit_mask, formula_mask), self.root / relative)

    def formula_mask(self, formula: Formula | None, image: int) -> np.ndarray | None:
        """A formula's mask in one image (``None`` for no formula)."""
        if formula is None:
            return None
        return _evaluate(formula, lambda name: self.concept_masks(name, image))

    def _thumbnail(self, image: int) -> np.ndarray:
        height, width = self.thumb_shape
        if self.images is None:
            return np.full((height, width, 3), 128, dtype=np.uint8)
        try:
            picture = self.images(image)
        except PyneuronError:
            raise
        except Exception as error:
            raise PyneuronError(f"cannot load image {image}: {error}") from error
        rgb = as_rgb(picture, f"image {image}")
        grid = self.store.grid
        return thumbnail(rgb, grid.height, grid.width, self.scale)

    def _concept_mask(self, name: str, image: int) -> np.ndarray:
        mask = self.store.image_mask(name, image)
        mask.flags.writeable = False
        return mask


# -- pieces shared by the pages -----------------------------------------------------------


def _formula_links(
    plan: _Plan, formula: Formula | None, root: str
) -> list[tuple[str, str | None]] | None:
    """Formula pieces with the href of each concept's page (relative to ``root``)."""
    if formula is None:
        return None
    return [
        (text, root + plan.concept_page(name) if name is not None else None)
        for text, name in formula_parts(formula)
    ]


def _concept_link(plan: _Plan, name: Any, root: str) -> dict[str, Any] | None:
    """A concept's name and the href of its page (``None`` where it has none)."""
    if not isinstance(name, str):
        return None
    href = root + plan.concept_page(name) if name in plan.concept_pages else None
    return {"name": name, "href": href}


def _row_link(row: _Row, root: str) -> dict[str, Any]:
    """A row as other pages show it: its unit, formula, IoU and the href of its page."""
    return {
        "layer": row.layer,
        "unit": row.unit,
        "range": row.range,
        "label": _row_label(row),
        "href": root + row.page if row.page else None,
        "formula": row.text,
        "iou": _format(row.values.get("iou")),
    }


# -- unit pages -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _UnitPages:
    """``units/<layer>/<unit>.html``: a unit's metrics, formula, beam, label-free
    descriptions and top images with its masks drawn over them."""

    root: ClassVar[str] = "../../"

    plan: _Plan
    site: _Site
    pictures: _Pictures
    column_help: dict[str, tuple[str, str]]
    descriptions: dict[tuple[str, int], list[dict[str, Any]]]

    def write(self, row: _Row, previous: _Row | None, following: _Row | None) -> None:
        """Write the page of ``row``, linked to the pages of its neighbours."""
        assert row.page is not None
        root = self.root
        plan = self.plan
        self.site.page(
            "unit.html",
            row.page,
            row=_row_link(row, root),
            parts=_formula_links(plan, row.formula, root),
            metrics=self._metrics(row),
            primitive=_concept_link(plan, row.values.get("primitive"), root),
            beam=self._beam(row),
            descriptions=self._descriptions(row),
            images=self._images(row),
            fires=int(row.masks.image_counts[row.unit]) if row.masks is not None else None,
            dropped=row.dropped,
            has_unit_masks=row.masks is not None,
            has_images=self.pictures.images is not None,
            previous=_row_link(previous, root) if previous else None,
            next=_row_link(following, root) if following else None,
            layer_anchor=f"{root}index.html#layer-{plan.layer_slug(row.layer)}",
        )

    def _metrics(self, row: _Row) -> list[tuple[str, str, str]]:
        """(header, tooltip, value) of the row's metrics."""
        return [
            (self.column_help[c][0], self.column_help[c][1], _format(row.values[c])[0])
            for c in _UNIT_METRICS
            if c in row.values
        ]

    def _beam(self, row: _Row) -> dict[str, Any] | None:
        """The row's beam table (``None`` when no beam was given)."""
        plan = self.plan
        if not plan.beam_given:
            return None
        entries = plan.beam.get((row.layer, row.unit, row.range), [])
        columns = [c for c in _BEAM_COLUMNS if entries and c in entries[0]]
        return {
            "columns": [(self.column_help[c][0], self.column_help[c][1]) for c in columns],
            "rows": [
                {
                    "rank": entry["rank"],
                    "parts": _formula_links(plan, entry["formula"], self.root),
                    "best": entry["formula"] is not None and str(entry["formula"]) == row.text,
                    "cells": [_format(entry.get(c)) for c in columns],
                }
                for entry in entries
            ],
        }

    def _descriptions(self, row: _Row) -> list[dict[str, Any]]:
        """The row's label-free descriptions and their agreement with its formula."""
        from ..describe.compare import agreement

        out = []
        for record in self.descriptions.get((str(row.layer), int(row.unit)), []):
            kind, _ = agreement(record["label"], row.text)
            score = record.get("score")
            out.append(
                {
                    "method": record["method"],
                    "label": record["label"],
                    "score": _format(score)[0] if score is not None else "",
                    "agreement": kind or "—",
                }
            )
        return out

    def _images(self, row: _Row) -> list[dict[str, Any]]:
        """Draw the row's top images with its unit and formula masks (recorded in
        ``row.overlays`` for the index's strip)."""
        pictures = self.pictures
        out = []
        layer_dir = f"img/units/{self.plan.layer_slug(row.layer)}"
        pictures.folder(layer_dir)
        for image in row.top:
            base, plain = pictures.plain(image)
            unit_mask = row.masks.image_mask(row.unit, image) if row.masks is not None else None
            formula_mask = pictures.formula_mask(row.formula, image)
            drawn = f"{layer_dir}/{row.stem}-{image}.png"
            pictures.draw(drawn, base, unit_mask, formula_mask)
            row.overlays.append((image, drawn))
            out.append(
                {
                    "id": image,
                    "plain": self.root + plain,
                    "overlay": self.root + drawn,
                    "iou": _format(image_iou(unit_mask, formula_mask))[0],
                    "unit_pixels": int(unit_mask.sum()) if unit_mask is not None else None,
                    "formula_pixels": int(formula_mask.sum()) if formula_mask is not None else None,
                }
            )
        return out


# -- concept pages --------------------------------------------------------------------------


@dataclass(frozen=True)
class _ConceptPages:
    """``concepts/<concept>.html``: a concept's size, example masks and the units whose
    formula (or best single concept) it is part of."""

    root: ClassVar[str] = "../"

    plan: _Plan
    site: _Site
    pictures: _Pictures

    def write(self, name: str) -> None:
        """Write the page of concept ``name``."""
        plan = self.plan
        root = self.root
        table = plan.store.table()
        info = table.iloc[plan.store.index(name)]
        uses = sorted(plan.uses.get(name, []), key=_by_iou)
        primitive = sorted(plan.primitive_of.get(name, []), key=_by_iou)
        self.site.page(
            "concept.html",
            plan.concept_page(name),
            name=name,
            category=str(info["category"]),
            pixels=_format(int(info["pixels"]))[0],
            images=_format(int(info["images"]))[0],
            uses=[
                dict(_row_link(r, root), parts=_formula_links(plan, r.formula, root)) for r in uses
            ],
            primitive_of=[_row_link(r, root) for r in primitive],
            has_range=plan.has_range,
            examples=self._examples(name),
        )

    def _examples(self, name: str) -> list[dict[str, Any]]:
        """Images with the largest area of a concept (among up to CONCEPT_CANDIDATES drawn
        where it is present; ties: smaller id), its mask drawn over them."""
        plan = self.plan
        pictures = self.pictures
        ids, masks = plan.store.sample(name, CONCEPT_CANDIDATES, seed=0)
        if not len(ids):
            return []
        area = masks.reshape(len(ids), -1).sum(axis=1)
        pixels = masks.shape[1] * masks.shape[2]
        pictures.folder("img/concepts")
        slug = plan.concept_slug(name)
        out = []
        for k in np.lexsort((ids, -area))[:CONCEPT_EXAMPLES]:
            image = int(ids[k])
            base, plain = pictures.plain(image)
            drawn = f"img/concepts/{slug}-{image}.png"
            pictures.draw(drawn, base, None, masks[k])
            out.append(
                {
                    "id": image,
                    "plain": self.root + plain,
                    "overlay": self.root + drawn,
                    "share": f"{100 * int(area[k]) / pixels:.0f} %",
                }
            )
        return out


# -- the index --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _IndexPage:
    """``index.html``: per layer a summary, plots and the sortable table of its units
    (with a strip of each unit's drawn top images); then the concepts with a page."""

    plan: _Plan
    site: _Site
    pictures: _Pictures
    column_help: dict[str, tuple[str, str]]
    null: dict[str | None, np.ndarray]

    def write(self) -> None:
        """Write the index (after the unit pages: it shows the overlays they drew)."""
        plan = self.plan
        layers = [self._layer(layer, rows) for layer, rows in plan.layers.items()]
        grid = plan.store.grid
        self.site.page(
            "index.html",
            "index.html",
            layers=layers,
            has_range=plan.has_range,
            concepts=self._concepts(),
            store={
                "concepts": _format(len(plan.store))[0],
                "grid": f"{grid.n_images} images × {grid.height} × {grid.width}",
                "source": concept_source(plan.store.metadata),
            },
        )

    def _layer(self, layer: str, rows: list[_Row]) -> dict[str, Any]:
        """A layer's section: its facts, plots and table of rows."""
        plan = self.plan
        slug = plan.layer_slug(layer)
        histogram = f"img/plots/{slug}-iou.png"
        ious = np.array(
            [float(r.values["iou"]) if not _missing(r.values["iou"]) else np.nan for r in rows]
        )
        iou_histogram(ious, self.site.root / histogram, title=layer)
        columns = [c for c in _INDEX_COLUMNS if c in plan.columns]
        facts = _layer_facts(rows, ious, plan.columns, plan.has_range)
        plots = self._evaluation_plots(layer, slug, rows, ious, facts)
        pages = sum(r.page is not None for r in rows)
        note = None
        if pages < len(rows):
            note = (
                f"Unit pages are written for the {pages} best rows by IoU "
                f"(max_units={plan.max_units})."
            )
        return {
            "name": layer,
            "anchor": f"layer-{slug}",
            "histogram": histogram,
            "plots": plots,
            "facts": facts,
            "note": note,
            "columns": [(self.column_help[c][0], self.column_help[c][1]) for c in columns],
            "rows": [
                dict(
                    _row_link(r, ""),
                    cells=[_format(r.values[c]) for c in columns],
                    primitive=_concept_link(plan, r.values.get("primitive"), ""),
                    below_null=not _missing(r.values.get("above_null"))
                    and not bool(r.values["above_null"]),
                    strip=self._strip(r),
                )
                for r in rows
            ],
            "has_primitive": "primitive" in plan.columns,
        }

    def _evaluation_plots(
        self,
        layer: str,
        slug: str,
        rows: list[_Row],
        ious: np.ndarray,
        facts: list[tuple[str, str]],
    ) -> list[tuple[str, str]]:
        """Plots and facts of ``pyneuron evaluate`` for one layer: (src, alt) pairs."""
        columns = self.plan.columns
        root = self.site.root
        plots = []
        null = self.null.get(layer, self.null.get(None) if len(self.plan.layers) == 1 else None)
        if null is not None:
            path = f"img/plots/{slug}-null.png"
            iou_vs_null(ious, null, root / path, title=layer)
            plots.append((path, f"IoU of the units of layer {layer} against control units"))
        if "above_null" in columns:
            above = sum(bool(r.values.get("above_null")) for r in rows)
            facts.append(("above null", f"{above} of {len(rows)}"))
        if "iou_heldout" in columns:
            in_sample = _column(rows, "split_iou" if "split_iou" in columns else "iou")
            heldout = _column(rows, "iou_heldout")
            path = f"img/plots/{slug}-heldout.png"
            heldout_scatter(in_sample, heldout, root / path, title=layer)
            plots.append((path, f"Held-out against in-sample IoU, layer {layer}"))
            facts.append(("mean held-out IoU", _format(float(np.nanmean(heldout)))[0]))
        for name, label in (
            ("activation_drop", "mean act. drop"),
            ("activation_drop_random", "mean act. drop (random)"),
        ):
            if name in columns:
                values = _column(rows, name)
                mean = float(np.nanmean(values)) if np.isfinite(values).any() else None
                facts.append((label, _format(mean)[0]))
        return plots

    def _strip(self, row: _Row) -> list[dict[str, Any]]:
        """The index's strip of a row: thumbnails of the overlays its unit page shows."""
        height, width = self.pictures.thumb_shape
        shown = max(1, round(INDEX_STRIP_WIDTH * height / width))
        return [
            {"id": image, "src": src, "width": INDEX_STRIP_WIDTH, "height": shown}
            for image, src in row.overlays[:INDEX_STRIP]
        ]

    def _concepts(self) -> list[dict[str, Any]]:
        """The table of concepts with a page: category, uses, images."""
        plan = self.plan
        table = plan.store.table()
        concepts = []
        for name in plan.concepts:
            info = table.iloc[plan.store.index(name)]
            concepts.append(
                {
                    "name": name,
                    "href": plan.concept_page(name),
                    "category": str(info["category"]),
                    "uses": len(plan.uses.get(name, [])),
                    "primitive": len(plan.primitive_of.get(name, [])),
                    "images": _format(int(info["images"])),
                }
            )
        return concepts


def concept_source(metadata: Mapping[str, Any]) -> str:
    """Where a store's concepts come from, in a few words (from its metadata).

    Examples
    --------
    >>> concept_source({"source": "segment", "concept_set": "set:ade20k-150",
    ...                 "segment": {"segmenter": {"name": "sam3"}, "semantics": "ovce"}})
    'segmented by sam3 (ovce semantics), concept set set:ade20k-150'
    >>> concept_source({"source": "broden"})
    'broden'
    """
    source = str(metadata.get("source") or "masks")
    segmented = metadata.get("segment")
    if source == "segment" and isinstance(segmented, Mapping):
        segmenter = segmented.get("segmenter")
        name = segmenter.get("name") if isinstance(segmenter, Mapping) else segmenter
        source = (
            f"segmented by {name or 'a segmenter'} "
            f"({segmented.get('semantics', 'pyneuron')} semantics)"
        )
    if metadata.get("concept_set"):
        source += f", concept set {metadata['concept_set']}"
    return source


def _layer_facts(
    rows: list[_Row], ious: np.ndarray, columns: list[str], has_range: bool
) -> list[tuple[str, str]]:
    """A layer's summary: rows, units, explained, IoU statistics and the search's facts."""
    explained = sum(r.formula is not None for r in rows)
    finite = ious[np.isfinite(ious)]
    facts = [
        ("rows" if has_range else "units", _format(len(rows))[0]),
        ("explained", _format(explained)[0]),
        ("mean IoU", _format(float(finite.mean()) if finite.size else None)[0]),
        ("median IoU", _format(float(np.median(finite)) if finite.size else None)[0]),
        ("best IoU", _format(float(finite.max()) if finite.size else None)[0]),
        (
            f"IoU ≥ {INTERPRETABLE_IOU}",
            _format(int((finite >= INTERPRETABLE_IOU).sum()))[0],
        ),
    ]
    facts.extend(_search_facts(rows, columns))
    if has_range:
        facts.insert(1, ("units", _format(len({r.unit for r in rows}))[0]))
    return facts


def _search_facts(rows: list[_Row], columns: list[str]) -> list[tuple[str, str]]:
    """Layer facts of the optimal search (``optimal``) and of its audit of the beam
    (``audit`` and ``gap``, as :func:`pyneuron.compare_searches` writes them)."""
    facts = []
    if "optimal" in columns:
        proven = sum(bool(r.values["optimal"]) for r in rows if not _missing(r.values["optimal"]))
        facts.append(("proven optimal", f"{proven} of {len(rows)}"))
    if "audit" in columns:
        verdicts = [str(r.values["audit"]) for r in rows if not _missing(r.values["audit"])]
        counts = ", ".join(f"{verdicts.count(v)} {v}" for v in AUDIT_VERDICTS if v in verdicts)
        gaps = [float(r.values["gap"]) for r in rows if not _missing(r.values.get("gap"))]
        if gaps:
            counts += f" (largest gap {_format(max(gaps))[0]})"
        facts.append(("beam vs optimal", counts or "–"))
    return facts


def _column(rows: list[_Row], name: str) -> np.ndarray:
    """One float column of a layer's rows (NaN where missing)."""
    return np.array(
        [float(r.values[name]) if not _missing(r.values.get(name)) else np.nan for r in rows]
    )


def _evaluate(formula: Formula, concept: Callable[[str], np.ndarray]) -> np.ndarray:
    """A formula's mask in one image from its concepts' masks (cached by the caller)."""
    if isinstance(formula, Concept):
        return concept(formula.name)
    if isinstance(formula, Not):
        return ~_evaluate(formula.operand, concept)
    if isinstance(formula, BinaryOp):
        left, right = _evaluate(formula.left, concept), _evaluate(formula.right, concept)
        return left | right if formula.keyword == "OR" else left & right
    raise PyneuronError(f"cannot evaluate {formula!r}")  # pragma: no cover


def _row_label(row: _Row) -> str:
    return f"unit {row.unit}" + (f" · range {row.range}" if row.range is not None else "")


def _version() -> str:
    try:
        return metadata.version("pyneuron")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return ""


def write_comparison_page(
    path: str | os.PathLike[str],
    units: pd.DataFrame,
    layers: pd.DataFrame,
    concepts: pd.DataFrame | None = None,
    *,
    title: str = "pyneuron comparison",
    facts: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the page comparing two runs' explanations: one self-contained HTML file
    (styles inlined), written atomically.

    Parameters
    ----------
    path
        The HTML file to write; its folder must exist.
    units, layers
        :func:`pyneuron.report.compare.formula_agreement` and
        :func:`~pyneuron.report.compare.layer_agreement` tables.
    concepts
        A :func:`~pyneuron.report.compare.concept_agreement` table, shown when given.
    title
        The page's title.
    facts
        (label, value) pairs shown at the top (the runs, how images were matched, ...).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from ..engine.atomic import write_atomically
    from .compare import CONCEPT_COLUMNS, LAYER_COLUMNS, UNIT_COLUMNS

    def table(frame: pd.DataFrame, columns: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
        shown = [c for c in columns if c in frame.columns]
        numeric = [
            pd.api.types.is_numeric_dtype(frame[c])
            and not pd.api.types.is_bool_dtype(frame[c])
            and c != "layer"
            for c in shown
        ]
        formulas = [c in ("formula_a", "formula_b", "hypernym_a", "hypernym_b") for c in shown]
        rows = [
            [
                (*_format(value), "num" if n else "formula" if f else "")
                for value, n, f in zip(row, numeric, formulas)
            ]
            for row in frame[shown].itertuples(index=False)
        ]
        return {"columns": [columns[c] for c in shown], "rows": rows}

    path = Path(path)
    css = resources.files("pyneuron.report").joinpath("static", "report.css").read_text()
    page = (
        _Site(path.parent, title)
        .env.get_template("compare.html")
        .render(
            css=css,
            facts=list(facts),
            layers=table(layers, LAYER_COLUMNS),
            units=table(units, UNIT_COLUMNS),
            concepts=None if concepts is None else table(concepts, CONCEPT_COLUMNS),
            hypernyms="hypernym_exact" in units.columns,
        )
    )
    write_atomically(path, lambda p: p.write_text(page, encoding="utf-8"))
    return path
