"""The HTML report: pages, links, escaping, file names and overlay colours."""

from __future__ import annotations

import doctest
import importlib
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import pyneuron
from pyneuron.errors import PyneuronError
from pyneuron.report import (
    FORMULA_COLOR,
    OVERLAP_COLOR,
    UNIT_COLOR,
    Slugger,
    formula_parts,
    overlay,
    slugify,
    write_report,
)
from pyneuron.report.html import CONCEPT_EXAMPLES, INDEX_STRIP

GRID = (12, 8, 8)
SCALE = 14  # 8-pixel grid -> 112-pixel thumbnails
NAMES = [
    "sky",
    "Sky",
    "a b",
    "x/y",
    'say "hi"',
    "<b>&amp;</b>",
    "NOT me",
    "..",
    "CON",
    "café",
    "water (blue)",
]
LAYER_A = "layer/1 <x>"
LAYER_B = 'conv "2" & more'
SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
INLINE = {"a", "code", "span", "b", "i", "em", "strong"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


# -- inputs -----------------------------------------------------------------------------


def _image(image: int) -> np.ndarray:
    return np.random.default_rng(1000 + image).integers(0, 256, (8, 8, 3), dtype=np.uint8)


class Inputs:
    """A tiny probing set, two layers (the second with two activation ranges), results."""

    def __init__(self) -> None:
        rng = np.random.default_rng(7)
        n, h, w = GRID
        concepts = np.zeros((len(NAMES), n, h, w), dtype=bool)
        for c in range(len(NAMES)):
            for i in range(n):
                if rng.random() < 0.6:
                    r, s = rng.integers(0, 6, size=2)
                    concepts[c, i, r : r + rng.integers(2, 5), s : s + rng.integers(2, 5)] = True
        concepts[8, 3] = True  # "CON" covers image 3: an image-level concept
        self.concepts = concepts
        self.store = pyneuron.ConceptStore.from_masks(concepts, NAMES)
        noise = rng.random((n, h, w)) < 0.08
        a = np.stack(
            [
                concepts[0] | concepts[1],
                concepts[2] & ~concepts[3],
                concepts[5],
                np.zeros((n, h, w), dtype=bool),  # fires nowhere: no explanation
                (concepts[4] | concepts[6]) ^ noise,
                rng.random((n, h, w)) < 0.1,
            ]
        )
        b = [
            np.stack([concepts[7] ^ noise, concepts[9], concepts[10] | concepts[4], noise]),
            np.stack([concepts[0] & concepts[9], concepts[2], concepts[8], concepts[3] ^ noise]),
        ]
        self.dense = {LAYER_A: a, LAYER_B: b}
        self.unit_masks = {
            LAYER_A: pyneuron.UnitMasks.from_masks(a),
            LAYER_B: [pyneuron.UnitMasks.from_masks(m) for m in b],
        }
        tables, beams = [], []
        for full, out in ((False, tables), (True, beams)):
            table = pyneuron.explain(
                self.unit_masks[LAYER_A], self.store, full_beam=full, progress=False
            )
            table.insert(0, "layer", LAYER_A)
            out.append(table)
            for k, masks in enumerate(self.unit_masks[LAYER_B]):
                table = pyneuron.explain(masks, self.store, full_beam=full, progress=False)
                table.insert(0, "layer", LAYER_B)
                table.insert(2, "range", k)
                out.append(table)
        self.results = pd.concat(tables, ignore_index=True)
        self.beam = pd.concat(beams, ignore_index=True)
        top = np.argsort(-a.sum(axis=(2, 3)), axis=1, kind="stable")[:, :4]
        top[5, 3] = -1  # padding
        self.top_images = {LAYER_A: top}

    def write(self, out: Path, **options) -> Path:
        kwargs = dict(
            unit_masks=self.unit_masks,
            images=_image,
            top_images=self.top_images,
            beam=self.beam,
            title="Report <of> \"units\" & 'things'",
            progress=False,
        )
        kwargs.update(options)
        return write_report(out, self.results, self.store, **kwargs)


@pytest.fixture(scope="module")
def inputs() -> Inputs:
    return Inputs()


@pytest.fixture(scope="module")
def report(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    index = inputs.write(out)
    assert index == out / "index.html"
    return out


# -- an HTML checker ----------------------------------------------------------------------


class Page(HTMLParser):
    """Collects links, ids, body attributes, figures and text; checks tags are balanced."""

    def __init__(self, path: Path) -> None:
        super().__init__(convert_charrefs=True)
        self.path = path
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.body: dict[str, str | None] = {}
        self.figures: list[dict[str, str]] = []
        self.imgs: list[dict[str, str | None]] = []
        self.strips: dict[str, list[dict[str, str | None]]] = {}  # unit page href -> imgs
        self.cells: list[dict[str, str | None]] = []  # attributes of every <td>
        self._strip: str | None = None
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.chunks: list[str] = []
        self.raw = path.read_text(encoding="utf-8")
        self.feed(self.raw)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed {self.stack}")
        self.text = " ".join("".join(self.chunks).split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("href", "src"):
            if values.get(key) is not None:
                self.links.append(values[key])
        if values.get("id"):
            self.ids.add(values["id"])
        if tag == "body":
            self.body = values
        if tag == "figure":
            self.figures.append({"image": values["data-image"]})
        if tag == "img" and self.figures and values.get("class") in ("plain", "overlay"):
            self.figures[-1][values["class"]] = values["src"]
        if tag == "img":
            self.imgs.append(values)
            if self._strip is not None:
                self.strips[self._strip].append(values)
        if tag == "a" and values.get("class") == "strip":
            self._strip = values["href"]
            self.strips[self._strip] = []
        if tag == "td":
            self.cells.append(values)
        if tag not in VOID:
            self.stack.append(tag)
        if tag not in INLINE:
            self.chunks.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._strip = None
        if tag not in INLINE:
            self.chunks.append(" ")
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()
        else:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")

    def handle_data(self, data: str) -> None:
        if not self.stack or self.stack[-1] not in ("script", "style"):
            self.chunks.append(data)

    def resolve(self, link: str) -> tuple[Path, str]:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc, f"{self.path}: absolute link {link}"
        assert not parts.path.startswith("/"), f"{self.path}: absolute path {link}"
        target = (self.path.parent / unquote(parts.path)).resolve() if parts.path else self.path
        return target, parts.fragment


def pages(out: Path) -> dict[Path, Page]:
    return {path.resolve(): Page(path) for path in sorted(out.rglob("*.html"))}


def unit_pages(out: Path) -> dict[tuple[str, int, int | None], Page]:
    found = {}
    for path in sorted((out / "units").rglob("*.html")):
        page = Page(path)
        rng = page.body.get("data-range")
        key = (page.body["data-layer"], int(page.body["data-unit"]), int(rng) if rng else None)
        assert key not in found
        found[key] = page
    return found


def result_keys(results: pd.DataFrame) -> set[tuple[str, int, int | None]]:
    return {
        (row.layer, int(row.unit), None if pd.isna(row.range) else int(row.range))
        for row in results.itertuples()
    }


# -- tests ------------------------------------------------------------------------------


def test_pages_parse_and_every_link_resolves(report: Path) -> None:
    assert (report / "index.html").is_file()
    parsed = pages(report)
    assert len(parsed) > 10
    root = report.resolve()
    for path, page in parsed.items():
        assert not page.errors, (path, page.errors)
        assert page.raw.startswith("<!doctype html>")
        assert page.links, path
        for link in page.links:
            target, fragment = page.resolve(link)
            assert target.is_file(), f"{path}: {link} -> {target} does not exist"
            assert root in target.parents, f"{path}: {link} leaves the report"
            if fragment:
                assert fragment in parsed[target].ids, f"{path}: no #{fragment} in {target}"


def test_every_file_name_is_safe_and_nothing_is_left_over(report: Path) -> None:
    for path in report.rglob("*"):
        for part in path.relative_to(report).parts:
            assert SAFE_NAME.match(part), path
    assert sorted(p.name for p in report.iterdir()) == sorted(pyneuron.report.ENTRIES)


def test_a_unit_page_per_row_linked_from_the_index(report: Path, inputs: Inputs) -> None:
    found = unit_pages(report)
    assert set(found) == result_keys(inputs.results)
    index = Page(report / "index.html")
    linked = {
        target
        for target, _ in map(index.resolve, index.links)
        if (report / "units").resolve() in target.parents
    }
    assert linked == {page.path.resolve() for page in found.values()}
    for (layer, unit, rng), page in found.items():
        assert layer in page.text and f"unit {unit}" in page.text
        if rng is not None:
            assert f"range {rng}" in page.text


def test_concept_pages_for_the_concepts_used(report: Path, inputs: Inputs) -> None:
    used = {
        name
        for text in inputs.results["formula"].dropna()
        for name in pyneuron.Formula.parse(text).concepts()
    }
    assert len(used) >= 5
    found = {}
    for path in (report / "concepts").glob("*.html"):
        page = Page(path)
        found[page.body["data-concept"]] = page
    assert used <= set(found)
    assert set(found) <= set(NAMES)
    for name in used:
        page = found[name]
        users = inputs.results[
            inputs.results["formula"].map(
                lambda f, n=name: isinstance(f, str) and n in pyneuron.Formula.parse(f).concepts()
            )
        ]
        assert f"units using it {len(users)}" in page.text
        for formula in users["formula"]:
            assert formula in page.text
    # unit pages link the concepts of their formula
    pages_by_key = unit_pages(report)
    row = inputs.results.iloc[0]
    page = pages_by_key[(row["layer"], int(row["unit"]), None)]
    targets = {page.resolve(link)[0] for link in page.links}
    for name in pyneuron.Formula.parse(row["formula"]).concepts():
        assert found[name].path.resolve() in targets


def test_special_characters_are_escaped(report: Path) -> None:
    for page in pages(report).values():
        assert "<b>&amp;</b>" not in page.raw
        assert "<x>" not in page.raw
        assert "<of>" not in page.raw
        assert 'data-layer="conv "2"' not in page.raw
    index = Page(report / "index.html")
    assert LAYER_A in index.text and LAYER_B in index.text
    assert "Report <of> \"units\" & 'things'" in index.text
    concept = next(
        page
        for page in map(Page, (report / "concepts").glob("*.html"))
        if page.body["data-concept"] == "<b>&amp;</b>"
    )
    assert "Concept <b>&amp;</b>" in concept.text
    assert "&lt;b&gt;&amp;amp;&lt;/b&gt;" in concept.raw


def test_missing_formula_renders_as_no_explanation(report: Path, inputs: Inputs) -> None:
    missing = inputs.results[inputs.results["formula"].isna()]
    assert (missing["layer"] == LAYER_A).any() and (missing["unit"] == 3).any()
    page = unit_pages(report)[(LAYER_A, 3, None)]
    assert "no explanation" in page.text
    assert "IoU 0.0000" in page.text
    index = Page(report / "index.html")
    assert index.text.count("no explanation") == len(missing)


def test_runner_up_formulas_of_the_beam(report: Path, inputs: Inputs) -> None:
    found = unit_pages(report)
    for (layer, unit, rng), page in found.items():
        beam = inputs.beam[(inputs.beam["layer"] == layer) & (inputs.beam["unit"] == unit)]
        if rng is not None:
            beam = beam[beam["range"] == rng]
        for formula in beam["formula"].dropna():
            assert formula in page.text
    assert "Beam" in found[(LAYER_A, 0, None)].text


def test_overlay_colours_are_exact(report: Path, inputs: Inputs) -> None:
    found = unit_pages(report)
    states: set[int] = set()
    palette = {1: UNIT_COLOR, 2: FORMULA_COLOR, 3: OVERLAP_COLOR}
    for unit in range(6):
        page = found[(LAYER_A, unit, None)]
        formula = inputs.results.query("layer == @LAYER_A and unit == @unit")["formula"].iloc[0]
        formula_masks = (
            pyneuron.Formula.parse(formula).mask(inputs.store)
            if isinstance(formula, str)
            else np.zeros(GRID, dtype=bool)
        )
        fires = inputs.dense[LAYER_A][unit].any(axis=(1, 2))
        expected_ids = [i for i in inputs.top_images[LAYER_A][unit] if i >= 0 and fires[i]]
        assert [int(f["image"]) for f in page.figures] == expected_ids
        for figure in page.figures:
            image = int(figure["image"])
            plain = np.asarray(Image.open(page.resolve(figure["plain"])[0]).convert("RGB"))
            drawn = np.asarray(Image.open(page.resolve(figure["overlay"])[0]).convert("RGB"))
            big = np.repeat(np.repeat(_image(image), SCALE, axis=0), SCALE, axis=1)
            np.testing.assert_array_equal(plain, big)
            state = inputs.dense[LAYER_A][unit, image] * 1 + formula_masks[image] * 2
            for r in range(GRID[1]):
                for c in range(GRID[2]):
                    block = (slice(r * SCALE, (r + 1) * SCALE), slice(c * SCALE, (c + 1) * SCALE))
                    rgb = big[block].astype(int)
                    grey = (rgb @ np.array([299, 587, 114]) + 500) // 1000
                    base = np.repeat(grey[:, :, None], 3, axis=2)
                    s = int(state[r, c])
                    states.add(s)
                    want = base if s == 0 else (2 * base + 3 * np.array(palette[s]) + 2) // 5
                    np.testing.assert_array_equal(drawn[block], want, err_msg=f"{unit} {image}")
    assert states == {0, 1, 2, 3}


def test_legend_shows_the_overlay_colours(report: Path) -> None:
    page = unit_pages(report)[(LAYER_A, 0, None)]
    for color in (UNIT_COLOR, FORMULA_COLOR, OVERLAP_COLOR):
        assert "rgb({}, {}, {})".format(*color) in page.raw
    assert "unit mask only" in page.text and "formula mask only" in page.text


def test_ranges_without_top_images_show_the_busiest_images(report: Path, inputs: Inputs) -> None:
    found = unit_pages(report)
    for k, dense in enumerate(inputs.dense[LAYER_B]):
        for unit in range(dense.shape[0]):
            counts = dense[unit].sum(axis=(1, 2))
            order = np.lexsort((np.arange(len(counts)), -counts))
            want = [int(i) for i in order if counts[i] > 0][:8]
            ids = [int(f["image"]) for f in found[(LAYER_B, unit, k)].figures]
            assert ids == want


# -- index strips, concept examples, top images only where the unit fires ----------------


def _css_rules(out: Path) -> dict[str, dict[str, str]]:
    """The report's style sheet as selector -> {property: value}."""
    css = re.sub(r"/\*.*?\*/", "", (out / "static" / "report.css").read_text(), flags=re.S)
    rules: dict[str, dict[str, str]] = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        declarations = dict(
            (part.split(":", 1)[0].strip(), part.split(":", 1)[1].strip())
            for part in body.split(";")
            if ":" in part
        )
        for selector in selectors.split(","):
            rules.setdefault(" ".join(selector.split()), {}).update(declarations)
    return rules


def test_index_rows_show_a_lazy_strip_of_the_unit_page_overlays(
    report: Path, inputs: Inputs
) -> None:
    index = Page(report / "index.html")
    found = unit_pages(report)
    assert found
    files_before = sorted((report / "img").rglob("*.png"))
    for key, page in found.items():
        href = page.path.relative_to(report).as_posix()
        figures = page.figures
        strip = index.strips.get(href, [])
        assert len(strip) == min(INDEX_STRIP, len(figures)), key
        for img, figure in zip(strip, figures):
            assert img["loading"] == "lazy"
            assert int(img["width"]) > 0 and int(img["height"]) > 0
            target = index.resolve(img["src"])[0]
            assert target.is_file()
            # the strip shows the unit page's overlays: no new files
            assert target == page.resolve(figure["overlay"])[0]
    assert index.strips[f"units/{Slugger()(LAYER_A)}/0.html"]
    assert f"units/{Slugger()(LAYER_A)}/3.html" not in index.strips  # fires nowhere
    assert sorted((report / "img").rglob("*.png")) == files_before


def test_index_formula_column_is_not_squeezed(report: Path, inputs: Inputs) -> None:
    """The formula column keeps a readable width and the numeric headers may wrap, so
    the unit table fits a 1,400 px window instead of wrapping formulas a word a line."""
    index = Page(report / "index.html")
    formula_cells = [c for c in index.cells if "formula" in (c.get("class") or "").split()]
    assert len(formula_cells) == len(inputs.results)
    rules = _css_rules(report)
    width = rules["table.units td.formula"]["min-width"]
    assert width.endswith("rem") and float(width[:-3]) >= 15
    assert rules["table.units th"]["white-space"] == "normal"
    assert rules["body.index main"]["max-width"] != rules["main"]["max-width"]


@pytest.mark.skipif(not shutil.which("chromium-headless-shell"), reason="no headless browser")
def test_index_table_fits_a_1400_pixel_window(report: Path, tmp_path: Path) -> None:
    """Measured in a browser (where one is installed): the table fits, formulas don't wrap."""
    probe = report / "probe.html"
    measure = (
        "<script>window.addEventListener('load', function () {"
        "var t = document.querySelector('table.units');"
        "var f = Array.prototype.find.call(t.tHead.rows[0].cells,"
        " function (c) { return c.textContent.trim().indexOf('formula') === 0; });"
        "document.body.setAttribute('data-measured', JSON.stringify({"
        "page: document.documentElement.scrollWidth, table: t.getBoundingClientRect().width,"
        "hidden: t.parentNode.scrollWidth - t.parentNode.clientWidth,"
        "formula: f.getBoundingClientRect().width}));"
        "});</script></body>"
    )
    probe.write_text((report / "index.html").read_text().replace("</body>", measure))
    try:
        dom = subprocess.run(
            [
                "chromium-headless-shell",
                "--no-sandbox",
                "--disable-gpu",
                "--window-size=1400,900",
                "--virtual-time-budget=5000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        ).stdout
    finally:
        probe.unlink()
    found = re.search(r"data-measured=\"([^\"]*)\"", dom)
    assert found, dom[-2000:]
    sizes = json.loads(found.group(1).replace("&quot;", '"'))
    assert sizes["page"] <= 1400 and sizes["hidden"] <= 0, sizes  # no horizontal scrolling
    assert sizes["formula"] >= 250, sizes


def test_concept_pages_show_example_masks(report: Path, inputs: Inputs) -> None:
    pixels = inputs.concepts.sum(axis=(2, 3))  # (concepts, images)
    checked = 0
    for path in (report / "concepts").glob("*.html"):
        page = Page(path)
        c = NAMES.index(page.body["data-concept"])
        present = np.flatnonzero(pixels[c])
        want = sorted(present.tolist(), key=lambda i: (-pixels[c, i], i))[:CONCEPT_EXAMPLES]
        assert [int(f["image"]) for f in page.figures] == want, path
        assert "concept mask" in page.text
        for figure in page.figures:
            image = int(figure["image"])
            for key in ("plain", "overlay"):
                assert page.resolve(figure[key])[0].is_file()
            lazy = [i for i in page.imgs if i["src"] in (figure["plain"], figure["overlay"])]
            assert [i["loading"] for i in lazy] == ["lazy", "lazy"]
            big = np.repeat(np.repeat(_image(image), SCALE, axis=0), SCALE, axis=1)
            drawn = np.asarray(Image.open(page.resolve(figure["overlay"])[0]).convert("RGB"))
            np.testing.assert_array_equal(drawn, overlay(big, None, inputs.concepts[c, image]))
            checked += 1
    assert checked >= 5 * CONCEPT_EXAMPLES


def test_top_images_are_only_images_where_the_unit_fires(inputs: Inputs, tmp_path: Path) -> None:
    n, h, w = GRID
    dense = np.zeros((3, n, h, w), dtype=bool)
    dense[0, [2, 5], 1:4, 1:4] = True  # unit 0 fires on 2 images
    dense[2, :, 0, 0] = True  # unit 2 fires everywhere; unit 1 nowhere
    masks = pyneuron.UnitMasks.from_masks(dense)
    results = pyneuron.explain(masks, inputs.store, progress=False)
    top = np.array([[0, 2, 1, 5, 3, 4], [0, 1, 2, 3, 4, 5], [7, 6, 5, 4, 3, 2]])
    write_report(
        tmp_path,
        results,
        inputs.store,
        unit_masks={"few": masks},
        images=_image,
        top_images={"few": top},
        progress=False,
    )
    found = unit_pages(tmp_path)
    assert [int(f["image"]) for f in found[("few", 0, None)].figures] == [2, 5]
    assert "4 of its given top images are left out" in found[("few", 0, None)].text
    assert "it fires on 2 images in all" in found[("few", 0, None)].text
    assert found[("few", 1, None)].figures == []
    assert "fires on no image" in found[("few", 1, None)].text
    assert "left out" not in found[("few", 1, None)].text
    assert [int(f["image"]) for f in found[("few", 2, None)].figures] == top[2].tolist()
    assert "left out" not in found[("few", 2, None)].text
    strips = Page(tmp_path / "index.html").strips
    assert [i["alt"] for i in strips["units/few/0.html"]] == ["image 2", "image 5"]
    assert "units/few/1.html" not in strips
    assert len(strips["units/few/2.html"]) == INDEX_STRIP


def test_max_units_limits_unit_pages(inputs: Inputs, tmp_path: Path) -> None:
    inputs.write(tmp_path, max_units=2, beam=None)
    found = unit_pages(tmp_path)
    assert sum(layer == LAYER_A for layer, _, _ in found) == 2
    assert sum(layer == LAYER_B for layer, _, _ in found) == 2
    best = inputs.results[inputs.results["layer"] == LAYER_A].nlargest(2, "iou", keep="first")
    assert {(LAYER_A, int(u), None) for u in best["unit"]} <= set(found)
    for path, page in pages(tmp_path).items():
        assert not page.errors
        for link in page.links:
            assert page.resolve(link)[0].is_file(), (path, link)
    index = Page(tmp_path / "index.html")
    assert "max_units=2" in index.text
    assert "Beam" not in found[next(iter(found))].text


def test_other_image_sizes_and_no_images(inputs: Inputs, tmp_path: Path) -> None:
    big = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    inputs.write(tmp_path / "a", images=lambda i: big, max_units=1)
    inputs.write(tmp_path / "b", images=lambda i: big[:, :, 0], unit_masks={}, max_units=1)
    inputs.write(tmp_path / "c", images=None, top_images={}, max_units=1)
    for name in "abc":
        for page in pages(tmp_path / name).values():
            assert not page.errors
            for link in page.links:
                assert page.resolve(link)[0].is_file()
        thumbs = sorted((tmp_path / name / "img" / "images").glob("*.png"))
        assert thumbs
        assert Image.open(thumbs[0]).size == (112, 112)
    grey = np.asarray(Image.open(next((tmp_path / "c" / "img" / "images").glob("*.png"))))
    assert (grey == 128).all()
    b_pages = unit_pages(tmp_path / "b")
    assert "no unit masks were given" in b_pages[(LAYER_A, 0, None)].text
    assert "No top images for this unit" in b_pages[(LAYER_B, 2, 1)].text


def test_existing_report_needs_overwrite_and_other_files_stay(
    inputs: Inputs, tmp_path: Path
) -> None:
    (tmp_path / "results.csv").write_text("keep me")
    inputs.write(tmp_path, max_units=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        inputs.write(tmp_path, max_units=1)
    inputs.write(tmp_path, max_units=2, overwrite=True)
    assert len(unit_pages(tmp_path)) == 4
    assert (tmp_path / "results.csv").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*pyneuron.report.ENTRIES, "results.csv"]
    )


def test_a_failure_leaves_no_report_behind(inputs: Inputs, tmp_path: Path) -> None:
    def broken(image: int) -> np.ndarray:
        raise OSError("disk on fire")

    with pytest.raises(PyneuronError, match="disk on fire"):
        inputs.write(tmp_path, images=broken)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PyneuronError, match="RGB array"):
        inputs.write(tmp_path, images=lambda i: np.zeros((4, 4, 4, 4), dtype=np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r, o: (r.drop(columns="iou"), o), "lack the column"),
        (lambda r, o: (pd.concat([r, r.iloc[:1]]), o), "several rows"),
        (lambda r, o: (r.assign(formula="nonexistent OR sky"), o), "no concept named"),
        (lambda r, o: (r.assign(formula="(sky AND"), o), "cannot parse"),
        (lambda r, o: (r.assign(unit=r["unit"] + 10), o), "unit masks have"),
        (lambda r, o: (r, {**o, "top_images": {LAYER_A: np.zeros((6, 2)) + 0.5}}), "integer"),
        (lambda r, o: (r, {**o, "top_images": {LAYER_A: np.full((6, 2), 99)}}), "out of range"),
        (lambda r, o: (r, {**o, "max_units": -1}), "max_units"),
        (
            lambda r, o: (
                r,
                {**o, "unit_masks": {**o["unit_masks"], LAYER_B: o["unit_masks"][LAYER_A]}},
            ),
            "ranges",
        ),
    ],
)
def test_bad_input_is_refused_before_writing(inputs: Inputs, tmp_path: Path, change, message):
    options = {
        "unit_masks": inputs.unit_masks,
        "images": _image,
        "top_images": inputs.top_images,
        "progress": False,
    }
    results, options = change(inputs.results, options)
    with pytest.raises(PyneuronError, match=message):
        write_report(tmp_path / "out", results, inputs.store, **options)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_grid_mismatch(inputs: Inputs, tmp_path: Path) -> None:
    other = pyneuron.UnitMasks.from_masks(np.zeros((6, 12, 4, 4), dtype=bool))
    with pytest.raises(pyneuron.GridMismatchError):
        write_report(
            tmp_path,
            inputs.results,
            inputs.store,
            unit_masks={LAYER_A: other},
            images=_image,
            top_images={},
            progress=False,
        )


def test_single_layer_results_without_layer_column(inputs: Inputs, tmp_path: Path) -> None:
    results = inputs.results[inputs.results["layer"] == LAYER_A].drop(columns=["layer", "range"])
    write_report(
        tmp_path,
        results,
        inputs.store,
        unit_masks={"conv1": inputs.unit_masks[LAYER_A]},
        images=_image,
        top_images={},
        progress=False,
    )
    assert set(unit_pages(tmp_path)) == {("conv1", u, None) for u in range(6)}


def test_slugs_are_safe_and_unique() -> None:
    names = [*NAMES, "", "/", "a" * 300, "ß", "日本", "aux.txt", "Sky", "sky-2", ".hidden"]
    slugger = Slugger()
    slugs = [slugger(name) for name in names]
    assert len(set(slugs)) == len(set(names))
    for slug in slugs:
        assert SAFE_NAME.match(slug) and len(slug) <= 70
        assert slug.split(".")[0] not in ("con", "aux", "nul", "prn")
    assert slugger("sky") == slugs[0] == "sky"
    assert slugify("..") == "x" and slugify("a/b") == "a-b"


@pytest.mark.parametrize(
    "text", ["a", "NOT a", "(a OR b) AND NOT c", '"x (y)" OR "say \\"hi\\""', "NOT (a AND b)"]
)
def test_formula_parts_print_the_formula(text: str) -> None:
    formula = pyneuron.Formula.parse(text)
    parts = formula_parts(formula)
    assert "".join(t for t, _ in parts) == str(formula)
    assert [name for _, name in parts if name is not None] == list(_leaves(formula))


def _leaves(formula):
    if isinstance(formula, pyneuron.Concept):
        yield formula.name
    elif isinstance(formula, pyneuron.Not):
        yield from _leaves(formula.operand)
    else:
        yield from _leaves(formula.left)
        yield from _leaves(formula.right)


@pytest.mark.parametrize(
    "name", ["pyneuron.report.names", "pyneuron.report.images", "pyneuron.report.html"]
)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(
        importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


def test_a_mid_size_report_is_fast(tmp_path: Path) -> None:
    """2 layers x 64 units x 8 images on a 56x56 grid in a few seconds."""
    rng = np.random.default_rng(3)
    n, h, w = 40, 56, 56
    concepts = rng.random((30, n, h // 8, w // 8)) < 0.2
    concepts = np.repeat(np.repeat(concepts, 8, axis=2), 8, axis=3)
    store = pyneuron.ConceptStore.from_masks(concepts, [f"concept {i}" for i in range(30)])
    masks, results, top = {}, [], {}
    for layer in ("layer3", "layer4"):
        picks = rng.integers(0, 30, size=(64, 2))
        dense = (concepts[picks[:, 0]] | concepts[picks[:, 1]]) ^ (rng.random((64, n, h, w)) < 0.02)
        masks[layer] = pyneuron.UnitMasks.from_masks(dense)
        table = pyneuron.explain(masks[layer], store, progress=False)
        table.insert(0, "layer", layer)
        results.append(table)
        top[layer] = np.argsort(-dense.sum(axis=(2, 3)), axis=1)[:, :8]
    photos = rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
    start = time.perf_counter()
    write_report(
        tmp_path,
        pd.concat(results, ignore_index=True),
        store,
        unit_masks=masks,
        images=lambda i: photos[i],
        top_images=top,
        progress=False,
    )
    elapsed = time.perf_counter() - start
    assert len(list((tmp_path / "units").rglob("*.html"))) == 128
    assert len(list((tmp_path / "img" / "units").rglob("*.png"))) == 128 * 8
    assert elapsed < 30, elapsed  # a few seconds; generous for slow CI machines
    assert os.path.getsize(tmp_path / "index.html") > 0


def test_a_failed_replacement_keeps_the_whole_old_report(
    inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs.write(tmp_path, max_units=1)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    real_rename = os.rename
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(OSError, match="rename failed"):
        inputs.write(tmp_path, max_units=2, overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
