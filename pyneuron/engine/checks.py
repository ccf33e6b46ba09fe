"""Argument checks shared by the engine's entry points."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import pandas as pd

from ..errors import PyneuronError


def positive_int(value: object, name: str, maximum: int = 2**31 - 1) -> int:
    """``value`` as an int, if it is an integer (not a bool) from 1 to ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise PyneuronError(f"{name} must be an integer >= 1, got {value!r}")
    if value > maximum:
        raise PyneuronError(f"{name} must be at most {maximum}, got {value!r}")
    return int(value)


def check_table(table: pd.DataFrame, columns: Sequence[str]) -> None:
    """One layer's explanation table with the given columns, or a clear error."""
    if not isinstance(table, pd.DataFrame):
        raise PyneuronError(
            f"expected an explanation table (DataFrame), got {type(table).__name__}"
        )
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise PyneuronError(
            f"the table lacks the column(s) {', '.join(missing)}; pass a table from "
            "pyneuron.explain or pyneuron.dissect"
        )
    if "layer" in table.columns and table["layer"].nunique() > 1:
        raise PyneuronError(
            "the table holds several layers; pass the rows of one layer "
            "(table[table.layer == name]) with that layer's unit masks"
        )
