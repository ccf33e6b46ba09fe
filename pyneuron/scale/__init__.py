"""Backends that run the engine's search elsewhere, given to it as objects (Ray), and
:func:`explain`, which also takes a backend by name (``backend="ray"``): the engine takes
backend objects only and knows nothing of Ray. :mod:`pyneuron.scale.parts` runs the
expensive stages before the search (segmentation, capture) in parts of the images on
Ray."""

from __future__ import annotations

import functools
from typing import Any

import pandas as pd

from ..engine import search
from .ray import RayBackend, resolve_backend

__all__ = ["RayBackend", "explain", "resolve_backend"]


@functools.wraps(search.explain)
def explain(units: Any, store: Any, settings: Any = None, **options: Any) -> pd.DataFrame:
    options["backend"] = resolve_backend(options.get("backend", "local"))
    return search.explain(units, store, settings, **options)
