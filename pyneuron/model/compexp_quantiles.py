"""compexp's and NetDissect-Lite's own streaming quantile estimator, reproduced exactly.

compexp (``vision/util/vecquantile.py``) and NetDissect-Lite (``util/vecquantile.py``)
estimate each unit's threshold with the same randomized streaming estimator, a variant of
the KLL sketch (Karnin, Lang & Liberty, FOCS 2016): ``QuantileVector(depth=U, seed=1)``,
fed batches of 64 images transposed to (images * h * w, U) rows, read out at 1000 evenly
spaced levels, the threshold being readout index ``int(1000 * (1 - q) - 1)``. Its
estimate differs from the exact quantile (by up to ~0.005 in activation units on real
layers), so exact thresholds (pyneuron's default) do not reproduce published results bit
for bit; :class:`CompexpQuantiles` does, given the same activations in the same image
order (the batch size does not matter: the estimator sees one stream of values).

The estimator, per unit (all units share the random draws):

- *levels* of buffers; level ``l`` holds values of weight ``2 ** l``. Level 0 starts with
  room for ``resolution`` (24,576) values. Values are appended to level 0.
- when level 0 is full, levels are *compacted* from the bottom up while a level has less
  free room than half the capacity of the level below it (1 for level 0): its values are
  sorted, and every second one (starting at offset 0 or 1, one fair coin per
  compaction from ``numpy.random.RandomState(seed)``) moves up a level.
- when the top level itself would need compacting, a new, smaller level 0 is inserted
  (capacity ``max(128, ceil(resolution * 0.67 ** levels))``) and every level's values
  move down one level if they fit there (keeping room for half the level below), or are
  compacted in place (sorted, every second kept, one coin each) if not.
- the minimum and maximum seen are tracked exactly. The readout sorts all kept values
  plus the two extremes (weight 0), places each at its cumulative weight minus half its
  own (in float32), rescales those positions to [0, 1] and interpolates linearly
  (``numpy.interp``).

Differences: none in what is computed. The original switches to subsampling once a new
level would get a capacity below 2 (about 2**23 times ``resolution`` values per unit; its
code for that path cannot run), where this raises instead. Ties among equal values in
the readout are ordered by ``numpy.argsort``, as in the original, so a different NumPy
build could order them differently (it matters only when the readout level falls inside
a run of equal values with different weights).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..errors import PyneuronError

#: compexp's / NetDissect-Lite's settings.
RESOLUTION = 24 * 1024
SEED = 1
READOUT_POINTS = 1000


def readout_index(q: float) -> int:
    """The readout index compexp reads the threshold at: ``int(1000 * (1 - q) - 1)``."""
    return int(READOUT_POINTS * (1 - q) - 1)


class CompexpQuantiles:
    """compexp's streaming quantile estimator over the units of a layer (see the module).

    Parameters
    ----------
    n_units : int
        Units (the estimator's ``depth``).
    seed : int
        Seed of its ``numpy.random.RandomState`` (compexp: 1).
    resolution : int
        Capacity of the first buffer (compexp: 24 * 1024); smaller is coarser.

    Examples
    --------
    >>> import numpy as np
    >>> acts = np.arange(2000, dtype=np.float32).reshape(20, 1, 10, 10)
    >>> estimator = CompexpQuantiles(1)
    >>> estimator.update(acts)
    >>> threshold = estimator.quantile(0.005)  # all 2000 values kept
    >>> round(float(threshold[0]))  # np.quantile: 1988.995; ties order as numpy.argsort
    1989
    """

    def __init__(self, n_units: int, *, seed: int = SEED, resolution: int = RESOLUTION) -> None:
        if isinstance(n_units, bool) or not isinstance(n_units, int) or n_units < 1:
            raise PyneuronError(f"n_units must be a positive integer, got {n_units!r}")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
            raise PyneuronError(f"resolution must be an integer >= 8, got {resolution!r}")
        self._units = n_units
        self._resolution = resolution
        self._min_capacity = min(128, (resolution + 7) // 8)
        self._buffers = [np.zeros((n_units, resolution))]
        self._fill = [0]
        self._random = np.random.RandomState(seed)
        self._low = np.full(n_units, np.nan)
        self._high = np.full(n_units, np.nan)
        self._count = 0

    @property
    def values_seen(self) -> int:
        """Values per unit added so far."""
        return self._count

    def update(self, batch: npt.ArrayLike) -> None:
        """Add activations (B, U, ...) in compexp's order: image by image, then position
        by position (row-major), every unit at once."""
        arr = np.asarray(batch)
        if arr.ndim < 2 or arr.shape[1] != self._units:
            raise PyneuronError(
                f"batch must have shape (images, {self._units} units, ...), got {arr.shape}"
            )
        rows = np.moveaxis(arr, 1, -1).reshape(-1, self._units)
        self._count += rows.shape[0]
        start = 0
        while start < rows.shape[0]:
            if self._room(0) == 0:
                self._make_room()
            take = min(self._room(0), rows.shape[0] - start)
            fill = self._fill[0]
            self._buffers[0][:, fill : fill + take] = rows[start : start + take].T
            self._fill[0] += take
            start += take

    def quantile(self, q: float = 0.005) -> np.ndarray:
        """Per-unit threshold as compexp reads it: readout level ``linspace(0, 1, 1000)``
        at :func:`readout_index` ``(q)``; float64 (U,)."""
        return self.quantile_at(float(np.linspace(0.0, 1.0, READOUT_POINTS)[readout_index(q)]))

    def quantile_at(self, level: float) -> np.ndarray:
        """The estimator's quantile at ``level`` in [0, 1] (its "old-style" readout)."""
        if self._count == 0:
            return np.full(self._units, np.nan)
        if self._fill[0]:
            self._extremes(self._buffers[0][:, : self._fill[0]])
        parts = [self._low[:, None], self._high[:, None]]
        weights = [np.zeros(2, dtype=np.float32)]
        for depth, fill in enumerate(self._fill):
            if fill:
                parts.append(self._buffers[depth][:, :fill])
                weights.append(np.full(fill, 2.0**depth, dtype=np.float32))
        values = np.concatenate(parts, axis=1)
        order = np.argsort(values)
        values = np.take_along_axis(values, order, axis=1)
        weight = np.concatenate(weights)[order]
        position = np.cumsum(weight, axis=-1) - weight / 2
        position -= position[:, 0:1]
        position /= position[:, -1:]
        return np.array([np.interp(level, position[u], values[u]) for u in range(self._units)])

    # -- the levels -----------------------------------------------------------------------
    def _room(self, depth: int) -> int:
        return self._buffers[depth].shape[1] - self._fill[depth]

    def _reserve(self, depth: int) -> int:
        """Free room level ``depth`` must keep: half the level below (rounded up), 1 at 0."""
        return -(-self._buffers[depth - 1].shape[1] // 2) if depth else 1

    def _halve(self, depth: int, track_extremes: bool) -> np.ndarray:
        """Sort level ``depth`` and return every second value from a random offset
        (values of weight 1 update the extremes on the way, as in the original)."""
        values = self._buffers[depth][:, : self._fill[depth]]
        values.sort()
        if track_extremes:
            self._extremes(values[:, [0, -1]])
        offset = self._random.binomial(1, 0.5)
        return values[:, offset::2].copy()

    def _make_room(self) -> None:
        """Compact level 0 into level 1, and so on up while a level lacks its reserve."""
        depth = 0
        while self._room(depth) < self._reserve(depth):
            if depth + 1 == len(self._buffers):
                self._grow()
                return
            kept = self._halve(depth, track_extremes=depth == 0)
            start = self._fill[depth + 1]
            self._buffers[depth + 1][:, start : start + kept.shape[1]] = kept
            self._fill[depth] = 0
            self._fill[depth + 1] += kept.shape[1]
            depth += 1

    def _grow(self) -> None:
        """Insert a new level 0; move every level down where it fits, else halve it."""
        capacity = np.ceil(self._resolution * np.power(0.67, len(self._buffers)))
        if capacity < 2:
            raise PyneuronError(
                f"after {self._count} values per unit compexp's estimator would start "
                "subsampling, which its original code cannot run; use method='exact'"
            )
        capacity = max(self._min_capacity, int(capacity))
        self._buffers.insert(0, np.empty((self._units, capacity)))
        self._fill.insert(0, 0)
        for depth in range(1, len(self._buffers)):
            amount = self._fill[depth]
            if amount == 0:
                continue
            below = self._fill[depth - 1]
            if self._buffers[depth - 1].shape[1] - (amount + below) >= self._reserve(depth - 1):
                moved = self._buffers[depth][:, :amount]
                self._buffers[depth - 1][:, below : below + amount] = moved
                self._fill[depth - 1] += amount
                self._fill[depth] = 0
            else:
                kept = self._halve(depth, track_extremes=depth == 1)
                self._buffers[depth][:, : kept.shape[1]] = kept
                self._fill[depth] = kept.shape[1]

    def _extremes(self, values: np.ndarray) -> None:
        self._low = np.fmin(self._low, values.min(axis=1))
        self._high = np.fmax(self._high, values.max(axis=1))
