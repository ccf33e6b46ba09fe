"""The examples in the docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "pyneuron.model.activations",
    "pyneuron.engine.upsample",
    "pyneuron.engine.grid",
    "pyneuron.engine.store",
    "pyneuron.engine.units",
    "pyneuron.engine.search",
    "pyneuron.engine.settings",
    "pyneuron.progress",
    "pyneuron.scale.ray",
    "pyneuron.engine.formula",
    "pyneuron.engine.heldout",
    "pyneuron.engine.null",
    "pyneuron.model.faithfulness",
    "pyneuron.engine.netdissect",
    "pyneuron.model.compexp_quantiles",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
