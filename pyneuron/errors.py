"""Exceptions raised by pyneuron. All derive from :class:`PyneuronError` (a ``ValueError``)."""

from __future__ import annotations


class PyneuronError(ValueError):
    """Base class of pyneuron's errors about bad input."""


class GridMismatchError(PyneuronError):
    """Two mask sets (units and concepts, or a mask and its set) are on different grids."""


class StoreError(PyneuronError):
    """A store directory is missing, truncated, corrupt, or from an unknown format version."""


class EmptyStoreError(PyneuronError):
    """A store holds no concept that could explain anything."""


class UnknownConceptError(PyneuronError, KeyError):
    """A formula or lookup names a concept the store does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OutOfRangeError(PyneuronError, IndexError):
    """A mask, unit or image index outside the set (also an ``IndexError``)."""


class OutputExistsError(PyneuronError, FileExistsError):
    """An output path holds something pyneuron will not replace (also a ``FileExistsError``)."""


class InsufficientMemoryError(PyneuronError, MemoryError):
    """An operation needs more memory than the process can get (also a ``MemoryError``)."""
