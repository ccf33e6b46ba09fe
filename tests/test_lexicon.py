"""WordNet lexicons (through `wn`, from a tiny WN-LMF file written here, never downloaded):
hypernyms, lowest meaningful common hypernyms against a literal implementation of the
rule, alignment of two name lists, hypernym mappings and merging concepts by them."""

from __future__ import annotations

import doctest
import itertools
import sys

import numpy as np
import pytest

import pyneuron
from pyneuron.concepts import lexicon as lexicon_module
from pyneuron.concepts.lexicon import DEFAULT_STOP, Lexicon, write_taxonomy
from pyneuron.errors import PyneuronError

wn = pytest.importorskip("wn", reason="WordNet lexicons need wn: pip install 'pyneuron[wordnet]'")

#: Synset id -> (lemmas, hypernym ids), in file order. ``plant`` has two noun senses, the
#: factory first (as in WordNet); ``dog`` has two hypernyms at the same depth.
SYNSETS = {
    "entity": (["entity"], []),
    "object": (["object"], ["entity"]),
    "organism": (["organism", "being"], ["object"]),
    "flora": (["plant", "flora"], ["organism"]),
    "tree": (["tree"], ["flora"]),
    "oak": (["oak"], ["tree"]),
    "pine": (["pine", "pine tree"], ["tree"]),
    "grass": (["grass"], ["flora"]),
    "animal": (["animal"], ["organism"]),
    "pet": (["pet"], ["organism"]),
    "dog": (["dog"], ["animal", "pet"]),
    "artifact": (["artifact"], ["object"]),
    "factory": (["plant", "works", "industrial plant"], ["artifact"]),
    "car": (["car", "automobile"], ["artifact"]),
    "bicycle": (["bicycle"], ["artifact"]),
    "light": (["traffic light"], ["artifact"]),
}
#: The noun senses of each word, most frequent first.
SENSES = {"plant": ["factory", "flora"]}
WORDS = ["oak", "pine", "pine tree", "tree", "plant", "flora", "grass", "dog", "animal", "pet"]
WORDS += ["car", "automobile", "bicycle", "traffic light", "organism", "object", "entity"]


def lmf_text() -> str:
    """The WN-LMF 1.1 file of :data:`SYNSETS`, written out literally."""
    senses: dict[str, list[str]] = {}
    for synset, (lemmas, _) in SYNSETS.items():
        for lemma in lemmas:
            senses.setdefault(lemma, []).append(synset)
    senses.update(SENSES)
    entries = []
    for k, (lemma, synsets) in enumerate(senses.items()):
        links = "".join(f'<Sense id="t-e{k}-{s}" synset="t-{s}"/>' for s in synsets)
        entries.append(
            f'<LexicalEntry id="t-e{k}"><Lemma writtenForm="{lemma}" partOfSpeech="n"/>'
            f"{links}</LexicalEntry>"
        )
    synsets = []
    for synset, (_, parents) in SYNSETS.items():
        relations = "".join(f'<SynsetRelation relType="hypernym" target="t-{p}"/>' for p in parents)
        synsets.append(f'<Synset id="t-{synset}" ili="" partOfSpeech="n">{relations}</Synset>')
    return "\n".join(
        [
            '<?xml version="1.0" encoding="UTF-8"?>',
            "<!DOCTYPE LexicalResource SYSTEM "
            '"http://globalwordnet.github.io/schemas/WN-LMF-1.1.dtd">',
            '<LexicalResource xmlns:dc="https://globalwordnet.github.io/schemas/dc/">',
            '<Lexicon id="t" label="test" language="en" email="a@example.org" '
            'license="https://creativecommons.org/publicdomain/zero/1.0/" version="1">',
            *entries,
            *synsets,
            "</Lexicon>",
            "</LexicalResource>",
            "",
        ]
    )


@pytest.fixture
def wn_home(tmp_path):
    """wn's data directory set to a fresh folder for the test (restored afterwards)."""
    saved = wn.config.database_path.parent
    wn.config.data_directory = tmp_path / "wn"
    yield tmp_path / "wn"
    wn.config.data_directory = saved


@pytest.fixture
def lmf(tmp_path):
    path = tmp_path / "t.xml"
    path.write_text(lmf_text())
    return path


# -- a literal implementation of the rules -----------------------------------------------


def first_sense(word: str) -> str | None:
    if word in SENSES:
        return SENSES[word][0]
    return next((s for s, (lemmas, _) in SYNSETS.items() if word in lemmas), None)


def depth(synset: str) -> int:
    parents = SYNSETS[synset][1]
    return 0 if not parents else 1 + min(depth(p) for p in parents)


def ancestors(synset: str) -> set[str]:
    found = {synset}
    for parent in SYNSETS[synset][1]:
        found |= ancestors(parent)
    return found


def meaningful(synset: str, min_depth: int, stop: set[str]) -> bool:
    return depth(synset) >= min_depth and not set(SYNSETS[synset][0]) & stop


def literal_common(a: str, b: str, min_depth: int, stop: set[str]) -> str | None:
    sa, sb = first_sense(a), first_sense(b)
    if sa is None or sb is None:
        return a if a == b else None
    if sa == sb:
        return SYNSETS[sa][0][0]
    common = ancestors(sa) & ancestors(sb)
    deepest = max(depth(s) for s in common)
    for synset in sorted(f"t-{s}" for s in common if depth(s) == deepest):
        if meaningful(synset[2:], min_depth, stop):
            return SYNSETS[synset[2:]][0][0]
    return None


# -- tests --------------------------------------------------------------------------------


def test_hypernyms_nearest_first_through_every_hypernym(wn_home, lmf):
    lexicon = Lexicon.from_file(lmf)
    assert lexicon.hypernyms("oak") == ["tree", "plant", "organism", "object", "entity"]
    assert lexicon.hypernyms("dog") == ["animal", "pet", "organism", "object", "entity"]
    assert lexicon.hypernyms("plant") == ["artifact", "object", "entity"]  # the first sense
    # underscores as spaces, Broden category suffixes, case
    assert lexicon.hypernyms("traffic_light") == ["artifact", "object", "entity"]
    assert lexicon.hypernyms("Oak-s") == lexicon.hypernyms("oak")
    with pytest.raises(PyneuronError, match="'unicorn' is not a noun"):
        lexicon.hypernyms("unicorn")


@pytest.mark.parametrize(
    ("min_depth", "stop"),
    [(0, set()), (1, set()), (3, set()), (4, set()), (0, set(DEFAULT_STOP)), (3, {"tree"})],
)
def test_lowest_common_hypernym_is_the_literal_rule(wn_home, lmf, min_depth, stop):
    lexicon = Lexicon.from_file(lmf, min_depth=min_depth, stop=stop)
    for a, b in itertools.product([*WORDS, "unicorn"], repeat=2):
        expected = literal_common(a, b, min_depth, stop)
        assert lexicon.lowest_common_hypernym(a, b) == expected, (a, b)


def test_lowest_common_hypernym_examples(wn_home, lmf):
    lexicon = Lexicon.from_file(lmf, min_depth=3)
    assert lexicon.lowest_common_hypernym("oak", "pine") == "tree"
    assert lexicon.lowest_common_hypernym("oak", "tree") == "tree"
    assert lexicon.lowest_common_hypernym("oak", "grass") == "plant"
    assert lexicon.lowest_common_hypernym("oak", "dog") is None  # organism is too general
    assert lexicon.lowest_common_hypernym("automobile", "car") == "car"  # synonyms
    assert lexicon.lowest_common_hypernym("car", "bicycle") is None  # artifact is stopped
    assert lexicon.lowest_common_hypernym("oak", "plant") is None  # plant: the factory
    assert lexicon.lowest_common_hypernym("unicorn", "unicorn") == "unicorn"
    assert Lexicon.from_file(lmf, min_depth=4).lowest_common_hypernym("oak", "grass") is None


def test_align_maps_each_name_to_its_deepest_meeting(wn_home, lmf):
    lexicon = Lexicon.from_file(lmf, min_depth=3)
    mapping = lexicon.align(["oak", "grass", "sky", "car"], ["tree", "dog", "automobile"])
    assert mapping == {
        "oak": "tree",
        "grass": "plant",
        "sky": "sky",
        "car": "car",
        "tree": "tree",  # with oak (tree) rather than grass (plant)
        "dog": "dog",
        "automobile": "car",
    }
    assert lexicon.align(["pine tree"], ["pine"]) == {"pine tree": "pine", "pine": "pine"}


def test_hypernym_mapping_by_depth_and_by_levels(wn_home, lmf):
    lexicon = Lexicon.from_file(lmf, min_depth=0)
    names = ["oak", "pine", "grass", "dog", "car", "plant", "sky", "tree"]
    assert lexicon.hypernym_mapping(names, levels=1) == {
        "oak": "tree",
        "pine": "tree",
        "grass": "plant",
        "dog": "animal",  # the first of its shortest paths
        "car": "car",  # artifact is stopped, nothing meaningful in between
        "plant": "plant",
        "sky": "sky",
        "tree": "plant",
    }
    assert lexicon.hypernym_mapping(names, depth=3) == {
        "oak": "plant",
        "pine": "plant",
        "grass": "plant",
        "dog": "animal",
        "car": "car",
        "plant": "plant",
        "sky": "sky",
        "tree": "plant",
    }
    # depth 2 is organism (stopped): the nearest meaningful hypernym below it
    assert lexicon.hypernym_mapping(["oak", "dog"], depth=2) == {"oak": "plant", "dog": "animal"}
    assert lexicon.hypernym_mapping(["oak"], levels=10) == {"oak": "plant"}
    assert lexicon.hypernym_mapping(["oak"], levels=0) == {"oak": "oak"}
    for wrong in ({}, {"depth": 1, "levels": 1}, {"depth": -1}, {"levels": 1.5}):
        with pytest.raises(PyneuronError):
            lexicon.hypernym_mapping(["oak"], **wrong)


def test_merging_a_store_by_hypernym(wn_home, lmf):
    rng = np.random.default_rng(3)
    names = ["oak", "pine", "grass", "dog", "sky"]
    masks = rng.random((5, 6, 4, 4)) < 0.3
    store = pyneuron.ConceptStore.from_masks(masks, names, ["tree", "tree", "plant", "", ""])
    mapping = Lexicon.from_file(lmf, min_depth=0).hypernym_mapping(names, levels=1)
    merged = store.merge_concepts(mapping)
    assert merged.names == ["tree", "plant", "animal", "sky"]
    assert merged.categories == ["tree", "plant", "", ""]
    np.testing.assert_array_equal(merged.mask("tree"), masks[0] | masks[1])
    np.testing.assert_array_equal(merged.mask("animal"), masks[3])
    assert merged.metadata["merges"] == [
        {"oak": "tree", "pine": "tree", "grass": "plant", "dog": "animal"}
    ]


def test_files_are_added_once_and_the_data_directory_is_kept(wn_home, lmf, tmp_path):
    first = Lexicon.from_file(lmf, data_directory=tmp_path / "own")
    assert wn.config.database_path.parent == wn_home  # wn's setting is left as it was
    again = Lexicon.from_file(lmf, data_directory=tmp_path / "own")  # already there
    assert again.name == first.name == "t:1"
    wn.config.data_directory = tmp_path / "elsewhere"  # the lexicon keeps its own
    assert first.hypernyms("pine") == ["tree", "plant", "organism", "object", "entity"]
    named = Lexicon("t", data_directory=tmp_path / "own")
    assert named.lowest_common_hypernym("oak", "pine") is None  # default min_depth 6
    assert (
        Lexicon("t", data_directory=tmp_path / "own", min_depth=4).lowest_common_hypernym(
            "oak", "pine"
        )
        == "tree"
    )


def test_bad_lexicons_say_what_is_wrong(wn_home, tmp_path, monkeypatch):
    with pytest.raises(PyneuronError, match="no WordNet lexicon 'nope'.*download"):
        Lexicon("nope")
    with pytest.raises(PyneuronError, match="does not exist"):
        Lexicon.from_file(tmp_path / "missing.xml")
    other = tmp_path / "other.xml"
    other.write_text('<?xml version="1.0"?>\n<LexicalResource></LexicalResource>\n')
    with pytest.raises(PyneuronError, match="cannot read WordNet file .*other.xml"):
        Lexicon.from_file(other)
    empty = tmp_path / "empty.xml"
    empty.write_text(lmf_text().split("<Lexicon ")[0] + "</LexicalResource>\n")
    with pytest.raises(PyneuronError, match="holds no WN-LMF lexicon"):
        Lexicon.from_file(empty)
    with pytest.raises(PyneuronError, match="min_depth"):
        Lexicon("nope", min_depth=-1)
    monkeypatch.setitem(sys.modules, "wn", None)
    with pytest.raises(PyneuronError, match=r"pip install 'pyneuron\[wordnet\]'"):
        Lexicon("t")


def test_write_taxonomy_round_trips(wn_home, tmp_path):
    tree = {"oak": "tree", "pine": "tree", "tree": "plant", "grass": "plant", "plant": "thing"}
    lexicon = Lexicon.from_file(write_taxonomy(tmp_path / "t.xml", tree), min_depth=0, stop=())
    for word in tree:
        chain, up = [], word
        while up in tree:
            up = tree[up]
            chain.append(up)
        assert lexicon.hypernyms(word) == chain
    changed = {**tree, "oak": "plant"}  # a new version: not the one added above
    lexicon = Lexicon.from_file(write_taxonomy(tmp_path / "t.xml", changed), min_depth=0, stop=())
    assert lexicon.hypernyms("oak") == ["plant", "thing"]
    with pytest.raises(PyneuronError, match="taxonomy words must be non-empty strings"):
        write_taxonomy(tmp_path / "c.xml", {"a": ""})
    with pytest.raises(PyneuronError, match="cycle"):
        write_taxonomy(tmp_path / "c.xml", {"a": "b", "b": "a"})
    with pytest.raises(PyneuronError, match="lexicon id"):
        write_taxonomy(tmp_path / "c.xml", {"a": "b"}, lexicon="1 bad")
    assert not (tmp_path / "c.xml").exists()


def test_docstring_examples(wn_home):
    result = doctest.testmod(lexicon_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
