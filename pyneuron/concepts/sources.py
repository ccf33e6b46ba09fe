"""Resolving a concept source given on the command line to a store and its images."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ..engine.store import ConceptStore
from ..errors import PyneuronError
from ..image_files import image_file_key, list_images
from .sets import concept_set, parse_set_spec

SEGMENTER_KINDS = ("clipseg", "grounding-dino", "owlv2", "sam3")


def make_segmenter(spec: str | None = None, *, device: Any = None, dtype: Any = None) -> Any:
    """Load the segmenter a command line names.

    Parameters
    ----------
    spec
        ``kind:model`` (``clipseg:DIR``, ``grounding-dino:DET,SAM``, ``owlv2:DET,SAM``,
        ``sam3:DIR``), a plain model id or directory (SAM 3 if its config says so, else
        CLIPSeg), or ``None`` for the default CLIPSeg model.
    device, dtype
        Where and in which precision to run it (see
        :func:`pyneuron.devices.resolve_device` and ``resolve_dtype``);
        ``None``: CUDA in float16 when available, else the CPU in float32.

    Returns
    -------
    Segmenter
        The loaded adapter.

    Raises
    ------
    PyneuronError
        A malformed spec, a device this machine lacks or an unknown dtype (both before
        any model loads), a model that cannot be loaded.
    """
    from . import segmenters

    placement = {"device": device, "dtype": dtype}
    if spec is None:
        return segmenters.CLIPSegSegmenter.from_pretrained(segmenters.DEFAULT_CLIPSEG, **placement)
    kind, sep, models = spec.partition(":")
    if not sep or kind not in SEGMENTER_KINDS:
        return segmenters.as_segmenter(spec, **placement)
    if kind == "clipseg":
        return segmenters.CLIPSegSegmenter.from_pretrained(models, **placement)
    if kind == "sam3":
        return segmenters.Sam3Segmenter.from_pretrained(
            models or segmenters.DEFAULT_SAM3, **placement
        )
    detector, _, sam = models.partition(",")
    if not sam:
        raise PyneuronError(f"segmenter {spec!r}: give the detector and SAM as {kind}:DET,SAM")
    adapter = (
        segmenters.GroundingDinoSamSegmenter
        if kind == "grounding-dino"
        else segmenters.Owlv2SamSegmenter
    )
    return adapter.from_pretrained(detector, sam, **placement)


def resolved_segmenter_spec(spec: str | None) -> str | None:
    """``spec`` (as for :func:`make_segmenter`) with the model directories in it made
    absolute; model ids of the Hugging Face cache are kept as given."""
    if spec is None:
        return None
    kind, sep, models = spec.partition(":")
    if not sep or kind not in SEGMENTER_KINDS:
        kind, models = "", spec
    parts = [str(Path(m).resolve()) if Path(m).is_dir() else m for m in models.split(",")]
    return (f"{kind}:" if kind else "") + ",".join(parts)


def resolved_concepts_spec(source: str | os.PathLike[str]) -> str:
    """``source`` (as for :func:`open_concepts`) for a run's ``config.toml``: a path made
    absolute, a concept set kept as named (the folder of ``set:broden:PATH`` made
    absolute).

    Examples
    --------
    >>> resolved_concepts_spec("set:ade20k-150")
    'set:ade20k-150'
    """
    spec = parse_set_spec(source)
    if spec is None:
        return str(Path(source).expanduser().resolve())
    name, argument = spec
    if name == "broden" and argument is not None:
        return f"set:broden:{Path(argument).expanduser().resolve()}"
    return os.fspath(source)


def open_concepts(
    source: str | os.PathLike[str],
    *,
    images: str | os.PathLike[str] | None = None,
    grid: int = 112,
    subset: str | None = None,
    categories: list[str] | None = None,
    segmenter: str | None = None,
    semantics: str = "pyneuron",
    device: Any = None,
    dtype: Any = None,
    workers: int = 0,
    backend: Any = None,
    parts_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[ConceptStore, list[Path], bool]:
    """(store, probing image files in store order, whether the store was built here).

    ``source`` is a store directory, a Broden-format folder (``index.csv``), or a concept
    list file (``.txt`` / ``.toml``) or a ready-made concept set (``set:NAME[:ARG]``, see
    :mod:`pyneuron.concepts.sets`; ``categories`` filters a ``set:broden:PATH``) segmented
    over ``images`` by ``segmenter`` (a spec
    as for :func:`make_segmenter`, loaded on ``device`` in ``dtype``) with ``semantics``
    (``"pyneuron"`` or ``"ovce"``), ``workers`` processes decoding the images (see
    :func:`pyneuron.concepts.segment`). ``segmenter``, ``semantics``, ``device``,
    ``dtype`` and ``workers`` are used only to segment a concept list. With
    ``backend`` (a :class:`~pyneuron.RayBackend`) the list is segmented on the cluster,
    in parts of the images written to ``parts_dir``
    (:func:`~pyneuron.concepts.distributed.segment_on_ray`: the same store).
    """
    path = Path(source)
    if (path / "manifest.json").is_file():
        if images is None:
            raise PyneuronError("a concept store needs --images: the folder of its probing images")
        store = ConceptStore.open(path)
        files = list_images(images)
        check_image_order(store, files)
        return store, files, False
    if (path / "index.csv").is_file():
        from . import broden, broden_images

        store = broden(path, categories, subset, grid, progress=progress)
        return store, broden_images(path, categories, subset), True
    set_spec = parse_set_spec(source)
    if set_spec is not None or (path.is_file() and path.suffix in (".txt", ".toml")):
        if images is None:
            raise PyneuronError("segmenting a concept list needs --images")
        from . import load_vocabulary, segment

        files = list_images(images)
        # a bad list fails before a model loads
        if set_spec is None:
            vocabulary = load_vocabulary(path)
        else:
            options = {"categories": categories} if categories else {}
            vocabulary = concept_set(os.fspath(source), **options)
        if backend is not None:
            from .distributed import segment_on_ray

            if parts_dir is None:
                raise PyneuronError("segmenting on Ray needs parts_dir: a folder every node sees")
            build = functools.partial(make_segmenter, segmenter, device=device, dtype=dtype)
            store = segment_on_ray(
                files,
                vocabulary,
                build,
                grid=grid,
                semantics=semantics,
                workers=workers,
                backend=backend,
                parts_dir=parts_dir,
                progress=progress,
            )
        else:
            model = make_segmenter(segmenter, device=device, dtype=dtype)
            store = segment(
                files,
                vocabulary,
                model,
                grid=grid,
                semantics=semantics,
                workers=workers,
                progress=progress,
            )
        if set_spec is not None:
            store.metadata["concept_set"] = os.fspath(source)
        return store, files, True
    if not path.exists():
        raise PyneuronError(f"no store at {path}: the concept source does not exist")
    raise PyneuronError(
        f"{path} is not a concept source: give a store directory, a Broden folder (index.csv), "
        "a concept list (.txt/.toml) or a concept set (set:NAME[:ARG], e.g. set:ade20k-150)"
    )


def _same_image(name: str, file: Path) -> bool:
    """Whether the store's image ``name`` (a path relative to its image folder, an
    absolute path, a file name or a stem, by concept source) names ``file``."""
    recorded = PurePosixPath(name.replace("\\", "/"))
    if recorded.is_absolute():
        return recorded.name == file.name
    parts = recorded.parts
    return any(
        tuple(candidate.parts[-len(parts) :]) == parts for candidate in (file, file.with_suffix(""))
    )


def check_image_order(store: ConceptStore, files: Sequence[Path]) -> None:
    """Raise unless ``files`` are the store's probing images in the store's order.

    Stores record their images (``store.metadata["images"]``: Broden, segmentation,
    mask folders, label maps, COCO); each file must carry the recorded name, and where
    the store also holds a content hash per image (stores built by
    :func:`pyneuron.concepts.segment` from files) each file's bytes must match it. A
    store without either (built from arrays) is not checked.

    Raises
    ------
    PyneuronError
        Naming the first image that differs, and what to do.
    """
    segment = store.metadata.get("segment")
    segment = segment if isinstance(segment, dict) else {}
    names = store.metadata.get("images", segment.get("images"))
    if isinstance(names, list) and names and len(names) == len(files):
        for i, (name, file) in enumerate(zip(names, files)):
            if not _same_image(str(name), Path(file)):
                raise PyneuronError(
                    f"image {i} of the folder is {file}, but image {i} of the concept store is "
                    f"{name!r}: the images must be the store's probing images in its order "
                    "(sorted by path); give the folder the store was built from"
                )
    keys = segment.get("image_keys")
    if isinstance(keys, list) and len(keys) == len(files):
        for i, (key, file) in enumerate(zip(keys, files)):
            if key is not None and image_file_key(file) != key:
                raise PyneuronError(
                    f"image {i} ({file}) is not the image the concept store was segmented "
                    "from (its content differs); give the folder the store was built from, "
                    "unchanged"
                )
