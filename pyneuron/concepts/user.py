"""Concept stores from the user's own masks: numpy arrays, a folder of per-concept PNG
masks, semantic-segmentation label maps with a class-name list, or COCO annotations.

Every function writes through :class:`~pyneuron.ConceptStoreWriter` image by image, so
nothing is ever dense over the whole probing set: in memory, or streamed to ``out`` (a
store directory that appears only when the whole store is written; on an error nothing
is left there and an existing store under ``out`` stays as it was).

**Resizing.** Masks are brought to the ``grid`` (``112`` or ``(height, width)``) by nearest
neighbour, exactly as ``PIL.Image.resize(size, Image.NEAREST)`` does: output column ``x``
takes input column ``floor(s/2 + x*s)`` with ``s = in_width / out_width`` accumulated in
double precision the way Pillow does (so a few columns can differ from the textbook
``floor((x + 0.5) * s)``); rows likewise. The sampled positions are computed once per
input size with Pillow itself and applied with numpy indexing.

Examples
--------
>>> import numpy as np
>>> sky = np.zeros((2, 4, 4), dtype=bool); sky[0, :2] = True
>>> dog = np.zeros((2, 4, 4), dtype=bool); dog[1, 3, 3] = True
>>> store = from_arrays({"sky": sky, "dog": dog}, categories={"sky": "scene"})
>>> store.names, store.categories, store.images_with("dog").tolist()
(['sky', 'dog'], ['scene', ''], [1])
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from PIL import Image

from ..engine.store import ConceptStore, ConceptStoreWriter
from ..errors import PyneuronError

PathLike: TypeAlias = "str | os.PathLike[str]"
GridSize: TypeAlias = "int | tuple[int, int]"

__all__ = [
    "ConceptSourceError",
    "MissingFileError",
    "from_arrays",
    "from_coco",
    "from_label_maps",
    "from_mask_folder",
]


class ConceptSourceError(PyneuronError):
    """Bad input to a concept source: an undecodable or malformed file, an unknown label,
    an empty input, duplicate concept names."""


class MissingFileError(ConceptSourceError, FileNotFoundError):
    """A file or folder a concept source needs does not exist (also a
    ``FileNotFoundError``)."""


# -- shared helpers (also used by :mod:`pyneuron.concepts.broden`) --------------------------


def grid_size(grid: GridSize) -> tuple[int, int]:
    """``112`` or ``(height, width)`` -> ``(height, width)``."""
    size = (grid, grid) if isinstance(grid, (int, np.integer)) else grid
    try:
        h, w = size  # type: ignore[misc]
    except (TypeError, ValueError):
        raise PyneuronError(f"grid must be an int or (height, width), got {grid!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise PyneuronError(f"grid must be positive integers, got {grid!r}")
    return int(h), int(w)


@lru_cache(maxsize=256)
def _nearest_positions(size_in: int, size_out: int) -> np.ndarray:
    """Input positions PIL's NEAREST resize samples along one axis of ``size_out``."""
    ramp = np.arange(size_in, dtype=np.int32)[None, :]
    picked = Image.fromarray(ramp, mode="I").resize((size_out, 1), Image.Resampling.NEAREST)
    positions = np.asarray(picked, dtype=np.int64)[0].copy()
    positions.setflags(write=False)
    return positions


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D array (labels or a bool mask) to ``size = (height, width)`` by nearest
    neighbour, identically to ``PIL.Image.resize((width, height), Image.NEAREST)``.

    Examples
    --------
    >>> resize_nearest(np.array([[1, 2], [3, 4]]), (4, 4))
    array([[1, 1, 2, 2],
           [1, 1, 2, 2],
           [3, 3, 4, 4],
           [3, 3, 4, 4]])
    >>> resize_nearest(np.arange(16).reshape(4, 4), (2, 2))   # rows/columns 1 and 3
    array([[ 5,  7],
           [13, 15]])
    """
    h, w = size
    if array.shape == (h, w):
        return array
    rows = _nearest_positions(array.shape[0], h)
    cols = _nearest_positions(array.shape[1], w)
    return array[rows[:, None], cols[None, :]]


def read_image(
    path: Path, what: str = "image", error: type[ConceptSourceError] = ConceptSourceError
) -> Image.Image:
    """Open and fully decode an image file, with clear errors naming the file."""
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as cause:
        raise error(f"cannot decode {what} {path}: {cause}") from None


def read_array(path: Path, what: str = "mask") -> np.ndarray:
    """An image file as a numpy array (palette images give their indices)."""
    image = read_image(path, what)
    if image.mode == "1":
        return np.asarray(image, dtype=bool)
    return np.asarray(image)


def open_writer(
    grid: tuple[int, int, int],
    names: Sequence[str],
    categories: Sequence[str],
    out: PathLike | None,
    overwrite: bool,
    progress: bool,
    metadata: Mapping[str, Any],
) -> ConceptStoreWriter:
    """A :class:`ConceptStoreWriter` with a progress bar, streaming to ``out`` if given."""
    return ConceptStoreWriter(
        grid, names, categories, out, overwrite=overwrite, metadata=metadata, progress=progress
    )


def check_unique(names: Sequence[str], what: str = "concept name") -> None:
    """Raise :class:`ConceptSourceError` naming the first duplicate."""
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConceptSourceError(f"{what}s must be non-empty strings, got {name!r}")
        if name in seen:
            raise ConceptSourceError(f"duplicate {what} {name!r}; {what}s must be unique")
        seen.add(name)


def _categories_for(
    names: Sequence[str], categories: str | Sequence[str] | Mapping[str, str] | None
) -> list[str]:
    if categories is None:
        return [""] * len(names)
    if isinstance(categories, str):
        return [categories] * len(names)
    if isinstance(categories, Mapping):
        unknown = sorted(set(categories) - set(names))
        if unknown:
            raise ConceptSourceError(f"categories given for unknown concepts {unknown}")
        return [str(categories.get(name, "")) for name in names]
    categories = [str(c) for c in categories]
    if len(categories) != len(names):
        raise ConceptSourceError(f"{len(categories)} categories for {len(names)} concepts")
    return categories


# -- numpy arrays ------------------------------------------------------------------------------


def from_arrays(
    masks: np.ndarray | Mapping[str, np.ndarray],
    names: Sequence[str] | None = None,
    categories: str | Sequence[str] | Mapping[str, str] | None = None,
    *,
    out: PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ConceptStore:
    """A store from dense bool masks already on the grid.

    Parameters
    ----------
    masks
        Either a bool array (concepts, images, height, width) with ``names``, or a dict
        ``name -> bool (images, height, width)`` (all of one shape; ``names`` not given).
    names
        One unique name per concept (array form only).
    categories
        One category for all, one per concept, or a dict ``name -> category``.
    out, overwrite
        Stream the store to this directory (atomically); refuse to replace an existing
        one unless ``overwrite``.
    progress
        Show a progress bar (per image).

    Examples
    --------
    >>> masks = np.zeros((2, 3, 2, 2), dtype=bool); masks[1, 2] = True
    >>> from_arrays(masks, ["cat", "grass"]).images_with("grass").tolist()
    [2]
    """
    if isinstance(masks, Mapping):
        if names is not None:
            raise ConceptSourceError("give names only with an array; a dict's keys are names")
        names = list(masks)
        arrays = [np.asarray(masks[name]) for name in names]
        if not arrays:
            raise ConceptSourceError("no concept masks given (an empty dict)")
        for name, array in zip(names, arrays):
            if array.ndim != 3 or array.shape != arrays[0].shape:
                raise ConceptSourceError(
                    f"mask {name!r} has shape {array.shape}; every mask must be "
                    f"(images, height, width) = {arrays[0].shape}"
                )
    else:
        array = np.asarray(masks)
        if array.ndim != 4:
            raise ConceptSourceError(
                f"masks must have shape (concepts, images, height, width), got {array.shape}"
            )
        if names is None:
            raise ConceptSourceError("give one name per concept (names=[...])")
        names = list(names)
        if len(names) != array.shape[0]:
            raise ConceptSourceError(f"{len(names)} names for {array.shape[0]} concept masks")
        if array.shape[0] == 0:
            raise ConceptSourceError("no concept masks given (0 concepts)")
        arrays = list(array)
    check_unique(names)
    for name, array in zip(names, arrays):
        if array.dtype != bool:
            raise ConceptSourceError(
                f"mask {name!r} has dtype {array.dtype}; masks must be bool (threshold "
                "scores first, e.g. `scores > 0.5`)"
            )
    cats = _categories_for(names, categories)
    n_images, h, w = arrays[0].shape
    metadata = {"source": "arrays"}
    if out is None and not progress and not isinstance(masks, Mapping):
        store = ConceptStore.from_masks(np.asarray(masks), names, cats)
        store.metadata.update(metadata)
        return store
    with open_writer((n_images, h, w), names, cats, out, overwrite, progress, metadata) as writer:
        for i in range(n_images):
            present = {n: a[i] for n, a in zip(names, arrays) if a[i].any()}
            writer.add_image(i, masks=present)
    return writer.store


# -- a folder of per-concept masks -------------------------------------------------------------


def from_mask_folder(
    root: PathLike,
    images: Sequence[str] | None = None,
    grid: GridSize = 112,
    *,
    concepts: Sequence[str] | None = None,
    categories: str | Sequence[str] | Mapping[str, str] | None = None,
    suffix: str = ".png",
    allow_outside_links: bool = False,
    out: PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConceptStore:
    """A store from a folder with one sub-folder of mask images per concept.

    Layout: ``<root>/<concept>/<image>.png``, where ``<image>`` is the image's name
    without extension (its *stem*). A pixel is *on* where any channel of the mask file
    is non-zero (palette images: the palette index). A missing file means the concept is
    absent from that image. Masks may have any size (usually the image's); each is
    resized to the grid by nearest neighbour (see the module docstring).

    Parameters
    ----------
    root
        The folder. Sub-folders whose name starts with ``.`` are skipped.
    images
        Image stems in probing-set order (image ids ``0..n-1``). ``None``: the sorted
        union of the stems found under every concept. Masks of other stems are ignored.
    grid
        ``H`` or ``(H, W)`` of the store.
    concepts
        Concept folders to read, in this order; ``None``: every sub-folder, sorted.
    categories
        One category for all, one per concept, or a dict ``concept -> category``.
    suffix
        Extension of the mask files (case-insensitive), ``.png`` by default.
    allow_outside_links
        Symbolic links (concept folders or mask files) are followed when they stay inside
        ``root``; one that leads outside is refused unless this is true, so a folder from
        elsewhere cannot make pyneuron read arbitrary files.
    out, overwrite, progress
        As in :func:`from_arrays` (progress shown by default).

    Raises
    ------
    MissingFileError
        If ``root`` or a listed concept folder does not exist.
    ConceptSourceError
        If no mask file matches any image, a file cannot be decoded (the message names
        it), names repeat, or a symbolic link leads outside ``root``.

    Examples
    --------
    >>> import tempfile
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> (root / "dog").mkdir()
    >>> Image.fromarray(np.eye(4, dtype=np.uint8) * 255).save(root / "dog" / "img1.png")
    >>> store = from_mask_folder(root, images=["img0", "img1"], grid=4, progress=False)
    >>> store.images_with("dog").tolist(), int(store.mask("dog").sum())
    ([1], 4)
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"mask folder {root} does not exist")
    if concepts is None:
        concepts = sorted(
            p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not concepts:
            raise ConceptSourceError(
                f"{root} has no concept sub-folders; expected <root>/<concept>/<image>{suffix}"
            )
    else:
        concepts = list(concepts)
        if not concepts:
            raise ConceptSourceError("no concepts given (an empty list)")
    check_unique(concepts)
    suffix = suffix.lower()
    inside = root.resolve()

    def checked(path: Path) -> Path:
        if not allow_outside_links and not path.resolve().is_relative_to(inside):
            raise ConceptSourceError(
                f"{path} leads outside the mask folder {root} (to {path.resolve()}); pass "
                "allow_outside_links=True to follow such symbolic links"
            )
        return path

    files: dict[str, dict[str, Path]] = {}
    for concept in concepts:
        folder = root / concept
        if not folder.is_dir():
            raise MissingFileError(f"concept folder {folder} does not exist")
        checked(folder)
        files[concept] = {
            p.name[: -len(suffix)]: checked(p)
            for p in folder.iterdir()
            if p.name.lower().endswith(suffix) and p.is_file()
        }
    if images is None:
        images = sorted(set().union(*(f.keys() for f in files.values())))
    else:
        images = [str(s) for s in images]
        check_unique(images, "image name")
    if not images:
        raise ConceptSourceError(f"no mask files ending in {suffix!r} under {root}")
    if not any(stem in f for f in files.values() for stem in images):
        raise ConceptSourceError(
            f"no mask file under {root} matches any of the {len(images)} images (e.g. "
            f"{images[0]!r}); files are <root>/<concept>/<image>{suffix}"
        )
    h, w = grid_size(grid)
    cats = _categories_for(concepts, categories)
    metadata = {
        "source": "mask_folder",
        "root": str(root),
        "images": list(images),
        "resize": "PIL NEAREST",
    }
    writer = open_writer((len(images), h, w), concepts, cats, out, overwrite, progress, metadata)
    with writer:
        for i, stem in enumerate(images):
            masks = {}
            for concept in concepts:
                path = files[concept].get(stem)
                if path is None:
                    continue
                array = read_array(path, "mask")
                on = array != 0 if array.ndim == 2 else (array != 0).any(axis=2)
                on = resize_nearest(on, (h, w))
                if on.any():
                    masks[concept] = on
            writer.add_image(i, masks=masks)
    return writer.store


# -- semantic-segmentation label maps ------------------------------------------------------------


def _label_sources(
    label_maps: PathLike | Sequence[PathLike] | np.ndarray, suffix: str
) -> tuple[list[Any], list[str]]:
    """(items, image names): paths or 2-D arrays, in probing-set order."""
    if isinstance(label_maps, np.ndarray):
        if label_maps.ndim != 3:
            raise ConceptSourceError(
                f"label maps given as an array must be (images, height, width), got "
                f"{label_maps.shape}"
            )
        return list(label_maps), [str(i) for i in range(label_maps.shape[0])]
    if isinstance(label_maps, (str, os.PathLike)):
        folder = Path(label_maps)
        if not folder.is_dir():
            raise MissingFileError(f"label-map folder {folder} does not exist")
        paths = sorted(
            p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(suffix.lower())
        )
        if not paths:
            raise ConceptSourceError(f"no label maps ending in {suffix!r} in {folder}")
    else:
        paths = [Path(p) for p in label_maps]
        if not paths:
            raise ConceptSourceError("no label maps given (an empty list)")
    return paths, [p.stem for p in paths]


def from_label_maps(
    label_maps: PathLike | Sequence[PathLike] | np.ndarray,
    class_names: Sequence[str],
    grid: GridSize = 112,
    *,
    ignore_index: int | Iterable[int] | None = 255,
    reduce_zero_label: bool = False,
    categories: str | Sequence[str] | Mapping[str, str] | None = None,
    suffix: str = ".png",
    out: PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConceptStore:
    """A store from semantic-segmentation label maps and their class names.

    This is the ADE20K-150 / detectron2 ``sem_seg`` layout: single-channel PNGs (uint8 or
    uint16; palette PNGs give their indices) whose pixel value ``k`` is class
    ``class_names[k]``, with an ignore value (255 in detectron2's
    ``annotations_detectron2``). Raw ADEChallengeData2016 annotations use 0 for "other"
    and 1..150 for the classes: pass ``reduce_zero_label=True`` (mmsegmentation's name:
    0 becomes ignored, ``k`` becomes ``k - 1``). Every class is a concept (in class order,
    even when absent); maps are resized to the grid by nearest neighbour.

    Parameters
    ----------
    label_maps
        A folder (its files ending in ``suffix``, sorted by name, are images ``0..n-1``),
        a list of files, or an integer array (images, height, width).
    class_names
        Name of class ``k`` at position ``k``; unique.
    grid
        ``H`` or ``(H, W)`` of the store.
    ignore_index
        Raw pixel value(s) that are unlabelled, or ``None``.
    reduce_zero_label
        Treat 0 as unlabelled and shift the other values down by one (after
        ``ignore_index`` is applied to the raw values).
    categories
        One category for all, one per class, or a dict ``class -> category``.
    out, overwrite, progress
        As in :func:`from_arrays` (progress shown by default).

    Raises
    ------
    ConceptSourceError
        For a value that is neither a class nor ignored (naming the file and the value),
        a multi-channel or undecodable file, no maps, duplicate class names.

    Examples
    --------
    >>> maps = np.array([[[0, 1], [255, 1]], [[2, 2], [2, 2]]], dtype=np.uint8)
    >>> store = from_label_maps(maps, ["wall", "floor", "sky"], grid=2, progress=False)
    >>> store.mask("floor")[0].astype(int).tolist(), store.images_with("sky").tolist()
    ([[0, 1], [0, 1]], [1])
    """
    class_names = list(class_names)
    if not class_names:
        raise ConceptSourceError("no class names given (an empty list)")
    check_unique(class_names, "class name")
    if ignore_index is None:
        ignore = np.zeros(0, dtype=np.int64)
    elif isinstance(ignore_index, (int, np.integer)):
        ignore = np.array([int(ignore_index)], dtype=np.int64)
    else:
        ignore = np.array(sorted(int(v) for v in ignore_index), dtype=np.int64)
    items, stems = _label_sources(label_maps, suffix)
    h, w = grid_size(grid)
    cats = _categories_for(class_names, categories)
    metadata = {
        "source": "label_maps",
        "images": stems,
        "ignore_index": ignore.tolist(),
        "reduce_zero_label": bool(reduce_zero_label),
        "resize": "PIL NEAREST",
    }
    if not isinstance(label_maps, np.ndarray):
        metadata["files"] = [str(p) for p in items]
    n_classes = len(class_names)
    writer = open_writer((len(items), h, w), class_names, cats, out, overwrite, progress, metadata)
    with writer:
        for i, item in enumerate(items):
            where = f"label map {item}" if isinstance(item, Path) else f"label map {i}"
            raw = read_array(item, "label map") if isinstance(item, Path) else np.asarray(item)
            if raw.ndim != 2 or not (np.issubdtype(raw.dtype, np.integer) or raw.dtype == bool):
                raise ConceptSourceError(
                    f"{where} must be a single-channel integer image, got {raw.dtype} "
                    f"{raw.shape}; Broden's R + 256*G label PNGs are read by broden()"
                )
            ids = raw.astype(np.int64)
            unlabelled = np.isin(ids, ignore) if ignore.size else np.zeros(ids.shape, bool)
            if reduce_zero_label:
                unlabelled |= ids == 0
                ids = ids - 1
            ids[unlabelled] = -1
            bad = (ids < -1) | (ids >= n_classes) | ((ids == -1) & ~unlabelled)
            if bad.any():
                values = np.unique(raw[bad])
                raise ConceptSourceError(
                    f"{where} holds value(s) {values[:10].tolist()} that are neither one of "
                    f"the {n_classes} classes nor ignored (ignore_index="
                    f"{ignore.tolist()}, reduce_zero_label={reduce_zero_label})"
                )
            writer.add_image(i, label_map=resize_nearest(ids, (h, w)))
    return writer.store


# -- COCO annotations ---------------------------------------------------------------------------


#: Largest COCO image pycocotools handles safely (it sizes masks in 32-bit integers).
COCO_MAX_PIXELS = 2**31 - 1


def _rle_counts_from_string(text: str | bytes) -> np.ndarray:
    """Run lengths of COCO's compressed RLE string (``rleFrString`` of pycocotools'
    maskApi.c), checked for malformed input instead of trusted."""
    data = text.encode() if isinstance(text, str) else bytes(text)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x, k, more = 0, 0, True
        while more:
            if p >= len(data):
                raise ValueError("its compressed RLE string ends in the middle of a number")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"its compressed RLE string holds the character {chr(data[p])!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return np.asarray(counts, dtype=np.int64)


def _sample_rle(
    counts: np.ndarray, h: int, w: int, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """Pixels (rows x cols) of an h x w mask given as column-major run lengths (the first
    run is zeros), without decoding the whole mask."""
    if counts.size and counts.min() < 0:
        raise ValueError("its RLE holds a negative run length")
    if int(counts.sum()) != h * w:
        raise ValueError(f"its RLE runs cover {int(counts.sum())} pixels, not {h}x{w}")
    ends = np.cumsum(counts)
    index = cols[None, :].astype(np.int64) * h + rows[:, None]
    return np.searchsorted(ends, index, side="right") % 2 == 1


def _check_polygons(segm: list[Any], h: int, w: int) -> None:
    """Refuse polygons pycocotools would crash on (or spend unbounded memory on)."""
    limit = 4 * max(h, w)
    for polygon in segm:
        if not isinstance(polygon, (list, tuple)) or len(polygon) < 6 or len(polygon) % 2:
            raise ValueError("a polygon must be a list of at least 3 (x, y) pairs")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon):
            raise ValueError("polygon coordinates must be numbers")
        values = np.asarray(polygon, dtype=np.float64)
        if not np.isfinite(values).all() or np.abs(values).max() > limit:
            raise ValueError(
                f"a polygon coordinate lies far outside the {h}x{w} image (|x|, |y| must be at "
                f"most {limit}; coordinates are pixels, not normalized or scaled)"
            )


def _coco_mask(
    mask_utils: Any, ann: Mapping[str, Any], h: int, w: int, size: tuple[int, int]
) -> np.ndarray | None:
    """One annotation's segmentation (polygons, RLE or compressed RLE) of an h x w image,
    as ``pycocotools.coco.COCO.annToMask`` decodes it, resized to ``size`` by nearest
    neighbour. Only the sampled pixels are computed, from the run lengths, so the cost
    does not grow with the image."""
    rows, cols = _positions(h, size[0]), _positions(w, size[1])
    segm = ann["segmentation"]
    if isinstance(segm, list):
        if not segm:
            return None
        _check_polygons(segm, h, w)
        rles = mask_utils.frPyObjects([list(map(float, p)) for p in segm], h, w)
        out = np.zeros(size, dtype=bool)
        for rle in rles:
            out |= _sample_rle(_rle_counts_from_string(rle["counts"]), h, w, rows, cols)
        return out
    if isinstance(segm, Mapping):
        rle_size = list(segm.get("size", ()))
        if rle_size != [h, w]:
            raise ValueError(f"its RLE size {rle_size} is not the image's [height, width] {[h, w]}")
        counts = segm.get("counts")
        if isinstance(counts, (str, bytes)):
            return _sample_rle(_rle_counts_from_string(counts), h, w, rows, cols)
        if isinstance(counts, list) and all(
            isinstance(c, int) and not isinstance(c, bool) for c in counts
        ):
            return _sample_rle(np.asarray(counts, dtype=np.int64), h, w, rows, cols)
        raise ValueError("its RLE 'counts' must be a list of integers or a compressed string")
    raise ValueError(f"segmentation must be polygons or RLE, got {type(segm).__name__}")


def _positions(size_in: int, size_out: int) -> np.ndarray:
    """Input positions a nearest-neighbour resize to ``size_out`` reads (see
    :func:`resize_nearest`)."""
    if size_in == size_out:
        return np.arange(size_in, dtype=np.int64)
    return _nearest_positions(size_in, size_out)


def from_coco(
    annotations: PathLike | Mapping[str, Any],
    grid: GridSize = 112,
    *,
    image_ids: Sequence[int] | None = None,
    crowd: bool = True,
    category: str = "object",
    use_supercategory: bool = False,
    out: PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConceptStore:
    """A store from COCO-style instance annotations (polygons, RLE, compressed RLE).

    Each COCO category is a concept (in category-id order, even when absent); in each
    image the instances of a category are merged (union), decoded as ``pycocotools``
    does at the image's ``height x width`` and resized to the grid by nearest neighbour
    (only the pixels the resize reads are computed, from the run lengths, so large images
    cost no more than small ones). Sizes and coordinates are checked before
    ``pycocotools`` sees them: images of at most 2**31 - 1 pixels, polygon coordinates
    within 4 x max(height, width) of the origin, RLE runs covering the image exactly.
    Needs ``pycocotools`` (``pip install pycocotools``).

    Parameters
    ----------
    annotations
        Path of the JSON file, or the loaded dict (``images``, ``categories``,
        ``annotations``).
    grid
        ``H`` or ``(H, W)`` of the store.
    image_ids
        COCO image ids in probing-set order; ``None``: every image, sorted by id.
    crowd
        Include ``iscrowd`` annotations (default) or skip them.
    category, use_supercategory
        Store category of every concept, or each COCO category's ``supercategory``.
    out, overwrite, progress
        As in :func:`from_arrays` (progress shown by default).

    Raises
    ------
    ImportError
        If ``pycocotools`` is not installed.
    ConceptSourceError
        For unknown image or category ids, duplicate category names, an empty file, an
        image size out of range, or a segmentation that cannot be decoded (naming the
        annotation id).

    Examples
    --------
    >>> coco = {"images": [{"id": 7, "height": 4, "width": 4}],
    ...         "categories": [{"id": 1, "name": "cat"}],
    ...         "annotations": [{"id": 1, "image_id": 7, "category_id": 1,
    ...                          "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]}]}
    >>> store = from_coco(coco, grid=4, progress=False)
    >>> store.mask("cat")[0].astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 0, 0],
           [0, 0, 0, 0]])
    """
    try:
        from pycocotools import mask as mask_utils
    except ImportError:  # pragma: no cover - exercised only without pycocotools
        raise ImportError(
            "pyneuron.concepts.from_coco needs pycocotools: pip install pycocotools "
            "(or pip install 'pyneuron[coco]')"
        ) from None
    source = "dict"
    if not isinstance(annotations, Mapping):
        path = Path(annotations)
        source = str(path)
        if not path.is_file():
            raise MissingFileError(f"COCO annotation file {path} does not exist")
        try:
            annotations = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ConceptSourceError(f"cannot read COCO JSON {path}: {error}") from None
        except RecursionError:  # arrays or objects nested thousands deep
            raise ConceptSourceError(
                f"{path} is not valid COCO JSON: it is nested too deeply to read (COCO "
                "annotations nest a few levels); check that it is the instances file"
            ) from None
        if not isinstance(annotations, Mapping):
            raise ConceptSourceError(f"{path} is not a COCO annotation object")
    try:
        coco_images = {int(im["id"]): im for im in annotations["images"]}
        coco_categories = sorted(annotations["categories"], key=lambda c: int(c["id"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ConceptSourceError(
            f"COCO annotations from {source} need 'images' and 'categories' lists with "
            f"'id's: {error!r}"
        ) from None
    if len(coco_images) != len(annotations["images"]):
        raise ConceptSourceError(f"COCO annotations from {source} repeat an image id")
    if not coco_categories:
        raise ConceptSourceError(f"COCO annotations from {source} have no categories")
    names = [str(c.get("name", "")) for c in coco_categories]
    check_unique(names, "COCO category name")
    concept_of = {int(c["id"]): k for k, c in enumerate(coco_categories)}
    if len(concept_of) != len(coco_categories):
        raise ConceptSourceError(f"COCO annotations from {source} repeat a category id")
    cats = [
        str(c.get("supercategory", "")) if use_supercategory else category for c in coco_categories
    ]
    ids = sorted(coco_images) if image_ids is None else [int(i) for i in image_ids]
    if not ids:
        raise ConceptSourceError(f"COCO annotations from {source} have no images")
    unknown = [i for i in ids if i not in coco_images]
    if unknown:
        raise ConceptSourceError(f"image ids {unknown[:10]} are not in {source}")
    if len(set(ids)) != len(ids):
        raise ConceptSourceError("image_ids repeat an id")
    by_image: dict[int, list[Mapping[str, Any]]] = {i: [] for i in ids}
    for ann in annotations.get("annotations", []):
        try:
            image_id, category_id = int(ann["image_id"]), int(ann["category_id"])
            ann["segmentation"]
        except (KeyError, TypeError, ValueError):
            raise ConceptSourceError(
                f"annotation {ann.get('id') if isinstance(ann, Mapping) else ann!r} in "
                f"{source} needs 'image_id', 'category_id' and 'segmentation'"
            ) from None
        if image_id not in coco_images:
            raise ConceptSourceError(
                f"annotation {ann.get('id')} refers to image {image_id}, not in {source}"
            )
        if category_id not in concept_of:
            raise ConceptSourceError(
                f"annotation {ann.get('id')} refers to category {category_id}, not in {source}"
            )
        if image_id in by_image and (crowd or not ann.get("iscrowd", 0)):
            by_image[image_id].append(ann)
    h, w = grid_size(grid)
    metadata = {
        "source": "coco",
        "annotations": source,
        "image_ids": ids,
        "images": [str(coco_images[i].get("file_name", "")) for i in ids],
        "category_ids": [int(c["id"]) for c in coco_categories],
        "crowd": bool(crowd),
        "resize": "PIL NEAREST",
    }
    writer = open_writer((len(ids), h, w), names, cats, out, overwrite, progress, metadata)
    with writer:
        for i, image_id in enumerate(ids):
            image = coco_images[image_id]
            try:
                ih, iw = int(image["height"]), int(image["width"])
            except (KeyError, TypeError, ValueError, OverflowError):
                raise ConceptSourceError(
                    f"COCO image {image_id} needs integer 'height' and 'width'"
                ) from None
            if ih < 1 or iw < 1 or ih * iw > COCO_MAX_PIXELS:
                raise ConceptSourceError(
                    f"COCO image {image_id} is {ih}x{iw}: height and width must be at least 1 "
                    "and their product at most 2**31 - 1 (pycocotools' limit)"
                )
            merged: dict[int, np.ndarray] = {}
            for ann in by_image[image_id]:
                try:
                    mask = _coco_mask(mask_utils, ann, ih, iw, (h, w))
                except Exception as error:  # pycocotools raises bare Exceptions
                    raise ConceptSourceError(
                        f"cannot decode the segmentation of annotation {ann.get('id')} "
                        f"(image {image_id}): {error}"
                    ) from None
                if mask is None:
                    continue
                k = concept_of[int(ann["category_id"])]
                merged[k] = merged[k] | mask if k in merged else mask
            masks = {names[k]: mask for k, mask in merged.items() if mask.any()}
            writer.add_image(i, masks=masks)
    return writer.store
