"""Formula parsing and printing."""

from __future__ import annotations

import pytest

from pyneuron import And, Concept, Formula, Not, Or, PyneuronError


@pytest.mark.parametrize(
    "text",
    [
        "water",
        "(water OR river)",
        "((water OR river) AND NOT blue)",
        "((a OR NOT b) AND (c OR d))",
        "(NOT a)",
        "(NOT (a AND b))",
        '(traffic light AND NOT "AND")',
        '("wall (brick)" OR "say \\"hi\\"")',
    ],
)
def test_print_parse_round_trip(text):
    formula = Formula.parse(text)
    assert str(formula) == text
    assert Formula.parse(str(formula)) == formula


def test_precedence_and_structure():
    assert Formula.parse("a OR b AND NOT c") == Or(
        Concept("a"), And(Concept("b"), Not(Concept("c")))
    )
    assert Formula.parse("NOT NOT a") == Not(Not(Concept("a")))
    assert Formula.parse("a AND b AND c") == And(And(Concept("a"), Concept("b")), Concept("c"))
    formula = Formula.parse("(water OR river) AND NOT blue")
    assert formula.length == 4 and formula.concepts() == ["water", "river", "blue"]
    assert (Concept("a") & ~Concept("b")) == And(Concept("a"), Not(Concept("b")))
    assert str(Concept("a") | "b AND c") == "(a OR (b AND c))"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty formula"),
        ("a OR", "expected a concept name"),
        ("(a OR b", "missing '\\)'"),
        ("a b) OR c", "unexpected"),
        ("AND a", "expected a concept name"),
        ('"unterminated', "unexpected character"),
        ("(" * 5000 + "a" + ")" * 5000, "nested too deeply"),
    ],
)
def test_parse_errors_point_at_the_problem(text, message):
    with pytest.raises(PyneuronError, match=message):
        Formula.parse(text)


def test_result_tables_write_formulas_as_str_does():
    """explain() writes its left-deep formulas directly; the text must be str(Formula)."""
    import numpy as np

    from pyneuron.engine.search import _formula_text

    names = ["water", "AND", "wall (brick)", 'say "hi"', "traffic light", "or"]
    nodes = {0: (Or, False), 1: (And, False), 2: (And, True), 3: (Or, True)}
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 6))
        concepts = rng.integers(0, len(names), n)
        ops = rng.integers(0, 4, max(n - 1, 0))
        padded_concepts = np.concatenate([concepts, np.full(2, -1)])  # beams pad with -1
        padded_ops = np.concatenate([ops, np.full(2, -1)])
        expected: Formula = Concept(names[concepts[0]])
        for op, concept in zip(ops, concepts[1:]):
            node, negate = nodes[int(op)]
            right: Formula = Concept(names[concept])
            expected = node(expected, Not(right) if negate else right)
        text = _formula_text(padded_concepts, padded_ops, {}, names)
        assert text == str(expected)
        assert Formula.parse(text) == expected
