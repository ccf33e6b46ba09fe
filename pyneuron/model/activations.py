"""Capturing layer activations from any PyTorch model (CNNs and vision transformers).

:func:`capture` runs the model once over the images with forward hooks on the asked
layers and returns, per layer, activations of shape (images, channels, h, w): CNN
feature maps as they are, channels-last maps transposed, and transformer token
sequences (B, T, D) with the class/register tokens dropped and the patch tokens folded
into their (h, w) grid (token i * w + j goes to row i, column j).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import resolve_device, resolve_dtype
from ..engine.atomic import write_atomically
from ..engine.batches import release_pages
from ..errors import PyneuronError
from ..image_files import list_images, open_image
from ..progress import progress_bar
from ..weights import weights_hash

ImageSource = Any  # DataLoader | Dataset | folder | list of PIL images | array


def _torch():
    try:
        import torch
    except ImportError as error:  # pragma: no cover - torch is a dependency
        raise ImportError("capturing activations needs PyTorch: pip install torch") from error
    return torch


# -- layers -----------------------------------------------------------------------------


def resolve_layers(model: Any, layers: str | Sequence[str]) -> dict[str, Any]:
    """Map layer names (as in ``model.named_modules()``) to modules; unknown names raise
    an error listing close matches."""
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise PyneuronError("no layers given; name at least one module, e.g. 'layer4'")
    modules = dict(model.named_modules())
    found = {}
    for name in names:
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise PyneuronError(
                f"model has no layer {name!r}{hint} (layer names are those of "
                "model.named_modules())"
            )
        found[name] = modules[name]
    return found


def _first_tensor(output: Any) -> Any:
    """The hidden-state tensor inside a module output (tensor, tuple, dict, ModelOutput)."""
    torch = _torch()
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "last_hidden_state" in output:
            return output["last_hidden_state"]
        values: Iterable[Any] = output.values()
    elif dataclasses.is_dataclass(output):
        values = (getattr(output, f.name) for f in dataclasses.fields(output))
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        values = ()
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    raise PyneuronError(f"layer output of type {type(output).__name__} holds no tensor")


def infer_prefix_tokens(n_tokens: int) -> int:
    """Smallest number of leading (class/register) tokens leaving a square patch grid."""
    for prefix in range(n_tokens):
        side = math.isqrt(n_tokens - prefix)
        if side * side == n_tokens - prefix:
            return prefix
    raise PyneuronError(f"cannot fold {n_tokens} tokens into a square grid")


@dataclasses.dataclass(frozen=True)
class LayerFormat:
    """How to turn one layer's output into (B, C, h, w) maps.

    Attributes
    ----------
    channels_last
        The output is (B, h, w, C) (e.g. ConvNeXt/Swin stages in some implementations).
    prefix_tokens
        For token outputs (B, T, D): leading tokens to drop (class, registers);
        ``None`` infers the smallest count leaving a square grid.
    grid
        For token outputs: the (h, w) patch grid when it is not square.
    """

    channels_last: bool = False
    prefix_tokens: int | None = None
    grid: tuple[int, int] | None = None


def to_maps(output: Any, fmt: LayerFormat = LayerFormat()) -> Any:
    """Convert a layer output tensor to (B, C, h, w) (see :class:`LayerFormat`)."""
    tensor = _first_tensor(output)
    if tensor.ndim == 4:
        return tensor.permute(0, 3, 1, 2) if fmt.channels_last else tensor
    if tensor.ndim == 3:  # tokens (B, T, D)
        n_tokens = tensor.shape[1]
        if fmt.grid is not None:
            h, w = fmt.grid
            prefix = n_tokens - h * w if fmt.prefix_tokens is None else fmt.prefix_tokens
        else:
            prefix = (
                infer_prefix_tokens(n_tokens) if fmt.prefix_tokens is None else fmt.prefix_tokens
            )
            h = w = math.isqrt(n_tokens - prefix)
        if prefix < 0 or n_tokens - prefix != h * w:
            raise PyneuronError(
                f"cannot fold {n_tokens} tokens with {prefix} prefix tokens into a {h}x{w} grid; "
                "pass LayerFormat(prefix_tokens=..., grid=(h, w))"
            )
        patches = tensor[:, prefix:, :]
        return patches.reshape(tensor.shape[0], h, w, tensor.shape[2]).permute(0, 3, 1, 2)
    if tensor.ndim == 2:  # pooled features (B, C): one "pixel" per unit
        return tensor[:, :, None, None]
    raise PyneuronError(f"cannot interpret a layer output of shape {tuple(tensor.shape)}")


# -- images -----------------------------------------------------------------------------


def _default_transform(image: Any) -> Any:
    torch = _torch()
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _apply_transform(transform: Callable[..., Any] | None, images: list[Any]) -> Any:
    """Batch tensor (B, 3, H, W) from PIL images via a transform or image processor."""
    torch = _torch()
    if transform is not None and hasattr(transform, "preprocess"):  # transformers processor
        return transform(images=images, return_tensors="pt")["pixel_values"]
    tensors = [(transform or _default_transform)(image) for image in images]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise PyneuronError(
            f"images of different sizes {sorted(shapes)}: give a transform that resizes them "
            "(e.g. torchvision.transforms.Resize) or the model's image processor"
        )
    return torch.stack(tensors)


def _batch_tensor(item: Any) -> Any:
    """The image tensor of a DataLoader batch: a tensor, (tensor, label), or a dict."""
    torch = _torch()
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, Mapping):
        for key in ("pixel_values", "image", "images", "input"):
            if key in item:
                return item[key]
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    raise PyneuronError(
        f"cannot find the image tensor in a batch of type {type(item).__name__}; yield tensors, "
        "(images, labels) tuples, or dicts with 'pixel_values'"
    )


def iterate_batches(
    images: ImageSource,
    batch_size: int,
    transform: Callable[..., Any] | None,
    skip: int = 0,
    *,
    workers: int = 0,
    pin_memory: bool = False,
) -> tuple[int | None, Iterator[Any]]:
    """(number of images if known, iterator of (B, 3, H, W) tensors), skipping ``skip`` images.

    With ``workers`` > 0, image files (a folder or a list of files) are read, decoded and
    transformed in that many worker processes (a ``DataLoader`` over whole batches, so
    the batches are the same as without workers), ahead of the model; ``pin_memory``
    pins them for a fast copy to a GPU.
    """
    torch = _torch()
    from torch.utils.data import DataLoader, Dataset

    if isinstance(images, DataLoader):
        total = len(images.dataset) if hasattr(images.dataset, "__len__") else None

        def from_loader() -> Iterator[Any]:
            seen = 0
            for item in images:
                batch = _batch_tensor(item)
                if seen + batch.shape[0] > skip:
                    yield batch[max(0, skip - seen) :]
                seen += batch.shape[0]

        return total, from_loader()
    files = image_files(images)
    if files is not None:
        load = _FileBatches(files, batch_size, skip, transform)
        if workers > 0:
            loader = DataLoader(
                load,
                batch_size=None,
                num_workers=workers,
                pin_memory=pin_memory,
                prefetch_factor=2,
            )
            return len(files), iter(loader)
        return len(files), (load[i] for i in range(len(load)))
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise PyneuronError(
                f"an image array must be (N, H, W, 3) or (N, 3, H, W), got {images.shape}"
            )
        channels_last = images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3)

        def convert(chunk: np.ndarray) -> Any:
            array = chunk.astype(np.float32) / 255.0 if chunk.dtype == np.uint8 else chunk
            tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            return tensor.permute(0, 3, 1, 2) if channels_last else tensor

        return len(images), _batched(images, batch_size, skip, convert)
    if isinstance(images, Dataset) or (
        hasattr(images, "__getitem__") and hasattr(images, "__len__")
    ):
        items = images

        def load(chunk_indices: range) -> Any:
            samples = [items[i] for i in chunk_indices]
            samples = [
                open_image(Path(s)) if isinstance(s, (str, os.PathLike)) else s for s in samples
            ]
            if (
                samples
                and not isinstance(samples[0], torch.Tensor)
                and hasattr(samples[0], "convert")
            ):
                return _apply_transform(transform, samples)  # PIL images
            tensors = [_batch_tensor(s) if not isinstance(s, torch.Tensor) else s for s in samples]
            if transform is not None:
                tensors = [transform(t) for t in tensors]
            return torch.stack(tensors)

        return len(items), _batched(range(len(items)), batch_size, skip, load)
    raise PyneuronError(
        f"unsupported images of type {type(images).__name__}: give a DataLoader, a Dataset, a "
        "folder, a list of PIL images or an array"
    )


def _batched(
    items: Sequence[Any], batch_size: int, skip: int, load: Callable[[Any], Any]
) -> Iterator[Any]:
    for start in range(skip, len(items), batch_size):
        yield load(items[start : start + batch_size])


def image_files(images: ImageSource) -> list[Path] | None:
    """The image files of ``images`` when it names files: a folder (its images, sorted by
    path) or a list of file paths; None for other sources (arrays, PIL images, loaders)."""
    if isinstance(images, (str, os.PathLike)):
        return list_images(images)
    if isinstance(images, (list, tuple)) and all(
        isinstance(item, (str, os.PathLike)) for item in images
    ):
        return [Path(item) for item in images]
    return None


class _FileBatches:
    """Batch ``i`` of image files (from image ``skip`` on), decoded and transformed: a
    map-style dataset of whole batches, for a ``DataLoader`` with worker processes."""

    def __init__(
        self,
        files: Sequence[Path],
        batch_size: int,
        skip: int,
        transform: Callable[..., Any] | None,
    ) -> None:
        self.files, self.batch_size, self.skip, self.transform = files, batch_size, skip, transform

    def __len__(self) -> int:
        return max(0, -(-(len(self.files) - self.skip) // self.batch_size))

    def __getitem__(self, i: int) -> Any:
        start = self.skip + i * self.batch_size
        chunk = self.files[start : start + self.batch_size]
        return _apply_transform(self.transform, [open_image(p) for p in chunk])


# -- capture ----------------------------------------------------------------------------


def _model_device_dtype(model: Any) -> tuple[Any, Any]:
    torch = _torch()
    for parameter in model.parameters():
        return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.float32


def _fingerprint(model: Any, images: ImageSource, settings: Sequence[Any]) -> str:
    """What a resumed capture must share with the interrupted one: the model's class and
    weights, the image files (or the number of images) and the capture's settings."""
    files = image_files(images)
    key = json.dumps(
        [
            type(model).__name__,
            weights_hash(model),
            [str(f) for f in files] if files is not None else None,
            *settings,
        ],
        default=repr,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _callable_name(function: Any) -> str | None:
    """``module.qualname`` of a units function (part of a capture's fingerprint)."""
    if function is None:
        return None
    name = getattr(function, "__qualname__", type(function).__qualname__)
    return f"{getattr(function, '__module__', '')}.{name}"


def _apply_units(function: Callable[[Any], Any] | None, maps: Any, layer: str) -> Any:
    """``function(maps)`` as (B, U, h, w): the units of a layer's (B, C, h, w) maps."""
    if function is None:
        return maps
    torch = _torch()
    try:
        units = function(maps)
    except Exception as error:
        raise PyneuronError(
            f"the units function of layer {layer!r} failed on maps of shape "
            f"{tuple(maps.shape)}: {error}"
        ) from error
    if not isinstance(units, torch.Tensor):
        raise PyneuronError(
            f"the units function of layer {layer!r} returned {type(units).__name__}; it must "
            "return a tensor (B, U, h, w) or (B, U)"
        )
    if units.ndim == 2:
        units = units[:, :, None, None]
    if units.ndim != 4 or units.shape[0] != maps.shape[0]:
        raise PyneuronError(
            f"the units function of layer {layer!r} turned maps {tuple(maps.shape)} into "
            f"{tuple(units.shape)}; it must keep the batch axis and return (B, U, h, w) or "
            "(B, U)"
        )
    return units


class _StopForward(Exception):
    """Raised by the last hook to skip the rest of the forward pass."""


class _DiskSink:
    """Activations streamed into .npy memmaps under ``out`` with a resumable progress file."""

    def __init__(self, out: Path, fingerprint: str, total: int | None) -> None:
        if total is None:
            raise PyneuronError("streaming to disk (out=...) needs images of known length")
        self.out, self.fingerprint, self.total = out, fingerprint, total
        out.mkdir(parents=True, exist_ok=True)
        self.progress_file = out / "capture.json"
        self.done = 0
        self.arrays: dict[str, np.memmap] = {}
        if self.progress_file.is_file():
            state = json.loads(self.progress_file.read_text())
            if state.get("fingerprint") == fingerprint:
                self.done = int(state["done"])
                for name in state["layers"]:
                    self.arrays[name] = np.lib.format.open_memmap(self._path(name), mode="r+")

    def _path(self, name: str) -> Path:
        return self.out / f"{name.replace('/', '_')}.npy"

    def write(self, name: str, start: int, maps: np.ndarray) -> None:
        if name not in self.arrays:
            shape = (self.total, *maps.shape[1:])
            self.arrays[name] = np.lib.format.open_memmap(
                self._path(name), mode="w+", dtype=np.float32, shape=shape
            )
        self.arrays[name][start : start + maps.shape[0]] = maps

    def commit(self, done: int) -> None:
        for array in self.arrays.values():
            array.flush()
            release_pages(array)  # written pages would otherwise stay resident
        state = {"fingerprint": self.fingerprint, "done": done, "layers": list(self.arrays)}
        write_atomically(self.progress_file, lambda p: p.write_text(json.dumps(state)))
        self.done = done

    def result(self) -> dict[str, np.ndarray]:
        return {name: np.load(self._path(name), mmap_mode="r") for name in self.arrays}


def capture(
    model: Any,
    layers: str | Sequence[str],
    images: ImageSource,
    *,
    batch_size: int = 32,
    device: Any = None,
    dtype: Any = None,
    transform: Callable[..., Any] | None = None,
    formats: Mapping[str, LayerFormat] | LayerFormat | None = None,
    units: Callable[[Any], Any] | Mapping[str, Callable[[Any], Any]] | None = None,
    workers: int = 0,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run ``model`` over ``images`` once and return each layer's activations.

    Parameters
    ----------
    model
        Any ``torch.nn.Module`` (torchvision CNN, transformers vision model, ...).
    layers
        Module names as in ``model.named_modules()``, e.g. ``"layer4"`` or
        ``"vit.encoder.layer.11"``; several layers share one pass.
    images
        A ``DataLoader`` (yielding tensors, (images, labels), or dicts with
        ``pixel_values``), a ``Dataset``, a folder of image files, a list of image files,
        a list of PIL images, or an array (N, H, W, 3) uint8 / (N, 3, H, W) float.
    batch_size
        Images per forward pass (ignored for DataLoaders).
    device, dtype
        Where and in which precision to run: ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
        ``"mps"``; ``"float32"``, ``"float16"``, ``"bfloat16"``. The model is moved (in
        place, as ``model.to`` does) when it is elsewhere; by default it runs where it
        is, in its own precision. A device this machine lacks raises
        :class:`~pyneuron.errors.PyneuronError`.
    transform
        Preprocessing of PIL images: a callable returning a (3, H, W) tensor, or a
        transformers image processor.
    formats
        :class:`LayerFormat` per layer (or one for all) for channels-last outputs and
        token grids; by default 4-D outputs are (B, C, h, w) and token outputs are
        folded with inferred prefix tokens.
    units
        What to explain instead of the layer's channels: a function (or one per layer)
        from the layer's maps, a (B, C, h, w) tensor on the model's device, to the
        units, (B, U, h, w) or (B, U) -- a sparse autoencoder's encoder, probe
        directions, a channel subset. It runs under ``torch.inference_mode``.
    workers
        Worker processes that read, decode and transform image files (a folder or a
        list of files) ahead of the model; 0 does it in this process. The batches are
        the same either way. With a CUDA device they come in pinned memory.
    out
        Directory to stream activations to (``<layer>.npy``, memory-mapped, written
        batch by batch without keeping them in memory). A rerun with the same model
        weights, images and arguments resumes after the last completed batch.
    progress
        Show a progress bar (on a terminal).

    Returns
    -------
    dict
        Layer name -> float32 array (N, U, h, w) (memory-mapped when ``out`` is given).

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU())
    >>> acts = capture(model, "1", torch.rand(5, 3, 16, 16).numpy(), progress=False)
    >>> acts["1"].shape
    (5, 4, 7, 7)
    >>> first_two = capture(model, "1", torch.rand(5, 3, 16, 16).numpy(), progress=False,
    ...                     units=lambda maps: maps[:, :2])
    >>> first_two["1"].shape
    (5, 2, 7, 7)
    """
    torch = _torch()
    modules = resolve_layers(model, layers)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PyneuronError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise PyneuronError(f"workers must be a non-negative integer, got {workers!r}")
    model_device, model_dtype = _model_device_dtype(model)
    device = resolve_device(device) if device is not None else model_device
    dtype = resolve_dtype(dtype, device) if dtype is not None else model_dtype
    if (device, dtype) != (model_device, model_dtype):
        model.to(device=device, dtype=dtype)
    layer_formats = {
        name: (
            formats
            if isinstance(formats, LayerFormat)
            else (formats or {}).get(name, LayerFormat())
        )
        for name in modules
    }
    layer_units = {
        name: units.get(name) if isinstance(units, Mapping) else units for name in modules
    }
    files = image_files(images)
    if files is not None:
        images = files  # a folder is listed once
    sink = None
    if out is not None:
        total, _ = iterate_batches(images, batch_size, transform)
        settings = [
            list(modules),
            total,
            batch_size,
            str(dtype),
            repr(sorted(layer_formats.items())),
            [_callable_name(f) for f in layer_units.values()],
        ]
        sink = _DiskSink(Path(out), _fingerprint(model, images, settings), total)
    start = sink.done if sink is not None else 0
    total, batches = iterate_batches(
        images,
        batch_size,
        transform,
        skip=start,
        workers=workers,
        pin_memory=device.type == "cuda",
    )
    collected: dict[str, list[np.ndarray]] = {name: [] for name in modules}
    current: dict[str, Any] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            current[name] = to_maps(output, layer_formats[name])
            if len(current) == len(modules):
                raise _StopForward  # nothing after the last asked layer is needed

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    seen = start
    try:
        with (
            torch.inference_mode(),
            progress_bar(
                total=total,
                initial=start,
                desc="capture",
                unit="img",
                enabled=progress,
            ) as bar,
        ):
            for batch in batches:
                current.clear()
                try:
                    model(batch.to(device=device, dtype=dtype, non_blocking=True))
                except _StopForward:
                    pass
                missing = [name for name in modules if name not in current]
                if missing:
                    raise PyneuronError(f"layers {missing} did not run in the model's forward pass")
                for name in modules:
                    maps = _apply_units(layer_units[name], current[name], name)
                    maps = maps.float().cpu().numpy()
                    if sink is not None:
                        sink.write(name, seen, maps)
                    else:
                        collected[name].append(maps)
                seen += batch.shape[0]
                if sink is not None:
                    sink.commit(seen)
                bar.update(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise PyneuronError("no images: the image source is empty")
    if sink is not None:
        return sink.result()
    return {name: np.concatenate(chunks) for name, chunks in collected.items()}
