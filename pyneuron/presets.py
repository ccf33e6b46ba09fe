"""Presets: every setting a published method fixes, chosen with one name.

A preset fixes how concepts are segmented, how units are thresholded and upsampled, and
how formulas are searched, so that a run reproduces the method it names. Give it as
``pyneuron dissect --preset NAME`` or ``pyneuron.dissect(..., preset=NAME)``; a setting
given explicitly as well wins over the preset's (the run's summary lists such
overrides), and the run records the preset in its ``config.toml`` and ``summary.json``,
and the report names it.

Presets
-------
``ovce``
    Open Vocabulary Compositional Explanations (La Rosa & Gilpin 2025, arXiv 2511.20931,
    code ``aiea-lab/ovce``, ``run_fast.py`` with its default flags): masks made by one
    segmenter pass per concept group, argmax at the segmenter's resolution, nearest
    resize to a 112 x 112 grid; 5 activation ranges per unit from scikit-learn's
    ``KMeans(n_clusters=5, random_state=0)`` over the unit's activations (zeros left out
    when the unit has no negative value), ranges in ascending order;
    activations upsampled with ``torch.nn.functional.interpolate(mode="bilinear")``
    and kept where ``lower < a < upper``; beam search of length 3 and beam 5 over OR,
    AND, AND NOT, scored by IoU over the whole dataset.
``ovce-classic``
    OVCE with ``--num_clusters 1`` (its compositional-explanations mode): the same
    masks and upsampling, one threshold per unit at the top 1 % of its activations
    from OVCE's seeded streaming estimator (compexp's, ``thresholds="compexp"``: the
    same estimator, bit for bit), a pixel on where ``a > threshold``.

Where pyneuron deliberately differs by default (and why) is in the README's table
"OVCE step -> pyneuron option".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import PyneuronError

#: The search OVCE runs (``run_fast.py``: ``beam.compute_beam_explanations(length=3,
#: beam_size=5)`` of the compositional-explanations package, IoU over all pixels).
_OVCE_SEARCH = {
    "length": 3,
    "beam_size": 5,
    "operators": ("OR", "AND", "AND NOT"),
    "search": "beam",
    "mode": "dataset",
}
#: OVCE's masks: ``src/settings.py`` (mask shape 112 x 112), ``utils/segmentor_utils.py``.
_OVCE_MASKS = {"grid": 112, "semantics": "ovce", "upsample": "torch"}


@dataclass(frozen=True)
class Preset:
    """A named set of settings (keyword names of :func:`pyneuron.dissect`).

    Attributes
    ----------
    name
        What ``--preset`` / ``preset=`` takes.
    description
        One line: the method and where its settings come from.
    settings
        Setting name -> value: ``grid``, ``semantics`` (of
        :func:`pyneuron.concepts.segment`), ``quantile``, ``thresholds``, ``ranges``,
        ``ranges_method``, ``upsample`` and the :class:`~pyneuron.SearchSettings`
        fields ``length``, ``beam_size``, ``operators``, ``search``, ``mode``.

    Examples
    --------
    >>> preset = get_preset("ovce")
    >>> preset.settings["ranges"], preset.settings["beam_size"]
    (5, 5)
    >>> resolved, overrides = preset.apply({"length": 2, "grid": 112}, explicit={"length"})
    >>> resolved["length"], resolved["grid"], overrides
    (2, 112, {'length': 2})
    """

    name: str
    description: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))

    def apply(
        self, given: Mapping[str, Any], explicit: Collection[str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``given`` with the preset's settings in place of those not in ``explicit``.

        Returns the resolved values (every key of ``given`` and of the preset) and the
        overrides: the settings of the preset given explicitly with another value.
        """
        resolved = dict(given)
        overrides = {}
        for name, value in self.settings.items():
            if name in explicit and _normal(given.get(name)) != _normal(value):
                overrides[name] = given[name]
            elif name not in explicit:
                resolved[name] = value
        return resolved, overrides

    def summary(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """What a run records: the preset's name, its settings and the overrides."""
        return {
            "name": self.name,
            "description": self.description,
            "settings": {k: _normal(v) for k, v in self.settings.items()},
            "overrides": {k: _normal(v) for k, v in overrides.items()},
        }


def _normal(value: Any) -> Any:
    """Tuples as lists, so that settings compare and serialise alike."""
    return list(value) if isinstance(value, tuple) else value


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "ovce": Preset(
            "ovce",
            "OVCE (La Rosa & Gilpin 2025): per-group segmenter passes, nearest resize to "
            "112x112, 5 KMeans activation ranges (scikit-learn), torch bilinear upsampling, "
            "beam search of length 3, beam 5",
            {
                **_OVCE_MASKS,
                "ranges": 5,
                "ranges_method": "sklearn",
                **_OVCE_SEARCH,
            },
        ),
        "ovce-classic": Preset(
            "ovce-classic",
            "OVCE with one cluster (compositional explanations): per-group segmenter passes, "
            "nearest resize to 112x112, top-1 % thresholds from OVCE's seeded streaming "
            "estimator, torch bilinear upsampling, beam search of length 3, beam 5",
            {
                **_OVCE_MASKS,
                "ranges": None,
                "quantile": 0.01,
                "thresholds": "compexp",
                **_OVCE_SEARCH,
            },
        ),
    }
)


def get_preset(name: str | Preset) -> Preset:
    """The preset called ``name`` (a :class:`Preset` is returned as is).

    Examples
    --------
    >>> get_preset("ovce").settings["semantics"]
    'ovce'
    """
    if isinstance(name, Preset):
        return name
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise PyneuronError(
            f"unknown preset {name!r}; the presets are {', '.join(PRESETS)}"
        ) from None
