"""Compositional explanations side by side with label-free descriptions, with agreement.

Agreement between a label-free label and a compositional formula is judged against the
formula's *positive* concepts (those not under a NOT; a label matching only a negated
concept is reported as ``"negated"``):

- names are normalized first (:func:`normalize`): Unicode NFKC, lower case, ``_`` and
  ``-`` as spaces, a Broden category suffix (``-s``, ``-c``, ... as in ``sky-s``,
  ``red-c``) dropped, punctuation removed, articles dropped, and each word reduced to
  a crude singular (``dogs`` -> ``dog``, ``boxes`` -> ``box``, ``skies`` -> ``sky``);
- ``"exact"``: the normalized label equals a normalized positive concept;
- ``"words"``: they share at least one word (e.g. ``"red car"`` vs ``car``);
- ``"none"``: neither.

``overlap`` is the largest word Jaccard index |L ∩ C| / |L ∪ C| between the label's and a
positive concept's word sets (1 for an exact match, 0 when nothing is shared); it is NaN
when the unit has no formula or no label.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..engine.formula import And, Concept, Formula, Not, Or
from ..errors import PyneuronError
from .result import DescribeResult

_ARTICLES = {"a", "an", "the"}
_SUFFIX = re.compile(r"-[a-z]$")
_PUNCTUATION = re.compile(r"[^\w\s]")


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and re.search(r"(ss|x|z|ch|sh)es$", word):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def normalize(name: str) -> str:
    """A concept name or label in the normalized form used for agreement.

    Examples
    --------
    >>> normalize("Red_Cars"), normalize("sky-s"), normalize("The Skies"), normalize("t-shirt")
    ('red car', 'sky', 'sky', 't shirt')
    """
    text = unicodedata.normalize("NFKC", str(name)).strip().lower()
    text = _SUFFIX.sub("", text)
    text = _PUNCTUATION.sub(" ", text.replace("_", " ").replace("-", " "))
    words = [_singular(w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def formula_concepts(formula: Formula | str) -> tuple[list[str], list[str]]:
    """(positive, negated) concept names of a formula, in order of appearance; a concept
    is negated when it sits under an odd number of NOTs.

    Examples
    --------
    >>> formula_concepts("(water OR river) AND NOT blue-c")
    (['water', 'river'], ['blue-c'])
    """
    tree = Formula.parse(formula) if isinstance(formula, str) else formula
    positive: list[str] = []
    negated: list[str] = []

    def walk(node: Formula, negative: bool) -> None:
        if isinstance(node, Concept):
            (negated if negative else positive).append(node.name)
        elif isinstance(node, Not):
            walk(node.operand, not negative)
        elif isinstance(node, (And, Or)):
            walk(node.left, negative)
            walk(node.right, negative)
        else:  # pragma: no cover - every formula node is one of the above
            raise PyneuronError(f"unknown formula node {type(node).__name__}")

    walk(tree, False)
    return list(dict.fromkeys(positive)), list(dict.fromkeys(negated))


def _match(label: str, concepts: Iterable[str]) -> tuple[str, float]:
    target = normalize(label)
    words = set(target.split())
    kind, best = "none", 0.0
    for concept in concepts:
        name = normalize(concept)
        other = set(name.split())
        if name == target and name:
            return "exact", 1.0
        union = words | other
        shared = len(words & other)
        if shared:
            kind = "words"
            best = max(best, shared / len(union))
    return kind, best


def agreement(label: Any, formula: Any) -> tuple[str | None, float]:
    """How a label agrees with a formula: (``"exact"`` | ``"words"`` | ``"negated"`` |
    ``"none"``, overlap); (None, NaN) when either is missing. See the module docstring.

    Examples
    --------
    >>> agreement("rivers", "(water OR river) AND NOT blue")
    ('exact', 1.0)
    >>> agreement("blue water", "(water OR river) AND NOT blue")
    ('words', 0.5)
    >>> agreement("blue", "(water OR river) AND NOT blue")
    ('negated', 0.0)
    """
    if _missing(label) or _missing(formula) or not str(label).strip():
        return None, float("nan")
    positive, negated = formula_concepts(str(formula))
    kind, overlap = _match(str(label), positive)
    if kind == "none" and negated and _match(str(label), negated)[0] != "none":
        return "negated", 0.0
    return kind, overlap


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


def _table(source: Any, what: str) -> pd.DataFrame:
    if isinstance(source, DescribeResult):
        return source.table
    if isinstance(source, pd.DataFrame):
        return source
    if isinstance(source, (str, os.PathLike)):  # a run directory
        path = Path(source) / "results.parquet"
        if not path.is_file():
            raise PyneuronError(f"{source} holds no pyneuron results ({path.name} is missing)")
        return pd.read_parquet(path)
    raise PyneuronError(
        f"{what} must be a DataFrame, a DescribeResult or a run directory, "
        f"got {type(source).__name__}"
    )


def compare(compositional_results: Any, label_free_results: Any) -> pd.DataFrame:
    """One row per (layer, unit): the compositional formula next to each label-free
    method's label, with the agreement between them.

    Parameters
    ----------
    compositional_results
        A results table with ``layer``, ``unit`` and ``formula`` columns (from
        :func:`pyneuron.dissect` or a run's ``results.parquet``), or a run directory.
        Extra columns ``iou`` and ``range`` are carried over; with activation ranges (a
        ``range`` column) the first range of each unit is used.
    label_free_results
        A :class:`DescribeResult`, a table with ``layer``, ``unit``, ``method`` and
        ``label`` columns, a ``pyneuron describe`` run directory, or a list of these.

    Returns
    -------
    pandas.DataFrame
        ``layer``, ``unit``, ``formula`` (and ``iou``), then per method M (in order of
        appearance): ``M`` (the label), ``M_agreement`` (``"exact"``, ``"words"``,
        ``"negated"``, ``"none"``, or missing (NaN) when the formula or label is) and
        ``M_overlap`` (word Jaccard, see the module docstring). Units present in only one
        input are kept (missing values where absent).
        ``attrs["agreement_rate"]`` holds, per method, the fraction of units with both a
        formula and a label whose agreement is ``"exact"`` or ``"words"``.

    Examples
    --------
    >>> comp = pd.DataFrame({"layer": ["l4"] * 2, "unit": [0, 1],
    ...                      "formula": ["(water OR river)", "grass AND NOT dog"]})
    >>> free = pd.DataFrame({"layer": ["l4"] * 2, "unit": [0, 1],
    ...                      "method": "clip-dissect", "label": ["river", "dog"]})
    >>> compare(comp, free)[["unit", "clip-dissect", "clip-dissect_agreement"]]
       unit clip-dissect clip-dissect_agreement
    0     0        river                  exact
    1     1          dog                negated
    """
    comp = _table(compositional_results, "compositional_results")
    for column in ("layer", "unit", "formula"):
        if column not in comp.columns:
            raise PyneuronError(f"compositional results have no {column!r} column")
    if "range" in comp.columns:
        comp = comp.sort_values(["layer", "unit", "range"], kind="stable")
    keep = ["layer", "unit", "formula"] + [c for c in ("iou",) if c in comp.columns]
    comp = comp.drop_duplicates(["layer", "unit"])[keep]
    sources = (
        label_free_results
        if isinstance(label_free_results, (list, tuple))
        else [label_free_results]
    )
    free = pd.concat([_table(s, "label_free_results") for s in sources], ignore_index=True)
    for column in ("layer", "unit", "method", "label"):
        if column not in free.columns:
            raise PyneuronError(f"label-free results have no {column!r} column")
    free = free.drop_duplicates(["layer", "unit", "method"])
    methods = list(dict.fromkeys(free["method"].tolist()))
    if set(methods) & set(keep):
        raise PyneuronError(
            f"a label-free method may not be named {sorted(set(methods) & set(keep))}"
        )
    wide = free.pivot(index=["layer", "unit"], columns="method", values="label").reset_index()
    wide.columns.name = None
    table = comp.merge(wide, on=["layer", "unit"], how="outer", sort=False)
    table = table.sort_values(["layer", "unit"], kind="stable").reset_index(drop=True)
    rates: dict[str, float] = {}
    columns = list(keep)
    for method in methods:
        judged = [agreement(label, formula) for label, formula in zip(
            table[method], table["formula"], strict=True
        )]  # fmt: skip
        table[f"{method}_agreement"] = [kind for kind, _ in judged]
        table[f"{method}_overlap"] = np.array([value for _, value in judged], dtype=np.float64)
        known = [kind for kind, _ in judged if kind is not None]
        rates[method] = (
            float(np.mean([kind in ("exact", "words") for kind in known]))
            if known
            else float("nan")
        )
        columns += [method, f"{method}_agreement", f"{method}_overlap"]
    table = table[columns]
    table["unit"] = table["unit"].astype(np.int64)
    table.attrs["agreement_rate"] = rates
    return table
