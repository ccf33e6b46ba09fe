"""Concept sources written into a :class:`~pyneuron.ConceptStore`: Broden-format
datasets, user masks, and open-vocabulary segmentation."""
