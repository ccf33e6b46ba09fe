"""Where the scripts' figures go: ``scripts/results/<name>.json``, also printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(name: str, summary: dict[str, Any]) -> None:
    """Write ``summary`` to ``scripts/results/<name>.json`` and print it."""
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    text = json.dumps(summary, indent=2) + "\n"
    (results / f"{name}.json").write_text(text)
    print(text, end="")
