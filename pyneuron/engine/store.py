"""The concept store: every concept's mask over the probing set, block-sparse, on disk."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import PyneuronError, StoreError, UnknownConceptError
from . import _native, storage
from .grid import Grid
from .masks import FULL_SLOT, MaskSet, MaskSetWriter, stacked_grid
from .writer import StagedWriter

KIND = "concepts"


class ConceptStore(MaskSet):
    """Concept masks on one grid of N images x H x W, each stored per image as an
    empty, full or bitset container, with per-concept metadata.

    Build one with :meth:`from_masks` (dense arrays), :meth:`writer` (image by image,
    never dense), or open a saved one with :meth:`open` (memory-mapped).

    Examples
    --------
    >>> import numpy as np
    >>> masks = np.zeros((2, 3, 4, 4), dtype=bool)
    >>> masks[0, 0] = True            # "sky" covers image 0
    >>> masks[1, 1, :2, :2] = True    # "dog" is a blob in image 1
    >>> store = ConceptStore.from_masks(masks, ["sky", "dog"])
    >>> len(store), store.names
    (2, ['sky', 'dog'])
    >>> store.images_with("dog").tolist()
    [1]
    """

    KIND = KIND

    def __init__(
        self,
        grid: Grid,
        index: Sequence[np.ndarray],
        words: np.ndarray,
        names: Sequence[str],
        categories: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        path: Path | None = None,
    ) -> None:
        super().__init__(grid, *index, words)
        self._lookup = _name_lookup(names)
        self._names = [str(n) for n in names]
        if len(self._names) != len(self):
            raise PyneuronError(f"{len(self._names)} names for {len(self)} concepts")
        self._categories = (
            [str(c) for c in categories] if categories is not None else [""] * len(self._names)
        )
        if len(self._categories) != len(self._names):
            raise PyneuronError(f"{len(self._categories)} categories for {len(self._names)} names")
        self._metadata.update(metadata or {})
        self.path = path
        self._cooccurrence: np.ndarray | None = None

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_masks(
        cls,
        masks: np.ndarray,
        names: Sequence[str],
        categories: Sequence[str] | None = None,
    ) -> ConceptStore:
        """Build a store from dense masks, bool of shape (C, N, H, W).

        Parameters
        ----------
        masks
            ``masks[c, i]`` is concept ``c`` in image ``i``.
        names
            One unique name per concept.
        categories
            Optional category per concept (``"object"``, ``"scene"``, ...).
        """
        masks = np.asarray(masks)
        if masks.ndim != 4:
            raise PyneuronError(
                "concept masks must have shape (concepts, images, height, width), "
                f"got {masks.shape}"
            )
        if len(names) != masks.shape[0]:
            raise PyneuronError(f"{len(names)} names for {masks.shape[0]} concept masks")
        _name_lookup(names)
        grid = Grid(*masks.shape[1:])
        offsets, images, slots, counts, words = cls._arrays_from_dense(masks, grid)
        return cls(grid, (offsets, images, slots, counts), words, names, categories)

    @classmethod
    def writer(
        cls,
        grid: Grid | tuple[int, int, int],
        names: Sequence[str] = (),
        categories: Sequence[str] | None = None,
        path: str | os.PathLike[str] | None = None,
        *,
        overwrite: bool = False,
        metadata: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> ConceptStoreWriter:
        """Start a store built image by image; see :class:`ConceptStoreWriter`."""
        return ConceptStoreWriter(
            grid,
            names,
            categories,
            path,
            overwrite=overwrite,
            metadata=metadata,
            progress=progress,
        )

    @classmethod
    def concatenate(
        cls,
        parts: Sequence[ConceptStore],
        path: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> ConceptStore:
        """The stores ``parts``, over consecutive image ranges, as one store over all
        their images: image ``i`` of part ``k`` becomes image ``i`` plus the images of
        the parts before it.

        The parts must hold the same concepts (names and categories, in the same order)
        on images of one height and width. Containers are copied, never decoded; with
        ``path`` the bitsets stream to disk part by part (a memory-mapped part is read
        sequentially) and the store appears there only when complete (atomic).

        The result is byte for byte (every file of its directory once saved) the store
        written in one go when that store and the parts were written image by image in
        image order (:meth:`writer`, :func:`pyneuron.concepts.segment`) and ``metadata``
        is the one-shot store's.

        Parameters
        ----------
        parts
            One or more stores, in image order.
        path
            Write the store to this directory instead of keeping it in memory.
        overwrite
            Replace an earlier store at ``path``.
        metadata
            The metadata of the result; by default a copy of the first part's. Per-image
            entries (image lists, skipped images) are not merged here: pass them merged.

        Raises
        ------
        PyneuronError
            No parts, parts of other concepts or of another image size
            (:class:`~pyneuron.errors.GridMismatchError`).

        Examples
        --------
        >>> masks = np.zeros((1, 3, 2, 2), dtype=bool); masks[0, [0, 2], 0] = True
        >>> whole = ConceptStore.from_masks(masks, ["dog"])
        >>> parts = [whole.take_images([0]), whole.take_images([1, 2])]
        >>> ConceptStore.concatenate(parts).images_with("dog").tolist()
        [0, 2]
        """
        parts = list(parts)
        grid = stacked_grid(parts, ConceptStore)
        first = parts[0]
        for k, part in enumerate(parts):
            if part.names != first.names or part.categories != first.categories:
                raise PyneuronError(
                    f"part {k} holds other concepts than part 0 (names or categories differ); "
                    "concatenated stores hold the same concepts in the same order"
                )
        chosen = copy.deepcopy(dict(first.metadata if metadata is None else metadata))
        with cls.writer(
            grid, first.names, first.categories, path, overwrite=overwrite, metadata=chosen
        ) as writer:
            writer.add_parts(parts)
        assert writer.store is not None
        return writer.store

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool | None = None) -> ConceptStore:
        """Open a saved store; the bitsets are memory-mapped, so this is instant.

        Parameters
        ----------
        verify
            Check the CRC-32 of the bitsets too (always done for the index and metadata).
            ``None`` verifies stores whose bitsets take at most 256 MiB.

        Raises
        ------
        StoreError
            If the directory is missing, truncated, corrupt, or from a newer pyneuron.
        """
        data = storage.load(path, kind=KIND, verify=verify)
        table = data["table"]
        try:
            return cls(
                data["grid"],
                data["index"],
                data["words"],
                list(table["name"]),
                list(table["category"]),
                data["metadata"],
                Path(path),
            )
        except (KeyError, ValueError) as error:
            raise StoreError(f"store {path} is corrupt: {error}") from None

    # -- access ----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Concept names, in concept-id order."""
        return list(self._names)

    @property
    def categories(self) -> list[str]:
        """Concept categories, in concept-id order (``""`` when not given)."""
        return list(self._categories)

    def index(self, name: str) -> int:
        """Concept id of ``name``; raises :class:`UnknownConceptError` (a ``KeyError``
        and a ``PyneuronError``) listing close names if unknown."""
        try:
            return self._lookup[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(str(name), self._names, n=5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownConceptError(f"no concept named {name!r} in this store{hint}") from None

    def mask(self, name: str | int) -> np.ndarray:
        """Dense bool mask (n_images, height, width) of a concept (by name or id)."""
        return self._dense(self._resolve(name))

    def image_mask(self, name: str | int, image: int) -> np.ndarray:
        """A concept's bool mask (height, width) in one image."""
        return self._image_mask(self._resolve(name), image)

    def images_with(self, name: str | int) -> np.ndarray:
        """Ids of the images where a concept is present."""
        return self._images_with(self._resolve(name))

    def cooccurrence(self) -> np.ndarray:
        """Pixels shared by every pair of concepts: a symmetric uint64 (concepts, concepts)
        table, ``|c AND d|``, with the concept sizes on its diagonal.

        Computed once in a batched pass over the store (about as long as explaining a few
        dozen units) and kept with the store. :func:`pyneuron.explain` uses it on stores
        of up to ``pyneuron.engine.search.COOCCURRENCE_MAX_CONCEPTS`` concepts: the overlap of
        every beam formula with every concept is then known or tightly bounded before any
        counting, which skips most of the work on dense concept data. Results are the
        same without it.

        Examples
        --------
        >>> import numpy as np
        >>> masks = np.zeros((2, 1, 2, 2), dtype=bool)
        >>> masks[0, 0, 0] = True; masks[1, 0, :, 0] = True
        >>> ConceptStore.from_masks(masks, ["top", "left"]).cooccurrence().tolist()
        [[2, 1], [1, 2]]
        """
        if self._cooccurrence is None:
            table = _native.concept_cooccurrence(self._native)
            table.setflags(write=False)
            self._cooccurrence = table
        return self._cooccurrence

    def _resolve(self, name: str | int) -> int:
        return self._check_index(name) if isinstance(name, (int, np.integer)) else self.index(name)

    def table(self) -> pd.DataFrame:
        """One row per concept: name, category, pixels, images."""
        return pd.DataFrame(
            {
                "name": self._names,
                "category": self._categories,
                "pixels": self.pixel_counts,
                "images": self.image_counts,
            }
        )

    def info(self) -> pd.DataFrame:
        """A summary per category, one row each (in order of first appearance; ``""``
        for concepts without a category), indexed by category, with columns

        - ``concepts``: concepts of the category;
        - ``present``: those present in at least one image;
        - ``pixels``: set pixels summed over its concepts (a pixel two concepts of the
          category share counts twice);
        - ``images``: images where at least one of its concepts is present.

        Use :meth:`table` for the same counts per concept.

        Examples
        --------
        >>> masks = np.zeros((3, 4, 2, 2), dtype=bool)
        >>> masks[0, :2] = True                  # "sky": images 0 and 1, full
        >>> masks[1, 1, 0, 0] = masks[1, 3, 0, 0] = True   # "dog": a pixel in 1 and 3
        >>> store = ConceptStore.from_masks(masks, ["sky", "dog", "cat"],
        ...                                 ["scene", "object", "object"])
        >>> store.info()
                  concepts  present  pixels  images
        category
        scene            1        1       8       2
        object           2        1       2       2
        """
        codes, order = pd.factorize(pd.Series(self._categories, dtype=object), sort=False)
        n = len(order)
        codes = codes.astype(np.int64)
        image_counts = self.image_counts
        per_entry = np.repeat(codes, np.diff(self._offsets))
        pairs = np.unique(per_entry * self.grid.n_images + self._images.astype(np.int64))
        pixels = np.zeros(n, dtype=np.int64)
        np.add.at(pixels, codes, self.pixel_counts)
        return pd.DataFrame(
            {
                "concepts": np.bincount(codes, minlength=n),
                "present": np.bincount(codes[image_counts > 0], minlength=n),
                "pixels": pixels,
                "images": np.bincount(pairs // self.grid.n_images, minlength=n),
            },
            index=pd.Index(list(order), name="category", dtype=object),
        )

    def sample(self, name: str | int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` random images where a concept is present, with its masks there.

        Parameters
        ----------
        name
            Concept name or id.
        k
            How many images; fewer come back when the concept is in fewer images.
        seed
            Seed of the draw (``numpy.random.default_rng``), so checks are repeatable.

        Returns
        -------
        image_ids, masks
            Image ids, int64 ascending, and the concept's bool masks there,
            (len(image_ids), height, width). Only those images are decoded.

        Examples
        --------
        >>> masks = np.zeros((1, 5, 2, 2), dtype=bool)
        >>> masks[0, [1, 3, 4], 0, 1] = True
        >>> store = ConceptStore.from_masks(masks, ["dog"])
        >>> ids, dog = store.sample("dog", 2)
        >>> len(ids), dog.shape, bool(dog[:, 0, 1].all() and dog.sum() == 2)
        (2, (2, 2, 2), True)
        >>> store.sample("dog", 10)[0].tolist()
        [1, 3, 4]
        """
        m = self._resolve(name)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise PyneuronError(f"k must be an integer >= 0, got {k!r}")
        n_images = int(self._offsets[m + 1] - self._offsets[m])
        rng = np.random.default_rng(seed)
        picked = np.sort(rng.choice(n_images, size=min(int(k), n_images), replace=False))
        return self._entries(m, picked)

    def take_images(self, images: Sequence[int] | np.ndarray) -> ConceptStore:
        """The store restricted to some images, renumbered 0, 1, ... in the order given.

        Used to split a probing set (explain on one part, score on the other); the
        containers are copied, never decoded.

        Examples
        --------
        >>> masks = np.zeros((1, 4, 2, 2), dtype=bool); masks[0, [1, 3]] = True
        >>> ConceptStore.from_masks(masks, ["dog"]).take_images([3, 0]).images_with("dog")
        array([0])
        """
        grid, index, words = self._subset(images=images)
        return ConceptStore(grid, index, words, self._names, self._categories, self._metadata)

    def merge_concepts(
        self,
        mapping: Mapping[str, str],
        *,
        path: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
    ) -> ConceptStore:
        """The store with concepts renamed and merged: concepts mapped to one name become
        one concept, their pixelwise union (OR) in every image.

        Parameters
        ----------
        mapping
            Old name -> new name (e.g. :meth:`pyneuron.concepts.lexicon.Lexicon.hypernym_mapping`:
            ``oak`` and ``pine`` -> ``tree``). Concepts left out keep their names; a
            concept may be mapped onto the name of one left out (``oak`` -> ``tree``
            while ``tree`` stays: ``tree`` becomes ``oak OR tree``).
        path
            Write the store to this directory (atomically) instead of keeping it in memory.
        overwrite
            Replace an earlier store at ``path``.

        Returns
        -------
        ConceptStore
            Concepts in order of the first old concept of each new name. A merged
            concept's category is its members' common category, or ``"merged"`` when
            they differ. The metadata is this store's plus, appended to the list
            ``metadata["merges"]``, the mapping applied (old -> new, names that change).
            Containers are combined per image without decoding: a full member makes the
            union full, bitsets are OR-ed.

        Raises
        ------
        UnknownConceptError
            A name of ``mapping`` is not a concept of the store.
        PyneuronError
            A new name is not a non-empty string.

        Examples
        --------
        >>> masks = np.zeros((3, 2, 2, 2), dtype=bool)
        >>> masks[0, 0, 0] = True; masks[1, 0, :, 0] = True; masks[2, 1] = True
        >>> store = ConceptStore.from_masks(masks, ["oak", "pine", "sky"])
        >>> merged = store.merge_concepts({"oak": "tree", "pine": "tree"})
        >>> merged.names, merged.mask("tree")[0].astype(int).tolist()
        (['tree', 'sky'], [[1, 1], [1, 0]])
        >>> merged.metadata["merges"]
        [{'oak': 'tree', 'pine': 'tree'}]
        """
        if not isinstance(mapping, Mapping):
            raise PyneuronError(
                f"mapping must be a mapping of old to new concept names, got "
                f"{type(mapping).__name__}"
            )
        targets = list(self._names)
        for old, new in mapping.items():
            if not isinstance(new, str) or not new:
                raise PyneuronError(
                    f"concept {old!r} is mapped to {new!r}; new names must be non-empty strings"
                )
            targets[self.index(old)] = new
        names = list(dict.fromkeys(targets))
        number = {name: k for k, name in enumerate(names)}
        groups = np.array([number[t] for t in targets], dtype=np.int64)
        members: dict[str, set[str]] = {name: set() for name in names}
        for target, category in zip(targets, self._categories):
            members[target].add(category)
        categories = [next(iter(c)) if len(c) == 1 else "merged" for c in members.values()]
        metadata = copy.deepcopy(self._metadata)
        changed = {old: new for old, new in mapping.items() if old != new}
        metadata["merges"] = [*metadata.get("merges", []), changed]
        with self.writer(
            self.grid, names, categories, path, overwrite=overwrite, metadata=metadata
        ) as writer:
            _add_unions(self, groups, writer.writer)
        assert writer.store is not None
        return writer.store

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"ConceptStore({len(self)} concepts on {self.grid}{where})"


def _add_unions(
    store: ConceptStore, groups: np.ndarray, out: MaskSetWriter, chunk_bytes: int = 64 * 2**20
) -> None:
    """Add to ``out``, as mask ``groups[c]``, the union of the containers of every concept
    ``c`` of ``store`` per image, ``chunk_bytes`` of bitsets at a time."""
    offsets, images, slots, _, words = store.arrays
    grid = store.grid
    owners = np.repeat(np.arange(len(store), dtype=np.int64), np.diff(offsets))
    keys = groups[owners] * grid.n_images + images.astype(np.int64)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    # Entries order[bounds[r]:bounds[r + 1]] are the members of run r: one (group, image).
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if keys.size else []
    bounds = np.r_[starts, keys.size].astype(np.int64)
    pool = words.reshape(-1, grid.words_per_image)
    rows = max(1, chunk_bytes // (8 * grid.words_per_image))
    first = 0
    while first < bounds.shape[0] - 1:
        last = int(np.searchsorted(bounds, bounds[first] + rows, side="right")) - 1
        last = min(max(last, first + 1), bounds.shape[0] - 1)
        entry = order[bounds[first] : bounds[last]]
        run = np.repeat(np.arange(last - first), np.diff(bounds[first : last + 1]))
        full = slots[entry] == FULL_SLOT
        merged = np.zeros((last - first, grid.words_per_image), dtype=np.uint64)
        if (~full).any():
            with_bits, at = np.unique(run[~full], return_index=True)
            merged[with_bits] = np.bitwise_or.reduceat(pool[slots[entry[~full]]], at, axis=0)
        counts = np.bitwise_count(merged).sum(axis=1, dtype=np.int64)
        counts[np.unique(run[full])] = grid.pixels
        run_keys = keys[bounds[first:last]]
        out.add_packed(run_keys // grid.n_images, run_keys % grid.n_images, merged, counts)
        first = last


def _name_lookup(names: Sequence[str]) -> dict[str, int]:
    lookup: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise PyneuronError(f"concept names must be non-empty strings, got {name!r}")
        if name in lookup:
            raise PyneuronError(f"duplicate concept name {name!r}; concept names must be unique")
        lookup[str(name)] = i
    return lookup


class ConceptStoreWriter(StagedWriter[ConceptStore]):
    """Builds a :class:`ConceptStore` image by image without holding dense masks.

    With ``path`` the bitsets stream to disk and the store appears under ``path`` only
    when :meth:`close` succeeds (atomic rename); without, the store stays in memory.
    Use as a context manager: on an exception nothing is written. The finished store
    is :attr:`store` (also returned by :meth:`close`).

    Examples
    --------
    >>> import numpy as np
    >>> with ConceptStore.writer((2, 4, 4), names=["sky", "beach", "dog"]) as w:
    ...     w.add_image(0, labels=["beach"], masks={"sky": np.eye(4, dtype=bool)})
    ...     w.add_image(1, label_map=np.full((4, 4), 2))   # every pixel is "dog"
    >>> store = w.store
    >>> store.images_with("dog").tolist(), int(store.table()["pixels"][0])
    ([1], 4)
    """

    kind = KIND

    def __init__(
        self,
        grid: Grid | tuple[int, int, int],
        names: Sequence[str] = (),
        categories: Sequence[str] | None = None,
        path: str | os.PathLike[str] | None = None,
        *,
        overwrite: bool = False,
        metadata: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        self._names: list[str] = []
        self._categories: list[str] = []
        self._lookup: dict[str, int] = {}
        categories = list(categories) if categories is not None else [""] * len(names)
        if len(categories) != len(names):
            raise PyneuronError(f"{len(categories)} categories for {len(names)} names")
        for name, category in zip(names, categories):
            if name in self._lookup:
                raise PyneuronError(
                    f"duplicate concept name {name!r}; concept names must be unique"
                )
            self.add_concept(name, category)
        self._seen_images: set[int] = set()
        grid = Grid.of(grid)
        super().__init__(
            grid,
            path,
            overwrite=overwrite,
            metadata=dict(metadata or {}),
            progress=progress,
            progress_total=grid.n_images,
            progress_desc="concept store",
        )

    @property
    def store(self) -> ConceptStore | None:
        """The finished store (``None`` until closed)."""
        return self.result

    def add_concept(self, name: str, category: str = "") -> int:
        """Declare a concept (if new) and return its id."""
        if name in self._lookup:
            return self._lookup[name]
        if not isinstance(name, str) or not name:
            raise PyneuronError(f"concept names must be non-empty strings, got {name!r}")
        self._lookup[name] = len(self._names)
        self._names.append(name)
        self._categories.append(str(category))
        return self._lookup[name]

    def add_image(
        self,
        image: int,
        *,
        masks: Mapping[str, np.ndarray] | None = None,
        labels: Iterable[str] = (),
        label_map: np.ndarray | None = None,
    ) -> None:
        """Add the concepts of one image.

        Parameters
        ----------
        image
            Image id in ``[0, n_images)``; each image is added at most once.
        masks
            Concept name -> bool mask (height, width). New names are declared on the fly.
        labels
            Image-level concepts (scenes, textures): full-image masks.
        label_map
            Integer (height, width) map of concept ids (positions in ``names``);
            negative values are unlabelled.
        """
        writer = self.writer
        image = writer._check_image(image)
        if image in self._seen_images:
            raise PyneuronError(f"image {image} was already added")
        h, w = self.grid.height, self.grid.width
        ids: list[int] = []
        blocks: list[np.ndarray] = []
        if label_map is not None:
            label_map = np.asarray(label_map)
            if label_map.shape != (h, w) or not np.issubdtype(label_map.dtype, np.integer):
                raise PyneuronError(
                    f"label_map must be an integer array of shape {(h, w)}, got "
                    f"{label_map.dtype} {label_map.shape}"
                )
            present = np.unique(label_map[label_map >= 0])
            if present.size and present[-1] >= len(self._names):
                raise PyneuronError(
                    f"label_map of image {image} holds label {present[-1]} but only "
                    f"{len(self._names)} concepts are declared"
                )
            ids += present.tolist()
            blocks += [label_map == k for k in present]
        for name, mask in (masks or {}).items():
            ids.append(self.add_concept(name))
            blocks.append(np.asarray(mask))
        label_ids = [self.add_concept(name) for name in labels]
        if blocks:
            writer.add_image(image, ids, np.stack(blocks))
        if label_ids:
            writer.add_full(image, label_ids)
        self._seen_images.add(image)
        self._progress.update(1)

    def _mask_count(self) -> int:
        return len(self._names)

    def _table(self) -> dict[str, Any]:
        return {"name": self._names, "category": self._categories}

    def _build(self, index: tuple[np.ndarray, ...], words: np.ndarray) -> ConceptStore:
        return ConceptStore(self.grid, index, words, self._names, self._categories, self.metadata)

    def _open(self, path: Path) -> ConceptStore:
        return ConceptStore.open(path, verify=False)
