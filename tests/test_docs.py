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
    "pyneuron.model.dissect",
    "pyneuron.model.layer_units",
    "pyneuron.engine.batches",
    "pyneuron.devices",
    "pyneuron.weights",
    "pyneuron.presets",
    "pyneuron.concepts.sources",
    "pyneuron.concepts.sets",
    "pyneuron.app.rundir",
    "pyneuron.model.thresholds",
    "pyneuron.report.compare",
    "pyneuron.concepts.lexicon",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_readme_python_example_runs(capsys):
    """The README's first Python example runs as written and prints what it shows."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "((river OR water) AND NOT blue)" in printed and "1.0" in printed
