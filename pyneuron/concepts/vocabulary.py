"""Concept vocabularies for open-vocabulary segmentation: named groups of concept names.

A *group* is segmented in one pass: in ``"argmax"`` mode every pixel goes to the best
concept of its group, so the concepts of one group never overlap, while concepts of
different groups (e.g. ``parts`` and ``part x colour``) may. A vocabulary is a list of
groups; :func:`load_vocabulary` reads one from a text or TOML file.

Text format (``.txt`` or any suffix but ``.toml``)::

    # comments start with '#'; blank lines separate groups
    [parts]            # optional: a line '[name]' names the group that follows
    wheel
    door
    background

    red wheel
    blue wheel

Unnamed groups are called ``group1``, ``group2``, ... (by position).

TOML format (``.toml``)::

    [groups]
    parts = ["wheel", "door", "background"]

    [groups.colours]                # a table gives per-group options
    concepts = ["red", "blue", "green"]
    mode = "threshold"              # "argmax" (default of segment()) or "threshold"

Groups keep the order of the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PyneuronError

MODES = ("argmax", "threshold")
_HEADER = re.compile(r"^\[\s*([^\]]+?)\s*\]$")


def _check_mode(mode: str | None, where: str) -> None:
    if mode is not None and mode not in MODES:
        raise PyneuronError(f"{where}: mode must be one of {MODES}, got {mode!r}")


@dataclass(frozen=True)
class ConceptGroup:
    """Concepts segmented together in one pass.

    Attributes
    ----------
    name
        Group name; stored as the concepts' category in the :class:`~pyneuron.ConceptStore`.
    concepts
        Concept names (unique within the group, non-empty, surrounding spaces removed).
    mode
        ``"argmax"`` or ``"threshold"`` for this group only; ``None`` uses the mode given
        to :func:`~pyneuron.concepts.segment`.

    Examples
    --------
    >>> ConceptGroup("parts", ["wheel", "door"]).concepts
    ('wheel', 'door')
    """

    name: str
    concepts: tuple[str, ...]
    mode: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise PyneuronError(f"a concept group needs a non-empty name, got {self.name!r}")
        object.__setattr__(self, "name", self.name.strip())
        if isinstance(self.concepts, str):
            raise PyneuronError(
                f"concepts of group {self.name!r} must be a list of names, not the string "
                f"{self.concepts!r}"
            )
        names: list[str] = []
        seen: set[str] = set()
        for concept in self.concepts:
            if not isinstance(concept, str) or not concept.strip():
                raise PyneuronError(
                    f"group {self.name!r}: concept names must be non-empty strings, got {concept!r}"
                )
            concept = concept.strip()
            if concept in seen:
                raise PyneuronError(
                    f"group {self.name!r}: duplicate concept name {concept!r}; list each concept "
                    "once per group"
                )
            seen.add(concept)
            names.append(concept)
        if not names:
            raise PyneuronError(f"concept group {self.name!r} is empty; give at least one concept")
        object.__setattr__(self, "concepts", tuple(names))
        _check_mode(self.mode, f"group {self.name!r}")

    def __len__(self) -> int:
        return len(self.concepts)


@dataclass(frozen=True)
class ConceptVocabulary:
    """Concept groups, each segmented in its own pass.

    Build one from a list of names (one group), a list of lists (one group each), a
    mapping ``{group name: names}``, or a file with :func:`load_vocabulary`.

    Examples
    --------
    >>> vocab = ConceptVocabulary.of([["wheel", "door", "background"], ["red wheel"]])
    >>> [g.name for g in vocab.groups], vocab.names
    (['group1', 'group2'], ['wheel', 'door', 'background', 'red wheel'])
    >>> vocab.stored_names(fillers=("background",))
    ['wheel', 'door', 'red wheel']
    >>> ConceptVocabulary.of({"colours": ["red", "blue"]}).groups[0]
    ConceptGroup(name='colours', concepts=('red', 'blue'), mode=None)
    """

    groups: tuple[ConceptGroup, ...]

    def __post_init__(self) -> None:
        groups = tuple(self.groups)
        if not groups:
            raise PyneuronError("the concept vocabulary is empty; give at least one concept")
        for group in groups:
            if not isinstance(group, ConceptGroup):
                raise PyneuronError(f"vocabulary groups must be ConceptGroup, got {group!r}")
        seen: set[str] = set()
        for group in groups:
            if group.name in seen:
                raise PyneuronError(f"duplicate concept group name {group.name!r}")
            seen.add(group.name)
        object.__setattr__(self, "groups", groups)

    @classmethod
    def of(cls, concepts: Any) -> ConceptVocabulary:
        """Coerce ``concepts`` to a vocabulary.

        Parameters
        ----------
        concepts
            A :class:`ConceptVocabulary` or :class:`ConceptGroup`; a list of names (one
            group called ``concepts``); a list of lists (groups ``group1``, ``group2``,
            ...); a mapping ``{group name: names}``; or a ``pathlib.Path`` (or a string
            naming an existing ``.txt``/``.toml`` file) read by :func:`load_vocabulary`.
        """
        if isinstance(concepts, ConceptVocabulary):
            return concepts
        if isinstance(concepts, ConceptGroup):
            return cls((concepts,))
        if isinstance(concepts, os.PathLike) or (
            isinstance(concepts, str)
            and concepts.lower().endswith((".txt", ".toml"))
            and Path(concepts).is_file()
        ):
            return load_vocabulary(concepts)
        if isinstance(concepts, str):
            raise PyneuronError(
                f"concepts must be a list of names, not the string {concepts!r}; for a "
                "vocabulary file pass pathlib.Path(...) or use load_vocabulary(path)"
            )
        if isinstance(concepts, Mapping):
            return cls(tuple(ConceptGroup(str(k), tuple(v)) for k, v in concepts.items()))
        try:
            items = list(concepts)
        except TypeError:
            raise PyneuronError(
                "concepts must be a list of names, a list of lists of names, a mapping "
                f"{{group: names}} or a ConceptVocabulary, got {type(concepts).__name__}"
            ) from None
        if not items:
            raise PyneuronError("the concept list is empty; give at least one concept name")
        if all(isinstance(item, ConceptGroup) for item in items):
            return cls(tuple(items))
        if all(isinstance(item, str) for item in items):
            return cls((ConceptGroup("concepts", tuple(items)),))
        if all(not isinstance(item, str) and isinstance(item, Iterable) for item in items):
            return cls(
                tuple(ConceptGroup(f"group{i + 1}", tuple(item)) for i, item in enumerate(items))
            )
        raise PyneuronError(
            "concepts must be either all names (one group) or all lists of names (one group "
            "each); got a mix"
        )

    @property
    def names(self) -> list[str]:
        """Every concept name, group by group (a name listed in two groups appears twice)."""
        return [name for group in self.groups for name in group.concepts]

    def unique_names(self) -> list[str]:
        """Every distinct concept name, in first-appearance order."""
        return list(dict.fromkeys(self.names))

    def stored_names(self, fillers: Iterable[str] = ()) -> list[str]:
        """Names that end up in a store: every non-filler concept, group by group.

        Raises
        ------
        PyneuronError
            If a non-filler name occurs in two groups (a store holds one mask per name), or
            a group holds only fillers.
        """
        fillers = set(fillers)
        owner: dict[str, str] = {}
        names: list[str] = []
        for group in self.groups:
            kept = [c for c in group.concepts if c not in fillers]
            if not kept:
                raise PyneuronError(
                    f"group {group.name!r} holds only filler concepts {list(group.concepts)}; "
                    "nothing of it would be stored — add real concepts or change fillers"
                )
            for concept in kept:
                if concept in owner:
                    raise PyneuronError(
                        f"duplicate concept name {concept!r} in groups {owner[concept]!r} and "
                        f"{group.name!r}; a store holds one mask per name, so rename one (e.g. "
                        f"'{concept} ({group.name})')"
                    )
                owner[concept] = group.name
                names.append(concept)
        return names

    def to_dict(self) -> list[dict[str, Any]]:
        """JSON-ready description: one ``{"name", "concepts", "mode"}`` per group."""
        return [{"name": g.name, "concepts": list(g.concepts), "mode": g.mode} for g in self.groups]

    def __iter__(self) -> Iterator[ConceptGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise PyneuronError(f"{path} is not valid TOML: {error}") from None


def _groups_from_toml(data: Mapping[str, Any], path: Path) -> list[ConceptGroup]:
    groups = data.get("groups")
    if not isinstance(groups, Mapping) or not groups:
        raise PyneuronError(
            f'{path}: expected a [groups] table, e.g.\n[groups]\nparts = ["wheel", "door"]'
        )
    result = []
    for name, value in groups.items():
        where = f"{path}: group {name!r}"
        mode = None
        if isinstance(value, Mapping):
            unknown = set(value) - {"concepts", "mode"}
            if unknown:
                raise PyneuronError(f"{where}: unknown keys {sorted(unknown)} (use concepts, mode)")
            mode = value.get("mode")
            value = value.get("concepts")
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise PyneuronError(f"{where}: concepts must be a list of strings")
        try:
            result.append(ConceptGroup(str(name), tuple(value), mode))
        except PyneuronError as error:
            raise PyneuronError(f"{path}: {error}") from None
    return result


def _groups_from_text(text: str, path: Path) -> list[ConceptGroup]:
    blocks: list[tuple[str | None, list[str], int]] = []
    name: str | None = None
    current: list[str] = []
    start = 1

    def flush() -> None:
        nonlocal name, current
        if current:
            blocks.append((name, current, start))
        elif name is not None:
            raise PyneuronError(f"{path}:{start}: group [{name}] lists no concepts")
        name, current = None, []

    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            if raw.strip() == "":
                flush()
            continue
        header = _HEADER.match(line)
        if header:
            flush()
            name, start = header.group(1), number
            continue
        if not current and name is None:
            start = number
        current.append(line)
    flush()
    groups = []
    for i, (group_name, concepts, line_number) in enumerate(blocks):
        try:
            groups.append(ConceptGroup(group_name or f"group{i + 1}", tuple(concepts)))
        except PyneuronError as error:
            raise PyneuronError(f"{path}:{line_number}: {error}") from None
    return groups


def load_vocabulary(path: str | os.PathLike[str]) -> ConceptVocabulary:
    """Read concept groups from a text file or a TOML file (by suffix ``.toml``).

    See the module documentation for both formats.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "v.txt").write_text("[parts]\\nwheel\\ndoor\\n\\nred wheel\\n")
    >>> vocab = load_vocabulary(folder / "v.txt")
    >>> [(g.name, g.concepts) for g in vocab.groups]
    [('parts', ('wheel', 'door')), ('group2', ('red wheel',))]
    >>> _ = (folder / "v.toml").write_text('[groups]\\nparts = ["wheel", "door"]\\n')
    >>> load_vocabulary(folder / "v.toml").names
    ['wheel', 'door']
    """
    path = Path(path)
    if not path.is_file():
        raise PyneuronError(f"vocabulary file {path} does not exist")
    if path.suffix.lower() == ".toml":
        groups = _groups_from_toml(_read_toml(path), path)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise PyneuronError(f"{path} is not UTF-8 text: {error}") from None
        groups = _groups_from_text(text, path)
    if not groups:
        raise PyneuronError(f"vocabulary file {path} lists no concepts")
    try:
        return ConceptVocabulary(tuple(groups))
    except PyneuronError as error:
        raise PyneuronError(f"{path}: {error}") from None
