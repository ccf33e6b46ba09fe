"""Result files of a run: tidy tables (parquet and CSV), summary and resolved config."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from . import atomic
from .atomic import OutputKind, commit_directory, temporary_sibling
from .errors import PyneuronError

RESULTS = "results"
BEAM = "beam"
NULL = "null"
SUMMARY = "summary.json"
CONFIG = "config.toml"


def _is_run(path: Path) -> bool:
    return (path / SUMMARY).is_file() and (path / CONFIG).is_file()


#: A run directory (``dissect``, ``explain``, ``describe``, the demo): what ``--overwrite``
#: may replace.
RUN_KIND = OutputKind("pyneuron run directory", _is_run)


def versions() -> dict[str, str]:
    """Versions of pyneuron and the libraries a run depends on."""
    import numpy

    from . import __version__, _native

    found = {
        "pyneuron": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pandas": pd.__version__,
        "simd": _native.simd_level(),
        "threads": str(_native.num_threads()),
    }
    try:
        import torch

        found["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return found


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise PyneuronError(f"cannot write {type(value).__name__} values to TOML")


def to_toml(config: Mapping[str, Any]) -> str:
    """Render a config (scalars, lists, nested tables; ``None`` values are left out) as TOML."""
    lines: list[str] = []

    def table(path: list[str], mapping: Mapping[str, Any]) -> None:
        if path:
            lines.extend(["", "[" + ".".join(json.dumps(part) for part in path) + "]"])
        for key, value in mapping.items():
            if value is not None and not isinstance(value, Mapping):
                lines.append(f"{json.dumps(str(key))} = {_toml_value(value)}")
        for key, value in mapping.items():
            if isinstance(value, Mapping):
                table([*path, str(key)], value)

    table([], config)
    return "\n".join(lines) + "\n"


def write_run(
    out: str | os.PathLike[str],
    results: pd.DataFrame,
    *,
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    beam: pd.DataFrame | None = None,
    extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a run directory atomically: tables, ``summary.json``, ``config.toml``, and
    whatever ``extra(staging_dir)`` adds (unit masks, the report) before the summary
    is written.

    Raises
    ------
    OutputExistsError
        If ``out`` exists and ``overwrite`` is false, or ``out`` holds anything but an
        earlier run directory (checked before anything is written).
    """
    out = Path(out)
    refuse_existing(out, overwrite)
    staging = temporary_sibling(out)
    try:
        results.to_parquet(staging / f"{RESULTS}.parquet", index=False)
        results.to_csv(staging / f"{RESULTS}.csv", index=False)
        if beam is not None:
            beam.to_parquet(staging / f"{BEAM}.parquet", index=False)
            beam.to_csv(staging / f"{BEAM}.csv", index=False)
        if extra is not None:
            extra(staging)  # may still complete the summary
        (staging / SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
        (staging / CONFIG).write_text(to_toml(config))
        commit_directory(staging, out, overwrite, RUN_KIND)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Raise if ``out`` cannot take a run: it holds anything and ``overwrite``
    (``--overwrite``) is false, or it holds something other than a run directory."""
    atomic.refuse_existing(out, overwrite, RUN_KIND, "--overwrite")


def read_results(run: str | os.PathLike[str]) -> pd.DataFrame:
    """The results table of a run directory."""
    atomic.recover(run)
    path = Path(run) / f"{RESULTS}.parquet"
    if not path.is_file():
        raise PyneuronError(f"{run} holds no pyneuron results ({path.name} is missing)")
    return pd.read_parquet(path)
