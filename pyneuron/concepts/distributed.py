"""Open-vocabulary segmentation on Ray: :func:`segment_on_ray` runs
:func:`~pyneuron.concepts.segment` over ranges of the images on the cluster's nodes and
concatenates the parts into the store one :func:`~pyneuron.concepts.segment` call over
all images writes, byte for byte (see :mod:`pyneuron.scale.parts` for how parts run, are
kept and are reused).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.grid import Grid
from ..engine.store import ConceptStore
from ..errors import PyneuronError
from ..scale.parts import Part, file_stamps, fingerprint_of, plan_parts, run_parts
from ..scale.ray import RayBackend, digest
from .segment import DEFAULT_FILLERS, SEMANTICS, segment
from .segmenters import as_segmenter
from .vocabulary import ConceptVocabulary

#: Entries of ``metadata["segment"]`` with one item per image, joined part after part.
PER_IMAGE_FIELDS = ("images", "image_files", "image_keys")
#: The entry of ``metadata["segment"]`` listing skipped images (``{"image": i, ...}``).
SKIPPED_FIELD = "skipped"
# Bump when what a segmentation part holds changes (earlier parts are then redone).
PART_FORMAT = 1


def _is_factory(segmenter: Any) -> bool:
    """Whether ``segmenter`` is a zero-argument callable that builds a segmenter (a
    class, a function, a ``functools.partial``), not a segmenter itself (those take
    ``(images, concepts)``)."""
    if isinstance(segmenter, (str, os.PathLike)) or not callable(segmenter):
        return False
    try:
        inspect.signature(segmenter).bind()
    except (TypeError, ValueError):  # arguments needed, or no signature (some builtins)
        return False
    return True


class SegmentPart:
    """Segments the images ``files[start:stop]`` into a store (a part's ``compute``).

    Sent once to every Ray actor; the segmenter (loaded from a model id on ``device`` in
    ``dtype``, built by a factory, or given) is built on the first part an actor runs
    and kept for the next ones.
    """

    def __init__(
        self,
        files: list[Path],
        concepts: Any,
        segmenter: Any,
        options: dict[str, Any],
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        self.files = files
        self.concepts = concepts
        self.segmenter = segmenter
        self.options = options
        self.device = device
        self.dtype = dtype
        self._built: Any = None

    def model(self) -> Any:
        """The segmenter, built once."""
        if self._built is None:
            made = self.segmenter() if _is_factory(self.segmenter) else self.segmenter
            self._built = as_segmenter(made, device=self.device, dtype=self.dtype)
        return self._built

    def __call__(self, start: int, stop: int, folder: Path) -> None:
        segment(
            self.files[start:stop],
            self.concepts,
            self.model(),
            out=folder / "store",
            progress=False,
            **self.options,
        )


def merge_segment_metadata(parts: Sequence[ConceptStore]) -> dict[str, Any]:
    """The metadata :func:`~pyneuron.concepts.segment` gives all images of ``parts``
    (stores segmented over consecutive image ranges): the per-image lists of
    ``metadata["segment"]`` (:data:`PER_IMAGE_FIELDS`) joined in order, the skipped
    images of every part with their image ids counted from the first image of all;
    everything else must be the same in every part.

    Raises
    ------
    PyneuronError
        Parts that were not segmented alike (another segmenter, vocabulary, grid...).

    Examples
    --------
    >>> import numpy as np
    >>> def part(files, skipped):
    ...     store = ConceptStore.from_masks(np.zeros((1, len(files), 2, 2), bool), ["x"])
    ...     store.metadata.update(source="segment", segment={"images": files, "skipped": skipped})
    ...     return store
    >>> merged = merge_segment_metadata([part(["a"], []), part(["b", "c"], [{"image": 1}])])
    >>> merged["segment"]
    {'images': ['a', 'b', 'c'], 'skipped': [{'image': 2}]}
    """
    metadata = [store.metadata for store in parts]
    if "segment" not in metadata[0]:
        raise PyneuronError("part 0 was not made by segment (its metadata has no 'segment')")
    for k, meta in enumerate(metadata):
        if _without_images(meta) != _without_images(metadata[0]):
            raise PyneuronError(
                f"part {k} was segmented otherwise than part 0 (their metadata differ beyond "
                "the image lists); segment every part with the same settings"
            )
    merged = copy.deepcopy(metadata[0])
    joined = merged["segment"]
    for field in PER_IMAGE_FIELDS:
        values = [meta["segment"].get(field) for meta in metadata]
        if field not in joined or all(v is None for v in values):
            continue
        for k, (store, items) in enumerate(zip(parts, values)):
            if not isinstance(items, list) or len(items) != store.grid.n_images:
                raise PyneuronError(
                    f"part {k} lists no {field!r} entry for each of its "
                    f"{store.grid.n_images} images"
                )
        joined[field] = copy.deepcopy([item for items in values for item in items])
    if SKIPPED_FIELD in joined:
        starts = np.cumsum([0] + [store.grid.n_images for store in parts]).tolist()
        joined[SKIPPED_FIELD] = [
            {**entry, "image": entry["image"] + start}
            for meta, start in zip(metadata, starts)
            for entry in copy.deepcopy(meta["segment"].get(SKIPPED_FIELD, []))
        ]
    return merged


def _without_images(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata`` without the per-image entries of its ``"segment"`` entry."""
    per_image = (*PER_IMAGE_FIELDS, SKIPPED_FIELD)
    segment = metadata.get("segment", {})
    return {**metadata, "segment": {k: v for k, v in segment.items() if k not in per_image}}


def segment_on_ray(
    files: Sequence[str | os.PathLike[str]],
    concepts: Any,
    segmenter: Any = "CIDAS/clipseg-rd64-refined",
    grid: int | tuple[int, int] = 112,
    batch_size: int = 8,
    *,
    mode: str = "argmax",
    threshold: float = 0.5,
    fillers: Sequence[str] = DEFAULT_FILLERS,
    semantics: str = "pyneuron",
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    on_error: str = "raise",
    device: Any = None,
    dtype: Any = None,
    workers: int = 0,
    backend: RayBackend | str = "ray",
    parts_dir: str | os.PathLike[str],
    part_images: int = 256,
    gpus_per_part: float | None = None,
    progress: bool = True,
) -> ConceptStore:
    """:func:`~pyneuron.concepts.segment` over image files on a Ray cluster: the same
    store, byte for byte, as ``segment(files, concepts, segmenter, grid, batch_size,
    ...)`` in one process.

    The images are cut into parts of ``part_images`` consecutive files; each part is
    segmented by ``segment(files[a:b], ...)`` on a node and written to ``parts_dir``;
    the driver then concatenates the parts (:meth:`ConceptStore.concatenate`) into
    ``out``, with the metadata of the one-process store
    (:func:`merge_segment_metadata`).

    Parameters
    ----------
    files
        The image files (image ``i`` of the store is ``files[i]``), on paths every node
        reads.
    concepts, grid, batch_size, mode, threshold, fillers, semantics, cache_dir, on_error, workers
        As for :func:`~pyneuron.concepts.segment` (``cache_dir``, if given, on a shared
        filesystem too; ``workers`` decode on each node). With ``part_images`` a multiple
        of ``batch_size`` (the default), the segmenter gets the batches of one process.
    segmenter
        What reaches the workers (pickled): a model id or directory (loaded on each
        worker), a picklable segmenter, or a zero-argument callable that builds one
        on the worker (a class, a ``functools.partial``; built once per worker). Parts
        are named by its fingerprint (:func:`~pyneuron.scale.parts.fingerprint_of`).
    device, dtype
        Where and in which precision each worker loads a segmenter given by model id
        (e.g. ``"cuda"`` with ``gpus_per_part``; see :func:`~pyneuron.concepts.segment`).
    out, overwrite
        Write the store to this directory (atomically); ``None`` keeps it in memory.
    backend
        ``"ray"``, a :class:`~pyneuron.RayBackend`, or ``"local"`` (parts in this process).
    parts_dir
        Where the parts are written, in a folder named by the inputs; a folder every
        node and the driver see (a shared filesystem). A rerun with the same inputs
        reuses the parts there (after a killed driver, only the missing ones are
        segmented); a part that fails to load is segmented again.
    part_images
        Images per part.
    gpus_per_part
        GPUs per Ray actor; by default 1 when the cluster has GPUs.
    progress
        Show a progress bar (of parts).

    Returns
    -------
    ConceptStore

    Raises
    ------
    PyneuronError
        As :func:`~pyneuron.concepts.segment`, raised with the worker's message; a
        cluster that cannot be reached or an unknown ``semantics``, before any image is
        segmented.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from PIL import Image
    >>> folder = Path(tempfile.mkdtemp())
    >>> files = []
    >>> for i in range(3):
    ...     Image.fromarray(np.full((4, 4, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    ...     files.append(folder / f"{i}.png")
    >>> def bright(images, concepts):  # "bright" where the image is light
    ...     level = [np.asarray(image)[0, 0, 0] / 255 for image in images]
    ...     return np.array(level, np.float32).reshape(-1, 1, 1, 1) * np.ones((1, 1, 4, 4))
    >>> store = segment_on_ray(files, ["bright"], bright, grid=4, mode="threshold",
    ...     threshold=0.3, backend="local", parts_dir=folder / "parts", part_images=2,
    ...     progress=False)
    >>> store.images_with("bright").tolist()
    [2]
    """
    files = [Path(f) for f in files]
    if not files:
        raise PyneuronError("no image files given")
    if semantics not in SEMANTICS:
        raise PyneuronError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    if (device is not None or dtype is not None) and not isinstance(segmenter, str):
        raise PyneuronError(
            "device and dtype apply to a segmenter given as a model id or directory, loaded "
            "on each worker; build other segmenters where they should run (a factory)"
        )
    options = {
        "grid": grid,
        "batch_size": batch_size,
        "mode": mode,
        "threshold": threshold,
        "fillers": tuple(fillers) if not isinstance(fillers, str) else (fillers,),
        "semantics": semantics,
        "cache_dir": cache_dir,
        "on_error": on_error,
        "workers": workers,
    }
    vocabulary = ConceptVocabulary.of(concepts)
    key = digest(
        "segment",
        PART_FORMAT,
        file_stamps(files),
        vocabulary,
        fingerprint_of(segmenter),
        sorted((k, repr(v)) for k, v in options.items() if k not in ("cache_dir", "workers")),
        repr(device),
        repr(dtype),
    )
    compute = SegmentPart(files, vocabulary, segmenter, options, device, dtype)
    run = run_parts(
        compute,
        _load_store,
        plan_parts(len(files), part_images, parts_dir, f"segment-{key}"),
        backend,
        gpus_per_part=gpus_per_part,
        progress=progress,
        desc="segment",
    )
    stores = run.results
    return ConceptStore.concatenate(stores, out, overwrite, metadata=merge_segment_metadata(stores))


def _load_store(part: Part) -> ConceptStore:
    """A part's store (its files checked by run_parts), on the part's images."""
    store = ConceptStore.open(part.path / "store", verify=False)
    expected = Grid(part.n_images, store.grid.height, store.grid.width)
    if store.grid != expected:
        raise PyneuronError(f"the part holds {store.grid}, not {part.n_images} images")
    return store
