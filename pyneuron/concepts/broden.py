"""Broden-format datasets (Broden, and compexp's ADE20K subset of it) as concept stores.

The layout (Bau et al. 2017, NetDissect) is a folder with

- ``index.csv``: one row per image, columns ``image`` (path under ``images/``), ``split``,
  ``ih, iw, sh, sw`` (image and segmentation sizes) and one column per category. A
  category cell lists, separated by ``;``, segmentation PNG files (under ``images/``)
  and/or image-level label numbers (scenes, textures);
- ``label.csv``: ``number, name, category, frequency, coverage, syns``; ``category`` lists
  the label's categories with counts, e.g. ``object(12);part(3)`` (``,`` also accepted);
- ``category.csv`` (category names, in order) and ``c_<category>.csv`` (per-category
  codes; not needed here);
- ``images/``: the images and the segmentation PNGs, whose label is ``R + 256 * G``.

What :func:`broden` does, and how it matches NetDissect-Lite / compexp
(``loader/data_loader/broden.py`` and ``catalog.py`` of compexp):

- a concept is a label *number*: its mask is the union over every selected category and
  every segmentation file of the pixels holding that number; an image-level number (in
  any column) is a full-image mask; label 0 (unlabelled) is skipped;
- images without any data in the selected categories are dropped
  (``index_has_any_data``), so image ids are positions among the kept rows;
- ``subset="ade20k"`` keeps the rows whose image path starts with the folder
  ``ade20k/`` -- compexp's ``index_ade20k.csv`` (made by its ``script/split_broden.py``
  from the first path component); a list keeps several sources;
- concepts are declared in label-number order (so ties in the search break as in
  compexp, which sorts labels by number), including labels absent from the kept images
  (they are never search candidates);
- the *category* of a concept (used in tables only, never in masks or the search) is
  the selected category with the largest count in ``label.csv``'s ``category`` field,
  ties going to the one listed first. NetDissect's ``primary_categories_per_index`` uses
  the coverage columns of ``c_<category>.csv`` instead, so a few labels that are
  frequent in two categories may be filed differently;
- **resizing**: Broden's segmentations are stored at the probing resolution
  (``sh = sw = 112`` in ``broden1_224``, the compexp/NetDissect mask size), so at
  ``grid=112`` nothing is resized, as in compexp. Otherwise each label image is resized
  to the grid by nearest neighbour exactly as ``PIL.Image.resize(NEAREST)`` does (see
  :func:`pyneuron.concepts.user.resize_nearest`); NetDissect-Lite's optional
  ``scale_segmentation`` uses ``scipy.ndimage.zoom(order=0)``, which samples slightly
  different pixels.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.store import ConceptStore
from .user import (
    ConceptSourceError,
    GridSize,
    MissingFileError,
    PathLike,
    grid_size,
    open_writer,
    read_image,
    resize_nearest,
)

__all__ = [
    "BrodenError",
    "BrodenLabel",
    "broden",
    "broden_images",
    "declared_concepts",
    "read_labels",
]

META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
_CATEGORY_ITEM = re.compile(r"^\s*([^()]*?)\s*(?:\(\s*(\d+)\s*\))?\s*$")


class BrodenError(ConceptSourceError):
    """A Broden-format folder is malformed (bad CSV, unknown label, undecodable PNG)."""


@dataclass(frozen=True)
class BrodenLabel:
    """A label of ``label.csv``: its number, name and ``{category: count}`` (in the
    file's order)."""

    number: int
    name: str
    categories: dict[str, int]


@dataclass(frozen=True)
class _Index:
    root: Path
    rows: list[dict[str, Any]]  # kept rows: image, and per selected category its items
    categories: list[str]
    line_numbers: list[int]
    sizes: list[tuple[str | None, str | None]]  # (sh, sw) cells


def _read_csv(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise MissingFileError(f"Broden {what} {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BrodenError(f"cannot read {path}: {error}") from None


def _parse_categories(text: str, where: str) -> dict[str, int]:
    result: dict[str, int] = {}
    for item in re.split(r"[;,]", text or ""):
        if not item.strip():
            continue
        match = _CATEGORY_ITEM.match(item)
        if match is None or not match.group(1):
            raise BrodenError(f"{where}: cannot parse category {item!r} (expected 'name(count)')")
        result[match.group(1)] = int(match.group(2) or 0)
    return result


def read_labels(path: PathLike) -> dict[int, BrodenLabel]:
    """The labels of a Broden folder's ``label.csv`` by number (0, unlabelled, left out).

    Raises
    ------
    MissingFileError
        If ``label.csv`` does not exist.
    BrodenError
        For a malformed file: a missing column, a bad or repeated number, a label
        without a name, a name used twice, an unparsable category.
    """
    root = Path(path)
    path = root / "label.csv"
    fields, rows = _read_csv(path, "label file")
    missing = {"number", "name"} - set(fields)
    if missing:
        raise BrodenError(f"{path} lacks column(s) {sorted(missing)}; it has {fields}")
    labels: dict[int, BrodenLabel] = {}
    names: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{path} line {line}"
        try:
            number = int(row["number"])
        except (TypeError, ValueError):
            raise BrodenError(
                f"{where}: label number {row['number']!r} is not an integer"
            ) from None
        if number < 0:
            raise BrodenError(f"{where}: negative label number {number}")
        if number in labels:
            raise BrodenError(f"{where}: label number {number} is listed twice")
        if number == 0:
            continue  # 0 is "unlabelled", never a concept
        name = (row["name"] or "").strip()
        if not name:
            raise BrodenError(f"{where}: label {number} has no name")
        if name in names:
            raise BrodenError(
                f"{where}: label name {name!r} is used by labels {names[name]} and {number}; "
                "concept names must be unique"
            )
        names[name] = number
        categories = _parse_categories(row.get("category", ""), where)
        labels[number] = BrodenLabel(number, name, categories)
    if not labels:
        raise BrodenError(f"{path} lists no labels")
    return labels


def _parse_items(cell: str | None) -> list[int | str]:
    items: list[int | str] = []
    for item in (cell or "").split(";"):
        item = item.strip()
        if item:
            items.append(int(item) if item.isdigit() else item)
    return items


def _read_index(
    root: Path,
    categories: Sequence[str] | None,
    subset: str | Sequence[str] | None,
    split: str | Sequence[str] | None,
    index: str,
) -> _Index:
    if not root.is_dir():
        raise MissingFileError(f"Broden folder {root} does not exist")
    path = root / index
    fields, rows = _read_csv(path, "index")
    if "image" not in fields:
        raise BrodenError(f"{path} has no 'image' column; it has {fields}")
    columns = [f for f in fields if f not in META_COLUMNS]
    category_file = root / "category.csv"
    if category_file.is_file():
        cat_fields, cat_rows = _read_csv(category_file, "category file")
        if "name" not in cat_fields:
            raise BrodenError(f"{category_file} has no 'name' column; it has {cat_fields}")
        available = [r["name"] for r in cat_rows if r["name"]]
    else:
        available = columns
    if categories is None:
        selected = list(available)
    else:
        wanted = [categories] if isinstance(categories, str) else list(categories)
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise BrodenError(f"unknown categories {unknown}; this dataset has {available}")
        if not wanted:
            raise BrodenError("no categories selected (an empty list)")
        selected = [c for c in available if c in wanted]
    absent = [c for c in selected if c not in columns]
    if absent:
        raise BrodenError(f"{path} has no column for categories {absent}; it has {fields}")
    subsets = None if subset is None else {subset} if isinstance(subset, str) else set(subset)
    splits = None if split is None else {split} if isinstance(split, str) else set(split)
    kept: list[dict[str, Any]] = []
    lines: list[int] = []
    sizes: list[tuple[str | None, str | None]] = []
    for line, row in enumerate(rows, start=2):
        image = row["image"] or ""
        if subsets is not None and image.split("/", 1)[0] not in subsets:
            continue
        if splits is not None and row.get("split") not in splits:
            continue
        items = {c: _parse_items(row[c]) for c in selected}
        # NetDissect's index_has_any_data: some non-zero number or file in a category.
        if not any(item for values in items.values() for item in values):
            continue
        kept.append({"image": image, **items})
        lines.append(line)
        sizes.append((row.get("sh"), row.get("sw")))
    if not kept:
        raise BrodenError(
            f"no image of {path} is left with data in categories {selected} (subset="
            f"{subset!r}, split={split!r})"
        )
    return _Index(root, kept, selected, lines, sizes)


def broden_images(
    path: PathLike,
    categories: Sequence[str] | None = None,
    subset: str | Sequence[str] | None = None,
    *,
    split: str | Sequence[str] | None = None,
    index: str = "index.csv",
) -> list[Path]:
    """The image files :func:`broden` uses with the same arguments, in image-id order
    (feed exactly these to the model so its activations line up with the store).

    Examples
    --------
    >>> broden_images("broden1_224", subset="ade20k")[:1]  # doctest: +SKIP
    [PosixPath('broden1_224/images/ade20k/ADE_train_00000001.jpg')]
    """
    table = _read_index(Path(path), categories, subset, split, index)
    return [table.root / "images" / row["image"] for row in table.rows]


def _label_image(path: Path) -> np.ndarray:
    """A Broden segmentation PNG as int32 labels ``R + 256 * G`` (single-channel images:
    the value itself)."""
    image = read_image(path, "segmentation", error=BrodenError)
    if image.mode not in ("RGB", "RGBA") and image.mode not in ("L", "I", "I;16"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 3:
        return array[:, :, 0].astype(np.int32) + array[:, :, 1].astype(np.int32) * 256
    return array.astype(np.int32)


def broden(
    path: PathLike,
    categories: Sequence[str] | None = None,
    subset: str | Sequence[str] | None = None,
    grid: GridSize | None = 112,
    *,
    split: str | Sequence[str] | None = None,
    index: str = "index.csv",
    out: PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConceptStore:
    """Read a Broden-format dataset into a :class:`~pyneuron.ConceptStore`.

    See the module docstring for the layout and the exact semantics (which match
    NetDissect-Lite and compexp).

    Parameters
    ----------
    path
        The dataset folder (``index.csv``, ``label.csv``, ``category.csv``, ``images/``).
    categories
        Categories to read (e.g. ``["object", "part", "scene", "texture", "color"]``,
        compexp's set); ``None``: all of ``category.csv`` (or every index column).
    subset
        Keep only images whose path starts with this folder (``"ade20k"`` gives
        compexp's ADE20K probing set), or with any of several.
    grid
        ``H`` or ``(H, W)`` of the store; ``None``: the segmentation size ``(sh, sw)``
        of ``index.csv`` (which must be the same for every kept image).
    split
        Keep only rows of this ``split`` value (``"train"``, ``"val"``), or of several.
    index
        The index file name, e.g. ``"index_ade20k.csv"`` as compexp ships it.
    out, overwrite
        Stream the store to this directory; it appears only when complete (atomic), and
        an existing store there is replaced only with ``overwrite`` (and only on success).
    progress
        Show a progress bar over the images.

    Returns
    -------
    ConceptStore
        Concept names from ``label.csv``; ``store.metadata`` records ``labels`` (the
        label number of each concept), ``images`` (the image paths, in image-id order),
        the categories, subset, split and grid.

    Raises
    ------
    MissingFileError
        If the folder, the index, ``label.csv`` or a segmentation file is missing (the
        message names it). Also a ``FileNotFoundError``.
    BrodenError
        For malformed CSVs, unknown categories, label numbers that ``label.csv`` does
        not list (naming the file and the label), undecodable PNGs (naming the file).
        Nothing is left under ``out`` then.

    Examples
    --------
    >>> store = broden("broden1_224", subset="ade20k", out="ade.store")  # doctest: +SKIP
    >>> store.info()                                                      # doctest: +SKIP
    """
    root = Path(path)
    table = _read_index(root, categories, subset, split, index)
    labels = read_labels(root)
    selected = table.categories
    if grid is None:
        try:
            sizes = {(int(sh), int(sw)) for sh, sw in table.sizes}  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise BrodenError(
                f"grid=None needs integer 'sh' and 'sw' columns in {root / index}"
            ) from None
        if len(sizes) != 1:
            raise BrodenError(
                f"grid=None needs one segmentation size, but {root / index} has "
                f"{sorted(sizes)[:5]}; pass grid=112 or (height, width)"
            )
        h, w = sizes.pop()
    else:
        h, w = grid_size(grid)

    declared = declared_concepts(labels, selected)
    numbers = [number for number, _, _ in declared]
    names = [name for _, name, _ in declared]
    cats = [category for _, _, category in declared]
    max_number = max(labels)
    lut = np.full(max_number + 2, -2, dtype=np.int64)  # -2: not in label.csv
    lut[list(labels)] = -1  # -1: in label.csv, not declared yet
    lut[numbers] = np.arange(len(numbers))
    lut[0] = -3  # unlabelled

    metadata: dict[str, Any] = {
        "source": "broden",
        "root": str(root),
        "index": index,
        "categories": list(selected),
        "subset": subset if subset is None or isinstance(subset, str) else list(subset),
        "split": split if split is None or isinstance(split, str) else list(split),
        "grid": [h, w],
        "resize": "PIL NEAREST",
        "images": [row["image"] for row in table.rows],
    }
    writer = open_writer((len(table.rows), h, w), names, cats, out, overwrite, progress, metadata)

    def concept(number: int, category: str, where: str) -> int:
        if number > max_number or lut[number] == -2:
            raise BrodenError(f"{where} holds label {number}, which {root / 'label.csv'} lacks")
        if lut[number] == -1:  # a label.csv label found under an unexpected category
            lut[number] = writer.add_concept(labels[number].name, category)
            numbers.append(number)
            names.append(labels[number].name)
        return int(lut[number])

    with writer:
        for i, (row, line) in enumerate(zip(table.rows, table.line_numbers)):
            full: set[int] = set()
            pixels: dict[int, np.ndarray] = {}
            for category in selected:
                for item in row[category]:
                    if isinstance(item, int):
                        if item != 0:
                            where = f"{root / index} line {line} ({category})"
                            full.add(concept(item, category, where))
                        continue
                    file = root / "images" / item
                    if not file.is_file():
                        raise MissingFileError(
                            f"segmentation {file} (listed in {root / index} line {line}, "
                            f"column {category}) does not exist"
                        )
                    label_map = _label_image(file)
                    present = _present(label_map)
                    codes = lut[np.minimum(present, max_number + 1)]
                    for number in present[codes < 0].tolist():  # unknown or undeclared
                        concept(number, category, f"segmentation {file}")
                    small = resize_nearest(label_map, (h, w))
                    if small is not label_map:
                        present = _present(small)
                    for number, c in zip(present.tolist(), lut[present].tolist()):
                        mask = small == number
                        pixels[c] = pixels[c] | mask if c in pixels else mask
            masks = {names[c]: m for c, m in pixels.items() if c not in full}
            writer.add_image(i, masks=masks, labels=[names[c] for c in sorted(full)])
        writer.metadata["labels"] = list(numbers)
    return writer.store


def declared_concepts(
    labels: dict[int, BrodenLabel], categories: Sequence[str]
) -> list[tuple[int, str, str]]:
    """``(number, name, category)`` of each label :func:`broden` declares as a concept
    when it reads ``categories``: the labels filed under one of them or under none at
    all, by number. The category is the selected one with the largest count in
    ``label.csv`` (ties: the one listed first); ``""`` for a label filed under none.

    Examples
    --------
    >>> labels = {3: BrodenLabel(3, "door", {"object": 2, "part": 2}),
    ...           1: BrodenLabel(1, "red-c", {"color": 3}), 9: BrodenLabel(9, "x", {})}
    >>> declared_concepts(labels, ["object", "part"])
    [(3, 'door', 'object'), (9, 'x', '')]
    """
    declared = []
    for number in sorted(labels):
        label = labels[number]
        counts = {c: n for c, n in label.categories.items() if c in categories}
        if label.categories and not counts:
            continue
        declared.append((number, label.name, _primary(counts)))
    return declared


def _present(label_map: np.ndarray) -> np.ndarray:
    """The sorted non-zero label numbers of a (non-negative) label map (a faster
    ``np.unique``)."""
    present = np.flatnonzero(np.bincount(label_map.reshape(-1)))
    return present[1:] if present.size and present[0] == 0 else present


def _primary(counts: dict[str, int]) -> str:
    """The category with the largest count; ties go to the first listed; ``""`` if none."""
    best = ""
    best_count = -1
    for category, count in counts.items():
        if count > best_count:
            best, best_count = category, count
    return best
