"""Incremental writers shared by concept stores and unit masks: stream bitsets to a
staging directory (or memory), then commit atomically."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import numpy as np
import pandas as pd

from ..errors import PyneuronError
from ..progress import progress_bar
from . import storage
from .atomic import commit_directory, refuse_existing, temporary_sibling
from .grid import Grid
from .masks import MaskSet, MaskSetWriter, pixel_counts

SetT = TypeVar("SetT", bound=MaskSet)


class StagedWriter(Generic[SetT]):
    """Base of the public writers: owns the staging directory and the bitset stream.

    Subclasses define ``kind``, ``_mask_count()``, ``_table()`` and ``_build()``.
    """

    kind: str = ""

    def __init__(
        self,
        grid: Grid | tuple[int, int, int],
        path: str | os.PathLike[str] | None,
        *,
        overwrite: bool,
        metadata: dict[str, Any] | None,
        progress: bool,
        progress_total: int,
        progress_desc: str,
    ) -> None:
        self.grid = Grid.of(grid)
        self.path = Path(path) if path is not None else None
        self.overwrite = overwrite
        self.metadata = dict(metadata or {})
        self._staging: Path | None = None
        self._words_file = None
        if self.path is not None:
            refuse_existing(self.path, overwrite, storage.output_kind(self.kind))
            self._staging = temporary_sibling(self.path)
            self._words_file = open(self._staging / storage.WORDS_FILE, "wb")  # noqa: SIM115
        self._writer: MaskSetWriter | None = MaskSetWriter(self.grid, words_file=self._words_file)
        self._progress = progress_bar(total=progress_total, desc=progress_desc, enabled=progress)
        self.result: SetT | None = None

    # -- subclass hooks --------------------------------------------------------------
    def _mask_count(self) -> int:
        raise NotImplementedError

    def _table(self) -> dict[str, Any]:
        raise NotImplementedError

    def _build(self, index: tuple[np.ndarray, ...], words: np.ndarray) -> SetT:
        raise NotImplementedError

    def _open(self, path: Path) -> SetT:
        raise NotImplementedError

    # -- shared machinery ------------------------------------------------------------
    @property
    def writer(self) -> MaskSetWriter:
        if self._writer is None or self.result is not None:
            raise PyneuronError("this writer is closed")
        return self._writer

    def add_parts(self, parts: Sequence[MaskSet]) -> None:
        """Add mask sets over consecutive image ranges, in order, from image 0 (mask ``m``
        of each to mask ``m``; see :meth:`MaskSetWriter.add_set`)."""
        start = 0
        for part in parts:
            self.writer.add_set(part, start)
            start += part.grid.n_images

    def close(self) -> SetT:
        """Finish (and commit to ``path``, atomically); returns the mask set."""
        if self.result is not None:
            return self.result
        offsets, images, slots, counts, words = self.writer.finish(self._mask_count())
        self._progress.close()
        index = (offsets, images, slots, counts)
        if self.path is None:
            self.result = self._build(index, words)
            return self.result
        assert self._staging is not None and self._words_file is not None
        self._words_file.close()
        table = pd.DataFrame(
            {**self._table(), "pixels": pixel_counts(offsets, counts), "images": np.diff(offsets)}
        )
        try:
            storage.write_directory(
                self._staging,
                kind=self.kind,
                grid=self.grid,
                index=index,
                words=None,
                words_crc32=self.writer.words_crc32,
                table=table,
                metadata=self.metadata,
            )
            commit_directory(
                self._staging, self.path, self.overwrite, storage.output_kind(self.kind)
            )
        except BaseException:
            self.abort()
            raise
        self._staging = None
        self.result = self._open(self.path)
        return self.result

    def abort(self) -> None:
        """Discard everything written so far; nothing appears under ``path``."""
        self._progress.close()
        if self._words_file is not None:
            self._words_file.close()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        self._writer = None

    def __enter__(self) -> StagedWriter[SetT]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
