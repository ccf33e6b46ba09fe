"""Concept sources written into a :class:`~pyneuron.ConceptStore`: Broden-format
datasets, user masks, and open-vocabulary segmentation."""

from .broden import BrodenError, broden, broden_images
from .lexicon import Lexicon, write_taxonomy
from .segment import SEMANTICS, segment
from .segmenters import (
    BoxSettings,
    CallableSegmenter,
    CLIPSegSegmenter,
    CLIPSegSettings,
    Detections,
    GroundingDinoSamSegmenter,
    Owlv2SamSegmenter,
    Sam3Segmenter,
    Sam3Settings,
    Segmenter,
)
from .sets import CONCEPT_SETS, ConceptSetInfo, concept_set, list_concept_sets, parse_set_spec
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
    "CONCEPT_SETS",
    "SEMANTICS",
    "BoxSettings",
    "BrodenError",
    "CLIPSegSegmenter",
    "CLIPSegSettings",
    "CallableSegmenter",
    "ConceptGroup",
    "ConceptSetInfo",
    "ConceptSourceError",
    "ConceptVocabulary",
    "Detections",
    "GroundingDinoSamSegmenter",
    "Lexicon",
    "MissingFileError",
    "Owlv2SamSegmenter",
    "Sam3Segmenter",
    "Sam3Settings",
    "Segmenter",
    "broden",
    "broden_images",
    "concept_set",
    "from_arrays",
    "from_coco",
    "from_label_maps",
    "from_mask_folder",
    "list_concept_sets",
    "load_vocabulary",
    "parse_set_spec",
    "resize_nearest",
    "segment",
    "write_taxonomy",
]
