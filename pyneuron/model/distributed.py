"""A model's layers turned into units on Ray: capture, exact thresholds, unit masks and
top images over parts of the images, equal to one process's result.

:func:`layer_units_on_ray` runs in two rounds of parts (contiguous image ranges, see
:mod:`pyneuron.scale.parts`), each on the cluster's nodes:

1. per part, the model (built on the worker by ``model_factory``) captures the layers'
   activations of the part's images (:func:`~pyneuron.model.activations.capture`) to
   files in the part's folder, and keeps per layer what the exact thresholds over *all*
   images need (:func:`~pyneuron.model.thresholds.quantile_part`) and each unit's top
   images of the part; the driver merges the thresholds exactly
   (:func:`~pyneuron.model.thresholds.merge_quantile_parts`) and the top images;
2. per part, the part's activations become unit masks with those thresholds
   (:func:`~pyneuron.engine.upsample.unit_masks_from_activations`), which the driver
   concatenates (:meth:`~pyneuron.UnitMasks.concatenate`).

The thresholds are always the exact quantile: compexp's randomized estimator
(``method="compexp"`` of :func:`~pyneuron.model.thresholds.quantile_thresholds`) depends
on the order in which it sees the values and cannot be merged from parts.

The activations stay in ``parts_dir`` between the rounds (and afterwards, so a rerun
reuses every part done): it must be a folder every node and the driver see (a shared
filesystem), large enough for the layers' activations of all images (float32).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.batches import image_batches
from ..engine.grid import Grid
from ..engine.units import UnitMasks
from ..engine.upsample import check_upsample, unit_masks_from_activations
from ..errors import PyneuronError
from ..scale.parts import Part, file_stamps, fingerprint_of, plan_parts, run_parts
from ..scale.ray import RayBackend, digest
from .activations import capture
from .layer_units import LayerUnits, top_activating_images
from .thresholds import QuantilePart, merge_quantile_parts, quantile_part

# Bump when what a part of either round holds changes (earlier parts are then redone).
PART_FORMAT = 1
#: The index of a round-1 part: per layer, its activation file and summary file.
LAYERS_FILE = "layers.json"

UnitsFunction = Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]]


@dataclass(frozen=True)
class LayerSummary:
    """What round 1 keeps of one layer in one part (read on the driver)."""

    activations: Path
    shape: tuple[int, ...]
    quantiles: QuantilePart
    top_peaks: np.ndarray
    top_images: np.ndarray


class CapturePart:
    """Round 1 of one part (a part's ``compute``): capture the layers, then per layer
    save the thresholds' share and the top images of the part. Sent once to every Ray
    actor; the model is built on the first part an actor runs and kept for the next."""

    def __init__(
        self,
        model_factory: Callable[[], Any],
        layers: list[str],
        files: list[Path],
        settings: dict[str, Any],
        quantile: float,
        top_k: int,
    ) -> None:
        self.model_factory = model_factory
        self.layers = layers
        self.files = files
        self.settings = settings
        self.quantile = quantile
        self.top_k = top_k
        self._model: Any = None

    def __call__(self, start: int, stop: int, folder: Path) -> None:
        if self._model is None:
            self._model = self.model_factory()
        acts = capture(
            self._model,
            self.layers,
            self.files[start:stop],
            out=folder / "activations",
            progress=False,
            **self.settings,
        )
        index = {}
        for k, layer in enumerate(self.layers):
            array = acts[layer]
            part = quantile_part(array, self.quantile, total_images=len(self.files))
            peaks = _peaks(array)
            rows = top_activating_images(peaks[:, :, None], self.top_k).T
            units = np.arange(peaks.shape[1])
            summary = f"layer{k}.npz"
            with open(folder / summary, "wb") as handle:
                np.savez(
                    handle,
                    **part.to_arrays(),
                    top_peaks=peaks[rows, units],
                    top_images=rows + start,
                )
            index[layer] = {
                "activations": Path(array.filename)
                .resolve()
                .relative_to(folder.resolve())
                .as_posix(),
                "summary": summary,
            }
        (folder / LAYERS_FILE).write_text(json.dumps(index))


def _peaks(activations: np.ndarray) -> np.ndarray:
    """(N, U) float64: each image's highest activation of each unit, read block by block."""
    n, units = activations.shape[:2]
    out = np.empty((n, units))
    for start, block in image_batches(activations):
        out[start : start + block.shape[0]] = block.reshape(block.shape[0], units, -1).max(axis=2)
    return out


def _load_summaries(layers: list[str], top_k: int) -> Callable[[Part], dict[str, LayerSummary]]:
    """The ``load`` of round 1: every layer's files of a part, checked."""

    def load(part: Part) -> dict[str, LayerSummary]:
        index = json.loads((part.path / LAYERS_FILE).read_text())
        if sorted(index) != sorted(layers):
            raise PyneuronError(f"the part holds layers {sorted(index)}, not {sorted(layers)}")
        found = {}
        for layer in layers:
            path = part.path / index[layer]["activations"]
            acts = np.load(path, mmap_mode="r", allow_pickle=False)
            if acts.dtype != np.float32 or acts.ndim != 4 or acts.shape[0] != part.n_images:
                raise PyneuronError(
                    f"{path} holds {acts.dtype} {acts.shape}, not float32 activations of "
                    f"{part.n_images} images (images, units, h, w)"
                )
            with np.load(part.path / index[layer]["summary"], allow_pickle=False) as data:
                quantiles = QuantilePart.from_arrays(data)
                peaks, images = data["top_peaks"], data["top_images"]
            kept = (min(top_k, part.n_images), acts.shape[1])
            if (
                quantiles.values.shape[0] != acts.shape[1]
                or quantiles.images != part.n_images
                or peaks.shape != kept
                or images.shape != kept
                or peaks.dtype != np.float64
                or images.dtype != np.int64
                or not ((images >= part.start) & (images < part.stop)).all()
            ):
                raise PyneuronError(f"the summary of layer {layer!r} does not fit its activations")
            found[layer] = LayerSummary(path, acts.shape, quantiles, peaks, images)
        return found

    return load


class MaskPart:
    """Round 2 of one part: the part's activations (from round 1) as unit masks."""

    def __init__(
        self,
        activations: dict[tuple[int, int], dict[str, Path]],
        thresholds: dict[str, np.ndarray],
        size: tuple[int, int],
        upsample: str,
    ) -> None:
        self.activations = activations
        self.thresholds = thresholds
        self.size = size
        self.upsample = upsample

    def __call__(self, start: int, stop: int, folder: Path) -> None:
        for k, (layer, path) in enumerate(self.activations[start, stop].items()):
            unit_masks_from_activations(
                np.load(path, mmap_mode="r", allow_pickle=False),
                self.thresholds[layer],
                self.size,
                upsample=self.upsample,
                path=folder / f"masks{k}",
                progress=False,
            )


def _load_masks(
    layers: list[str], units: dict[str, int], size: tuple[int, int]
) -> Callable[[Part], dict[str, UnitMasks]]:
    """The ``load`` of round 2: every layer's unit masks of a part, checked."""

    def load(part: Part) -> dict[str, UnitMasks]:
        found = {}
        for k, layer in enumerate(layers):
            masks = UnitMasks.open(part.path / f"masks{k}", verify=False)
            if masks.grid != Grid(part.n_images, *size) or len(masks) != units[layer]:
                raise PyneuronError(
                    f"the masks of layer {layer!r} are {len(masks)} units on {masks.grid}, not "
                    f"{units[layer]} on {part.n_images} images of {size}"
                )
            found[layer] = masks
        return found

    return load


def _merge_top(summaries: list[LayerSummary], k: int) -> np.ndarray:
    """(U, k) top images over all parts: the parts' candidates in image order, merged as
    :func:`~pyneuron.model.layer_units.top_activating_images` orders them (higher peak
    first, ties: lower image first)."""
    peaks = np.concatenate([s.top_peaks for s in summaries])
    images = np.concatenate([s.top_images for s in summaries])
    rows = top_activating_images(peaks[:, :, None], k)
    return images[rows, np.arange(peaks.shape[1])[:, None]]


def layer_units_on_ray(
    model_factory: Callable[[], Any],
    layers: str | Sequence[str],
    files: Sequence[str | os.PathLike[str]],
    *,
    size: tuple[int, int],
    transform: Callable[..., Any] | None = None,
    batch_size: int = 32,
    quantile: float = 0.005,
    top_k: int = 8,
    upsample: str = "pillow",
    units: UnitsFunction | None = None,
    device: Any = None,
    dtype: Any = None,
    backend: RayBackend | str = "ray",
    parts_dir: str | os.PathLike[str],
    part_images: int = 256,
    gpus_per_part: float | None = None,
    masks_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, LayerUnits]:
    """Thresholds, unit masks and top images of a model's layers over image files,
    computed on a Ray cluster, equal to one process's.

    With ``acts = capture(model_factory(), layers, files, transform=transform,
    batch_size=batch_size, units=units)``, each layer's result equals, bit for bit and
    byte for byte once saved, ``quantile_thresholds(acts[layer], quantile)`` (the exact
    quantile, ``threshold_method="exact"``), ``unit_masks_from_activations(acts[layer],
    thresholds, size, upsample=upsample)`` and ``top_activating_images(acts[layer],
    top_k)``, provided the model gives an image the same activations whatever the other
    images of its batch (``part_images`` a multiple of ``batch_size``, the default, gives
    every part the batches of one process). See the module docstring for the two rounds.

    Parameters
    ----------
    model_factory
        A zero-argument callable building the model (picklable: it is sent to the
        workers, e.g. a module-level function); called once per worker. Parts are named
        by its fingerprint (:func:`~pyneuron.scale.parts.fingerprint_of`): give it a
        ``fingerprint`` attribute that changes with the weights, or use a new
        ``parts_dir`` when they change.
    layers
        Module names, as for :func:`~pyneuron.model.activations.capture`.
    files
        The image files (image ``i`` is ``files[i]``), on paths every node reads.
    size
        The concept grid's (height, width).
    transform, batch_size, device, dtype
        As for :func:`~pyneuron.model.activations.capture` (``device="cuda"`` with GPUs).
    quantile
        Top share of each unit's activations above its threshold.
    top_k
        Top images kept per unit.
    upsample
        How unit maps are resized to the grid: ``"pillow"`` (compexp's) or ``"torch"``
        (OVCE's); see :func:`~pyneuron.engine.upsample.unit_masks_from_activations`.
    units
        What to explain instead of the layers' channels: a picklable function (or one per
        layer) from a layer's (B, C, h, w) maps to (B, U, h, w) units (see ``units`` of
        :func:`~pyneuron.model.activations.capture`).
    backend
        ``"ray"``, a :class:`~pyneuron.RayBackend`, or ``"local"`` (parts in this process).
    parts_dir
        Where both rounds write their parts (activations included); a folder every node
        and the driver see. A rerun with the same inputs reuses every part there.
    part_images
        Images per part.
    gpus_per_part
        GPUs per Ray actor; by default 1 when the cluster has GPUs.
    masks_dir
        Write each layer's unit masks to ``masks_dir/<layer>`` (streamed, atomic,
        replacing earlier unit masks there) instead of keeping them in memory.
    progress
        Show progress bars (of parts).

    Returns
    -------
    dict
        Layer name -> :class:`~pyneuron.model.layer_units.LayerUnits`.

    Raises
    ------
    PyneuronError
        Bad arguments, a cluster that cannot be reached (before any image is read), or
        a part that fails on a worker (with the worker's message).

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np, torch
    >>> from PIL import Image
    >>> folder = Path(tempfile.mkdtemp())
    >>> files = [folder / f"{i}.png" for i in range(4)]
    >>> for i, f in enumerate(files):
    ...     Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(f)
    >>> def build():
    ...     torch.manual_seed(0)
    ...     return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.ReLU())
    >>> result = layer_units_on_ray(build, "1", files, size=(6, 6), quantile=0.1,
    ...     top_k=2, backend="local", parts_dir=folder / "parts", part_images=2,
    ...     progress=False)
    >>> result["1"].thresholds.shape, result["1"].top_images.shape
    ((2,), (2, 2))
    """
    upsample = check_upsample(upsample)
    names = [layers] if isinstance(layers, str) else list(layers)
    files = [Path(f) for f in files]
    if not names:
        raise PyneuronError("no layers given; name at least one module, e.g. 'layer4'")
    if not files:
        raise PyneuronError("no image files given")
    settings = {
        "batch_size": batch_size,
        "transform": transform,
        "units": units,
        "device": device,
        "dtype": dtype,
    }
    key = digest(
        "layer-units",
        PART_FORMAT,
        file_stamps(files),
        names,
        fingerprint_of(model_factory),
        sorted((k, fingerprint_of(v)) for k, v in settings.items()),
        repr(float(quantile)),
        top_k,
    )
    first = run_parts(
        CapturePart(model_factory, names, files, settings, quantile, top_k),
        _load_summaries(names, top_k),
        plan_parts(len(files), part_images, parts_dir, f"capture-{key}"),
        backend,
        gpus_per_part=gpus_per_part,
        progress=progress,
        desc="capture",
    )
    thresholds, top_images, shapes_of = {}, {}, {}
    for layer in names:
        summaries = [part[layer] for part in first.results]
        shapes = {s.shape[1:] for s in summaries}
        if len(shapes) > 1:
            raise PyneuronError(
                f"layer {layer!r} gave activations of shapes {sorted(shapes)} in different "
                "parts; the model must give every image the same (units, h, w)"
            )
        thresholds[layer] = merge_quantile_parts([s.quantiles for s in summaries])
        top_images[layer] = _merge_top(summaries, top_k)
        shapes_of[layer] = summaries[0].shape[1:]

    activations = {
        (p.start, p.stop): {layer: first.results[p.index][layer].activations for layer in names}
        for p in first.parts
    }
    grid_size = (int(size[0]), int(size[1]))
    masks_key = digest(key, size, upsample, *(thresholds[layer] for layer in names))
    second = run_parts(
        MaskPart(activations, thresholds, grid_size, upsample),
        _load_masks(names, {layer: shape[0] for layer, shape in shapes_of.items()}, grid_size),
        plan_parts(len(files), part_images, parts_dir, f"masks-{masks_key}"),
        backend,
        gpus_per_part=0,
        progress=progress,
        desc="unit masks",
    )
    result = {}
    for layer in names:
        path = Path(masks_dir) / layer if masks_dir is not None else None
        masks = UnitMasks.concatenate([part[layer] for part in second.results], path, True)
        result[layer] = LayerUnits(
            thresholds[layer], masks, top_images[layer], "exact", tuple(shapes_of[layer][1:])
        )
    return result
