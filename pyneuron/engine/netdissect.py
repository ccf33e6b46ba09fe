"""NetDissect-Lite's category-restricted IoU, from a concept store's categories.

pyneuron's default IoU (compexp's) divides by every pixel of the unit mask:
``|C∧A| / (|C| + |A| - |C∧A| + 1e-10)``. NetDissect-Lite (``tally`` in its
``feature_operation.py``) counts the unit's pixels for a concept of category ``k`` only
in the images where category ``k`` is labelled under the unit: where the unit's mask
shares a pixel with some concept of category ``k`` (an image-level label such as a scene
covers the whole image, so it counts wherever the unit fires in that image). With
``A_k`` that restricted count,

``IoU_netdissect(C) = |C∧A| / (|C| + A_k - |C∧A| + 1e-10)``,  ``k`` = category of ``C``,

which is never below the dataset-wide IoU. ``|C|`` and ``|C∧A|`` are over all images, as
in NetDissect-Lite. Each concept has one category: the store's (NetDissect-Lite uses each
label's *primary* category, its ``labelcat``); concepts without a category (``""``) form
one category together.

Examples
--------
The case of two images of 2 x 2 pixels, a concept with 2 pixels in image 0, a unit with
one pixel in each image, one of them on the concept: NetDissect-Lite counts the unit in
image 0 only, 1 / (2 + 1 - 1), not 1 / (2 + 2 - 1).

>>> import numpy as np, pyneuron
>>> concept = np.zeros((1, 2, 2, 2), dtype=bool); concept[0, 0, 0] = True
>>> unit = np.zeros((1, 2, 2, 2), dtype=bool); unit[0, :, 0, 0] = True
>>> store = pyneuron.ConceptStore.from_masks(concept, ["c1"], ["object"])
>>> units = pyneuron.UnitMasks.from_masks(unit)
>>> pyneuron.iou_table(units, store, mode="netdissect", progress=False)
array([[0.5]])
>>> pyneuron.iou_table(units, store, progress=False).round(6)
array([[0.333333]])
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import PyneuronError
from . import _native
from .metrics import iou
from .store import ConceptStore
from .units import UnitMasks

#: ``"dataset"``: IoU over all pixels (compexp, the default); ``"netdissect"``: the unit's
#: pixels counted per category as NetDissect-Lite does.
IOU_MODES = ("dataset", "netdissect")


def check_mode(mode: str) -> str:
    """The IoU mode, checked: one of :data:`IOU_MODES`."""
    if mode not in IOU_MODES:
        choices = " or ".join(map(repr, IOU_MODES))
        raise PyneuronError(f"unknown IoU mode {mode!r}; choose {choices}")
    return mode


def category_codes(store: ConceptStore) -> tuple[np.ndarray, int]:
    """Category code of every concept (int32, in order of first appearance) and their count."""
    codes, names = pd.factorize(pd.Series(store.categories, dtype=object), sort=False)
    return codes.astype(np.int32), max(1, len(names))


def category_unit_pixels(
    units: UnitMasks, batch: slice, store: ConceptStore, codes: np.ndarray, n_categories: int
) -> np.ndarray:
    """(units in ``batch``, categories) int64: NetDissect-Lite's ``tally_units_cat``, each
    unit's pixels in the images where a concept of the category meets the unit."""
    return _native.category_unit_pixels(
        units._native, batch.start, batch.stop, store._native, codes, n_categories
    )


def netdissect_iou(
    intersection: np.ndarray, concept_sizes: np.ndarray, unit_category_pixels: np.ndarray
) -> np.ndarray:
    """IoU with the unit size of each concept's category, in float64 from integer counts.

    ``unit_category_pixels`` is broadcast against ``intersection`` (already indexed by
    each concept's category code)."""
    return iou(intersection, concept_sizes, unit_category_pixels)
