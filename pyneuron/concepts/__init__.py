"""Concept sources written into a :class:`~pyneuron.ConceptStore`: Broden-format
datasets, user masks, and open-vocabulary segmentation."""

from .broden import BrodenError, broden, broden_images
from .user import (
    ConceptSourceError,
    MissingFileError,
    from_arrays,
    from_coco,
    from_label_maps,
    from_mask_folder,
    resize_nearest,
)

__all__ = [
    "BrodenError",
    "ConceptSourceError",
    "MissingFileError",
    "broden",
    "broden_images",
    "from_arrays",
    "from_coco",
    "from_label_maps",
    "from_mask_folder",
    "resize_nearest",
]
