"""The examples in the docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "pyneuron.activations",
    "pyneuron.upsample",
    "pyneuron.grid",
    "pyneuron.store",
    "pyneuron.units",
    "pyneuron.search",
    "pyneuron.distributed",
    "pyneuron.formula",
    "pyneuron.evaluate",
    "pyneuron.null",
    "pyneuron.faithfulness",
    "pyneuron.netdissect",
    "pyneuron.compexp_quantiles",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
