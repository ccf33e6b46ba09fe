"""Safe, unique file names for arbitrary concept and layer names."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

#: Longest slug before a disambiguating suffix.
MAX_SLUG = 60

# Names Windows refuses as file names (with any extension), compared case-insensitively.
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(10)}
_UNSAFE = re.compile(r"[^a-z0-9._-]+")


def slugify(name: object) -> str:
    """A file-name-safe version of ``name``: lowercase ASCII letters, digits, ``.``, ``_``, ``-``.

    The result never is empty, never starts or ends with ``.`` or ``-`` (so it is
    never hidden, ``.`` or ``..``), is at most :data:`MAX_SLUG` characters long and is
    not a name Windows reserves. Different names can give the same slug; use
    :class:`Slugger` to make them unique.

    Examples
    --------
    >>> slugify("Traffic light"), slugify("layer4/0.conv1"), slugify(".."), slugify("café")
    ('traffic-light', 'layer4-0.conv1', 'x', 'cafe')
    >>> slugify('<b>"CON"</b>')
    'b-con-b'
    >>> slugify("con"), slugify("AUX.txt")
    ('con_', 'aux_.txt')
    """
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
    text = _UNSAFE.sub("-", text.lower())
    text = re.sub(r"-{2,}", "-", text)
    text = text[:MAX_SLUG].strip(".-")
    if not text:
        return "x"
    head, dot, rest = text.partition(".")
    if head in _RESERVED:
        text = f"{head}_{dot}{rest}"
    return text


class Slugger:
    """Gives every distinct name its own slug, stable in the order names are first seen.

    Collisions (case, punctuation, non-ASCII letters) get ``-2``, ``-3``, ...

    Examples
    --------
    >>> s = Slugger()
    >>> s("Sky"), s("sky"), s("Sky"), s("sky-2"), s("a b"), s("a/b")
    ('sky', 'sky-2', 'sky', 'sky-2-2', 'a-b', 'a-b-2')
    """

    def __init__(self, names: Iterable[object] = ()) -> None:
        self._slugs: dict[object, str] = {}
        self._used: set[str] = set()
        for name in names:
            self(name)

    def __call__(self, name: object) -> str:
        """The slug of ``name`` (assigned on first use)."""
        if name in self._slugs:
            return self._slugs[name]
        base = slugify(name)
        slug, n = base, 1
        while slug in self._used:
            n += 1
            slug = f"{base}-{n}"
        self._used.add(slug)
        self._slugs[name] = slug
        return slug
