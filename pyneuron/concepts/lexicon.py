"""Concept names in a WordNet taxonomy: hypernyms, lowest meaningful common hypernyms, and
mappings that merge concepts by hypernym (for :meth:`~pyneuron.ConceptStore.merge_concepts`).

A :class:`Lexicon` reads a wordnet through the `wn <https://github.com/goodmami/wn>`_
package (an optional dependency: ``pip install 'pyneuron[wordnet]'``): a lexicon already
in wn's database (``Lexicon("oewn:2024")``, after ``python -m wn download oewn:2024``)
or a WN-LMF file (``Lexicon.from_file("english-wordnet-2024.xml.gz")``), added to wn's
database once. :func:`write_taxonomy` writes a small WN-LMF file from a ``{word:
hypernym}`` table, for a taxonomy of one's own.

Rules (the same in every function):

- a concept name is looked up as a noun, as given, then with ``_`` as spaces, then
  without a Broden category suffix (``sky-s`` -> ``sky``); its **first** noun sense (the
  most frequent in WordNet's order) stands for it. A name that is not a noun of the
  lexicon has no hypernyms and is only ever equal to itself;
- a synset is named by its first lemma (``tree``);
- a hypernym is **meaningful** when its depth (the fewest hypernym steps from it to a
  root, roots having depth 0) is at least ``min_depth`` and none of its lemmas is in
  ``stop`` (by default :data:`DEFAULT_STOP`: ``entity``, ``physical entity``,
  ``abstraction``, ``object``, ``whole``, ``artifact``, ``organism``, ...). In WordNet
  3.0 (and the Open English WordNet built from it) ``object`` has depth 2, ``whole``
  3, ``living thing`` and ``artifact`` 4, ``organism`` and ``instrumentality`` 5,
  ``plant`` and ``animal`` 6, hence :data:`DEFAULT_MIN_DEPTH` = 6: ``car`` and
  ``chair`` (common hypernym ``instrumentality``) do not agree, ``oak`` and ``pine``
  agree at ``tree``. A word and itself (or a synonym: the same synset) always agree.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from ..errors import PyneuronError

#: Lemmas of synsets too general to merge concepts under (see the module docstring).
DEFAULT_STOP = frozenset(
    {
        "entity",
        "physical entity",
        "abstraction",
        "abstract entity",
        "object",
        "physical object",
        "whole",
        "unit",
        "thing",
        "matter",
        "artifact",
        "artefact",
        "living thing",
        "animate thing",
        "organism",
        "being",
        "causal agent",
        "part",
        "piece",
        "group",
        "attribute",
        "relation",
        "measure",
        "instrumentality",
        "instrumentation",
    }
)
#: The smallest depth of a meaningful hypernym (roots have depth 0).
DEFAULT_MIN_DEPTH = 6

_BRODEN_SUFFIX = re.compile(r"-[a-z]$")


def _wn() -> Any:
    """The ``wn`` package, or an error naming the extra that installs it."""
    try:
        import wn
        import wn.lmf
        import wn.project
        import wn.taxonomy
    except ImportError:
        raise PyneuronError(
            "WordNet lexicons need the `wn` package: pip install 'pyneuron[wordnet]'"
        ) from None
    return wn


def _current_directory(wn: Any) -> Path:
    """wn's data directory now (read without creating it, as wn's own getter would)."""
    return Path(wn.config.database_path).parent


@contextlib.contextmanager
def _data_directory(path: Path) -> Iterator[Any]:
    """wn with its data directory set to ``path`` (wn's setting is global: restored
    afterwards)."""
    wn = _wn()
    saved = _current_directory(wn)
    wn.config.data_directory = path
    try:
        yield wn
    except wn.Error as error:
        raise PyneuronError(f"WordNet: {error}") from None
    finally:
        wn.config.data_directory = saved


class Lexicon:
    """A wordnet's noun taxonomy, for mapping concept names to hypernyms.

    Parameters
    ----------
    name
        A lexicon specifier of wn's database (``"oewn:2024"``, ``"oewn"`` for any
        version; several separated by spaces).
    data_directory
        wn's data directory holding that database (default: wn's current one,
        ``~/.wn_data`` or ``$WN_DATA_DIR``). It is remembered: queries use it even if
        ``wn.config.data_directory`` changes later.
    min_depth, stop
        What makes a hypernym meaningful (see the module docstring).

    Raises
    ------
    PyneuronError
        ``wn`` is not installed, or the database holds no such lexicon.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> tree = {"plant": "entity", "tree": "plant", "oak": "tree", "pine": "tree",
    ...         "animal": "entity", "dog": "animal"}
    >>> path = write_taxonomy(folder / "mini.xml", tree)
    >>> lexicon = Lexicon.from_file(path, data_directory=folder / "wn", min_depth=1)
    >>> lexicon.hypernyms("oak")
    ['tree', 'plant', 'entity']
    >>> lexicon.lowest_common_hypernym("oak", "pine"), lexicon.lowest_common_hypernym("oak", "dog")
    ('tree', None)
    """

    def __init__(
        self,
        name: str,
        *,
        data_directory: str | os.PathLike[str] | None = None,
        min_depth: int = DEFAULT_MIN_DEPTH,
        stop: Collection[str] = DEFAULT_STOP,
    ) -> None:
        if isinstance(min_depth, bool) or not isinstance(min_depth, int) or min_depth < 0:
            raise PyneuronError(f"min_depth must be an integer >= 0, got {min_depth!r}")
        self.name = str(name)
        self.data_directory = Path(
            _current_directory(_wn()) if data_directory is None else data_directory
        ).expanduser()
        self.min_depth = min_depth
        self.stop = frozenset(str(word).lower() for word in stop)
        self._synsets: dict[str, Any] = {}
        self._commons: dict[tuple[str, str], tuple[str, int] | None] = {}
        with self._wn() as wn:
            try:
                self._wordnet = wn.Wordnet(self.name)
            except wn.Error:
                raise PyneuronError(
                    f"no WordNet lexicon {self.name!r} in {self.data_directory}: download one "
                    "(python -m wn download oewn:2024) or give a WN-LMF file "
                    "(Lexicon.from_file, --wordnet FILE)"
                ) from None

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        data_directory: str | os.PathLike[str] | None = None,
        min_depth: int = DEFAULT_MIN_DEPTH,
        stop: Collection[str] = DEFAULT_STOP,
    ) -> Lexicon:
        """The lexicons of a WN-LMF file (XML, possibly gzip- or lzma-compressed).

        The file is added to wn's database in ``data_directory`` (see :class:`Lexicon`)
        unless a lexicon of the same id and version is there already (then that one is
        used: a file changed under the same version is not re-read).

        Raises
        ------
        PyneuronError
            The file is missing, not WN-LMF, or holds no lexicon.
        """
        path = Path(path)
        if not path.is_file():
            raise PyneuronError(f"WordNet file {path} does not exist")
        folder = Path(_current_directory(_wn()) if data_directory is None else data_directory)
        folder.expanduser().mkdir(parents=True, exist_ok=True)
        specifiers = []
        with _data_directory(folder) as wn:
            try:
                for package in wn.project.iterpackages(path):
                    if package.type != "wordnet":
                        continue
                    file = package.resource_file()
                    found = wn.lmf.scan_lexicons(file)
                    specifiers += [f"{info['id']}:{info['version']}" for info in found]
                    if found:
                        wn.add(file, progress_handler=None)
            except (wn.Error, OSError) as error:
                raise PyneuronError(f"cannot read WordNet file {path}: {error}") from None
        if not specifiers:
            raise PyneuronError(f"{path} holds no WN-LMF lexicon")
        return cls(" ".join(specifiers), data_directory=folder, min_depth=min_depth, stop=stop)

    # -- queries ----------------------------------------------------------------------
    def hypernyms(self, word: str) -> list[str]:
        """The hypernyms of a word's first noun sense, nearest first (each once, by the
        fewest steps; meaningful or not).

        Raises
        ------
        PyneuronError
            The word is not a noun of the lexicon.
        """
        with self._wn():
            synset = self._require(word)
            seen = {synset.id}
            names: list[str] = []
            level = [synset]
            while level:
                following = []
                for node in level:
                    for parent in node.hypernyms():
                        if parent.id not in seen:
                            seen.add(parent.id)
                            names.append(_name(parent))
                            following.append(parent)
                level = following
            return names

    def lowest_common_hypernym(self, a: str, b: str) -> str | None:
        """The lowest common hypernym of two words if it is meaningful, else ``None``.

        Either word counts as its own hypernym (``oak`` and ``tree`` give ``tree``); a
        word and itself (or a synonym) give its synset's name even when that is not
        meaningful. Of several lowest common hypernyms the first meaningful one by
        synset id is taken. Words not in the lexicon give ``None`` unless equal.
        """
        with self._wn():
            found = self._common(a, b)
            return None if found is None else found[0]

    def align(self, names_a: Sequence[str], names_b: Sequence[str]) -> dict[str, str]:
        """Map the names of two lists to shared names where they meet at a meaningful
        hypernym: each name goes to its lowest meaningful common hypernym with the name
        of the other list that gives the deepest one (the first such name on ties).

        Names with no such partner map to themselves; a name in both lists maps to its
        own synset's name. Used to compare two formulas' concepts
        (:func:`pyneuron.app.compare.compare_runs`).

        Examples
        --------
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> tree = {"plant": "entity", "tree": "plant", "oak": "tree", "grass": "plant"}
        >>> lexicon = Lexicon.from_file(write_taxonomy(folder / "t.xml", tree),
        ...                             data_directory=folder / "wn", min_depth=1)
        >>> lexicon.align(["oak", "grass", "sky"], ["tree"])
        {'oak': 'tree', 'grass': 'plant', 'sky': 'sky', 'tree': 'tree'}
        """
        mapping: dict[str, str] = {}
        with self._wn():
            for names, others in ((names_a, names_b), (names_b, names_a)):
                for name in names:
                    if name in mapping:
                        continue
                    best = None
                    for other in others:
                        found = self._common(name, other)
                        if found is not None and (best is None or found[1] > best[1]):
                            best = found
                    mapping[name] = name if best is None else best[0]
        return mapping

    def hypernym_mapping(
        self, names: Sequence[str], *, depth: int | None = None, levels: int | None = None
    ) -> dict[str, str]:
        """Map concept names to a hypernym, to merge concepts
        (:meth:`~pyneuron.ConceptStore.merge_concepts`).

        Give one of

        - ``depth``: the hypernym at this depth on the word's shortest path to a root
          (of equally short ones, the first by synset ids): cut the taxonomy at
          ``depth``, words below one hypernym merge;
        - ``levels``: the hypernym that many steps up that path (1: the parent).

        When that hypernym is not meaningful, the nearest meaningful one below it on the
        path is taken; a word already at or above ``depth``, with no meaningful hypernym
        there, or not in the lexicon maps to itself.

        Returns
        -------
        dict
            Every name of ``names`` -> its new name (itself when unchanged).

        Examples
        --------
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> tree = {"plant": "entity", "tree": "plant", "oak": "tree", "pine": "tree",
        ...         "grass": "plant"}
        >>> lexicon = Lexicon.from_file(write_taxonomy(folder / "t.xml", tree),
        ...                             data_directory=folder / "wn", min_depth=1)
        >>> lexicon.hypernym_mapping(["oak", "pine", "grass", "sky"], levels=1)
        {'oak': 'tree', 'pine': 'tree', 'grass': 'plant', 'sky': 'sky'}
        >>> lexicon.hypernym_mapping(["oak", "grass", "plant"], depth=1)
        {'oak': 'plant', 'grass': 'plant', 'plant': 'plant'}
        """
        if (depth is None) == (levels is None):
            raise PyneuronError("give one of depth (from the root) or levels (up from the word)")
        step = depth if depth is not None else levels
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            which = "depth" if depth is not None else "levels"
            raise PyneuronError(f"{which} must be an integer >= 0, got {step!r}")
        mapping = {}
        with self._wn() as wn:
            for name in names:
                synset = self._synset(name)
                if synset is None:
                    mapping[name] = name
                    continue
                paths = wn.taxonomy.hypernym_paths(synset)
                shortest = min(paths, key=lambda p: (len(p), [s.id for s in p]), default=[])
                path = [synset, *shortest]  # from the word to a root
                at = len(path) - 1 - depth if depth is not None else min(step, len(path) - 1)
                chosen = next((s for s in path[max(at, 0) : 0 : -1] if self._meaningful(s)), None)
                mapping[name] = name if chosen is None else _name(chosen)
        return mapping

    # -- helpers ----------------------------------------------------------------------
    def _wn(self) -> contextlib.AbstractContextManager[Any]:
        return _data_directory(self.data_directory)

    def _synset(self, word: str) -> Any:
        """The first noun synset of ``word`` (see the module docstring), or None."""
        if word not in self._synsets:
            self._synsets[word] = None
            text = str(word).strip()
            for form in dict.fromkeys((text, text.replace("_", " "), _BRODEN_SUFFIX.sub("", text))):
                found = self._wordnet.synsets(form, pos="n") if form else []
                if found:
                    self._synsets[word] = found[0]
                    break
        return self._synsets[word]

    def _require(self, word: str) -> Any:
        synset = self._synset(word)
        if synset is None:
            raise PyneuronError(f"{word!r} is not a noun of the WordNet lexicon {self.name!r}")
        return synset

    def _meaningful(self, synset: Any) -> bool:
        wn = _wn()
        if self.stop & {lemma.lower() for lemma in synset.lemmas()}:
            return False
        return wn.taxonomy.min_depth(synset) >= self.min_depth

    def _common(self, a: str, b: str) -> tuple[str, int] | None:
        """(name, depth) of the lowest meaningful common hypernym of two words, or None;
        a word not in the lexicon meets only itself (at depth -1). Kept per pair."""
        if (a, b) not in self._commons:
            self._commons[a, b] = self._find_common(a, b)
        return self._commons[a, b]

    def _find_common(self, a: str, b: str) -> tuple[str, int] | None:
        wn = _wn()
        sa, sb = self._synset(a), self._synset(b)
        if sa is None or sb is None:
            return (a, -1) if a == b else None
        if sa.id == sb.id:
            return _name(sa), wn.taxonomy.min_depth(sa)
        for synset in sorted(wn.taxonomy.lowest_common_hypernyms(sa, sb), key=lambda s: s.id):
            if self._meaningful(synset):
                return _name(synset), wn.taxonomy.min_depth(synset)
        return None

    def __repr__(self) -> str:
        return f"Lexicon({self.name!r}, min_depth={self.min_depth})"


def _name(synset: Any) -> str:
    """A synset's name: its first lemma (its id if it has none)."""
    lemmas = synset.lemmas()
    return str(lemmas[0]) if lemmas else str(synset.id)


def write_taxonomy(
    path: str | os.PathLike[str],
    hypernyms: Mapping[str, str],
    *,
    lexicon: str = "taxonomy",
    version: str | None = None,
) -> Path:
    """Write a noun taxonomy as a WN-LMF 1.1 file, for :meth:`Lexicon.from_file`.

    Parameters
    ----------
    path
        The XML file to write (atomically).
    hypernyms
        Word -> its hypernym; words that are only hypernyms are roots. Each word is one
        synset with one lemma.
    lexicon, version
        The lexicon's id and version in wn's database; wn keeps the first file added
        under an id and version, so the default version is a hash of ``hypernyms``
        (a changed taxonomy is a new version).

    Examples
    --------
    >>> import tempfile
    >>> path = write_taxonomy(Path(tempfile.mkdtemp()) / "t.xml", {"oak": "tree"})
    >>> '<SynsetRelation relType="hypernym"' in path.read_text()
    True
    """
    import hashlib
    import json

    from ..engine.atomic import write_atomically

    if version is None:
        content = json.dumps(list(hypernyms.items()), default=str).encode()
        version = hashlib.blake2b(content, digest_size=6).hexdigest()
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", lexicon):
        raise PyneuronError(f"lexicon id {lexicon!r} must be a letter then letters/digits/_.-")
    words = list(dict.fromkeys([*hypernyms, *hypernyms.values()]))
    for word in hypernyms:
        seen = {word}
        while word in hypernyms:
            word = hypernyms[word]
            if word in seen:
                raise PyneuronError(f"the taxonomy has a cycle through {word!r}")
            seen.add(word)
    number = {word: k for k, word in enumerate(words)}
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<!DOCTYPE LexicalResource SYSTEM "http://globalwordnet.github.io/schemas/WN-LMF-1.1.dtd">',
        '<LexicalResource xmlns:dc="https://globalwordnet.github.io/schemas/dc/">',
        f'<Lexicon id={quoteattr(lexicon)} label="pyneuron taxonomy" language="en" '
        f'email="none@example.org" license="https://creativecommons.org/publicdomain/zero/1.0/" '
        f"version={quoteattr(str(version))}>",
    ]
    for word, k in number.items():
        if not isinstance(word, str) or not word.strip():
            raise PyneuronError(f"taxonomy words must be non-empty strings, got {word!r}")
        lines.append(
            f'<LexicalEntry id="{lexicon}-w{k}"><Lemma writtenForm={quoteattr(word)} '
            f'partOfSpeech="n"/><Sense id="{lexicon}-w{k}-1" synset="{lexicon}-s{k}"/>'
            "</LexicalEntry>"
        )
    for word, k in number.items():
        parent = hypernyms.get(word)
        relation = (
            f'<SynsetRelation relType="hypernym" target="{lexicon}-s{number[parent]}"/>'
            if parent is not None
            else ""
        )
        lines.append(f'<Synset id="{lexicon}-s{k}" ili="" partOfSpeech="n">{relation}</Synset>')
    lines += ["</Lexicon>", "</LexicalResource>", ""]
    path = Path(path)
    write_atomically(path, lambda p: p.write_text("\n".join(lines), encoding="utf-8"))
    return path
