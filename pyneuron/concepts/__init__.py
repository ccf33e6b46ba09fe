"""Concept sources written into a :class:`~pyneuron.ConceptStore`: Broden-format
datasets, user masks, and open-vocabulary segmentation."""

from .broden import BrodenError, broden, broden_images
from .segment import segment
from .segmenters import (
    BoxSettings,
    CallableSegmenter,
    CLIPSegSegmenter,
    CLIPSegSettings,
    Detections,
    GroundingDinoSamSegmenter,
    Owlv2SamSegmenter,
    Segmenter,
)
from .user import (
    ConceptSourceError,
    MissingFileError,
    from_arrays,
    from_coco,
    from_label_maps,
    from_mask_folder,
    resize_nearest,
)
from .vocabulary import ConceptGroup, ConceptVocabulary, load_vocabulary

__all__ = [
    "BoxSettings",
    "BrodenError",
    "CLIPSegSegmenter",
    "CLIPSegSettings",
    "CallableSegmenter",
    "ConceptGroup",
    "ConceptSourceError",
    "ConceptVocabulary",
    "Detections",
    "GroundingDinoSamSegmenter",
    "MissingFileError",
    "Owlv2SamSegmenter",
    "Segmenter",
    "broden",
    "broden_images",
    "from_arrays",
    "from_coco",
    "from_label_maps",
    "from_mask_folder",
    "load_vocabulary",
    "resize_nearest",
    "segment",
]
