"""Ready-made concept vocabularies, selected by name: ``concept_set("ade20k-150")`` in
Python, ``--concepts set:ade20k-150`` on the command line.

=====================  ======  ==============================================================
name                   size    what (source)
=====================  ======  ==============================================================
``ade20k-150``         150     ADE20K SceneParsing classes (CSAILVision/sceneparsing)
``coco-stuff``         171     COCO-Stuff 164k: 80 things + 91 stuff (nightrome/cocostuff)
``pascal-context-459`` 459     PASCAL-Context, all classes (OVCE's / CAT-Seg's list)
``pascal-context-59``  59      PASCAL-Context, the 59-class benchmark (mmsegmentation)
``imagenet``           1000    ImageNet-1k classes, first WordNet lemma (Keras's index)
``cub-200``            677     OVCE's CUB-200 granularities, nested groups (aiea-lab/ovce)
``broden:PATH``        --      the labels of a Broden folder's ``label.csv``, by category
``common-words:N``     N       the N most frequent English words (the ``wordfreq`` package)
=====================  ======  ==============================================================

Each fixed list is a data file under ``pyneuron/concepts/data/`` in the text format of
:func:`~pyneuron.concepts.load_vocabulary`, whose header names its source and licence;
:func:`list_concept_sets` gives the table above as a DataFrame.

Groups and fillers, as OVCE (La Rosa & Gilpin 2025, aiea-lab/ovce) does it:

- a dataset's class list is *one* group (one segmenter pass, one label per pixel), as
  OVCE segments with a dataset's own class list, and it has **no filler**: OVCE's
  ``ignore_concepts`` is empty then, and none of these datasets counts its background or
  unlabelled pixels as a class;
- ``cub-200`` is OVCE's ``config/CUB.py``: each of its lists is a group named
  ``granularity_K/LIST``, and each starts with OVCE's fillers ``"other"`` and
  ``"background"``, which take part in the argmax and are then dropped (``segment()``'s
  default fillers, as OVCE's ``ignore_concepts = ['other', 'background']``);
- ``broden`` groups the labels by category (objects, parts, materials, ... each one
  pass), no filler;
- ``common-words`` is one group, no filler (and without the filler words themselves).

To add a filler to a set, build the vocabulary anew, e.g.
``ConceptVocabulary.of({"ade20k-150": [*concept_set("ade20k-150").names, "background"]})``.
"""

from __future__ import annotations

import functools
import importlib.resources
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import PyneuronError
from .broden import declared_concepts, read_labels
from .vocabulary import ConceptGroup, ConceptVocabulary, load_vocabulary

__all__ = [
    "CONCEPT_SETS",
    "ConceptSetInfo",
    "concept_set",
    "list_concept_sets",
    "parse_set_spec",
]

#: The prefix that marks a concept set on the command line (``set:NAME[:ARG]``).
SPEC_PREFIX = "set:"
#: OVCE's CUB-200 granularities (``run_fast.py --predefined_concept_set``).
CUB_GRANULARITIES = ("0", "1", "2", "all")
DEFAULT_COMMON_WORDS = 1000
#: The group of Broden labels that ``label.csv`` files under no category.
UNCATEGORISED = "uncategorised"


@dataclass(frozen=True)
class ConceptSetInfo:
    """What a concept set is, for :data:`CONCEPT_SETS` and :func:`list_concept_sets`.

    Attributes
    ----------
    name
        The name :func:`concept_set` takes (``set:NAME`` on the command line).
    description
        One line on what the set holds and how it is grouped.
    source
        Where the list comes from (dataset and URL of the canonical list).
    size
        How many concepts it stores with its default options; ``None`` where that
        depends on the argument (a Broden folder).
    argument
        The option that ``:ARG`` of ``set:NAME:ARG`` sets (``"path"``, ``"n"``,
        ``"granularity"``); ``None``: the set takes no argument.
    """

    name: str
    description: str
    source: str
    size: int | None
    argument: str | None = None


@functools.cache
def _data(file: str) -> ConceptVocabulary:
    """A data file of this package (read through importlib.resources: works from a wheel)."""
    resource = importlib.resources.files(__package__) / "data" / file
    with importlib.resources.as_file(resource) as path:
        return load_vocabulary(path)


def _ade20k_150(*, synonyms: bool = False) -> ConceptVocabulary:
    if not isinstance(synonyms, bool):
        raise PyneuronError(f"ade20k-150: synonyms must be True or False, got {synonyms!r}")
    vocabulary = _data("ade20k-150.txt")
    if synonyms:
        return vocabulary
    return ConceptVocabulary(
        tuple(ConceptGroup(g.name, tuple(c.split(",")[0] for c in g.concepts)) for g in vocabulary)
    )


def _coco_stuff() -> ConceptVocabulary:
    return _data("coco-stuff.txt")


def _pascal_context_459() -> ConceptVocabulary:
    return _data("pascal-context-459.txt")


def _pascal_context_59() -> ConceptVocabulary:
    return _data("pascal-context-59.txt")


def _imagenet() -> ConceptVocabulary:
    return _data("imagenet.txt")


def _cub_200(*, granularity: str | int = "all", synonyms: bool = False) -> ConceptVocabulary:
    level = str(granularity).strip().lower().removeprefix("granularity_")
    if level not in CUB_GRANULARITIES:
        raise PyneuronError(
            f"cub-200: granularity must be one of {list(CUB_GRANULARITIES)} (OVCE's "
            f"granularity_0/1/2/all), got {granularity!r}"
        )
    groups = _data("cub-200.txt").groups
    if level == "all":  # OVCE: GRANULARITY_0 + GRANULARITY_1 + GRANULARITY_2 + [ADE20K-150]
        return ConceptVocabulary(groups + _ade20k_150(synonyms=synonyms).groups)
    return ConceptVocabulary(tuple(g for g in groups if g.name.startswith(f"granularity_{level}/")))


def _broden(
    *,
    path: str | os.PathLike[str] | None = None,
    categories: str | Sequence[str] | None = None,
) -> ConceptVocabulary:
    if path is None:
        raise PyneuronError(
            "concept set 'broden' needs the Broden folder: set:broden:PATH, or "
            "concept_set('broden', path=PATH)"
        )
    labels = read_labels(path)
    filed = list(dict.fromkeys(c for n in sorted(labels) for c in labels[n].categories))
    if categories is None:
        selected = filed
    else:
        wanted = [categories] if isinstance(categories, str) else list(categories)
        unknown = [c for c in wanted if c not in filed]
        if not wanted or unknown:
            raise PyneuronError(
                f"broden: {f'unknown categories {unknown}' if unknown else 'no category given'}"
                f"; {Path(path) / 'label.csv'} files labels under {filed}"
            )
        selected = [c for c in filed if c in wanted]
    groups: dict[str, list[str]] = {c: [] for c in selected}
    for _, name, category in declared_concepts(labels, selected):  # as broden() does
        groups.setdefault(category or UNCATEGORISED, []).append(name)
    return ConceptVocabulary(tuple(ConceptGroup(c, tuple(v)) for c, v in groups.items() if v))


def _positive_int(value: Any, what: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise PyneuronError(f"{what} must be a positive whole number, got {value!r}")
    return number


def _common_words(*, n: int | str = DEFAULT_COMMON_WORDS) -> ConceptVocabulary:
    count = _positive_int(n, "common-words: n")
    try:
        import wordfreq
    except ImportError:
        raise PyneuronError(
            "concept set 'common-words' needs the wordfreq package: pip install "
            "'pyneuron[words]' (or pip install wordfreq)"
        ) from None
    from .segment import DEFAULT_FILLERS

    fetched = 2 * count
    while True:
        ranked = wordfreq.top_n_list("en", fetched)
        words = [w for w in ranked if _is_common_word(w, DEFAULT_FILLERS)]
        if len(words) >= count or len(ranked) < fetched:
            break
        fetched *= 2
    if len(words) < count:
        raise PyneuronError(
            f"common-words: wordfreq ranks only {len(words)} English words that pass the "
            f"filter; ask for at most that many (got n={count})"
        )
    return ConceptVocabulary((ConceptGroup("common-words", tuple(words[:count])),))


def _is_common_word(word: str, fillers: Sequence[str]) -> bool:
    """The ``common-words`` filter: ASCII letters only (no digits, apostrophes, hyphens
    or accents), at least two of them, and not one of ``segment()``'s filler words."""
    return word.isascii() and word.isalpha() and len(word) >= 2 and word not in fillers


_OVCE = "https://github.com/aiea-lab/ovce"
_SETS: dict[str, tuple[ConceptSetInfo, Callable[..., ConceptVocabulary]]] = {
    info.name: (info, build)
    for info, build in [
        (
            ConceptSetInfo(
                "ade20k-150",
                "ADE20K SceneParsing's 150 classes, first synonym of each (synonyms=True: "
                "the whole line, as OVCE prompts); one group",
                "MIT Scene Parsing Benchmark, https://github.com/CSAILVision/sceneparsing/"
                f"blob/master/objectInfo150.txt (as in {_OVCE})",
                150,
            ),
            _ade20k_150,
        ),
        (
            ConceptSetInfo(
                "coco-stuff",
                "COCO-Stuff 164k's 171 classes: 80 things, then 91 stuff; one group",
                "COCO-Stuff, https://github.com/nightrome/cocostuff/blob/master/labels.txt",
                171,
            ),
            _coco_stuff,
        ),
        (
            ConceptSetInfo(
                "pascal-context-459",
                "PASCAL-Context's 459 classes (words joined, as OVCE prompts); one group",
                "PASCAL-Context, https://cs.stanford.edu/~roozbeh/pascal-context/ (names as "
                f"in {_OVCE} datasets/datasets_register/register_pascal_context.py)",
                459,
            ),
            _pascal_context_459,
        ),
        (
            ConceptSetInfo(
                "pascal-context-59",
                "PASCAL-Context's 59-class benchmark; one group",
                "PASCAL-Context 59, https://github.com/open-mmlab/mmsegmentation/blob/main/"
                "mmseg/datasets/pascal_context.py",
                59,
            ),
            _pascal_context_59,
        ),
        (
            ConceptSetInfo(
                "imagenet",
                "ImageNet-1k's 1000 classes in class-index order, first WordNet lemma of "
                "each (the two 'crane's and 'maillot's qualified by hypernym); one group",
                "ILSVRC 2012 / WordNet 3.0, Keras's imagenet_class_index.json "
                "(https://github.com/pytorch/hub/blob/master/imagenet_classes.txt)",
                1000,
            ),
            _imagenet,
        ),
        (
            ConceptSetInfo(
                "cub-200",
                "OVCE's CUB-200 concept sets: granularity 0 (bird shapes, classes, colours), "
                "1 (parts), 2 (part colours, shapes, patterns), or all (+ ADE20K-150); one "
                "group per list, each with fillers 'other' and 'background'",
                f"CUB-200-2011 as in {_OVCE}/blob/main/config/CUB.py",
                677,
                "granularity",
            ),
            _cub_200,
        ),
        (
            ConceptSetInfo(
                "broden",
                "the labels of a Broden folder (set:broden:PATH), one group per category; "
                "categories= keeps some",
                "the folder's label.csv (Bau et al. 2017, NetDissect's Broden format)",
                None,
                "path",
            ),
            _broden,
        ),
        (
            ConceptSetInfo(
                "common-words",
                f"the N (default {DEFAULT_COMMON_WORDS}) most frequent English words of "
                "ASCII letters, at least two, fillers left out; one group",
                "wordfreq's top_n_list('en'), https://github.com/rspeer/wordfreq "
                "(pip install wordfreq)",
                DEFAULT_COMMON_WORDS,
                "n",
            ),
            _common_words,
        ),
    ]
}

#: Every concept set by name: a read-only mapping ``name -> ConceptSetInfo``.
CONCEPT_SETS: Mapping[str, ConceptSetInfo] = MappingProxyType(
    {name: info for name, (info, _) in _SETS.items()}
)


def _split(body: str, text: str) -> tuple[str, str | None]:
    name, sep, argument = body.partition(":")
    name = name.strip().lower()
    if not name:
        raise PyneuronError(
            f"{text!r} names no concept set; write set:NAME with NAME one of "
            f"{', '.join(CONCEPT_SETS)}"
        )
    if sep and not argument.strip():
        raise PyneuronError(f"{text!r} ends with an empty argument; drop the ':' or give one")
    return name, argument if sep else None


def parse_set_spec(text: str | os.PathLike[str]) -> tuple[str, str | None] | None:
    """Read ``set:NAME[:ARG]`` (the command line's ``--concepts`` value for a concept set).

    Parameters
    ----------
    text
        A ``--concepts`` value.

    Returns
    -------
    tuple or None
        ``(name, argument)`` (the name lower-cased, ``argument`` everything after the
        second ``:`` -- a path may hold more colons -- or ``None``); ``None`` when
        ``text`` does not start with ``set:`` (a path or another source). The name is
        checked by :func:`concept_set`, not here.

    Raises
    ------
    PyneuronError
        ``set:`` without a name, or a ``:`` followed by nothing.

    Examples
    --------
    >>> parse_set_spec("set:ade20k-150")
    ('ade20k-150', None)
    >>> parse_set_spec("set:broden:/data/broden1_224")
    ('broden', '/data/broden1_224')
    >>> parse_set_spec("concepts.txt") is None
    True
    """
    text = os.fspath(text)
    if not isinstance(text, str) or not text.startswith(SPEC_PREFIX):
        return None
    return _split(text[len(SPEC_PREFIX) :], text)


def concept_set(name: str, **options: Any) -> ConceptVocabulary:
    """A ready-made concept vocabulary, by name.

    The sets, their sources and groups are in the module documentation and
    :data:`CONCEPT_SETS`; the fixed lists are data files under
    ``pyneuron/concepts/data/``, each naming its source and licence.

    Parameters
    ----------
    name
        A set name (``"ade20k-150"``), optionally with its argument (``"common-words:500"``,
        ``"broden:PATH"``, ``"cub-200:1"``), with or without the ``set:`` prefix.
    **options
        The set's options:

        - ``ade20k-150``: ``synonyms=False`` -- ``True`` keeps each class's whole synonym
          line (``"building, edifice"``), as OVCE prompts; the default is the first
          synonym (``"building"``);
        - ``cub-200``: ``granularity="all"`` (``0``, ``1``, ``2`` or ``"all"``, OVCE's
          ``granularity_0/1/2/all``; ``"all"`` adds ADE20K-150 as OVCE does) and
          ``synonyms`` (for that ADE20K-150 group);
        - ``broden``: ``path`` (the Broden folder; required) and ``categories`` (a name
          or list: keep the labels filed under these);
        - ``common-words``: ``n=1000``, how many words;
        - the others take none.

        An argument in ``name`` sets the set's main option (:attr:`ConceptSetInfo.argument`).

    Returns
    -------
    ConceptVocabulary
        Ready for :func:`~pyneuron.concepts.segment` (whose default fillers,
        ``"background"`` and ``"other"``, are the ones ``cub-200`` lists).

    Raises
    ------
    PyneuronError
        An unknown set (the message lists the choices), an option the set does not take,
        a bad option value, a Broden folder without ``label.csv``, ``common-words``
        without the ``wordfreq`` package.

    Examples
    --------
    >>> ade = concept_set("ade20k-150")
    >>> len(ade.names), ade.names[:3]
    (150, ['wall', 'building', 'sky'])
    >>> concept_set("ade20k-150", synonyms=True).names[1]
    'building, edifice'
    >>> concept_set("imagenet").names[0]
    'tench'
    >>> [g.name for g in concept_set("set:cub-200:2")]
    ['granularity_2/part_colors', 'granularity_2/part_shapes', 'granularity_2/part_patterns']
    >>> concept_set("cub-200:1").groups[0].concepts[:3]
    ('other', 'background', "bird's wing")
    """
    text = os.fspath(name)
    key, argument = parse_set_spec(text) or _split(text, text)
    if key not in _SETS:
        raise PyneuronError(
            f"unknown concept set {key!r}; choose one of: {', '.join(CONCEPT_SETS)}"
        )
    info, build = _SETS[key]
    options = dict(options)
    if argument is not None:
        if info.argument is None:
            raise PyneuronError(
                f"concept set {key!r} takes no argument, got {argument!r}; write set:{key}"
            )
        if info.argument in options:
            raise PyneuronError(
                f"concept set {key!r}: {info.argument} is given twice ({argument!r} in the "
                f"name and {options[info.argument]!r} as an option); give it once"
            )
        options[info.argument] = argument
    accepted = list(inspect.signature(build).parameters)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise PyneuronError(
            f"concept set {key!r} takes {'options ' + str(accepted) if accepted else 'no options'}"
            f"; got {unknown}"
        )
    return build(**options)


def list_concept_sets() -> Any:
    """The concept sets as a table: one row per set, columns ``name``, ``size`` (stored
    concepts with the default options; missing where it depends on the argument),
    ``argument`` (what ``set:NAME:ARG`` sets), ``description`` and ``source``.

    Returns
    -------
    pandas.DataFrame

    Examples
    --------
    >>> table = list_concept_sets()
    >>> print(table.loc[table.name == "imagenet", "size"].item())
    1000
    >>> list(table.columns)
    ['name', 'size', 'argument', 'description', 'source']
    """
    import pandas as pd

    rows = [
        {
            "name": info.name,
            "size": info.size,
            "argument": info.argument,
            "description": info.description,
            "source": info.source,
        }
        for info in CONCEPT_SETS.values()
    ]
    table = pd.DataFrame(rows)
    table["size"] = table["size"].astype("Int64")
    return table
