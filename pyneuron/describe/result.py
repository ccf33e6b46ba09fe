"""The result of a describer, and helpers shared by the describers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import PyneuronError

#: Separator of the list-valued text columns (``top_concepts``, ``top_scores``, ...).
SEPARATOR = "; "
#: Columns every describer's table starts with.
COLUMNS = ("layer", "unit", "method", "label", "score", "top_concepts", "top_scores", "top_images")


@dataclass
class DescribeResult:
    """What a describer returns.

    Attributes
    ----------
    table
        One row per unit: ``layer``, ``unit``, ``method``, ``label`` (the best
        description), ``score`` (its score; higher is better; the scale depends on the
        method), ``top_concepts`` / ``top_scores`` (the best few, joined with ``"; "``),
        ``top_images`` (the unit's top probing images used, joined), then
        method-specific columns.
    method
        ``"clip-dissect"``, ``"occlusion"`` or ``"dnd"``.
    concepts
        The candidate concepts the scores refer to (CLIP-Dissect and occlusion).
    scores
        The (units, concepts) score matrix, when asked for (``return_matrix=True``).
    top_images
        (units, k) probing-image ids of each reported unit, best first.
    details
        Method-specific extras (e.g. occlusion boxes, captions).
    """

    table: pd.DataFrame
    method: str
    concepts: list[str] | None = None
    scores: np.ndarray | None = None
    top_images: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def labels(self) -> dict[int, str]:
        """Unit -> label."""
        return dict(zip(self.table["unit"].tolist(), self.table["label"].tolist(), strict=True))


def join(values: Iterable[Any], fmt: Callable[[Any], str] = str) -> str:
    """Join a list for a text column (see :data:`SEPARATOR`).

    Examples
    --------
    >>> join([0.5, 0.25], lambda v: f"{v:.2f}")
    '0.50; 0.25'
    """
    return SEPARATOR.join(fmt(v) for v in values)


def split(text: Any) -> list[str]:
    """The list stored in a text column by :func:`join` (empty for missing values).

    Examples
    --------
    >>> split("dog; red car")
    ['dog', 'red car']
    """
    if text is None or (isinstance(text, float) and np.isnan(text)) or text == "":
        return []
    return str(text).split(SEPARATOR)


def place_model(model: Any, device: Any) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, that device); ``device=None`` keeps the model's."""
    import torch

    parameter = next(model.parameters(), None)
    if device is not None:
        target = torch.device(device)
    else:
        target = parameter.device if parameter is not None else torch.device("cpu")
    model = model.eval()
    if parameter is not None and parameter.device != target:
        model = model.to(target)
    return model, target


def ranked_labels(
    layer: str,
    units: np.ndarray,
    method: str,
    names: Sequence[str],
    ids: np.ndarray,
    values: np.ndarray,
    tops: Iterable[Iterable[int]],
    **extra: Any,
) -> pd.DataFrame:
    """The result table of a describer that ranks ``names`` per unit: best name as the
    label, the top names and scores, the top images, then ``extra`` columns."""
    return pd.DataFrame(
        {
            "layer": layer,
            "unit": units,
            "method": method,
            "label": [names[row[0]] for row in ids],
            "score": values[:, 0].astype(np.float64),
            "top_concepts": [join(names[i] for i in row) for row in ids],
            "top_scores": [join(row, score_text) for row in values],
            "top_images": [join(row) for row in tops],
            **extra,
        }
    )


def score_text(value: float) -> str:
    return f"{float(value):.6g}"


def check_concepts(concepts: Any, what: str = "concepts") -> list[str]:
    """A clean concept list: strings, stripped, non-empty, without duplicates."""
    if isinstance(concepts, (str, bytes)) or not isinstance(concepts, Iterable):
        raise PyneuronError(
            f"{what} must be a list of strings (one per concept), got {type(concepts).__name__}"
        )
    names = []
    for item in concepts:
        if not isinstance(item, str):
            raise PyneuronError(f"{what} must be strings, got {type(item).__name__}: {item!r}")
        names.append(item.strip())
    if not names:
        raise PyneuronError(f"{what} is empty: give at least one concept")
    if "" in names:
        raise PyneuronError(f"{what} holds an empty string at position {names.index('')}")
    seen: set[str] = set()
    duplicates = []
    for name in names:
        if name in seen:
            duplicates.append(name)
        seen.add(name)
    if duplicates:
        shown = ", ".join(map(repr, list(dict.fromkeys(duplicates))[:5]))
        raise PyneuronError(f"{what} holds duplicates ({shown}); remove them")
    return names


def load_concepts(path: str | os.PathLike[str]) -> list[str]:
    """Concepts from a text file, one per line; blank lines and lines starting with ``#``
    are skipped, surrounding whitespace is stripped.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
    ...     _ = f.write("# colours\\nred\\n\\n blue \\n")
    >>> load_concepts(f.name)
    ['red', 'blue']
    """
    file = Path(path)
    if not file.is_file():
        raise PyneuronError(f"concept list {file} does not exist (a text file, one per line)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PyneuronError(f"cannot read concept list {file}: {error}") from None
    lines = [line.strip() for line in text.splitlines()]
    names = [line for line in lines if line and not line.startswith("#")]
    if not names:
        raise PyneuronError(f"concept list {file} holds no concepts (one per line)")
    return check_concepts(names, f"concept list {file}")


def select_units(units: Sequence[int] | None, n_units: int) -> np.ndarray:
    """Unit ids to report: all, or the given ones (checked)."""
    if units is None:
        return np.arange(n_units)
    ids = np.asarray(list(units), dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise PyneuronError("units must be a non-empty list of unit ids")
    bad = ids[(ids < 0) | (ids >= n_units)]
    if bad.size:
        raise PyneuronError(f"units {bad[:5].tolist()} out of range: the layer has {n_units}")
    return ids


def layer_summary(
    model: Any,
    layer: str,
    images: Any,
    activations: Any,
    *,
    transform: Any,
    batch_size: int,
    device: Any,
    progress: bool,
) -> np.ndarray:
    """(N, U) activation summary: from ``activations`` when given, else captured; checks
    that it covers as many images as ``images`` (when given)."""
    from ..model.activations import capture
    from .similarity import activation_summary

    if activations is None:
        if model is None:
            raise PyneuronError("give a model (with images) or precomputed activations")
        if images is None:
            raise PyneuronError("give the probing images (or precomputed activations)")
        if not isinstance(layer, str):
            raise PyneuronError(f"layer must be one module name, got {layer!r}")
        activations = capture(
            model,
            layer,
            images,
            batch_size=batch_size,
            device=device,
            transform=transform,
            progress=progress,
        )[layer]
    summary = activation_summary(activations)
    if not np.isfinite(summary).all():
        raise PyneuronError(f"the activations of layer {layer!r} hold NaN or infinite values")
    if images is not None and len(images) != summary.shape[0]:
        raise PyneuronError(
            f"{len(images)} images but activations of {summary.shape[0]} images were given"
        )
    return summary
