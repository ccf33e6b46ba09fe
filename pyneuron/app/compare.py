"""``pyneuron compare``: the explanations of two runs side by side, e.g. the same model
dissected on human-annotated and on segmenter-made concept masks (OVCE's question: how do
explanations change with the concept source?). The measures are
:mod:`pyneuron.report.compare`'s; this module reads the runs and matches their images.

Images are matched, in this order of preference:

1. ``files``: both runs list the same image files (``config.toml``'s ``image_files``);
2. ``content``: by content key (the BLAKE2b hash of each file,
   :func:`pyneuron.image_files.image_file_key`): recorded in a segmented store
   (``metadata["segment"]["image_keys"]``) or read from the run's image files when
   they all exist; a demo run's synthetic images are keyed by its demo settings;
3. ``path``: by the paths of the image files both runs list;
4. ``position``: image ``i`` with image ``i``, when neither run records its images any
   other way and both hold as many.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..engine.atomic import OutputKind, commit_directory, refuse_existing, temporary_sibling
from ..engine.store import ConceptStore
from ..errors import PyneuronError
from ..image_files import image_file_key
from ..report.compare import concept_agreement, formula_agreement, layer_agreement
from .rundir import open_run_store, read_config, read_results

#: What ``pyneuron compare`` writes (``--overwrite`` replaces only this).
COMPARISON_KIND = OutputKind("pyneuron comparison", lambda path: (path / "compare.html").is_file())


@dataclass(frozen=True)
class _ImageMatch:
    """Images two runs share: ``ids_a[k]`` of run A is ``ids_b[k]`` of run B, matched
    ``by`` ``"files"``, ``"content"``, ``"path"`` or ``"position"`` (see the module
    docstring)."""

    ids_a: np.ndarray
    ids_b: np.ndarray
    by: str


@dataclass(frozen=True)
class _Run:
    """A run directory's results, config and concept store."""

    path: Path
    label: str
    results: pd.DataFrame
    settings: dict[str, Any]
    store: ConceptStore

    @classmethod
    def open(
        cls,
        run: str | os.PathLike[str],
        store: ConceptStore | str | os.PathLike[str] | None,
        label: str,
    ) -> _Run:
        path = Path(run)
        try:
            results = read_results(path)
            settings = read_config(path)
        except PyneuronError as error:
            raise PyneuronError(f"run {label}: {error}") from None
        try:
            if store is None:
                store = open_run_store(path, settings)
            elif not isinstance(store, ConceptStore):
                store = ConceptStore.open(store)
        except PyneuronError as error:
            option = f"--concepts-{label.lower()} (store_{label.lower()}=)"
            raise PyneuronError(
                f"run {label} ({path}): {error}. Give its concept store with {option}"
            ) from None
        files = settings.get("image_files")
        if files is not None and len(files) != store.grid.n_images:
            raise PyneuronError(
                f"run {label} ({path}) lists {len(files)} images but its concept store covers "
                f"{store.grid.n_images}: give the store the run was explained on"
            )
        return cls(path, label, results, settings, store)

    @property
    def files(self) -> list[str] | None:
        files = self.settings.get("image_files")
        return None if files is None else [str(f) for f in files]

    def content_keys(self) -> list[str] | None:
        """The run's images by content (see the module docstring), or None."""
        n = self.store.grid.n_images
        if "demo" in self.settings:
            demo = json.dumps(self.settings["demo"], sort_keys=True)
            return [f"demo {demo} #{i}" for i in range(n)]
        segment = self.store.metadata.get("segment")
        keys = segment.get("image_keys") if isinstance(segment, dict) else None
        if isinstance(keys, list) and len(keys) == n and all(isinstance(k, str) for k in keys):
            return keys
        files = self.files
        if files is not None and all(Path(f).is_file() for f in files):
            return [image_file_key(f) for f in files]
        return None


def _match_images(a: _Run, b: _Run) -> _ImageMatch:
    """The images two runs share (see the module docstring)."""
    if a.files is not None and a.files == b.files:
        everything = np.arange(len(a.files), dtype=np.int64)
        return _ImageMatch(everything, everything, "files")
    keys_a = a.content_keys()
    keys_b = b.content_keys() if keys_a is not None else None
    if keys_a is not None and keys_b is not None:
        return _by_key(keys_a, keys_b, "content")
    if a.files is not None and b.files is not None:
        return _by_key(a.files, b.files, "path")
    n_a, n_b = a.store.grid.n_images, b.store.grid.n_images
    if n_a != n_b:
        raise PyneuronError(
            f"cannot tell which images runs A and B share: they record no image files or "
            f"content keys, and hold {n_a} and {n_b} images"
        )
    everything = np.arange(n_a, dtype=np.int64)
    return _ImageMatch(everything, everything, "position")


def _by_key(keys_a: Sequence[str], keys_b: Sequence[str], by: str) -> _ImageMatch:
    """Images of equal keys, in run A's order (the first of repeated keys)."""
    first_b: dict[str, int] = {}
    for j, key in enumerate(keys_b):
        first_b.setdefault(key, j)
    seen: set[str] = set()
    pairs = []
    for i, key in enumerate(keys_a):
        if key in first_b and key not in seen:
            seen.add(key)
            pairs.append((i, first_b[key]))
    if not pairs:
        raise PyneuronError(f"runs A and B share no images (matched by {by})")
    ids = np.array(pairs, dtype=np.int64)
    return _ImageMatch(ids[:, 0], ids[:, 1], by)


def lexicon_of(source: Any, *, min_depth: int | None = None) -> Any:
    """A :class:`~pyneuron.concepts.lexicon.Lexicon` from a WN-LMF file or a lexicon
    name of wn's database (``oewn:2024``); a lexicon object is returned as it is."""
    from ..concepts.lexicon import DEFAULT_MIN_DEPTH, Lexicon

    if not isinstance(source, (str, os.PathLike)):
        return source
    depth = DEFAULT_MIN_DEPTH if min_depth is None else min_depth
    if Path(source).is_file():
        return Lexicon.from_file(source, min_depth=depth)
    return Lexicon(str(source), min_depth=depth)


def compare_runs(
    run_a: str | os.PathLike[str],
    run_b: str | os.PathLike[str],
    *,
    lexicon: Any = None,
    store_a: ConceptStore | str | os.PathLike[str] | None = None,
    store_b: ConceptStore | str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compare the explanations of two runs unit by unit.

    Parameters
    ----------
    run_a, run_b
        Run directories (``pyneuron dissect``, ``explain`` or ``demo``).
    lexicon
        A :class:`~pyneuron.concepts.lexicon.Lexicon`, a WN-LMF file or a lexicon name
        of wn's database: concept names are also compared through their lowest
        meaningful common hypernyms (the ``hypernym_*`` columns).
    store_a, store_b
        The concept store of a run (a store or its directory), when not its own or the
        one its ``config.toml`` names.
    progress
        Show progress.

    Returns
    -------
    units, layers
        :func:`~pyneuron.report.compare.formula_agreement` and
        :func:`~pyneuron.report.compare.layer_agreement` tables; ``units.attrs["images"]``
        says how many images the runs share and how they were matched.

    Raises
    ------
    PyneuronError
        A run lacks results, a config or a concept store (the message names what is
        missing), the stores are on grids of other sizes, the runs share no image, or
        their formulas name concepts their stores lack.
    """
    first, second = _Run.open(run_a, store_a, "A"), _Run.open(run_b, store_b, "B")
    return _agreement(first, second, _match_images(first, second), lexicon_of(lexicon), progress)


def _agreement(
    first: _Run, second: _Run, images: _ImageMatch, lexicon: Any, progress: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    units = formula_agreement(
        first.results,
        second.results,
        first.store,
        second.store,
        images=(images.ids_a, images.ids_b),
        lexicon=lexicon,
        progress=progress,
    )
    units.attrs["images"] = {"shared": int(images.ids_a.shape[0]), "matched_by": images.by}
    return units, layer_agreement(units)


def write_comparison(
    run_a: str | os.PathLike[str],
    run_b: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    lexicon: Any = None,
    store_a: ConceptStore | str | os.PathLike[str] | None = None,
    store_b: ConceptStore | str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Compare two runs (:func:`compare_runs`) and write the comparison to ``out``:
    ``compare.csv`` (per unit), ``layers.csv`` (per layer), ``concepts.csv`` (the
    agreement of the two concept stores per shared concept,
    :func:`~pyneuron.report.compare.concept_agreement`) and ``compare.html``. The
    directory appears complete or not at all; ``overwrite`` replaces an earlier
    comparison only. Returns the path of ``compare.html``.
    """
    from ..report.html import write_comparison_page

    out = Path(out)
    refuse_existing(out, overwrite, COMPARISON_KIND, "--overwrite")
    first, second = _Run.open(run_a, store_a, "A"), _Run.open(run_b, store_b, "B")
    images = _match_images(first, second)
    chosen = lexicon_of(lexicon)
    units, layers = _agreement(first, second, images, chosen, progress)
    concepts = concept_agreement(
        first.store, second.store, images=(images.ids_a, images.ids_b), progress=progress
    )
    facts = [
        ("run A", str(first.path)),
        ("run B", str(second.path)),
        ("shared images", f"{images.ids_a.shape[0]} (matched by {images.by})"),
        ("concepts in both stores", str(len(concepts))),
    ]
    if chosen is not None:
        facts.append(("lexicon", repr(chosen)))
    staging = temporary_sibling(out)
    try:
        units.to_csv(staging / "compare.csv", index=False)
        layers.to_csv(staging / "layers.csv", index=False)
        concepts.to_csv(staging / "concepts.csv", index=False)
        write_comparison_page(staging / "compare.html", units, layers, concepts, facts=facts)
        commit_directory(staging, out, overwrite, COMPARISON_KIND)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / "compare.html"
