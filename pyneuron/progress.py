"""Progress of long work: a bar on a terminal, periodic lines everywhere else.

``tqdm`` hides its bar when output is not a terminal (``disable=None``), so a run written
to a log file or a batch job's output printed nothing for minutes. :func:`progress_bar`
gives a tqdm bar on a terminal or in a notebook, and otherwise a tqdm that prints one
plain line (``desc:  20%| 40/200 [00:12<00:48, 3.3unit/s]``) when it starts, every
``PYNEURON_PROGRESS_INTERVAL`` seconds (default 30) and when it ends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import std as tqdm_std
from tqdm.auto import tqdm as tqdm_auto
from tqdm.autonotebook import tqdm as tqdm_notebook_or_std

T = TypeVar("T")

INTERVAL_VARIABLE = "PYNEURON_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0
_KNOWN = (
    "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)
_UNKNOWN = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class _LineFile:
    """A stream that passes whole lines on and drops tqdm's bare line ends and returns."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip("\r\n"):
            self.stream.write(text)

    def flush(self) -> None:
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()


class _LineProgress(tqdm_std.tqdm):  # type: ignore[misc]
    """A tqdm that writes whole lines (no carriage returns, no repeats) for logs."""

    _last_line = ""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        line = msg if msg is not None else self.__str__()
        if line and line != self._last_line:
            self._last_line = line
            self.fp.write(line + "\n")
            self.fp.flush()
        return True

    def clear(self, nolock: bool = False) -> None:  # nothing to erase on a log
        return None


def line_interval() -> float:
    """Seconds between progress lines when output is not a terminal."""
    text = os.environ.get(INTERVAL_VARIABLE, "")
    try:
        value = float(text) if text else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 else DEFAULT_INTERVAL


def _interactive(stream: Any) -> bool:
    if tqdm_notebook_or_std is not tqdm_std.tqdm:  # a notebook: tqdm.auto draws a widget
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False


def progress_bar(
    iterable: Iterable[T] | None = None,
    *,
    enabled: bool = True,
    total: float | None = None,
    desc: str | None = None,
    unit: str = "it",
    file: Any = None,
    **options: Any,
) -> tqdm_std.tqdm:
    """A progress bar over ``iterable`` (or updated by hand with ``total``).

    Parameters
    ----------
    iterable : iterable, optional
        What to iterate over, as for ``tqdm``.
    enabled : bool
        False gives a silent bar (``-q`` / ``progress=False``).
    total, desc, unit, file, **options
        As for ``tqdm``; ``file`` defaults to ``sys.stderr``.

    Examples
    --------
    >>> import io
    >>> log = io.StringIO()
    >>> for _ in progress_bar(range(3), desc="work", unit="step", file=log):
    ...     pass
    >>> log.getvalue().splitlines()[0].startswith("work:   0%")
    True
    """
    stream = sys.stderr if file is None else file
    if not enabled:
        return tqdm_std.tqdm(iterable, total=total, desc=desc, unit=unit, disable=True)
    if _interactive(stream):
        return tqdm_auto(iterable, total=total, desc=desc, unit=unit, file=file, **options)
    options.setdefault("mininterval", line_interval())
    known = total is not None or hasattr(iterable, "__len__")
    return _LineProgress(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=_LineFile(stream),
        miniters=1,
        bar_format=_KNOWN if known else _UNKNOWN,
        **options,
    )
