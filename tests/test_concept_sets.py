"""Ready-made concept sets: counts, known entries and duplicates of every list, each data
file against a literal reading of it, OVCE's CUB-200 nesting, Broden labels against
broden() itself, common words against a literal filter of wordfreq's ranking, and the
``set:NAME[:ARG]`` syntax with its errors."""

from __future__ import annotations

import doctest
import importlib.resources
import random
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_broden import write_broden

import pyneuron
from pyneuron.concepts import broden, sets
from pyneuron.concepts.segment import DEFAULT_FILLERS
from pyneuron.concepts.sets import (
    CONCEPT_SETS,
    concept_set,
    list_concept_sets,
    parse_set_spec,
)
from pyneuron.concepts.vocabulary import ConceptVocabulary
from pyneuron.errors import PyneuronError

FIXED = {  # set -> (data file, number of classes)
    "ade20k-150": ("ade20k-150.txt", 150),
    "coco-stuff": ("coco-stuff.txt", 171),
    "pascal-context-459": ("pascal-context-459.txt", 459),
    "pascal-context-59": ("pascal-context-59.txt", 59),
    "imagenet": ("imagenet.txt", 1000),
}


def data_file(name: str) -> str:
    return (importlib.resources.files("pyneuron.concepts") / "data" / name).read_text("utf-8")


def literal_groups(text: str) -> list[tuple[str, list[str]]]:
    """Reference reading of a data file: '[name]' lines start groups; every other line
    that is neither blank nor a '#' comment is one concept."""
    groups: list[tuple[str, list[str]]] = []
    for line in text.split("\n"):
        if line == "" or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            groups.append((line[1:-1], []))
        else:
            groups[-1][1].append(line)
    return groups


# --- the fixed lists -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_sets_are_their_data_files_one_group_no_filler(name):
    file, count = FIXED[name]
    options = {"synonyms": True} if name == "ade20k-150" else {}
    vocabulary = concept_set(name, **options)
    assert isinstance(vocabulary, ConceptVocabulary)
    assert [(g.name, list(g.concepts)) for g in vocabulary] == literal_groups(data_file(file))
    assert [g.name for g in vocabulary] == [name]
    names = vocabulary.names
    assert len(names) == count == len(set(names)) == CONCEPT_SETS[name].size
    assert not set(names) & set(DEFAULT_FILLERS)  # OVCE adds no filler to dataset lists
    assert all(n == n.strip() and n for n in names)


@pytest.mark.parametrize("file", sorted({f for f, _ in FIXED.values()} | {"cub-200.txt"}))
def test_each_data_file_states_its_source_and_licence(file):
    header = [line for line in data_file(file).split("\n") if line.startswith("#")]
    assert any(line.startswith("# Source:") for line in header)
    assert any(line.startswith("# Licence:") for line in header)
    assert any("https://" in line for line in header)


KNOWN = {
    "ade20k-150": {0: "wall", 1: "building", 12: "person", 20: "car", 149: "flag"},
    "coco-stuff": {0: "person", 62: "tv", 79: "toothbrush", 80: "banner", 170: "wood"},
    "pascal-context-459": {0: "accordion", 2: "airconditioner", 430: "unknown", 458: "wool"},
    "pascal-context-59": {0: "aeroplane", 39: "pottedplant", 54: "tvmonitor", 58: "wood"},
    "imagenet": {
        0: "tench",
        1: "goldfish",
        2: "great white shark",
        134: "crane (wading bird)",
        151: "Chihuahua",
        264: "Cardigan",
        285: "Egyptian cat",
        409: "analog clock",
        474: "cardigan",
        517: "crane (lifting device)",
        607: "jack-o'-lantern",
        638: "maillot (tights)",
        639: "maillot (swimsuit)",
        954: "banana",
        999: "toilet tissue",
    },
}


@pytest.mark.parametrize("name", list(KNOWN))
def test_known_entries_in_class_index_order(name):
    names = concept_set(name).names
    for index, expected in KNOWN[name].items():
        assert names[index] == expected


def test_ade20k_names_are_the_first_synonym_of_ovces_lines():
    full = concept_set("ade20k-150", synonyms=True).names
    short = concept_set("ade20k-150").names
    assert short == [line.split(",")[0] for line in full]
    assert full[12] == "person, individual, someone, somebody, mortal, soul"
    assert len(set(short)) == 150
    with pytest.raises(PyneuronError, match="synonyms must be True or False"):
        concept_set("ade20k-150", synonyms="yes")


def test_coco_stuff_is_80_things_then_91_stuff_and_pascal_59_within_459():
    coco = concept_set("coco-stuff").names
    assert coco.index("toothbrush") == 79 and coco.index("banner") == 80
    assert sum("-" in n for n in coco[:80]) == 0  # things carry no "-other"/"-stuff"
    assert {"wall-other", "sky-other", "desk-stuff", "door-stuff"} <= set(coco[80:])
    assert set(concept_set("pascal-context-59").names) <= set(
        concept_set("pascal-context-459").names
    )


def test_imagenet_duplicates_are_qualified_and_nothing_else_changed():
    names = concept_set("imagenet").names
    qualified = [n for n in names if n.endswith(")")]
    assert qualified == [
        "crane (wading bird)",
        "crane (lifting device)",
        "maillot (tights)",
        "maillot (swimsuit)",
    ]
    assert all("_" not in n for n in names)  # Keras's '_' written as ' '


# --- CUB-200, as OVCE nests it ---------------------------------------------------------

COLOURS = "blue brown iridescent purple rufous gray yellow olive green pink orange red black"
COLOURS = COLOURS.split() + ["white", "buff", "multi-colored"]
PARTS_COLOURED = ["wing", "upperparts", "back", "upper tail", "breast", "throat", "eye"]
PARTS_COLOURED += ["forehead", "under tail", "nape", "belly", "leg", "crown", "bill"]
CUB_GROUPS = {
    "granularity_0/bird_shapes": 15,
    "granularity_0/bird_classes": 200,
    "granularity_0/colors": 32,
    "granularity_1/bird_parts": 16,
    "granularity_2/part_colors": 224,
    "granularity_2/part_shapes": 20,
    "granularity_2/part_patterns": 20,
}


def test_cub_200_granularities_are_ovces_nested_subsets():
    every = concept_set("cub-200")
    assert [g.name for g in every] == [*CUB_GROUPS, "ade20k-150"]  # OVCE's 'all'
    assert every.groups[-1] == concept_set("ade20k-150").groups[0]
    for group in every.groups[:-1]:
        assert group.concepts[:2] == ("other", "background")  # OVCE's fillers, first
        assert len(group) - 2 == CUB_GROUPS[group.name]
    stored = every.stored_names(DEFAULT_FILLERS)
    assert len(stored) == len(set(stored)) == CONCEPT_SETS["cub-200"].size == 677
    for level in ("0", "1", "2"):
        expected = [g for g in every.groups if g.name.startswith(f"granularity_{level}/")]
        for spelling in (level, int(level), f"granularity_{level}", f" GRANULARITY_{level} "):
            assert concept_set("cub-200", granularity=spelling).groups == tuple(expected)
        assert concept_set(f"set:cub-200:{level}").groups == tuple(expected)
    assert [g.name for g in concept_set("cub-200:0")] == list(CUB_GROUPS)[:3]


def test_cub_200_lists_match_ovces_rules():
    groups = {g.name: g.concepts for g in concept_set("cub-200", granularity=0)}
    groups |= {g.name: g.concepts for g in concept_set("cub-200", granularity="2")}
    classes = groups["granularity_0/bird_classes"]
    assert classes[2] == "black footed albatross" and classes[-1] == "common yellowthroat"
    assert "artic tern" in classes  # CUB's own spelling, kept
    # PART_COLORS: part by part, each of the 16 colours.
    literal = ["other", "background"]
    for part in PARTS_COLOURED:
        for colour in COLOURS:
            literal.append(f"{colour} bird's {part}")
    assert list(groups["granularity_2/part_colors"]) == literal
    # The merged colours: BIRD_COLORS then BACKGROUND_COLORS, fillers once.
    bird = [f"{c} bird" for c in COLOURS]
    background = [f"{c} background" for c in COLOURS]
    assert list(groups["granularity_0/colors"]) == ["other", "background", *bird, *background]
    assert concept_set("cub-200", synonyms=True).groups[-1].concepts[1] == "building, edifice"


def test_cub_200_bad_granularity():
    for bad in ("3", "granularity_all_", -1, "", None):
        with pytest.raises(PyneuronError, match="granularity must be one of"):
            concept_set("cub-200", granularity=bad)


# --- Broden ----------------------------------------------------------------------------

CATEGORIES = ["color", "object", "part", "material", "scene", "texture"]


def reference_broden_groups(labels, selected):
    """Literal grouping: a label is kept when it is filed under no category at all or
    under a selected one; its group is the selected category with the largest count,
    the first listed winning ties (broden()'s concept category), by label number."""
    groups: dict[str, list[str]] = {}
    for _, name, field in sorted(labels):
        counts = []
        for item in field.replace(",", ";").split(";"):
            if item:
                category, count = item.rstrip(")").split("(")
                counts.append((category, int(count)))
        chosen = [(c, k) for c, k in counts if c in selected]
        if counts and not chosen:
            continue
        best, best_count = "uncategorised", -1
        for category, count in chosen:
            if count > best_count:
                best, best_count = category, count
        groups.setdefault(best, []).append(name)
    order = [c for c in selected if c in groups]
    if "uncategorised" in groups:
        order.append("uncategorised")
    return [(c, groups[c]) for c in order]


def random_labels(rng: random.Random) -> list[tuple[int, str, str]]:
    numbers = rng.sample(range(1, 400), rng.randint(1, 25))
    labels = []
    for number in numbers:
        cats = rng.sample(CATEGORIES, rng.choice([0, 1, 1, 2, 3]))
        counts = [rng.choice([1, 2, 2, 5]) for _ in cats]  # ties on purpose
        sep = rng.choice([";", ","])
        labels.append(
            (number, f"label{number}", sep.join(f"{c}({k})" for c, k in zip(cats, counts)))
        )
    return labels


@pytest.mark.parametrize("seed", range(25))
def test_broden_groups_follow_the_literal_rule_on_random_label_files(tmp_path, seed):
    rng = random.Random(seed)
    labels = random_labels(rng)
    root = write_broden(tmp_path / "b", [], {}, labels=labels)
    filed = []
    for _, _, field in sorted(labels):
        for item in field.replace(",", ";").split(";"):
            if item and item.split("(")[0] not in filed:
                filed.append(item.split("(")[0])
    selections = [None] + [rng.sample(filed, rng.randint(1, len(filed))) for _ in range(3) if filed]
    for chosen in selections:
        selected = filed if chosen is None else [c for c in filed if c in chosen]
        expected = reference_broden_groups(labels, selected)
        if not expected:
            with pytest.raises(PyneuronError):
                concept_set("broden", path=root, categories=chosen)
            continue
        got = concept_set("broden", path=root, categories=chosen)
        assert [(g.name, list(g.concepts)) for g in got] == expected


def test_broden_set_declares_what_broden_stores(tmp_path):
    labels = [
        (1, "red-c", "color(3)"),
        (3, "wall", "object(5);part(1)"),
        (4, "door", "object(2);part(2)"),  # tie: object, listed first
        (5, "knob", "part(3)"),
        (6, "window", "part(4),object(1)"),
        (7, "kitchen-s", "scene(2)"),
        (9, "striped", "texture(2)"),
        (300, "rare", "object(1)"),
    ]
    rng = np.random.default_rng(0)
    pngs = {
        "a_object.png": rng.choice([0, 3, 4, 300], size=(8, 8)),
        "a_part.png": rng.choice([0, 5, 6], size=(8, 8)),
        "a_color.png": rng.choice([0, 1], size=(8, 8)),
    }
    rows = [
        {"image": "a.jpg", "object": "a_object.png", "part": "a_part.png", "scene": "7"},
        {"image": "b.jpg", "color": "a_color.png", "texture": "9"},
    ]
    root = write_broden(tmp_path / "b", rows, pngs, labels=labels)
    for categories in (None, ["object", "part"], ["scene"], "part"):
        store = broden(root, categories, grid=8, progress=False)
        vocabulary = concept_set(f"set:broden:{root}", categories=categories)
        by_category = [(g.name, c) for g in vocabulary for c in g.concepts]
        declared = sorted(zip(store.categories, store.names), key=lambda x: x[0])
        assert sorted(by_category, key=lambda x: x[0]) == declared
    assert [g.name for g in concept_set("broden", path=root)] == CATEGORIES[:3] + [
        "scene",
        "texture",
    ]


def test_broden_errors(tmp_path):
    root = write_broden(tmp_path / "b", [], {}, labels=[(1, "red-c", "color(1)")])
    with pytest.raises(PyneuronError, match="needs the Broden folder"):
        concept_set("broden")
    with pytest.raises(PyneuronError, match="unknown categories \\['shape'\\]"):
        concept_set("broden", path=root, categories=["color", "shape"])
    with pytest.raises(PyneuronError, match="no category given.*\\['color'\\]"):
        concept_set("broden", path=root, categories=[])
    with pytest.raises(pyneuron.concepts.MissingFileError, match="label.csv"):
        concept_set(f"set:broden:{tmp_path / 'nowhere'}")


# --- common words ----------------------------------------------------------------------


def reference_common_words(ranking: list[str], n: int) -> list[str]:
    kept = []
    for word in ranking:
        letters = all("a" <= ch <= "z" or "A" <= ch <= "Z" for ch in word)
        if letters and len(word) >= 2 and word not in ("background", "other"):
            kept.append(word)
    return kept[:n]


def test_common_words_from_wordfreq():
    import wordfreq

    ranking = wordfreq.top_n_list("en", 20000)
    for n in (1, 37, 1000):
        got = concept_set("common-words", n=n)
        assert [g.name for g in got] == ["common-words"]
        assert got.names == reference_common_words(ranking, n)
    default = concept_set("set:common-words").names
    assert len(default) == 1000 == len(set(default))
    assert "the" in default and "other" not in default and "background" not in default
    assert concept_set("set:common-words:25").names == default[:25]
    assert "other" in ranking[:1000] and "it's" in ranking[:200]  # the filter bites


@pytest.mark.parametrize("seed", range(10))
def test_common_words_filter_and_fetch_loop_on_a_fake_ranking(monkeypatch, seed):
    rng = random.Random(seed)
    pool = ["the", "a", "it's", "other", "background", "café", "x1", "well-known", "I"]
    pool += ["".join(rng.choice("abcdefg") for _ in range(rng.randint(1, 5))) for _ in range(300)]
    ranking = list(dict.fromkeys(rng.sample(pool, len(pool))))
    calls = []

    def top_n_list(lang, n, wordlist="best", ascii_only=False):
        assert lang == "en"
        calls.append(n)
        return ranking[:n]

    monkeypatch.setitem(sys.modules, "wordfreq", types.SimpleNamespace(top_n_list=top_n_list))
    available = reference_common_words(ranking, len(ranking))
    for n in sorted({1, rng.randint(1, len(available)), len(available)}):
        calls.clear()
        assert concept_set("common-words", n=n).names == available[:n]
        assert calls == [2 * n * 2**k for k in range(len(calls))]  # doubles until enough
    with pytest.raises(PyneuronError, match=f"ranks only {len(available)} English words"):
        concept_set("common-words", n=len(available) + 1)


def test_common_words_without_wordfreq_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wordfreq", None)  # import wordfreq -> ImportError
    with pytest.raises(PyneuronError, match=r"needs the wordfreq package.*pyneuron\[words\]"):
        concept_set("set:common-words:10")


@pytest.mark.parametrize("bad", [0, -3, "0", "x", "2.5", 2.5, True, "", None])
def test_common_words_bad_n(bad):
    with pytest.raises(PyneuronError, match="positive whole number"):
        concept_set("common-words", n=bad)


# --- names, specs and errors -----------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("set:ade20k-150", ("ade20k-150", None)),
        ("set:ADE20K-150", ("ade20k-150", None)),
        ("set: imagenet ", ("imagenet", None)),
        ("set:common-words:500", ("common-words", "500")),
        ("set:broden:/data/broden1_224", ("broden", "/data/broden1_224")),
        ("set:broden:C:\\data\\broden", ("broden", "C:\\data\\broden")),  # colons kept
        ("set:whatever", ("whatever", None)),  # names are checked by concept_set
        ("concepts.txt", None),
        ("/data/store", None),
        ("SET:ade20k-150", None),
        ("sets:ade20k-150", None),
        (Path("concepts.txt"), None),
    ],
)
def test_parse_set_spec(text, expected):
    assert parse_set_spec(text) == expected


@pytest.mark.parametrize("text", ["set:", "set: ", "set::x", "set:common-words:", "set:cub-200: "])
def test_parse_set_spec_rejects_empty_parts(text):
    with pytest.raises(PyneuronError):
        parse_set_spec(text)


def test_every_name_form_gives_the_same_set():
    reference = concept_set("pascal-context-59")
    for form in ("set:pascal-context-59", "Pascal-Context-59", " pascal-context-59"):
        assert concept_set(form) == reference
    assert concept_set("common-words:7") == concept_set("common-words", n=7)


def test_unknown_set_lists_the_choices():
    with pytest.raises(PyneuronError, match="unknown concept set 'ade20k-151'") as error:
        concept_set("set:ade20k-151")
    for name in CONCEPT_SETS:
        assert name in str(error.value)


def test_option_errors():
    with pytest.raises(PyneuronError, match="'imagenet' takes no argument"):
        concept_set("set:imagenet:5")
    with pytest.raises(PyneuronError, match="takes no options; got \\['synonyms'\\]"):
        concept_set("imagenet", synonyms=True)
    with pytest.raises(PyneuronError, match="takes options \\['n'\\]; got \\['size'\\]"):
        concept_set("common-words", size=3)
    with pytest.raises(PyneuronError, match="n is given twice"):
        concept_set("common-words:3", n=3)


def test_registry_and_table_agree_with_the_sets():
    table = list_concept_sets()
    assert list(table.name) == list(CONCEPT_SETS)
    assert list(table.columns) == ["name", "size", "argument", "description", "source"]
    for row in table.itertuples():
        info = CONCEPT_SETS[row.name]
        assert info.name == row.name and info.description and info.source
        if row.name == "broden":
            assert pd.isna(row.size) and row.argument == "path"
            continue
        stored = concept_set(row.name).stored_names(DEFAULT_FILLERS)
        assert row.size == info.size == len(stored)
    with pytest.raises(TypeError):
        CONCEPT_SETS["new"] = CONCEPT_SETS["imagenet"]  # read-only


def test_data_files_are_package_resources():
    folder = importlib.resources.files("pyneuron.concepts") / "data"
    files = sorted(p.name for p in folder.iterdir() if p.name.endswith(".txt"))
    assert files == sorted({f for f, _ in FIXED.values()} | {"cub-200.txt"})


def test_docstring_examples():
    result = doctest.testmod(sets, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_open_concepts_segments_a_named_set_and_records_it(tmp_path, monkeypatch):
    """`--concepts set:NAME` segments the set's concepts, the store (and the report's
    summary line) names the set, and a run's config keeps the spec as given."""
    from PIL import Image

    from pyneuron.concepts import sources
    from pyneuron.report.html import concept_source

    asked: list[list[str]] = []

    def segmenter(images, concepts):
        asked.append(list(concepts))
        scores = np.zeros((len(images), len(concepts), 4, 4), dtype=np.float32)
        scores[:, concepts.index("car"), :2] = 1.0  # "car" wins the top half
        scores[:, concepts.index("person"), 2:] = 1.0
        return scores

    monkeypatch.setattr(sources, "make_segmenter", lambda spec, **placement: segmenter)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(folder / f"{i}.png")
    store, files, built = sources.open_concepts(
        "set:coco-stuff", images=folder, grid=4, progress=False
    )
    assert built and len(files) == 2 and asked[0] == concept_set("coco-stuff").unique_names()
    assert store.metadata["concept_set"] == "set:coco-stuff"
    assert store.images_with("car").tolist() == [0, 1]
    assert store.mask("car")[0, :2].all() and not store.mask("car")[0, 2:].any()
    assert concept_source(store.metadata).endswith("concept set set:coco-stuff")
    saved = store.save(tmp_path / "store")
    assert pyneuron.ConceptStore.open(saved).metadata["concept_set"] == "set:coco-stuff"
    assert sources.resolved_concepts_spec("set:coco-stuff") == "set:coco-stuff"
    resolved = sources.resolved_concepts_spec(f"set:broden:{tmp_path.name}")
    assert resolved.startswith("set:broden:/") and resolved.endswith(tmp_path.name)
    with pytest.raises(PyneuronError, match="unknown concept set"):
        sources.open_concepts("set:nope", images=folder, progress=False)
