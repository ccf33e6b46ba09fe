"""Unit (activation) masks on the concept grid, block-sparse like concepts."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import PyneuronError, StoreError
from . import storage
from .grid import Grid
from .masks import FULL_SLOT, MaskSet, stacked_grid
from .writer import StagedWriter

KIND = "units"


class UnitMasks(MaskSet):
    """Binary activation masks of U units on a grid of N images x H x W.

    Build with :meth:`from_masks` (dense bool), :meth:`from_words` (packed words),
    :meth:`writer` (unit by unit or image by image), or :meth:`open` a saved set.

    Examples
    --------
    >>> import numpy as np
    >>> dense = np.zeros((3, 2, 4, 4), dtype=bool)
    >>> dense[0, 1, 1:3, 1:3] = True
    >>> units = UnitMasks.from_masks(dense)
    >>> len(units), units.pixel_counts.tolist()
    (3, [4, 0, 0])
    """

    KIND = KIND

    @classmethod
    def from_masks(cls, masks: np.ndarray) -> UnitMasks:
        """From dense bool masks of shape (units, images, height, width)."""
        masks = np.asarray(masks)
        if masks.ndim != 4:
            raise PyneuronError(
                f"unit masks must have shape (units, images, height, width), got {masks.shape}"
            )
        grid = Grid(*masks.shape[1:])
        offsets, images, slots, counts, words = cls._arrays_from_dense(masks, grid)
        return cls(grid, offsets, images, slots, counts, words)

    @classmethod
    def from_words(cls, words: np.ndarray, height: int, width: int) -> UnitMasks:
        """From packed words of shape (units, images, ceil(height * width / 64)), uint64.

        Bit ``p`` of an image (row-major pixel index) is bit ``p % 64`` of word ``p // 64``;
        padding bits past ``height * width`` must be zero.
        """
        words = np.asarray(words)
        if words.ndim != 3 or words.dtype != np.uint64:
            raise PyneuronError(
                f"packed unit masks must be uint64 of shape (units, images, words), got "
                f"{words.dtype} {words.shape}"
            )
        grid = Grid(words.shape[1], height, width)
        if words.shape[2] != grid.words_per_image:
            raise PyneuronError(
                f"a {height}x{width} image packs into {grid.words_per_image} words, got "
                f"{words.shape[2]}"
            )
        last = words[:, :, -1]
        if grid.pixels % 64 and (last >> np.uint64(grid.pixels % 64)).any():
            raise PyneuronError("padding bits past height * width are set in the packed words")
        counts = np.bitwise_count(words).sum(axis=2, dtype=np.int64)
        unit_ids, images = np.nonzero(counts)
        entry_counts = counts[unit_ids, images]
        partial = entry_counts < grid.pixels
        slots = np.full(entry_counts.shape[0], FULL_SLOT, dtype=np.int64)
        slots[partial] = np.arange(int(partial.sum()), dtype=np.int64)
        offsets = np.zeros(words.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(unit_ids, minlength=words.shape[0]), out=offsets[1:])
        pool = np.ascontiguousarray(words[unit_ids[partial], images[partial]])
        return cls(
            grid, offsets, images.astype(np.int32), slots, entry_counts.astype(np.int32), pool
        )

    @classmethod
    def writer(
        cls,
        grid: Grid | tuple[int, int, int],
        n_units: int,
        path: str | os.PathLike[str] | None = None,
        *,
        overwrite: bool = False,
        metadata: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> UnitMasksWriter:
        """Start unit masks built unit by unit or image by image; see :class:`UnitMasksWriter`."""
        return UnitMasksWriter(
            grid, n_units, path, overwrite=overwrite, metadata=metadata, progress=progress
        )

    @classmethod
    def concatenate(
        cls,
        parts: Sequence[UnitMasks],
        path: str | os.PathLike[str] | None = None,
        overwrite: bool = False,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> UnitMasks:
        """Unit masks over consecutive image ranges as one set over all their images
        (see :meth:`ConceptStore.concatenate`): the parts hold the same number of units
        on images of one height and width.

        The result is byte for byte the set written in one go when that set and the parts
        were written image by image in image order, as
        :func:`~pyneuron.engine.upsample.unit_masks_from_activations` writes them.

        Examples
        --------
        >>> dense = np.zeros((2, 3, 2, 2), dtype=bool); dense[1, 2] = True
        >>> whole = UnitMasks.from_masks(dense)
        >>> parts = [whole.take_images([0, 1]), whole.take_images([2])]
        >>> UnitMasks.concatenate(parts).images_with(1).tolist()
        [2]
        """
        parts = list(parts)
        grid = stacked_grid(parts, UnitMasks)
        chosen = copy.deepcopy(dict(parts[0].metadata if metadata is None else metadata))
        with cls.writer(grid, len(parts[0]), path, overwrite=overwrite, metadata=chosen) as writer:
            writer.add_parts(parts)
        assert writer.result is not None
        return writer.result

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool | None = None) -> UnitMasks:
        """Open saved unit masks (memory-mapped); see :meth:`ConceptStore.open`."""
        data = storage.load(path, kind=KIND, verify=verify)
        try:
            units = cls(data["grid"], *data["index"], data["words"])
        except ValueError as error:
            raise StoreError(f"unit masks at {path} are corrupt: {error}") from None
        units._metadata.update(data["metadata"])
        return units

    def table(self) -> pd.DataFrame:
        """One row per unit: unit, pixels, images."""
        return pd.DataFrame(
            {"unit": np.arange(len(self)), "pixels": self.pixel_counts, "images": self.image_counts}
        )

    def mask(self, unit: int) -> np.ndarray:
        """Dense bool mask (n_images, height, width) of one unit."""
        return self._dense(unit)

    def image_mask(self, unit: int, image: int) -> np.ndarray:
        """One unit's bool mask (height, width) in one image."""
        return self._image_mask(unit, image)

    def images_with(self, unit: int) -> np.ndarray:
        """Ids of the images where the unit fires."""
        return self._images_with(unit)

    def take_images(self, images: Sequence[int] | np.ndarray) -> UnitMasks:
        """The masks restricted to some images, renumbered 0, 1, ... in the order given
        (see :meth:`ConceptStore.take_images`)."""
        grid, index, words = self._subset(images=images)
        return UnitMasks(grid, *index, words)

    def take_units(self, units: Sequence[int] | np.ndarray) -> UnitMasks:
        """Some units only, renumbered 0, 1, ... in the order given.

        Examples
        --------
        >>> dense = np.zeros((3, 2, 2, 2), dtype=bool); dense[2, 1, 0] = True
        >>> UnitMasks.from_masks(dense).take_units([2, 0]).pixel_counts.tolist()
        [2, 0]
        """
        grid, index, words = self._subset(masks=units)
        return UnitMasks(grid, *index, words)

    def __repr__(self) -> str:
        return f"UnitMasks({len(self)} units on {self.grid})"


class UnitMasksWriter(StagedWriter[UnitMasks]):
    """Builds :class:`UnitMasks` unit by unit (:meth:`add_unit`) or image by image
    (:meth:`add_image`), streaming bitsets to ``path`` when given.

    Examples
    --------
    >>> import numpy as np
    >>> with UnitMasks.writer((2, 4, 4), n_units=3) as w:
    ...     w.add_image(0, np.ones((3, 4, 4), dtype=bool))
    ...     w.add_image(1, np.zeros((3, 4, 4), dtype=bool))
    >>> w.result.image_counts.tolist()
    [1, 1, 1]
    """

    kind = KIND

    def __init__(
        self,
        grid: Grid | tuple[int, int, int],
        n_units: int,
        path: str | os.PathLike[str] | None = None,
        *,
        overwrite: bool = False,
        metadata: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        if isinstance(n_units, bool) or not isinstance(n_units, (int, np.integer)) or n_units < 0:
            raise PyneuronError(f"n_units must be a non-negative integer, got {n_units!r}")
        self.n_units = int(n_units)
        super().__init__(
            grid,
            path,
            overwrite=overwrite,
            metadata=dict(metadata or {}),
            progress=progress,
            progress_total=0,
            progress_desc="unit masks",
        )
        self.writer.n_masks = self.n_units

    def add_unit(self, unit: int, mask: np.ndarray) -> None:
        """Add one unit's mask over all images: bool (n_images, height, width)."""
        self.writer.add_mask(unit, mask)
        self._progress.update(1)

    def add_image(self, image: int, masks: np.ndarray) -> None:
        """Add one image's masks for all units: bool (n_units, height, width)."""
        self.writer.add_image(image, np.arange(self.n_units), masks)
        self._progress.update(1)

    def _mask_count(self) -> int:
        return self.n_units

    def _table(self) -> dict[str, Any]:
        return {"unit": np.arange(self.n_units)}

    def _build(self, index: tuple[np.ndarray, ...], words: np.ndarray) -> UnitMasks:
        units = UnitMasks(self.grid, *index, words)
        units._metadata.update(self.metadata)
        return units

    def _open(self, path: Path) -> UnitMasks:
        return UnitMasks.open(path, verify=False)
