"""How the engine searches: one frozen :class:`SearchSettings` that the CLI, config files,
:func:`pyneuron.dissect` and run directories hand down to :func:`pyneuron.explain`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import PyneuronError
from . import _native
from .checks import positive_int
from .netdissect import check_mode

#: Largest ``length`` and ``beam_size`` of a search (the engine's limits).
MAX_LENGTH = _native.MAX_LENGTH
MAX_BEAM_SIZE = _native.MAX_BEAM_SIZE
#: Operators in engine code order; ``operators=`` takes any of them, in any order.
OPERATORS = ("OR", "AND", "AND NOT", "OR NOT")
DEFAULT_OPERATORS = ("OR", "AND", "AND NOT")
SEARCHES = ("beam", "optimal")


@dataclass(frozen=True)
class SearchSettings:
    """The search of :func:`pyneuron.explain`, checked once when built.

    Parameters
    ----------
    length
        Maximum number of concepts in a formula (1 is NetDissect), at most
        :data:`MAX_LENGTH` (32): it bounds the result table's ``concepts`` column, not
        its ``length`` column (compexp's formula length, where each NOT counts one more).
    beam_size
        Formulas kept per step, at most :data:`MAX_BEAM_SIZE` (1024); memory grows with
        ``beam_size`` x images per unit being searched.
    operators
        Any of ``"OR"``, ``"AND"``, ``"AND NOT"``, ``"OR NOT"``; candidates are built in
        the order given (compexp: OR, AND, AND NOT).
    penalty
        Score multiplier per extra length unit (1.0: none); ``penalty ** k`` must be a
        positive finite float for every formula length ``k + 1`` the search can reach.
    search
        ``"beam"`` (compexp's beam search) or ``"optimal"`` (the guaranteed best formula).
    time_limit, max_nodes
        Optimal search only: a per-unit budget in seconds and in expanded nodes (None:
        none). The seconds are the unit's own time, the CPU time of the thread that
        searches it (a loaded machine does not use them up), checked in every phase,
        the unit's pair tables included; the result's ``seconds`` is that time. A unit
        that runs out returns the best formula found with ``optimal`` False and
        ``upper_bound`` the highest IoU any formula could still have (1.0 when the time
        ran out before its tables were complete).
    mode
        ``"dataset"`` (IoU over all pixels, compexp) or, only with ``length=1``,
        ``"netdissect"`` (NetDissect-Lite's category-restricted IoU).

    Examples
    --------
    >>> settings = SearchSettings(length=2, operators=["or", "and not"])
    >>> settings.operators, settings.operator_codes
    (('OR', 'AND NOT'), [0, 2])
    >>> SearchSettings.from_options(settings, {"beam_size": 10}).beam_size
    10
    """

    length: int = 3
    beam_size: int = 5
    operators: Sequence[str] = DEFAULT_OPERATORS
    penalty: float = 1.0
    search: str = "beam"
    time_limit: float | None = None
    max_nodes: int | None = None
    mode: str = "dataset"

    def __post_init__(self) -> None:
        codes = _operator_codes(self.operators, self.length)
        set_ = object.__setattr__
        set_(self, "operators", tuple(OPERATORS[code] for code in codes))
        set_(self, "length", positive_int(self.length, "length", MAX_LENGTH))
        set_(self, "beam_size", positive_int(self.beam_size, "beam_size", MAX_BEAM_SIZE))
        _check_penalty(self.penalty, self.length)
        if self.search not in SEARCHES:
            raise PyneuronError(
                f"unknown search {self.search!r}; choose from {', '.join(SEARCHES)}"
            )
        if self.optimal and self.penalty != 1:
            raise PyneuronError(
                "the optimal search maximizes IoU; use penalty=1.0 with search='optimal'"
            )
        if not self.optimal and (self.time_limit is not None or self.max_nodes is not None):
            raise PyneuronError("time_limit and max_nodes apply to search='optimal' only")
        _time_limit(self.time_limit)
        if self.max_nodes is not None:
            set_(self, "max_nodes", positive_int(self.max_nodes, "max_nodes"))
        check_mode(self.mode)
        if self.mode == "netdissect" and (self.length != 1 or self.optimal):
            raise PyneuronError(
                "mode='netdissect' is NetDissect-Lite's IoU of single concepts; use it with "
                f"length=1 and search='beam' (got length={self.length}, "
                f"search={self.search!r}), or mode='dataset' for formulas"
            )

    @classmethod
    def from_options(
        cls, settings: SearchSettings | None, options: Mapping[str, Any]
    ) -> SearchSettings:
        """``settings`` (or the defaults) with ``options`` (field names) replaced."""
        cls.check_names(options)
        if settings is None:
            return cls(**options)
        if not isinstance(settings, cls):
            raise PyneuronError(f"settings must be a SearchSettings, got {type(settings).__name__}")
        return dataclasses.replace(settings, **options) if options else settings

    @classmethod
    def check_names(cls, options: Mapping[str, Any]) -> None:
        """Raise unless every key of ``options`` is a field of the settings."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [name for name in options if name not in fields]
        if unknown:
            raise PyneuronError(
                f"unknown search option(s) {', '.join(map(repr, unknown))}; the options are "
                f"{', '.join(fields)}"
            )

    @property
    def optimal(self) -> bool:
        """Whether this is the guaranteed-optimal search."""
        return self.search == "optimal"

    @property
    def operator_codes(self) -> list[int]:
        """The operators as the engine numbers them."""
        return [OPERATORS.index(op) for op in self.operators]

    @property
    def seconds(self) -> float:
        """The time limit as the engine takes it (0.0: none)."""
        return _time_limit(self.time_limit)

    @property
    def nodes(self) -> int:
        """The node budget as the engine takes it (0: none)."""
        return 0 if self.max_nodes is None else int(self.max_nodes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (operators as a list), e.g. for ``summary.json``."""
        values = dataclasses.asdict(self)
        values["operators"] = list(self.operators)
        return values


def _check_penalty(penalty: float, length: int) -> None:
    """A penalty whose powers stay positive and finite up to the longest formula
    (``2 * length - 1``: every added concept may carry a NOT)."""
    if (
        isinstance(penalty, bool)
        or not isinstance(penalty, (int, float, np.floating, np.integer))
        or not (math.isfinite(penalty) and penalty > 0)
    ):
        raise PyneuronError(f"penalty must be a positive finite number, got {penalty!r}")
    try:
        extreme = math.pow(float(penalty), 2 * length - 2)
    except OverflowError:
        extreme = math.inf
    if not (0 < extreme < math.inf):
        raise PyneuronError(
            f"penalty {penalty!r} to the power {2 * length - 2} (a formula of length "
            f"{2 * length - 1}) is {'0' if extreme == 0 else 'inf'}: every score would be "
            "equal; use a penalty closer to 1 (e.g. 0.95)"
        )


def _operator_codes(operators: Sequence[str], length: int) -> list[int]:
    if isinstance(operators, str):
        operators = (operators,)
    codes = []
    for op in operators:
        normalized = " ".join(str(op).upper().split())
        if normalized not in OPERATORS:
            raise PyneuronError(f"unknown operator {op!r}; choose from {', '.join(OPERATORS)}")
        code = OPERATORS.index(normalized)
        if code in codes:
            raise PyneuronError(f"operator {normalized!r} given twice")
        codes.append(code)
    if not codes and not (isinstance(length, int) and length <= 1):
        raise PyneuronError("no operators given; formulas longer than 1 need at least one")
    return codes


def _time_limit(value: float | None) -> float:
    """Seconds as the engine takes them (0.0: no limit)."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise PyneuronError(f"time_limit must be a positive number of seconds, got {value!r}")
    return float(value) if math.isfinite(value) else 0.0
