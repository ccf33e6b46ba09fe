"""NetDissect-Lite's tally, ported literally from its published algorithm (CSAILVision/
NetDissect-Lite, ``FeatureOperator.tally_job`` and ``tally`` of ``feature_operation.py``,
commit 2163454), to check pyneuron's ``mode="netdissect"`` against.

The data are Broden-style: per image a list of pixel label maps (several categories and
several maps per category allowed; 0 = unlabelled) and a list of image-level (scalar)
labels; ``labelcat`` is the one-hot (labels, categories) matrix of each label's primary
category. Unit maps are upsampled with ``scipy.misc.imresize(mode='F')``, i.e. Pillow's
BILINEAR on a float image, and thresholded strictly.

One deviation: NetDissect-Lite leaves ``tally_cat`` undefined for an image without any
pixel map (it reuses the previous unit's value); here it starts at zero. The tests give
every image a pixel map (as Broden's colour category does), so this never matters.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def imresize_f(feature_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """scipy.misc.imresize(feature_map, shape, mode='F') (bilinear, Pillow)."""
    image = Image.fromarray(feature_map.astype(np.float32), mode="F")
    return np.asarray(image.resize((shape[1], shape[0]), Image.BILINEAR))


def tally(
    features: np.ndarray,
    threshold: np.ndarray,
    images: list[tuple[list[np.ndarray], list[int]]],
    labelcat: np.ndarray,
    shape: tuple[int, int],
) -> np.ndarray:
    """The (units, labels) IoU matrix of NetDissect-Lite's ``tally``.

    ``images[i] = (pixel_maps, scalars)``: label maps of ``shape`` and scalar labels.
    """
    units = features.shape[1]
    labels = labelcat.shape[0]
    tally_both = np.zeros((units, labels), dtype=np.float64)
    tally_units = np.zeros(units, dtype=np.float64)
    tally_units_cat = np.zeros((units, labelcat.shape[1]), dtype=np.float64)
    tally_labels = np.zeros(labels, dtype=np.float64)
    sh, sw = shape
    for img_index, (maps, scalars) in enumerate(images):
        pixels = np.stack(maps) if maps else []
        for scalar in scalars:
            tally_labels[scalar] += sh * sw
        if len(pixels):
            tally_label = np.bincount(pixels.ravel())
            if len(tally_label) > 0:
                tally_label[0] = 0
            tally_labels[: len(tally_label)] += tally_label
        for unit_id in range(units):
            feature_map = features[img_index][unit_id]
            if feature_map.max() > threshold[unit_id]:
                mask = imresize_f(feature_map, (sh, sw))
                indexes = np.argwhere(mask > threshold[unit_id])
                tally_units[unit_id] += len(indexes)
                tally_cat = np.zeros(labelcat.shape[1])  # see the module docstring
                if len(pixels) > 0:
                    tally_bt = np.bincount(pixels[:, indexes[:, 0], indexes[:, 1]].ravel())
                    if len(tally_bt) > 0:
                        tally_bt[0] = 0
                    tally_cat = np.dot(tally_bt[None, :], labelcat[: len(tally_bt), :])[0]
                    tally_both[unit_id, : len(tally_bt)] += tally_bt
                for scalar in scalars:
                    tally_cat += labelcat[scalar]
                    tally_both[unit_id, scalar] += len(indexes)
                tally_units_cat[unit_id] += len(indexes) * (tally_cat > 0)
    tally_units_cat = np.dot(tally_units_cat, labelcat.T)
    return tally_both / (tally_units_cat + tally_labels[np.newaxis, :] - tally_both + 1e-10)
