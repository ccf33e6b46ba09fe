"""Open-vocabulary concept masks: any list of concept names -> a :class:`~pyneuron.ConceptStore`.

:func:`segment` runs a text-prompted segmenter (CLIPSeg by default, Grounding DINO + SAM,
OWLv2 + SAM, or any callable; see :mod:`pyneuron.concepts.segmenters`) over the probing
images and writes concept masks on the pixel grid, after Open Vocabulary Compositional
Explanations (OVCE; La Rosa & Gilpin 2025, arXiv 2511.20931), in one of two
:data:`SEMANTICS`.

``semantics="pyneuron"`` (the default):

1. Each image is given to the segmenter once with every distinct concept of every group,
   which returns score maps in [0, 1] per concept.
2. Each score map is resized to the grid with Pillow-exact bilinear interpolation (the
   resampling used for unit maps, see :func:`pyneuron.bilinear_resize`), and only then:
3. per concept group, in ``"argmax"`` mode every pixel goes to the group's
   highest-scoring concept (no threshold; ties go to the concept listed first; a pixel
   where every concept of the group scores <= 0 stays unlabelled), so concepts of one
   group never overlap; in ``"threshold"`` mode each concept's mask is
   ``score > threshold`` on its own;
4. filler concepts (``"background"``, ``"other"`` by default) take part in the argmax
   but are dropped afterwards: they are not stored.

``semantics="ovce"`` (OVCE's rules, as its code, aiea-lab/ovce, applies them):

1. Each group is given to the segmenter in a call of its own, with that group's
   concepts only.
2. Every pixel of the segmenter's output goes to the group's highest-scoring concept,
   at the segmenter's output resolution (``torch.argmax``: ties go to the concept listed
   first; every pixel gets a label, also where every concept scores 0).
3. Fillers are dropped after the argmax, as above.
4. Each concept mask is resized to the grid by nearest neighbour exactly as
   ``torch.nn.functional.interpolate(mask, size=grid, mode="nearest")``: grid row ``i``
   is output row ``min(floor(i * s), h - 1)`` with ``s = h / grid height`` and the
   product taken in single precision (likewise columns).

OVCE has no thresholded masks, so ``"threshold"`` groups are refused under ``"ovce"``.

How they differ. ``"pyneuron"`` calls the segmenter once per batch of images (one image
encoding for all groups), ``"ovce"`` once per group and batch. The two get the same
scores from segmenters whose score for a concept does not depend on the other concepts
queried with it (CLIPSeg scores each prompt on its own). For segmenters whose scores do (CAT-Seg
aggregates its costs across the queried classes; Grounding DINO reads the prompts as one
text), the masks differ, and ``"ovce"`` is the one that matches OVCE. Resampling the
scores before the argmax weighs the segmenter's pixels around each grid cell's centre,
as the bilinear resampling of unit maps to the same grid does, so concept and unit masks
are aligned and boundaries are smoother; torch's nearest resize keeps one segmenter pixel
per grid cell, the one at the cell's top-left corner (half a cell off its centre when
shrinking 352 -> 112). On smooth synthetic score maps (352 -> 112, 8 concepts in one
group) 0.7 % to 3 % of a concept's grid pixels differ between the two, more where the
maps have more boundary. ``"pyneuron"`` leaves a pixel where every concept of a group
scores <= 0 (e.g. outside every detected box) unlabelled; ``"ovce"`` gives it to the
group's first concept.

Groups are independent passes, so concepts of different groups (e.g. ``parts`` and
``part x colour``) may overlap. Each stored concept's category is its group's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import queue
import threading
import warnings
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..engine.atomic import write_atomically
from ..engine.grid import Grid
from ..engine.store import ConceptStore, ConceptStoreWriter
from ..engine.upsample import bilinear_resize
from ..errors import PyneuronError
from ..image_files import IMAGE_SUFFIXES, image_file_key, list_images, open_image
from ..progress import progress_bar
from .segmenters import CallableSegmenter, as_segmenter
from .vocabulary import MODES, ConceptVocabulary

CACHE_VERSION = 1
DEFAULT_FILLERS = ("background", "other")
#: How masks are made from the segmenter's scores (see the module's documentation).
SEMANTICS = ("pyneuron", "ovce")
_RESIZE = {
    "pyneuron": "one segmenter call per batch of images with every group's concepts; score maps "
    "resized to the grid (Pillow-exact bilinear), then argmax per group / score > threshold",
    "ovce": "one segmenter call per group with its concepts only; argmax per group at the "
    "segmenter's output resolution (every pixel labelled, ties to the first concept), then "
    "each concept mask resized to the grid as torch.nn.functional.interpolate(mode='nearest')",
}


# -- images -----------------------------------------------------------------------------


class _Images:
    """Random access to the probing images: decoded PIL images and content keys."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> Any:
        raise NotImplementedError

    def key(self, i: int) -> str:
        raise NotImplementedError

    def names(self) -> list[str] | None:
        return None


def _digest(*parts: bytes) -> str:
    digest = hashlib.blake2b(digest_size=20)
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


class _FileImages(_Images):
    def __init__(self, files: Sequence[Path], root: Path | None) -> None:
        self.files = list(files)
        self.root = root

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> Any:
        return open_image(self.files[i]).convert("RGB")

    def key(self, i: int) -> str:
        # The file's bytes: a cache hit never decodes the image.
        return image_file_key(self.files[i])

    def names(self) -> list[str]:
        if self.root is None:
            return [str(p) for p in self.files]
        return [p.relative_to(self.root).as_posix() for p in self.files]


class _PilImages(_Images):
    def __init__(self, images: Sequence[Any]) -> None:
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Any:
        return self.images[i].convert("RGB")

    def key(self, i: int) -> str:
        image = self.load(i)
        return _digest(b"pil", f"{image.size}".encode(), image.tobytes())


class _ArrayImages(_Images):
    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def load(self, i: int) -> Any:
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(self.array[i]), mode="RGB")

    def key(self, i: int) -> str:
        item = np.ascontiguousarray(self.array[i])
        return _digest(b"array", f"{item.shape}".encode(), item.tobytes())


def _as_images(images: Any) -> _Images:
    if isinstance(images, (str, os.PathLike)):
        root = Path(images)
        if root.is_file():
            return _FileImages([root], None)
        return _FileImages(list_images(root), root)
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise PyneuronError(
                "an image array must be uint8 of shape (N, H, W, 3), got "
                f"{images.dtype} {images.shape}"
            )
        if len(images) == 0:
            raise PyneuronError("the image array holds no images")
        return _ArrayImages(images)
    try:
        items = list(images)
    except TypeError:
        raise PyneuronError(
            f"unsupported images of type {type(images).__name__}: give a folder, a list of "
            "image files, a list of PIL images, or a uint8 array (N, H, W, 3)"
        ) from None
    if not items:
        raise PyneuronError("no images given")
    if all(isinstance(item, (str, os.PathLike)) for item in items):
        files = [Path(item) for item in items]
        for f in files:
            if not f.is_file():
                raise PyneuronError(f"image file {f} does not exist")
        return _FileImages(files, None)
    if all(hasattr(item, "convert") and hasattr(item, "tobytes") for item in items):
        return _PilImages(items)
    raise PyneuronError(
        "a list of images must hold only PIL images or only file paths "
        f"(suffixes {', '.join(IMAGE_SUFFIXES)})"
    )


# -- the plan: groups, names, modes -------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    name: str
    mode: str
    concepts: tuple[str, ...]
    columns: np.ndarray  # positions of the concepts in the segmenter call
    stored: tuple[int | None, ...]  # store concept id per concept (None: filler)


def _plan(
    vocabulary: ConceptVocabulary, mode: str, fillers: Sequence[str]
) -> tuple[list[str], list[str], list[str], list[_Group]]:
    """(segmenter concepts, stored names, stored categories, groups)."""
    stored_names = vocabulary.stored_names(fillers)
    stored_index = {name: i for i, name in enumerate(stored_names)}
    queried = vocabulary.unique_names()
    column = {name: i for i, name in enumerate(queried)}
    categories = [""] * len(stored_names)
    groups = []
    filler_set = set(fillers)
    for group in vocabulary.groups:
        if len(group.concepts) > np.iinfo(np.int16).max:
            raise PyneuronError(f"group {group.name!r} has more than 32767 concepts; split it")
        stored = []
        for concept in group.concepts:
            if concept in filler_set:
                stored.append(None)
            else:
                stored.append(stored_index[concept])
                categories[stored_index[concept]] = group.name
        groups.append(
            _Group(
                group.name,
                group.mode or mode,
                group.concepts,
                np.array([column[c] for c in group.concepts], dtype=np.int64),
                tuple(stored),
            )
        )
    return queried, stored_names, categories, groups


def _label_groups(
    scores: np.ndarray, groups: Sequence[_Group], threshold: float
) -> list[np.ndarray]:
    """Per group: argmax labels (H, W) int16 (-1 unlabelled) or packed threshold masks."""
    results = []
    for group in groups:
        sub = scores[group.columns]
        if group.mode == "argmax":
            labels = np.argmax(sub, axis=0).astype(np.int16)
            labels[np.max(sub, axis=0) <= 0] = -1
            results.append(labels)
        else:
            bits = (sub > threshold).reshape(len(group.concepts), -1)
            results.append(np.packbits(bits, axis=1))
    return results


@lru_cache(maxsize=256)
def _torch_nearest_positions(size_in: int, size_out: int) -> np.ndarray:
    """Input positions ``torch.nn.functional.interpolate(mode="nearest", size=...)``
    samples along one axis of ``size_out``: ``min(floor(i * s), size_in - 1)`` with
    ``s = size_in / size_out``, both in single precision as torch computes them."""
    scale = np.float32(size_in) / np.float32(size_out)
    positions = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    positions = np.minimum(positions, size_in - 1)
    positions.setflags(write=False)
    return positions


def _label_then_resize(scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """OVCE's labels of one group: argmax at the scores' resolution, resized to
    ``(height, width)`` by torch's nearest rule (int16, every pixel labelled)."""
    labels = np.argmax(scores, axis=0).astype(np.int16)
    rows = _torch_nearest_positions(labels.shape[0], height)
    cols = _torch_nearest_positions(labels.shape[1], width)
    return labels[rows[:, None], cols[None, :]]


def _masks_for_store(
    encoded: Sequence[np.ndarray], groups: Sequence[_Group], names: Sequence[str], h: int, w: int
) -> dict[str, np.ndarray]:
    masks: dict[str, np.ndarray] = {}
    for group, value in zip(groups, encoded):
        if group.mode == "argmax":
            for k in np.unique(value[value >= 0]).tolist():
                concept = group.stored[k]
                if concept is not None:
                    masks[names[concept]] = value == k
        else:
            bits = np.unpackbits(value, axis=1, count=h * w).astype(bool)
            for k, concept in enumerate(group.stored):
                if concept is not None and bits[k].any():
                    masks[names[concept]] = bits[k].reshape(h, w)
    return masks


# -- cache ------------------------------------------------------------------------------


class _Cache:
    """Per-image results under ``<cache_dir>/segment-<run key>/<ab>/<image key>.npz``.

    The run key hashes the segmenter fingerprint, the groups (names, concepts, modes),
    the grid size, the semantics and the threshold of thresholded groups; the image key
    hashes the image's file bytes (or pixels). Fillers are not part of the key: they are
    applied when the store is written.
    """

    def __init__(self, root: Path, description: dict[str, Any]) -> None:
        key = _digest(json.dumps(description, sort_keys=True).encode())[:24]
        self.folder = Path(root) / f"segment-{key}"
        self.folder.mkdir(parents=True, exist_ok=True)
        info = self.folder / "run.json"
        if not info.exists():
            text = json.dumps(description, indent=2)
            write_atomically(info, lambda p: p.write_text(text), durable=False)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npz"

    def get(self, key: str, n_groups: int) -> list[np.ndarray] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path) as data:
                values = [data[f"g{i}"] for i in range(n_groups)]
        except (OSError, ValueError, KeyError, EOFError):
            return None  # a damaged entry is recomputed
        return values

    def put(self, key: str, values: Sequence[np.ndarray]) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        arrays = {f"g{i}": v for i, v in enumerate(values)}

        def save(temporary: Path) -> None:
            with open(temporary, "wb") as handle:
                np.savez_compressed(handle, **arrays)

        # an entry is checked when read (a damaged one is recomputed): no fsync needed
        write_atomically(path, save, durable=False)


# -- running the segmenter ----------------------------------------------------------------


def _prefetch(generator: Generator[Any, None, None], depth: int = 2) -> Iterator[Any]:
    """Run ``generator`` in a background thread, ``depth`` items ahead (reading images
    overlaps with inference). The thread closes it when done or when the consumer stops,
    so its ``finally`` blocks (a worker pool's shutdown) run there."""
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            with contextlib.closing(generator):
                for item in generator:
                    items.put(("item", item))
                    if stop.is_set():
                        return
            items.put(("done", None))
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            items.put(("error", error))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def _grid_size(grid: Any) -> tuple[int, int]:
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        size: tuple[Any, ...] = (grid, grid)
    elif isinstance(grid, (tuple, list)) and len(grid) == 2:
        size = tuple(grid)
    else:
        raise PyneuronError(f"grid must be a size like 112 or (height, width), got {grid!r}")
    for value in size:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise PyneuronError(f"grid sizes must be positive integers, got {grid!r}")
    return int(size[0]), int(size[1])


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor
        return array.detach().float().cpu().numpy()
    return np.asarray(array)


def _score_arrays(output: Any, n_images: int, n_concepts: int, name: str) -> list[np.ndarray]:
    if hasattr(output, "detach"):
        output = _to_numpy(output)
    if isinstance(output, np.ndarray):
        if output.ndim != 4 or output.shape[:2] != (n_images, n_concepts):
            raise PyneuronError(
                f"segmenter {name!r} returned shape {output.shape}; expected ({n_images}, "
                f"{n_concepts}, height, width) for {n_images} images and {n_concepts} concepts"
            )
        arrays = list(output)
    else:
        arrays = [_to_numpy(a) for a in output]
        if len(arrays) != n_images:
            raise PyneuronError(
                f"segmenter {name!r} returned {len(arrays)} score maps for {n_images} images"
            )
    for a in arrays:
        if a.ndim != 3 or a.shape[0] != n_concepts:
            raise PyneuronError(
                f"segmenter {name!r} returned a score map of shape {a.shape}; expected "
                f"({n_concepts}, height, width)"
            )
    return arrays


def _check_arguments(
    mode: str, on_error: str, batch_size: int, threshold: float, workers: int, semantics: str
) -> None:
    """Refuse arguments of :func:`segment` that are not one of their allowed values."""
    if mode not in MODES:
        raise PyneuronError(f"mode must be one of {MODES}, got {mode!r}")
    if semantics not in SEMANTICS:
        raise PyneuronError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if on_error not in ("raise", "skip"):
        raise PyneuronError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PyneuronError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not np.isfinite(threshold):
        raise PyneuronError(f"threshold must be a finite number, got {threshold!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise PyneuronError(f"workers must be an integer >= 0, got {workers!r}")


def _check_groups(groups: Sequence[_Group], semantics: str) -> None:
    """Refuse thresholded groups under ``"ovce"`` semantics (OVCE labels by argmax only)."""
    if semantics != "ovce":
        return
    for group in groups:
        if group.mode == "threshold":
            raise PyneuronError(
                f"group {group.name!r} is in threshold mode, which semantics='ovce' does not "
                "have (OVCE gives every pixel of a group to its best concept); use "
                "mode='argmax' for it, or semantics='pyneuron'"
            )


def _open_cache(
    cache_dir: str | os.PathLike[str] | None,
    model: Any,
    groups: Sequence[_Group],
    grid: tuple[int, int],
    threshold: float,
    semantics: str,
) -> _Cache | None:
    """The per-image cache of this run under ``cache_dir`` (``None`` without one)."""
    if cache_dir is None:
        return None
    if isinstance(model, CallableSegmenter) and not model.has_fingerprint:
        raise PyneuronError(
            f"cannot cache the outputs of function {model.name!r}: it has no fingerprint. "
            "Set one (fn.fingerprint = 'v1', changed whenever its outputs change) or wrap it: "
            "CallableSegmenter(fn, fingerprint='v1')"
        )
    thresholded = any(g.mode == "threshold" for g in groups)
    return _Cache(
        Path(cache_dir),
        {
            "version": CACHE_VERSION,
            "segmenter": str(model.fingerprint),
            "groups": [[g.name, g.mode, list(g.concepts)] for g in groups],
            "grid": list(grid),
            "semantics": semantics,
            "threshold": float(threshold) if thresholded else None,
        },
    )


def _metadata(
    model: Any,
    groups: Sequence[_Group],
    mode: str,
    threshold: float,
    fillers: Sequence[str],
    grid: tuple[int, int],
    images: list[str] | None,
    semantics: str,
) -> dict[str, Any]:
    """The store's metadata: ``source="segment"`` and how the masks were made."""
    describe = getattr(model, "describe", None)
    if callable(describe):
        segmenter = describe()
    else:
        fingerprint = str(getattr(model, "fingerprint", ""))
        segmenter = {"name": _model_name(model), "fingerprint": fingerprint}
    return {
        "source": "segment",
        "segment": {
            "segmenter": segmenter,
            "groups": [
                {"name": g.name, "concepts": list(g.concepts), "mode": g.mode} for g in groups
            ],
            "mode": mode,
            "threshold": float(threshold),
            "fillers": list(fillers),
            "grid": list(grid),
            "semantics": semantics,
            "resize": _RESIZE[semantics],
            "images": images,
        },
    }


def _model_name(model: Any) -> str:
    return str(getattr(model, "name", type(model).__name__))


class _Read(NamedTuple):
    """Image ``index`` as read: its content key (``None`` if it could not be read), and
    its cached result, its decoded image, or the error that stopped reading it."""

    index: int
    key: str | None
    hit: list[np.ndarray] | None
    image: Any
    error: PyneuronError | None


@dataclass(frozen=True)
class _ImageReader:
    """Reads an image: its content key, then its cached result or else its pixels.

    Picklable, for worker processes: an image that cannot be read gives its error back
    in the :class:`_Read` rather than raising, so that it is handled in image order.
    """

    source: _Images
    cache: _Cache | None
    n_groups: int
    keyed: bool  # whether images get a content key (files always; others for the cache)

    def read(self, i: int) -> _Read:
        key = None
        try:
            key = self.source.key(i) if self.keyed else ""
            hit = self.cache.get(key, self.n_groups) if self.cache is not None else None
            image = self.source.load(i) if hit is None else None
        except PyneuronError as error:
            return _Read(i, key, None, None, error)
        return _Read(i, key, hit, image, None)


_WORKER_READER: _ImageReader | None = None  # the reader of a worker process


def _start_worker(reader: _ImageReader) -> None:
    global _WORKER_READER
    _WORKER_READER = reader


def _read_in_worker(i: int) -> _Read:
    assert _WORKER_READER is not None, "_start_worker runs first in every worker"
    return _WORKER_READER.read(i)


def _pool_context() -> Any:
    """How worker processes start: forked from a fork server where there is one (a fresh
    single-threaded process; forking this one, which runs torch's threads, could
    deadlock), else spawned. The fork server, started once per program, imports this
    module first, so that workers start without importing pyneuron each (this replaces a
    preload list set before, which applies only until the fork server has started)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def _read_in_workers(reader: _ImageReader, n: int, workers: int) -> Generator[_Read, None, None]:
    """``reader.read(i)`` for ``i`` in ``range(n)``, in order, run by ``workers``
    processes that keep two images each read ahead."""
    pool = ProcessPoolExecutor(
        workers, mp_context=_pool_context(), initializer=_start_worker, initargs=(reader,)
    )
    pending: deque[Future[_Read]] = deque()
    try:
        for i in range(n):
            pending.append(pool.submit(_read_in_worker, i))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Pending(NamedTuple):
    """An image the segmenter has to score: its index, content key and decoded image."""

    index: int
    key: str
    image: Any


@dataclass
class _Batch:
    """The images of one segmenter call: those cached or unreadable (``done``; ``None``
    for an image skipped) and those still to segment (``todo``)."""

    index: range
    todo: list[_Pending]
    done: dict[int, list[np.ndarray] | None]


class _BatchReader:
    """Cuts the images into batches: looks each up in the cache, decodes the misses.

    With ``workers > 0``, image files are read, keyed, looked up and decoded by that many
    worker processes (images given in memory are read here). An image that cannot be
    read raises, or with ``on_error="skip"`` is recorded in :attr:`skipped` and left
    without concepts. :attr:`image_keys` collects the content keys of the images read
    (files get one even without a cache).
    """

    def __init__(
        self,
        source: _Images,
        batch_size: int,
        cache: _Cache | None,
        n_groups: int,
        on_error: str,
        workers: int,
    ) -> None:
        self.source = source
        self.batch_size = batch_size
        self.on_error = on_error
        self.names = source.names()
        files = isinstance(source, _FileImages)
        self.workers = workers if files else 0
        # Files get a content key each (cheap beside segmenting them), recorded in the store
        # so that a later run can check it is given the same images in the same order.
        self.reader = _ImageReader(source, cache, n_groups, cache is not None or files)
        self.image_keys: list[str | None] = [None] * len(source)
        self.skipped: list[dict[str, Any]] = []

    def batches(self) -> Generator[_Batch, None, None]:
        n = len(self.source)
        reads: Generator[_Read, None, None]
        if self.workers:
            reads = _read_in_workers(self.reader, n, self.workers)
        else:
            reads = (self.reader.read(i) for i in range(n))
        with contextlib.closing(reads):  # stops the workers when the batches stop early
            for start in range(0, n, self.batch_size):
                batch = _Batch(range(start, min(start + self.batch_size, n)), [], {})
                for read in itertools.islice(reads, len(batch.index)):
                    self._add(batch, read)
                yield batch

    def _add(self, batch: _Batch, read: _Read) -> None:
        i = read.index
        if read.key is not None:
            self.image_keys[i] = read.key
        if read.error is not None:
            self._fail(i, read.error)
            batch.done[i] = None
        elif read.hit is not None:
            batch.done[i] = read.hit
        else:
            assert read.key is not None
            batch.todo.append(_Pending(i, read.key, read.image))

    def _fail(self, i: int, error: PyneuronError) -> None:
        if self.on_error == "raise":
            raise error
        name = self.names[i] if self.names else None
        self.skipped.append({"image": i, "file": name, "error": str(error)})
        warnings.warn(f"skipping image {i}: {error}", RuntimeWarning, stacklevel=2)


@dataclass(frozen=True)
class _Labeller:
    """Scores images with the segmenter and labels every concept group on the grid."""

    model: Any
    queried: list[str]
    groups: Sequence[_Group]
    threshold: float
    height: int
    width: int
    image_names: list[str] | None
    semantics: str

    def label_batch(self, batch: _Batch, cache: _Cache | None) -> None:
        """Fill ``batch.done`` for the images of ``batch.todo`` (and cache each)."""
        images = [item.image for item in batch.todo]
        if self.semantics == "ovce":
            per_group = [self.scores(images, group.concepts) for group in self.groups]
            labelled = [
                [
                    _label_then_resize(self.checked(item.index, scores[j]), self.height, self.width)
                    for scores in per_group
                ]
                for j, item in enumerate(batch.todo)
            ]
        else:
            scores = self.scores(images, self.queried)
            labelled = [self.label_image(item.index, s) for item, s in zip(batch.todo, scores)]
        for item, encoded in zip(batch.todo, labelled):
            batch.done[item.index] = encoded
            if cache is not None:
                cache.put(item.key, encoded)

    def scores(self, images: list[Any], concepts: Sequence[str]) -> list[np.ndarray]:
        """The segmenter's score maps of ``images`` for ``concepts``, one per image."""
        output = self.model(images, list(concepts))
        return _score_arrays(output, len(images), len(concepts), _model_name(self.model))

    def checked(self, i: int, scores: np.ndarray) -> np.ndarray:
        """Image ``i``'s scores, refused if any is NaN or infinite."""
        if not np.isfinite(scores).all():
            raise PyneuronError(
                f"segmenter {_model_name(self.model)!r} returned NaN/inf scores for image {i}"
                + (f" ({self.image_names[i]})" if self.image_names else "")
            )
        return scores

    def label_image(self, i: int, scores: np.ndarray) -> list[np.ndarray]:
        """Image ``i``'s score maps resized to the grid and labelled per group."""
        scores = self.checked(i, np.asarray(scores, dtype=np.float32))
        if scores.shape[1:] != (self.height, self.width):
            scores = bilinear_resize(scores, self.height, self.width)
        return _label_groups(scores, self.groups, self.threshold)


def _add_images(
    writer: ConceptStoreWriter,
    batch: _Batch,
    groups: Sequence[_Group],
    names: Sequence[str],
    grid: tuple[int, int],
) -> None:
    """Write the concept masks of a labelled batch to the store (in image order)."""
    for i in batch.index:
        encoded = batch.done[i]
        masks = {} if encoded is None else _masks_for_store(encoded, groups, names, *grid)
        writer.add_image(i, masks=masks)


def segment(
    images: Any,
    concepts: Any,
    segmenter: Any = "CIDAS/clipseg-rd64-refined",
    grid: int | tuple[int, int] = 112,
    batch_size: int = 8,
    *,
    mode: str = "argmax",
    threshold: float = 0.5,
    fillers: Sequence[str] = DEFAULT_FILLERS,
    semantics: str = "pyneuron",
    out: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    on_error: str = "raise",
    device: Any = None,
    dtype: Any = None,
    workers: int = 0,
    progress: bool = True,
) -> ConceptStore:
    """Segment concepts named in text over the probing images into a ConceptStore.

    Parameters
    ----------
    images
        A folder (every image file in it, recursively, sorted by path), a list of image
        files, a list of PIL images, or a uint8 array (N, H, W, 3). Image ``i`` of the
        store is the ``i``-th of these.
    concepts
        A list of names (one group), a list of lists (one group each), a mapping
        ``{group: names}``, a :class:`~pyneuron.concepts.ConceptVocabulary`, or a
        ``pathlib.Path`` to a vocabulary file (see
        :func:`~pyneuron.concepts.load_vocabulary`).
    segmenter
        A model id or local directory of a CLIPSeg model (default
        ``CIDAS/clipseg-rd64-refined``, loaded from the Hugging Face cache), a
        segmenter adapter (:class:`~pyneuron.concepts.CLIPSegSegmenter`,
        :class:`~pyneuron.concepts.GroundingDinoSamSegmenter`,
        :class:`~pyneuron.concepts.Owlv2SamSegmenter`), or any callable
        ``(list of PIL images, list of names) -> scores in [0, 1]`` of shape (B, K, h, w)
        or B arrays (K, h_i, w_i).
    grid
        Grid size: ``112`` for 112 x 112 (compexp/OVCE), or ``(height, width)``.
    batch_size
        Images per segmenter call.
    mode
        ``"argmax"`` (OVCE: within a group every pixel goes to the best concept) or
        ``"threshold"`` (``score > threshold`` per concept, for independent concepts;
        ``"pyneuron"`` semantics only). A :class:`~pyneuron.concepts.ConceptGroup` may
        override it for its group.
    threshold
        Threshold of thresholded groups, compared with the resized scores (for the
        adapters, probabilities: sigmoid of CLIPSeg logits, box score x SAM mask).
    fillers
        Concepts that are never stored: in argmax groups they still compete for pixels
        (a pixel won by ``"background"`` belongs to no stored concept of that group).
        A filler may be listed in several groups.
    semantics
        How score maps become masks (one of :data:`SEMANTICS`; see the module's
        documentation). ``"pyneuron"``: one segmenter call per batch of images with
        every group's concepts, scores resized bilinearly to the grid, then the argmax
        per group there (a pixel where all of a group's scores are <= 0 stays
        unlabelled). ``"ovce"``: OVCE's rules, one segmenter call per group with that
        group's concepts only, the argmax at the segmenter's output resolution (every
        pixel labelled), each mask then resized to the grid exactly as
        ``torch.nn.functional.interpolate(mode="nearest")``; argmax groups only. For a
        segmenter whose scores do not depend on the concepts queried together, the two
        differ only in how boundaries are resampled and where all of a group's scores
        are <= 0.
    out
        Write the store to this directory (atomically: it appears only once complete);
        ``None`` keeps it in memory.
    cache_dir
        Keep per-image results here, keyed by image content, concepts, segmenter
        fingerprint, grid, modes, semantics and threshold, so a rerun (or a resumed
        interrupted run) skips the segmenter for images already done. A plain function needs a
        ``fingerprint`` attribute (or :class:`~pyneuron.concepts.CallableSegmenter`) to
        be cached.
    overwrite
        Replace an existing store at ``out``.
    on_error
        What an image file that cannot be read or decoded does: ``"raise"`` (default) stops
        with an error naming the file, and nothing is written to ``out`` (with
        ``cache_dir``, the images done so far are kept there and not recomputed on the
        rerun); ``"skip"`` warns, leaves that image without concepts and lists it in the
        metadata under ``"skipped"``.
    device, dtype
        Where and in which precision to run a segmenter given as a model id or directory:
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or a ``torch.device``;
        ``"float32"``, ``"float16"``, ``"bfloat16"`` or a ``torch`` dtype. ``None``: CUDA
        in float16 when a GPU is available, else the CPU in float32 (float16 is allowed
        on the CPU but slow there; use bfloat16). A device this machine lacks is refused,
        naming those it has, before the model loads. On CUDA, image tensors are copied
        from pinned memory. A segmenter that is already built (an adapter or a callable)
        runs where it was built: giving either then is an error (build the adapter with
        them instead).
    workers
        Worker processes that read, hash and decode image files (and look them up in
        the cache) ahead of the segmenter, in image order; ``0`` reads them in a thread
        of this process. The store is the same either way (an unreadable file is
        reported, raised or skipped, as with ``0``). Images given in memory (PIL images,
        an array) are always read here. The workers are started by a fork server (spawned
        where there is none), so a script using them needs the usual
        ``if __name__ == "__main__":`` guard.
    progress
        Show a progress bar.

    Returns
    -------
    ConceptStore
        One concept per non-filler name (category: its group's name); its ``metadata``
        records ``source="segment"`` and, under ``"segment"``, the segmenter, the groups,
        the mode, threshold, fillers, grid, semantics, resampling (``"resize"``) and the
        image files.

    Raises
    ------
    PyneuronError
        Empty or duplicate concept names, bad images (a file that cannot be decoded is
        named; nothing is written to ``out``), a segmenter returning the wrong shape or
        non-finite scores, an unknown ``semantics``, a thresholded group under
        ``"ovce"``, a device this machine lacks, ``device``/``dtype`` given with a
        segmenter that is already built.

    Examples
    --------
    >>> import numpy as np
    >>> def stub(images, concepts):      # "sky" wins the top half, "grass" the bottom
    ...     rows = {"sky": [0.9, 0.9, 0, 0], "grass": [0, 0, 0.8, 0.8], "background": [0.1] * 4}
    ...     scores = np.array([rows[c] for c in concepts], dtype=np.float32)[None, :, :, None]
    ...     return np.broadcast_to(scores, (len(images), len(concepts), 4, 4))
    >>> images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    >>> store = segment(images, ["sky", "grass", "background"], stub, grid=4, progress=False)
    >>> store.names, store.mask("sky")[0].sum(axis=1).tolist()
    (['sky', 'grass'], [4, 4, 0, 0])
    >>> store.metadata["segment"]["groups"][0]["concepts"]
    ['sky', 'grass', 'background']

    Under ``"ovce"`` a group of one concept covers every pixel (the argmax of one score):

    >>> ovce = segment(images, [["sky"], ["grass", "background"]], stub, grid=4,
    ...     semantics="ovce", progress=False)
    >>> ovce.mask("sky").all().item(), ovce.mask("grass")[0].sum(axis=1).tolist()
    (True, [0, 0, 4, 4])
    """
    _check_arguments(mode, on_error, batch_size, threshold, workers, semantics)
    fillers = (fillers,) if isinstance(fillers, str) else tuple(fillers)
    height, width = _grid_size(grid)
    queried, names, categories, groups = _plan(ConceptVocabulary.of(concepts), mode, fillers)
    _check_groups(groups, semantics)
    source = _as_images(images)
    store_grid = Grid(len(source), height, width)
    model = as_segmenter(segmenter, device=device, dtype=dtype)
    cache = _open_cache(cache_dir, model, groups, (height, width), threshold, semantics)
    metadata = _metadata(
        model, groups, mode, threshold, fillers, (height, width), source.names(), semantics
    )
    reader = _BatchReader(source, batch_size, cache, len(groups), on_error, workers)
    labeller = _Labeller(model, queried, groups, threshold, height, width, reader.names, semantics)

    bar = progress_bar(total=len(source), desc="segment", unit="img", enabled=progress)
    writer = ConceptStoreWriter(
        store_grid, names, categories, out, overwrite=overwrite, metadata=metadata
    )
    stream = _prefetch(reader.batches())
    try:
        with writer:
            for batch in stream:
                if batch.todo:
                    labeller.label_batch(batch, cache)
                _add_images(writer, batch, groups, names, (height, width))
                bar.update(len(batch.index))
            writer.metadata["segment"]["skipped"] = reader.skipped
            if isinstance(source, _FileImages):
                writer.metadata["segment"]["image_keys"] = reader.image_keys
    finally:
        stream.close()
        bar.close()
    store = writer.store
    assert store is not None
    return store
