"""HTML report of explained units: :func:`write_report`.

The report is a folder of static pages (jinja2 templates, one CSS file, PNG images made
with Pillow and matplotlib); open its ``index.html`` in a browser.
"""

from __future__ import annotations

from .html import ENTRIES, formula_parts, write_report
from .images import FORMULA_COLOR, OVERLAP_COLOR, THUMBNAIL_SIZE, UNIT_COLOR, overlay
from .names import Slugger, slugify

__all__ = [
    "ENTRIES",
    "FORMULA_COLOR",
    "OVERLAP_COLOR",
    "THUMBNAIL_SIZE",
    "UNIT_COLOR",
    "Slugger",
    "formula_parts",
    "overlay",
    "slugify",
    "write_report",
]
