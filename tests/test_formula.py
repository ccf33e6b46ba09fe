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
