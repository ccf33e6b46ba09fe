"""Logical formulas over concepts: parse, print (compexp style), evaluate on a store."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import PyneuronError
from . import _native
from .grid import unpack_bits

if TYPE_CHECKING:
    from .store import ConceptStore

KEYWORDS = ("AND", "OR", "NOT")
_TOKEN = re.compile(r'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|([^\s()"]+))')
_PLAIN_NAME = re.compile(r"[^\s()\"]+(?: [^\s()\"]+)*")

# Postfix program codes shared with the engine (csrc/core/search.hpp).
_NOT, _AND, _OR = -1, -2, -3


class Formula:
    """A formula over concept names: :class:`Concept`, :class:`Not`, :class:`And`, :class:`Or`.

    Formulas print like compexp, ``((water OR river) AND NOT blue)``, and
    :meth:`parse` reads that back (NOT binds tighter than AND, AND than OR).
    Names with spaces are fine; names with parentheses, quotes or a keyword as a
    word are written in double quotes.

    Examples
    --------
    >>> f = Formula.parse("(water OR river) AND NOT blue")
    >>> str(f)
    '((water OR river) AND NOT blue)'
    >>> f.length, f.concepts()
    (4, ['water', 'river', 'blue'])
    >>> str(Concept("sky") | ~Concept("sea"))
    '(sky OR NOT sea)'
    """

    @staticmethod
    def parse(text: str) -> Formula:
        """Parse a formula; raises ``PyneuronError`` pointing at the problem."""
        return _Parser(text).parse()

    @property
    def length(self) -> int:
        """Concept leaves plus NOTs (the length compexp penalizes)."""
        return _fold(self, lambda leaf: 1, lambda node, n: n + 1, lambda node, a, b: a + b)

    def concepts(self) -> list[str]:
        """Concept names in order of first appearance."""
        names: list[str] = []
        _fold(self, lambda leaf: names.append(leaf.name), _ignore, _ignore)
        return list(dict.fromkeys(names))

    def program(self, store: ConceptStore) -> list[int]:
        """Postfix program of concept ids for the engine."""
        # _fold visits the nodes in postfix order.
        code: list[int] = []
        _fold(
            self,
            lambda leaf: code.append(store.index(leaf.name)),
            lambda node, _: code.append(_NOT),
            lambda node, a, b: code.append(node.code),
        )
        return code

    def mask(self, store: ConceptStore) -> np.ndarray:
        """The formula's dense bool mask (n_images, height, width) on ``store``."""
        words = _native.evaluate_words(self.program(store), store._native)
        return unpack_bits(words, store.grid.pixels).reshape(store.grid.shape)

    def image_mask(self, store: ConceptStore, image: int) -> np.ndarray:
        """The formula's bool mask (height, width) in one image (evaluated in numpy)."""
        return _fold(
            self,
            lambda leaf: store.image_mask(leaf.name, image),
            lambda node, m: ~m,
            lambda node, a, b: a & b if node.code == _AND else a | b,
        )

    def __str__(self) -> str:
        def binary(node: BinaryOp, left: str, right: str) -> str:
            # A negated right operand prints as "AND NOT x", not "AND (NOT x)".
            right = right[1:-1] if isinstance(node.right, Not) else right
            return f"({left} {node.keyword} {right})"

        return _fold(self, lambda leaf: quote_name(leaf.name), lambda node, s: f"(NOT {s})", binary)

    def __and__(self, other: Formula) -> Formula:
        return And(self, _formula(other))

    def __or__(self, other: Formula) -> Formula:
        return Or(self, _formula(other))

    def __invert__(self) -> Formula:
        return Not(self)


def _ignore(*args: object) -> None:
    return None


def _fold(
    root: Formula,
    leaf: Callable[[Concept], Any],
    negate: Callable[[Not, Any], Any],
    binary: Callable[[BinaryOp, Any, Any], Any],
) -> Any:
    """Evaluate a formula bottom-up without recursion (formulas may be thousands deep):
    ``leaf(concept)``, ``negate(not_node, value)``, ``binary(node, left, right)``, called
    in postfix order (left before right)."""
    values: list[Any] = []
    stack: list[tuple[Formula, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if isinstance(node, Concept):
            values.append(leaf(node))
        elif not expanded:
            stack.append((node, True))
            if isinstance(node, Not):
                stack.append((node.operand, False))
            elif isinstance(node, BinaryOp):
                stack += [(node.right, False), (node.left, False)]
            else:
                raise PyneuronError(f"not a formula node: {node!r}")
        elif isinstance(node, Not):
            values.append(negate(node, values.pop()))
        else:
            right = values.pop()
            values.append(binary(node, values.pop(), right))  # type: ignore[arg-type]
    return values[0]


def _formula(value: Formula | str) -> Formula:
    if isinstance(value, Formula):
        return value
    if isinstance(value, str):
        return Formula.parse(value)
    raise TypeError(f"expected a Formula or a formula string, got {type(value).__name__}")


def quote_name(name: str) -> str:
    """A concept name as written in a formula (quoted when it would not parse bare)."""
    if _PLAIN_NAME.fullmatch(name) and not set(name.split(" ")) & set(KEYWORDS):
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@dataclass(frozen=True, repr=False)
class Concept(Formula):
    """A single concept, by name."""

    name: str

    def __repr__(self) -> str:
        return f"Concept({self.name!r})"


@dataclass(frozen=True, repr=False)
class Not(Formula):
    """Negation of a formula."""

    operand: Formula

    def __repr__(self) -> str:
        return f"Formula.parse({str(self)!r})"


@dataclass(frozen=True, repr=False)
class BinaryOp(Formula):
    left: Formula
    right: Formula
    keyword = ""
    code = 0

    def __repr__(self) -> str:
        return f"Formula.parse({str(self)!r})"


@dataclass(frozen=True, repr=False)
class And(BinaryOp):
    """Conjunction: both formulas hold."""

    keyword = "AND"
    code = _AND


@dataclass(frozen=True, repr=False)
class Or(BinaryOp):
    """Disjunction: either formula holds."""

    keyword = "OR"
    code = _OR


class _Parser:
    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise PyneuronError(
                f"a formula must be a string such as 'water OR river', got "
                f"{type(text).__name__} {text!r:.60}"
            )
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []  # (kind, value, position)
        position = 0
        stripped_end = len(text.rstrip())
        while position < stripped_end:
            match = _TOKEN.match(text, position)
            if match is None:
                raise self.error("unexpected character", position)
            start = match.start(match.lastindex or 0)
            if match.group(1):
                self.tokens.append(("(", "(", start))
            elif match.group(2):
                self.tokens.append((")", ")", start))
            elif match.group(3) is not None:
                self.tokens.append(("name", re.sub(r"\\(.)", r"\1", match.group(3)), start))
            elif match.group(4) in KEYWORDS:
                self.tokens.append((match.group(4), match.group(4), start))
            else:
                self._add_word(match.group(4), start)
            position = match.end()
        self.i = 0

    def _add_word(self, word: str, start: int) -> None:
        # Consecutive bare words form one name: "traffic light".
        if self.tokens and self.tokens[-1][0] == "word":
            _, previous, at = self.tokens[-1]
            self.tokens[-1] = ("word", f"{previous} {word}", at)
        else:
            self.tokens.append(("word", word, start))

    def error(self, what: str, position: int | None = None) -> PyneuronError:
        if position is None:
            position = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
        text = self.text if len(self.text) <= 80 else self.text[:77] + "..."
        return PyneuronError(f"cannot parse formula {text!r}: {what} at position {position}")

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def parse(self) -> Formula:
        if not self.tokens:
            raise self.error("empty formula")
        try:
            formula = self.parse_or()
        except RecursionError:
            raise self.error("formula nested too deeply") from None
        if self.i != len(self.tokens):
            raise self.error(f"unexpected {self.tokens[self.i][1]!r}")
        return formula

    def parse_or(self) -> Formula:
        formula = self.parse_and()
        while self.peek() == "OR":
            self.i += 1
            formula = Or(formula, self.parse_and())
        return formula

    def parse_and(self) -> Formula:
        formula = self.parse_not()
        while self.peek() == "AND":
            self.i += 1
            formula = And(formula, self.parse_not())
        return formula

    def parse_not(self) -> Formula:
        if self.peek() == "NOT":
            self.i += 1
            return Not(self.parse_not())
        kind = self.peek()
        if kind == "(":
            self.i += 1
            formula = self.parse_or()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.i += 1
            return formula
        if kind in ("word", "name"):
            self.i += 1
            return Concept(self.tokens[self.i - 1][1])
        raise self.error("expected a concept name, NOT or '('")
