"""Per-unit activation thresholds: exact streaming quantiles, KMeans ranges, user values.

A layer's activations are an array of shape ``(N images, U units, h, w)`` (float32 or
float64; integer arrays are read as float64; ``(N, U)`` and ``(N, U, L)`` work too). It may
be a :class:`numpy.memmap` larger than memory: every function here reads it in batches of
whole images and keeps only what it needs.

- :func:`quantile_thresholds` gives the compexp / NetDissect-Lite threshold of every unit:
  the quantile at level :func:`compexp_level` of the unit's raw activations over all images
  and positions. It is *exact*: equal to ``np.quantile(a[:, u].astype(np.float64).ravel(),
  level)``, computed by :class:`StreamingQuantiles` in memory proportional to
  ``U * (1 - level) * N * h * w`` instead of the whole array. ``method="compexp"`` gives
  instead what compexp's own randomized estimator gives (:mod:`pyneuron.model.compexp_quantiles`).
- :func:`activation_ranges` gives the Clustered-CompExp / OVCE ranges: per unit, 1-D KMeans
  over its activations, one ``(lo, hi)`` range per cluster: pyneuron's deterministic
  Lloyd's (:func:`kmeans_1d`) over the non-zero values, or (``method="sklearn"``) OVCE's
  rule, scikit-learn's ``KMeans(n_clusters, random_state=0)``, bit for bit.
- :func:`user_thresholds` checks thresholds chosen by the user.
- :func:`quantile_part` and :func:`merge_quantile_parts` split the exact quantile over
  parts of the images (computed apart, e.g. on several machines): each part keeps what the
  quantile over *all* images needs, and merging the parts gives exactly
  :func:`quantile_thresholds` of the whole array.

A unit's binary mask is ``a > threshold`` for a quantile threshold and ``lo < a < hi``
(both strict) for a range; building masks is not done here.
"""

from __future__ import annotations

import bisect
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..engine.batches import block_images, image_batches
from ..engine.checks import positive_int
from ..errors import PyneuronError
from .compexp_quantiles import CompexpQuantiles

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "RANGE_METHODS",
    "QuantilePart",
    "StreamingQuantiles",
    "activation_ranges",
    "check_ranges_method",
    "compexp_level",
    "kmeans_1d",
    "merge_quantile_parts",
    "quantile_part",
    "quantile_thresholds",
    "user_thresholds",
]

_SHAPE_HELP = "(N images, U units, h, w)"


# --------------------------------------------------------------------------- helpers


def _real(value: object, name: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PyneuronError(f"{name} must be a number {what}, got {value!r}")
    return float(value)


def _check_level(level: object) -> float:
    value = _real(level, "level", "in [0, 1]")
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise PyneuronError(f"level must be in [0, 1], got {level!r}")
    return value


def _as_activations(activations: npt.ArrayLike) -> np.ndarray:
    """Validate a whole activation array without reading it (memmaps stay memmaps)."""
    if isinstance(activations, np.ndarray):
        arr = activations
    else:
        try:
            arr = np.asarray(activations)
        except Exception as exc:  # e.g. a torch tensor that requires grad or lives on a GPU
            raise PyneuronError(
                f"cannot read activations of type {type(activations).__name__} as a numpy "
                f"array ({exc}); pass a numpy array or np.memmap, e.g. tensor.detach().cpu()"
                ".numpy()"
            ) from None
    _check_shape_dtype(arr, "activations")
    if arr.shape[0] == 0 or math.prod(arr.shape[1:]) == 0:
        raise PyneuronError(f"activations of shape {arr.shape} hold no values; {_SHAPE_HELP}")
    return arr


def _check_shape_dtype(arr: np.ndarray, name: str) -> None:
    if arr.ndim < 2:
        raise PyneuronError(f"{name} must have shape {_SHAPE_HELP}, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise PyneuronError(
            f"{name} must be real numbers (float32 or float64), got dtype {arr.dtype}"
        )


def _check_finite(batch: np.ndarray, first_image: int) -> None:
    """Raise naming the first (image, unit) with a NaN or infinite activation."""
    if batch.dtype.kind != "f":
        return
    finite = np.isfinite(batch)
    if finite.all():
        return
    bad = ~finite.reshape(batch.shape[0], batch.shape[1], -1).all(axis=2)
    image, unit = (int(i) for i in np.argwhere(bad)[0])
    values = batch[image, unit].ravel()
    value = values[~np.isfinite(values)][0]
    raise PyneuronError(
        f"unit {unit} has a non-finite activation ({value}) in image {first_image + image}; "
        "thresholds need finite activations: check the model and its inputs (NaN or inf "
        "pixels, overflow in float16/bfloat16)"
    )


def _unit_major(batch: np.ndarray) -> np.ndarray:
    """A fresh C-contiguous (U, B * h * w) copy of a (B, U, ...) batch; integers become float64."""
    b, u = batch.shape[:2]
    view = batch.reshape(b, u, -1).transpose(1, 0, 2)
    dtype = batch.dtype if batch.dtype.kind == "f" else np.dtype(np.float64)
    return view.astype(dtype, order="C", copy=True).reshape(u, -1)


# --------------------------------------------------------------------------- quantiles


def compexp_level(q: float = 0.005) -> float:
    """The quantile level at which compexp / NetDissect-Lite read a unit's threshold.

    They compute 1000 evenly spaced quantiles (levels ``np.linspace(0, 1, 1000)``) and take
    index ``int(1000 * (1 - q) - 1)``. This returns that level, ``np.linspace(0, 1,
    1000)[idx]``: 994/999 for q = 0.005 (compexp), 989/999 for q = 0.01 (OVCE). It equals
    ``idx / 999`` for all but 63 of the 1000 indices (none of the usual ones), where
    linspace's ``idx * (1 / 999)`` differs from it in the last bit. ``q`` is converted to a
    Python float first.

    Parameters
    ----------
    q : float
        Fraction of activations above the threshold, in [0, 1). ``q = 0`` gives level 1
        (the maximum).

    Returns
    -------
    float
        The level, in [0, 1].

    Examples
    --------
    >>> compexp_level(0.005)
    0.994994994994995
    >>> compexp_level(0.01) == 989 / 999
    True
    """
    value = _real(q, "q", "in [0, 1)")
    if not 0.0 <= value < 1.0:
        raise PyneuronError(
            f"q must be in [0, 1) (the fraction of activations above the threshold, e.g. "
            f"0.005), got {q!r}"
        )
    idx = int(1000 * (1 - value) - 1)
    return float(np.linspace(0.0, 1.0, 1000)[idx])


def _order_statistics(m: int, level: float) -> tuple[int, int, float]:
    """The two order statistics and weight numpy's 'linear' quantile uses for m values.

    Mirrors numpy's ``_quantile`` / ``_get_indexes`` / ``_get_gamma`` for a Python-float
    level: virtual index ``(m - 1) * level`` in float64; below it and above it the floor and
    floor + 1; at or past the end both are the last one (and the weight is computed from
    index -1, as numpy does).
    """
    virtual = float(np.float64(m - 1) * np.float64(level))
    if virtual >= float(np.float64(m - 1)):
        return m - 1, m - 1, virtual - (-1.0)
    lo = math.floor(virtual)
    return lo, lo + 1, virtual - float(lo)


def _lerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """numpy's ``_lerp``: ``a + (b - a) * t``, or ``b - (b - a) * (1 - t)`` when t >= 0.5."""
    diff = b - a
    if t >= 0.5:
        return b - diff * (1 - t)
    return a + diff * t


@dataclass(frozen=True)
class QuantilePart:
    """What one part of a stream (a contiguous range of images) keeps for the exact
    quantile over the whole stream (:meth:`StreamingQuantiles.export`).

    Attributes
    ----------
    values : numpy.ndarray, shape (U, c)
        Per unit, the part's values on the kept side: its top (or, for low levels, bottom)
        ``min(kept_per_unit, count)`` values, in no particular order.
    count : int
        Values per unit the part saw (its images times h * w).
    images : int
        Images the part saw.
    level : float
        The quantile level.
    total_values : int
        Values per unit over the whole stream (all parts).
    """

    values: np.ndarray
    count: int
    images: int
    level: float
    total_values: int

    #: The fields, as stored by :meth:`to_arrays`.
    FIELDS = ("values", "count", "images", "level", "total_values")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The part as arrays (for ``numpy.savez``); :meth:`from_arrays` reads them back."""
        return {name: np.asarray(getattr(self, name)) for name in self.FIELDS}

    @classmethod
    def from_arrays(cls, arrays: Any) -> QuantilePart:
        """A part from :meth:`to_arrays`'s arrays (any mapping, e.g. an ``np.load`` file),
        checked: a (U, c) real array of values and whole numbers that fit together.

        Raises
        ------
        PyneuronError
            If a field is missing or does not fit.
        """
        try:
            values = np.asarray(arrays["values"])
            count, images, total = (int(arrays[k]) for k in ("count", "images", "total_values"))
            level = float(arrays["level"])
        except (KeyError, TypeError, ValueError) as error:
            raise PyneuronError(f"not a quantile part: {error}") from None
        part = cls(values, count, images, level, total)
        part.check()
        return part

    def check(self) -> None:
        """Raise :class:`~pyneuron.errors.PyneuronError` unless the fields fit together:
        real (U, c) values with ``c`` what a part of ``count`` values keeps."""
        values = self.values
        if not (isinstance(values, np.ndarray) and values.ndim == 2 and values.dtype.kind == "f"):
            raise PyneuronError("a quantile part's values must be a float array (units, kept)")
        if not (0 < self.count <= self.total_values and 0 <= self.images <= self.count):
            raise PyneuronError(
                f"a quantile part of {self.count} values per unit ({self.images} images) does "
                f"not fit a stream of {self.total_values} values per unit"
            )
        _check_level(self.level)
        expected = min(_kept_side(self.total_values, self.level)[1], self.count)
        if values.shape[1] != expected:
            raise PyneuronError(
                f"a quantile part of {self.count} values per unit must keep {expected} values "
                f"per unit for the quantile at level {self.level} of {self.total_values} "
                f"values, it holds {values.shape[1]}"
            )


def _kept_side(total: int, level: float) -> tuple[bool, int]:
    """(keep the top side?, values kept per unit) for the exact quantile at ``level`` of
    ``total`` values: the smaller side of the interpolation point."""
    lo, hi, _ = _order_statistics(total, level)
    top, bottom = total - lo, hi + 1
    return top <= bottom, min(top, bottom)


class StreamingQuantiles:
    """Exact per-unit quantiles of activations seen batch by batch, in bounded memory.

    Numpy's 'linear' quantile at ``level`` of ``M`` values only reads the order statistics
    ``floor((M - 1) * level)`` and the next one. With ``total_values = M`` known, this keeps,
    per unit, only the values on the smaller side of that point (the top
    ``M - floor((M - 1) * level)`` values, or the bottom ones for low levels), merging each
    batch in with :func:`numpy.partition`, and :meth:`result` is *exactly*
    ``np.quantile(values_of_unit.astype(np.float64), level)`` (bit for bit, except possibly
    the sign of a zero result when a unit mixes -0.0 and +0.0). Values are kept in the
    batch's float dtype (integers as float64), so memory is about
    ``2 * n_units * kept_per_unit * itemsize`` plus one batch.

    With ``total_values=None`` (unknown count), pass ``max_values_per_unit``: the top that
    many values of each unit are kept. :meth:`result` is then exact whenever the count seen,
    ``M``, needs at most that many (``M - floor((M - 1) * level) <= max_values_per_unit``);
    otherwise it raises :class:`~pyneuron.errors.PyneuronError`, and :meth:`bounds` still
    gives a guaranteed interval: the unit's minimum and its smallest kept value.

    Parts of one stream can be computed apart (each with the whole stream's
    ``total_values``): :meth:`export` gives a part's kept values, and :meth:`merge` adds
    them to another instance; the result is the same, bit for bit, whatever the parts
    and their order.

    Parameters
    ----------
    n_units : int
        Units per batch (axis 1 of every batch).
    level : float
        Quantile level in [0, 1], e.g. ``compexp_level(0.005)``.
    total_values : int or None
        Values per unit over the whole stream (``N * h * w``); ``None`` if unknown.
    max_values_per_unit : int, optional
        Cap on values kept per unit. Required when ``total_values`` is None; with
        ``total_values`` it is a memory guard (raises if the exact result needs more).

    Examples
    --------
    >>> import numpy as np
    >>> acts = np.arange(60, dtype=np.float32).reshape(3, 2, 10)
    >>> sq = StreamingQuantiles(n_units=2, level=0.9, total_values=30)
    >>> sq.kept_per_unit
    4
    >>> for start in range(0, 3, 2):
    ...     sq.update(acts[start : start + 2])
    >>> sq.result()
    array([46.1, 56.1])
    >>> bool(np.quantile(acts[:, 0].astype(np.float64), 0.9) == sq.result()[0])
    True
    """

    def __init__(
        self,
        n_units: int,
        level: float,
        total_values: int | None,
        *,
        max_values_per_unit: int | None = None,
    ) -> None:
        self._n_units = positive_int(n_units, "n_units")
        self._level = _check_level(level)
        cap = None
        if max_values_per_unit is not None:
            cap = positive_int(max_values_per_unit, "max_values_per_unit")
        self._cap = cap
        if total_values is None:
            if cap is None:
                raise PyneuronError(
                    "total_values is None (count unknown), so pass max_values_per_unit, the "
                    "number of top values kept per unit; or pass total_values = N * h * w to "
                    "keep exactly what the exact quantile needs"
                )
            self._total: int | None = None
            self._top = True
            self._keep = cap
        else:
            self._total = positive_int(total_values, "total_values")
            self._top, self._keep = _kept_side(self._total, self._level)
            if cap is not None and self._keep > cap:
                raise PyneuronError(
                    f"the exact quantile at level {self._level} of {self._total} values needs "
                    f"{self._keep} values per unit, more than max_values_per_unit={cap}; raise "
                    f"the cap (memory about {2 * self._n_units * self._keep * 8} bytes in "
                    "float64)"
                )
        self._kept: np.ndarray | None = None  # (U, c): the kept side so far
        self._pending: list[np.ndarray] = []  # (U, m) batches not yet merged
        self._pending_values = 0
        self._seen = 0
        self._images = 0
        self._min: np.ndarray | None = None  # running minimum, only when total is unknown

    @property
    def n_units(self) -> int:
        """Units per batch."""
        return self._n_units

    @property
    def level(self) -> float:
        """The quantile level."""
        return self._level

    @property
    def total_values(self) -> int | None:
        """Values per unit expected over the stream (None if unknown)."""
        return self._total

    @property
    def values_seen(self) -> int:
        """Values per unit seen so far."""
        return self._seen

    @property
    def kept_per_unit(self) -> int:
        """The most values kept per unit after each merge."""
        return self._keep

    @property
    def exact(self) -> bool:
        """Whether :meth:`result` would now return the exact quantile (and not raise)."""
        if self._seen == 0:
            return False
        if self._total is not None:
            return self._seen == self._total
        lo, _, _ = _order_statistics(self._seen, self._level)
        return self._seen - lo <= self._keep

    def update(self, batch: npt.ArrayLike) -> None:
        """Add a batch of activations of shape (B, U, h, w) (or (B, U), (B, U, L)).

        Raises :class:`~pyneuron.errors.PyneuronError` on NaN or infinite values (naming
        the unit and the image, counted from the first image of the stream), on a wrong
        number of units, or when more than ``total_values`` values arrive.
        """
        arr = np.asarray(batch)
        _check_shape_dtype(arr, "batch")
        if arr.shape[1] != self._n_units:
            raise PyneuronError(
                f"batch has {arr.shape[1]} units (axis 1 of {arr.shape}), expected "
                f"{self._n_units}; batches are {_SHAPE_HELP}"
            )
        per_unit = arr.shape[0] * math.prod(arr.shape[2:])
        if per_unit == 0:
            self._images += arr.shape[0]
            return
        if self._total is not None and self._seen + per_unit > self._total:
            raise PyneuronError(
                f"this batch brings the values per unit to {self._seen + per_unit}, more than "
                f"total_values={self._total}; pass total_values = N * h * w for the whole "
                "stream, and each image once"
            )
        _check_finite(arr, self._images)
        values = _unit_major(arr)
        if self._total is None:
            low = values.min(axis=1).astype(np.float64)
            self._min = low if self._min is None else np.minimum(self._min, low)
        self._seen += per_unit
        self._images += arr.shape[0]
        self._queue(values)

    def export(self) -> QuantilePart:
        """What this part of the stream keeps for the quantile over the whole stream, for
        :meth:`merge` into another instance (e.g. on another machine).

        Raises :class:`~pyneuron.errors.PyneuronError` when ``total_values`` is unknown
        (then what the whole stream needs is not known) or nothing was seen.

        Examples
        --------
        >>> import numpy as np
        >>> acts = np.arange(30, dtype=np.float32).reshape(6, 1, 5)
        >>> parts = []
        >>> for first, stop in [(0, 2), (2, 6)]:
        ...     part = StreamingQuantiles(n_units=1, level=0.9, total_values=30)
        ...     part.update(acts[first:stop])
        ...     parts.append(part.export())
        >>> whole = StreamingQuantiles(n_units=1, level=0.9, total_values=30)
        >>> for part in parts:
        ...     whole.merge(part)
        >>> bool(whole.result()[0] == np.quantile(acts.astype(np.float64), 0.9))
        True
        """
        if self._total is None:
            raise PyneuronError(
                "export() needs total_values (the values per unit of the whole stream), so "
                "that the part keeps what the quantile over all parts needs"
            )
        if self._seen == 0:
            raise PyneuronError("no activations seen yet; call update() with batches first")
        self._merge()
        assert self._kept is not None
        return QuantilePart(self._kept.copy(), self._seen, self._images, self._level, self._total)

    def merge(self, part: QuantilePart) -> None:
        """Add a part exported by another instance of the same level and ``total_values``
        (see :meth:`export`), as if its values had been given to :meth:`update`.

        Raises :class:`~pyneuron.errors.PyneuronError` when the part does not fit: another
        level, stream length or unit count, or more values than ``total_values`` in all.
        """
        part.check()
        if part.level != self._level or part.total_values != self._total:
            raise PyneuronError(
                f"a part of the quantile at level {part.level} of {part.total_values} values "
                f"cannot merge into the quantile at level {self._level} of {self._total} values"
            )
        if part.values.shape[0] != self._n_units:
            raise PyneuronError(
                f"the part has {part.values.shape[0]} units, expected {self._n_units}"
            )
        if self._seen + part.count > part.total_values:
            raise PyneuronError(
                f"the parts bring the values per unit to {self._seen + part.count}, more than "
                f"total_values={part.total_values}; merge each part once"
            )
        self._seen += part.count
        self._images += part.images
        self._queue(np.array(part.values, order="C"))

    def _queue(self, values: np.ndarray) -> None:
        """Add (U, m) values to merge, merging once enough are pending."""
        self._pending.append(values)
        self._pending_values += values.shape[1]
        kept = 0 if self._kept is None else self._kept.shape[1]
        if self._pending_values >= self._keep and kept + self._pending_values > self._keep:
            self._merge()

    def _merge(self) -> None:
        """Fold the pending batches into the kept values (amortised linear time)."""
        if not self._pending:
            return
        parts = self._pending if self._kept is None else [self._kept, *self._pending]
        merged = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        n, k = merged.shape[1], self._keep
        if n > k:
            if self._top:
                merged.partition(n - k, axis=1)
                merged = merged[:, n - k :].copy()
            else:
                merged.partition(k - 1, axis=1)
                merged = merged[:, :k].copy()
        self._kept = merged
        self._pending = []
        self._pending_values = 0

    def _missing(self) -> int:
        """Values per unit the quantile needs beyond those kept (0 when exact)."""
        lo, _, _ = _order_statistics(self._seen, self._level)
        return max(0, (self._seen - lo) - min(self._keep, self._seen)) if self._top else 0

    def result(self) -> np.ndarray:
        """The quantile of every unit, shape (U,), float64.

        Exact (see the class notes). Raises :class:`~pyneuron.errors.PyneuronError` if no
        values were seen, if fewer than ``total_values`` were seen, or (count unknown) if
        the kept top values do not reach the order statistics the quantile needs.
        """
        if self._seen == 0:
            raise PyneuronError("no activations seen yet; call update() with batches first")
        if self._total is not None and self._seen != self._total:
            raise PyneuronError(
                f"saw {self._seen} values per unit, but total_values={self._total}; update() "
                "with every image of the stream before result()"
            )
        missing = self._missing()
        if missing:
            lo, _, _ = _order_statistics(self._seen, self._level)
            raise PyneuronError(
                f"the quantile at level {self._level} of {self._seen} values per unit needs "
                f"the top {self._seen - lo} values of each unit, but only "
                f"max_values_per_unit={self._keep} were kept; pass total_values="
                f"{self._seen} (then exactly the needed values are kept) or raise "
                f"max_values_per_unit to at least {self._seen - lo}; bounds() gives an "
                "interval that contains the exact value"
            )
        self._merge()
        assert self._kept is not None
        lo, hi, t = _order_statistics(self._seen, self._level)
        offset = self._seen - self._kept.shape[1] if self._top else 0
        i, j = lo - offset, hi - offset
        part = np.partition(self._kept, sorted({i, j}), axis=1)
        a = part[:, i].astype(np.float64)
        b = part[:, j].astype(np.float64)
        return _lerp(a, b, t)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """A guaranteed interval ``(lower, upper)`` per unit for the quantile of what was seen.

        When :attr:`exact` both are :meth:`result` (with ``total_values`` given, that needs
        the whole stream, as :meth:`result` does). Otherwise (count unknown and the cap too
        small) the quantile interpolates between order statistics that are all at or below
        the kept values, so it lies between the unit's smallest value seen and its smallest
        kept value.
        """
        if self._seen == 0:
            raise PyneuronError("no activations seen yet; call update() with batches first")
        if self._total is not None or not self._missing():
            value = self.result()
            return value, value.copy()
        self._merge()
        assert self._kept is not None and self._min is not None
        return self._min.copy(), self._kept.min(axis=1).astype(np.float64)


def quantile_thresholds(
    activations: npt.ArrayLike,
    q: float = 0.005,
    *,
    level: float | None = None,
    batch_images: int | None = None,
    method: str = "exact",
) -> np.ndarray:
    """Per-unit top-quantile thresholds, exactly as compexp / NetDissect-Lite define them.

    For each unit, the quantile at level ``compexp_level(q)`` (or ``level``) of its raw
    activations over all images and positions, with numpy's default 'linear' interpolation:
    the result equals ``np.quantile(activations[:, u].astype(np.float64).ravel(), level)``
    bit for bit (up to the sign of a zero result when a unit mixes -0.0 and +0.0). The
    unit's mask is then ``activation > threshold``.

    The array is read ``batch_images`` images at a time through
    :class:`StreamingQuantiles`, keeping per unit only the values at or above the
    interpolation point (about ``q * N * h * w``), so memmaps larger than memory work.

    Parameters
    ----------
    activations : array_like, shape (N, U, h, w)
        Raw activations (float32 or float64; integers are read as float64). ``(N, U)`` and
        ``(N, U, L)`` also work. NaN or inf raise :class:`~pyneuron.errors.PyneuronError`.
    q : float
        Fraction of activations above the threshold (compexp 0.005, OVCE 0.01).
    level : float, optional
        The quantile level in [0, 1], used instead of ``compexp_level(q)``.
    batch_images : int, optional
        Images per batch; by default about 64 MiB of activations.
    method : {"exact", "compexp"}
        ``"exact"`` (default): the exact quantile described above. ``"compexp"``: the
        value compexp's and NetDissect-Lite's own randomized streaming estimator gives
        (:class:`~pyneuron.model.compexp_quantiles.CompexpQuantiles`, seed 1, images in array
        order, readout index ``int(1000 * (1 - q) - 1)``), bit for bit, for reproducing
        published thresholds; it differs from the exact quantile (by up to ~0.005 on real
        layers). ``level`` cannot be combined with it; the result does not depend on
        ``batch_images``. Memory: about 0.6 MB per unit.

    Returns
    -------
    numpy.ndarray, shape (U,), float64

    Examples
    --------
    >>> import numpy as np
    >>> acts = np.arange(200, dtype=np.float32).reshape(2, 1, 10, 10)
    >>> quantile_thresholds(acts, q=0.01)
    array([197.00800801])
    >>> bool(quantile_thresholds(acts, level=0.5)[0] == np.quantile(acts, 0.5))
    True
    """
    arr = _as_activations(activations)
    if method not in ("exact", "compexp"):
        raise PyneuronError(f"unknown method {method!r}; choose 'exact' or 'compexp'")
    if method == "compexp":
        if level is not None:
            raise PyneuronError(
                "method='compexp' reads its estimator at readout index int(1000 * (1 - q) - 1);"
                " give q, not level"
            )
        compexp_level(q)  # checks q
        estimator = CompexpQuantiles(arr.shape[1])
        for start, values in image_batches(arr, batch_images):
            _check_finite(values, start)
            estimator.update(values)
        return estimator.quantile(q)
    return _stream(arr, q, level, batch_images, arr.shape[0]).result()


def _stream(
    arr: np.ndarray, q: float, level: float | None, batch_images: int | None, total_images: int
) -> StreamingQuantiles:
    """The :class:`StreamingQuantiles` of the exact quantile over ``total_images`` images
    (shaped like ``arr``), updated with the images of ``arr``."""
    level = compexp_level(q) if level is None else _check_level(level)
    batch = block_images(arr, batch_images)
    total = positive_int(total_images, "total_images") * math.prod(arr.shape[2:])
    stream = StreamingQuantiles(arr.shape[1], level, total)
    for _, values in image_batches(arr, batch):
        stream.update(values)
    return stream


def quantile_part(
    activations: npt.ArrayLike,
    q: float = 0.005,
    *,
    total_images: int,
    level: float | None = None,
    batch_images: int | None = None,
) -> QuantilePart:
    """What a part of the images (a contiguous range of them) keeps for the exact
    :func:`quantile_thresholds` over all ``total_images`` images.

    Give :func:`merge_quantile_parts` the parts of every image range (each image once,
    in any order) to get ``quantile_thresholds(all_activations, q, level=level)``, bit for
    bit. A part keeps per unit its share of what the whole quantile needs, at most
    about ``q * total_images * h * w`` values (see :class:`StreamingQuantiles`).

    ``method="compexp"`` has no parts: compexp's randomized estimator
    (:class:`~pyneuron.model.compexp_quantiles.CompexpQuantiles`) gives a value that
    depends on the order in which the values arrive and on its random draws, so
    estimators run on parts cannot be merged into the one-pass estimate (nor into the
    exact value). Runs split into parts use the exact quantile.

    Parameters
    ----------
    activations : array_like, shape (n, U, h, w)
        The part's raw activations (an array or memmap; ``(n, U)`` and ``(n, U, L)`` work
        too).
    q, level, batch_images
        As for :func:`quantile_thresholds`; the same for every part.
    total_images : int
        Images of the whole set, all parts together.

    Returns
    -------
    QuantilePart

    Examples
    --------
    >>> import numpy as np
    >>> acts = np.random.default_rng(0).random((10, 2, 3, 3), dtype=np.float32)
    >>> parts = [quantile_part(acts[a:b], 0.05, total_images=10) for a, b in [(0, 3), (3, 10)]]
    >>> bool((merge_quantile_parts(parts) == quantile_thresholds(acts, 0.05)).all())
    True
    """
    return _stream(_as_activations(activations), q, level, batch_images, total_images).export()


def merge_quantile_parts(parts: Sequence[QuantilePart]) -> np.ndarray:
    """The exact quantile thresholds of all images from the parts of every image range
    (:func:`quantile_part`), equal bit for bit to :func:`quantile_thresholds` over all of
    them, whatever the parts and their order.

    Raises
    ------
    PyneuronError
        No parts, parts of other levels, stream lengths or unit counts, or parts that do
        not cover the images exactly once (in values per unit).

    Examples
    --------
    >>> import numpy as np
    >>> acts = np.arange(40, dtype=np.float64).reshape(4, 1, 10)
    >>> parts = [quantile_part(acts[i : i + 1], level=0.5, total_images=4) for i in range(4)]
    >>> merge_quantile_parts(parts[::-1])
    array([19.5])
    """
    parts = list(parts)
    if not parts:
        raise PyneuronError("no quantile parts to merge")
    first = parts[0]
    first.check()
    seen = sum(part.count for part in parts)
    if seen != first.total_values:
        raise PyneuronError(
            f"the parts hold {seen} values per unit but the whole set "
            f"{first.total_values}; give the part of every image range, each once"
        )
    stream = StreamingQuantiles(first.values.shape[0], first.level, first.total_values)
    for part in parts:
        stream.merge(part)
    return stream.result()


# --------------------------------------------------------------------------- KMeans ranges


def _split(values: list[float], low: float, high: float) -> int:
    """First index of the sorted ``values`` nearer to center ``high`` than to ``low``.

    A value goes to the upper center iff ``(v - low) > (high - v)`` in float64: ties go to
    the lower cluster, a value equal to a center always goes to that center, and the test is
    monotone in ``v`` so a bisection finds the split.
    """
    return bisect.bisect_left(values, True, key=lambda v: (v - low) > (high - v))


def _assign(values: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Cluster of each float64 value for strictly increasing centers (same rule as _split)."""
    if centers.size < 2:
        return np.zeros(values.shape, dtype=np.int64)
    above = (values[:, None] - centers[None, :-1]) > (centers[None, 1:] - values[:, None])
    return np.count_nonzero(above, axis=1).astype(np.int64)


def _fit_sorted(s: np.ndarray, k: int, max_iter: int) -> tuple[np.ndarray, list[int]]:
    """Lloyd's algorithm on sorted float64 values.

    Returns strictly increasing centers of the non-empty clusters and the cluster bounds:
    cluster ``j`` is ``s[bounds[j]:bounds[j + 1]]``.
    """
    n = s.size
    if n == 0:
        return np.empty(0), [0]
    distinct = np.unique(s)
    if distinct.size <= k:  # each distinct value is its own cluster (the exact optimum)
        return distinct, [*np.searchsorted(s, distinct, side="left").tolist(), n]
    picks = ((2 * np.arange(k) + 1) * n) // (2 * k)
    centers = s[picks]
    if np.any(np.diff(centers) <= 0):  # ties at the quantiles: use distinct values
        centers = distinct[((2 * np.arange(k) + 1) * distinct.size) // (2 * k)]
    values = s.tolist()

    def assignment(c: np.ndarray) -> list[int]:
        cl = c.tolist()
        return [0, *(_split(values, cl[j], cl[j + 1]) for j in range(k - 1)), n]

    bounds = assignment(centers)
    for _ in range(max_iter):
        new = centers.copy()
        for j in range(k):
            a, b = bounds[j], bounds[j + 1]
            if b > a:  # an empty cluster keeps its center
                new[j] = min(max(float(np.mean(s[a:b])), values[a]), values[b - 1])
        new_bounds = assignment(new)
        changed = new_bounds != bounds
        centers, bounds = new, new_bounds
        if not changed:
            break
    keep = [j for j in range(k) if bounds[j + 1] > bounds[j]]
    return centers[keep], [*(bounds[j] for j in keep), n]


def kmeans_1d(
    values: npt.ArrayLike, n_clusters: int, *, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 1-D KMeans (Lloyd's algorithm on sorted values).

    Centers start at the values at the evenly spaced quantile positions
    ``(2j + 1) / (2 * n_clusters)`` of the sorted data (at evenly spaced distinct values if
    those tie). Each value goes to its nearest center, a value exactly halfway to the lower
    one; each center moves to the mean of its values; this repeats until the assignment no
    longer changes (a fixed point) or ``max_iter`` rounds. "Nearest" is decided in float64
    as ``(v - c_low) > (c_high - v)``; means are taken over the sorted members (clamped to
    their min and max), so the result does not depend on the order of ``values``. A cluster
    that becomes empty keeps its center while iterating and is dropped at the end. With at
    most ``n_clusters`` distinct values, each distinct value is its own cluster.

    Parameters
    ----------
    values : array_like, 1-D
        Finite real values.
    n_clusters : int
        Number of clusters wanted.
    max_iter : int
        Most update rounds.

    Returns
    -------
    centers : numpy.ndarray, shape (n_clusters,), float64
        Centers of the non-empty clusters, ascending, then NaN for the missing clusters.
    labels : numpy.ndarray, shape (len(values),), int64
        Index into ``centers`` of each value's cluster.

    Examples
    --------
    >>> centers, labels = kmeans_1d([1.0, 1.2, 5.0, 5.2, 9.0], 3)
    >>> centers
    array([1.1, 5.1, 9. ])
    >>> labels
    array([0, 0, 1, 1, 2])
    >>> kmeans_1d([2.0, 2.0, 3.0], 3)[0]
    array([ 2.,  3., nan])
    """
    k = positive_int(n_clusters, "n_clusters")
    rounds = positive_int(max_iter, "max_iter")
    raw = np.asarray(values)
    if raw.ndim != 1 or raw.dtype.kind not in "fiu":
        raise PyneuronError(
            f"values must be a 1-D array of real numbers, got shape {raw.shape} dtype {raw.dtype}"
        )
    v = raw.astype(np.float64)
    if not np.isfinite(v).all():
        raise PyneuronError("values must be finite; drop or fix NaN and inf first")
    fitted, _ = _fit_sorted(np.sort(v), k, rounds)
    centers = np.full(k, np.nan)
    centers[: fitted.size] = fitted
    return centers, _assign(v, fitted)


#: How activation ranges are clustered (``activation_ranges(method=...)``).
RANGE_METHODS = ("pyneuron", "sklearn")

#: Values per unit ``method="pyneuron"`` fits its centers on unless told otherwise.
DEFAULT_MAX_SAMPLES = 100_000


def check_ranges_method(method: object) -> str:
    """``method`` if it names a way of clustering of :data:`RANGE_METHODS`, else a clear
    error.

    Examples
    --------
    >>> check_ranges_method("sklearn")
    'sklearn'
    """
    if not (isinstance(method, str) and method in RANGE_METHODS):
        raise PyneuronError(
            f"unknown ranges method {method!r}; use 'pyneuron' (pyneuron's deterministic "
            "1-D KMeans) or 'sklearn' (scikit-learn's KMeans, as OVCE)"
        )
    return method


def _sklearn_kmeans() -> Any:
    """scikit-learn's ``KMeans`` class, or an error naming what to install."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise PyneuronError(
            "method='sklearn' (OVCE's activation ranges) needs scikit-learn: pip install "
            "'pyneuron[ovce]' (or scikit-learn>=1.3), or use method='pyneuron'"
        ) from None
    return KMeans


def _sklearn_fit(kmeans: Any, values: np.ndarray, k: int) -> Any:
    """OVCE's fit, ``KMeans(n_clusters=k, random_state=0).fit(values as one float64
    column)``, without the warnings about empty clusters (they become NaN rows) and
    about the default ``n_init`` of scikit-learn 1.2 and 1.3."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Number of distinct clusters")
        warnings.filterwarnings("ignore", message="The default value of `n_init`")
        return kmeans(n_clusters=k, random_state=0).fit(_column(values))


def _column(values: np.ndarray) -> np.ndarray:
    """``values`` as the float64 column scikit-learn makes of OVCE's torch tensor."""
    return values.astype(np.float64).reshape(-1, 1)


def _clustered(values: np.ndarray, keep_zeros: bool) -> np.ndarray:
    """A unit's values (B, h * w) that are clustered, image-major: all of them, or the
    non-zero ones."""
    return values.reshape(-1) if keep_zeros else values[values != 0]


def _label_ranges(values: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, 2): the (min, max) of the values of each label, NaN for labels without any."""
    out = np.full((k, 2), np.nan)
    for j in range(k):
        members = values[labels == j]
        if members.size:
            out[j] = members.min(), members.max()
    return out


def activation_ranges(
    activations: npt.ArrayLike,
    n_clusters: int = 5,
    *,
    method: str = "pyneuron",
    seed: int = 0,
    max_samples: int | None = None,
    batch_images: int | None = None,
    max_iter: int = 300,
) -> np.ndarray:
    """Per-unit activation ranges from 1-D KMeans (Clustered CompExp / OVCE).

    Each unit's activations (over all images and positions) are clustered, and each
    cluster gives the range ``(min, max)`` of its members; ranges are sorted by their
    lower end, ascending. The unit's mask for a range is ``lo < activation < hi`` -- both
    strict, as in OVCE, so the extreme members themselves fall outside it.

    ``method="pyneuron"`` (the default) clusters the unit's non-zero values (``!= 0``)
    with :func:`kmeans_1d`: deterministic Lloyd's iterations from evenly spaced
    quantiles, whatever the order of the values.

    ``method="sklearn"`` is OVCE's rule (``compute_activation_ranges`` in its
    ``utils/activations_utils.py``), bit for bit: the unit's values in image-major,
    row-major order, without its zeros when no value is negative (all of them,
    zeros included, otherwise), clustered by ``sklearn.cluster.KMeans(n_clusters,
    random_state=0)`` -- k-means++ seeding, Lloyd's iterations, in float64 (OVCE hands
    KMeans a torch tensor, which scikit-learn converts to float64) -- each label's
    members giving a range, sorted as OVCE's scripts read them (``sorted(ranges)``).
    Its result depends on the order of the values and on the scikit-learn version: from
    1.4 on, ``n_init`` defaults to ``"auto"`` (one k-means++ start), before to 10 starts
    (OVCE's Docker image, on Python 3.8, gets at most 1.3.2). It often ends in another
    local optimum than pyneuron's (pyneuron's usually has the lower inertia), so the
    ranges differ. It needs scikit-learn (``pip install 'pyneuron[ovce]'``).

    Rows for missing clusters are NaN and come last: a unit with fewer distinct
    clustered values than ``n_clusters`` (``"pyneuron"``: each distinct value is then a
    cluster of its own, range ``(v, v)``; ``"sklearn"``: the labels KMeans leaves empty),
    a unit with nothing to cluster (all zeros) or, for ``"sklearn"``, with fewer values
    than ``n_clusters`` (all NaN), or, rarely, a cluster that Lloyd's iterations left
    empty. OVCE's own code stops with an error on such units.

    Subsampling: when a unit has more than ``max_samples`` values to cluster, the
    clusters are fitted on ``max_samples`` of them drawn uniformly without replacement by
    ``numpy.random.default_rng(seed)`` (the same sample whatever ``batch_images``, kept in
    image order), and then *every* value is assigned to its nearest center (for
    ``"sklearn"``, by the fitted model's ``predict``), so the ranges still cover all of
    them; this holds about ``U * max_samples`` values in memory. The array is read once
    to collect the values, once before that to count them when subsampling (and, for
    ``"sklearn"``, always, to find the units with negative values) and once after to
    assign them when subsampling. By default ``"pyneuron"`` fits on
    at most :data:`DEFAULT_MAX_SAMPLES` values per unit and ``"sklearn"`` on every value,
    as OVCE does -- holding every clustered value of the layer in memory; give
    ``max_samples`` to bound that (the result then is no longer OVCE's).

    Parameters
    ----------
    activations : array_like, shape (N, U, h, w)
        Raw activations; NaN or inf raise :class:`~pyneuron.errors.PyneuronError`.
    n_clusters : int
        Clusters per unit (OVCE: 5).
    method : {"pyneuron", "sklearn"}
        How to cluster (see above).
    seed : int
        Seed of the subsample.
    max_samples : int, optional
        Most values per unit the clusters are fitted on; by default
        :data:`DEFAULT_MAX_SAMPLES` for ``"pyneuron"``, all for ``"sklearn"``.
    batch_images : int, optional
        Images per batch; by default about 64 MiB of activations.
    max_iter : int
        Most Lloyd iterations of ``"pyneuron"`` (``"sklearn"`` uses scikit-learn's 300).

    Returns
    -------
    numpy.ndarray, shape (U, n_clusters, 2), float64
        ``ranges[u, j] = (lo, hi)`` of cluster ``j`` of unit ``u``.

    Examples
    --------
    >>> import numpy as np
    >>> acts = np.array([0.0, 1.0, 1.5, 6.0, 7.0, 0.0]).reshape(6, 1, 1, 1)
    >>> activation_ranges(acts, n_clusters=2)
    array([[[1. , 1.5],
            [6. , 7. ]]])
    >>> activation_ranges(acts, n_clusters=2, method="sklearn")
    array([[[1. , 1.5],
            [6. , 7. ]]])
    """
    arr = _as_activations(activations)
    method = check_ranges_method(method)
    k = positive_int(n_clusters, "n_clusters")
    if max_samples is None:
        cap = DEFAULT_MAX_SAMPLES if method == "pyneuron" else None
    else:
        cap = positive_int(max_samples, "max_samples")
    rounds = positive_int(max_iter, "max_iter")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise PyneuronError(f"seed must be a non-negative integer, got {seed!r}")
    kmeans = _sklearn_kmeans() if method == "sklearn" else None
    batch = block_images(arr, batch_images)
    n, units = arr.shape[:2]
    per_unit = n * math.prod(arr.shape[2:])
    sampling = cap is not None and per_unit > cap

    # Pass 1 (for sklearn, or when some unit might exceed the cap): the units that keep
    # their zeros (sklearn: those with a negative value), the counts, then the sample.
    keep_zeros = np.zeros(units, dtype=bool)
    chosen: list[np.ndarray | None] = [None] * units
    checked = False
    if method == "sklearn" or sampling:
        nonzero = np.zeros(units, dtype=np.int64)
        for start, values in image_batches(arr, batch):
            _check_finite(values, start)
            flat = values.reshape(*values.shape[:2], -1)
            nonzero += np.count_nonzero(flat, axis=(0, 2))
            if method == "sklearn":
                keep_zeros |= (flat < 0).any(axis=(0, 2))
        checked = True
        if sampling:
            assert cap is not None
            counts = np.where(keep_zeros, per_unit, nonzero)
            rng = np.random.default_rng(int(seed))
            for u in range(units):
                if counts[u] > cap:
                    chosen[u] = np.sort(rng.choice(int(counts[u]), size=cap, replace=False))

    # Pass 2: the clustered values (or the chosen ones), in image-major order.
    parts: list[list[np.ndarray]] = [[] for _ in range(units)]
    offsets = np.zeros(units, dtype=np.int64)
    for start, values in image_batches(arr, batch):
        if not checked:
            _check_finite(values, start)
        flat = values.reshape(*values.shape[:2], -1)
        for u in range(units):
            kept = _clustered(flat[:, u], bool(keep_zeros[u]))
            picks = chosen[u]
            if picks is not None:
                first = int(offsets[u])
                offsets[u] += kept.size
                lo, hi = np.searchsorted(picks, [first, first + kept.size], side="left")
                kept = kept[picks[lo:hi] - first]
            parts[u].append(kept)

    ranges = np.full((units, k, 2), np.nan)
    fitted: dict[int, Any] = {}  # subsampled units: centers (pyneuron) or model (sklearn)
    for u in range(units):
        fitted_on = np.concatenate(parts[u])
        parts[u] = []
        if method == "sklearn":
            if fitted_on.size < k:  # KMeans needs at least k values
                continue
            model = _sklearn_fit(kmeans, fitted_on, k)
            if chosen[u] is None:
                ranges[u] = _label_ranges(fitted_on, model.labels_, k)
            else:
                fitted[u] = model
            continue
        ordered = np.sort(fitted_on.astype(np.float64))
        centers, bounds = _fit_sorted(ordered, k, rounds)
        if chosen[u] is None:
            for j in range(centers.size):
                ranges[u, j] = ordered[bounds[j]], ordered[bounds[j + 1] - 1]
        else:
            fitted[u] = centers

    # Pass 3 (subsampled units only): assign every clustered value to the fitted clusters.
    if fitted:
        low = np.full((units, k), np.inf)
        high = np.full((units, k), -np.inf)
        for _, values in image_batches(arr, batch):
            flat = values.reshape(*values.shape[:2], -1)
            for u, fit in fitted.items():
                kept = _clustered(flat[:, u], bool(keep_zeros[u]))
                if kept.size == 0:
                    continue
                if method == "sklearn":
                    block = _label_ranges(kept, fit.predict(_column(kept)), k)
                else:
                    block = _label_ranges(kept, _assign(kept.astype(np.float64), fit), k)
                low[u] = np.fmin(low[u], block[:, 0])
                high[u] = np.fmax(high[u], block[:, 1])
        for u in fitted:
            found = np.isfinite(low[u])
            ranges[u, found, 0] = low[u, found]
            ranges[u, found, 1] = high[u, found]
    if method == "sklearn":  # sorted by lower end, NaN rows last, as sorted() in OVCE
        order = np.argsort(ranges[:, :, 0], axis=1, kind="stable")
        ranges = np.take_along_axis(ranges, order[:, :, None], axis=1)
    return ranges


# --------------------------------------------------------------------------- user values


def user_thresholds(values: npt.ArrayLike, n_units: int) -> np.ndarray:
    """Check user-given thresholds: one number for every unit, or one per unit.

    Parameters
    ----------
    values : float or sequence of float
        A number (used for every unit) or ``n_units`` numbers; all finite.
    n_units : int
        Number of units of the layer.

    Returns
    -------
    numpy.ndarray, shape (n_units,), float64
        A new array.

    Examples
    --------
    >>> user_thresholds(0.5, 3)
    array([0.5, 0.5, 0.5])
    >>> user_thresholds([1, 2], 2)
    array([1., 2.])
    """
    units = positive_int(n_units, "n_units")
    try:
        raw = np.asarray(values)
    except Exception:
        raw = np.asarray(None)
    if raw.dtype.kind not in "fiu":
        raise PyneuronError(
            f"thresholds must be a number or a sequence of {units} numbers, got {values!r:.80}"
        )
    if raw.ndim == 0:
        out = np.full(units, float(raw), dtype=np.float64)
    elif raw.shape == (units,):
        out = raw.astype(np.float64, copy=True)
    else:
        raise PyneuronError(
            f"thresholds must be one number or one per unit ({units} units), got shape {raw.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise PyneuronError(
            f"the threshold of unit {int(bad[0])} is {out[bad[0]]}; thresholds must be "
            "finite numbers"
        )
    return out
