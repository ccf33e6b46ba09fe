"""Building models and their input transforms from a command-line specification."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PyneuronError
from ..weights import weights_hash

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_FORMS = (
    "give a transformers model directory (with config.json), 'path/to/file.py:function' or "
    "'module:function' returning a torch.nn.Module, or a torchvision model name (resnet18)"
)


def load_model(spec: str, weights: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """Build a model (in eval mode) and its image processor (or None) from ``spec``:

    - a directory holding a transformers model (``config.json``): loaded with
      ``AutoModel.from_pretrained`` (no download) with its image processor if saved;
      of a dual-encoder model (CLIP, SigLIP: ``vision_model`` and ``text_model``) only
      the vision tower is kept (:func:`vision_tower`), under the same layer names;
    - ``module:function`` or ``path/to/file.py:function``: the function's return value;
    - a torchvision model name (``resnet18``), randomly initialized unless ``weights``
      names a state-dict file.

    ``weights`` (a state-dict file) is loaded into the model in every case.
    """
    processor = None
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PyneuronError(f"{spec} is a directory but holds no transformers config.json")
        import transformers

        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            processor = None
        if hasattr(model, "vision_model") and hasattr(model, "text_model"):
            model = vision_tower(model)
    elif ":" in spec:
        try:
            model = load_object(spec)()
        except PyneuronError:
            raise
        except Exception as error:
            raise PyneuronError(f"{spec}() failed: {error}") from error
    elif _looks_like_a_path(spec):
        raise PyneuronError(f"model {spec} does not exist: {MODEL_FORMS}")
    else:
        try:
            import torchvision
        except ImportError:
            raise PyneuronError(
                f"cannot build model {spec!r}: it is not a directory or 'module:function', and "
                "torchvision (for model names) is not installed"
            ) from None
        try:
            model = torchvision.models.get_model(spec, weights=None)
        except ValueError:
            raise PyneuronError(
                f"{spec!r} is neither a path nor a torchvision model name: {MODEL_FORMS}"
            ) from None
    if weights is not None:
        import torch

        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(
                state.get("state_dict", state) if isinstance(state, dict) else state
            )
        except (OSError, RuntimeError, KeyError) as error:
            raise PyneuronError(f"cannot load weights {weights} into {spec}: {error}") from None
    if not hasattr(model, "named_modules"):
        raise PyneuronError(f"{spec} did not give a torch.nn.Module (got {type(model).__name__})")
    return model.eval(), processor


def load_object(spec: str) -> Any:
    """The object named by ``module:name`` or ``path/to/file.py:name`` (a model factory,
    a units function).

    Examples
    --------
    >>> load_object("math:sqrt")(9.0)
    3.0
    """
    module_name, colon, name = spec.rpartition(":")
    if not colon or not module_name or not name:
        raise PyneuronError(f"{spec!r} is not 'module:name' or 'path/to/file.py:name'")
    module = _import(module_name)
    if not hasattr(module, name):
        raise PyneuronError(f"{module_name} has no {name!r}")
    return getattr(module, name)


def units_function(spec: str) -> Any:
    """The units function named by ``module:function`` (``--units``): it maps a layer's
    activations (B, C, h, w) to the units to explain (B, U, h, w) or (B, U)."""
    function = load_object(spec)
    if not callable(function):
        raise PyneuronError(
            f"--units {spec} is a {type(function).__name__}, not a function of the layer's "
            "activations"
        )
    return function


@dataclass(frozen=True)
class ModelFactory:
    """A picklable zero-argument builder of a model, for Ray workers: ``load_model(spec,
    weights)``'s model, or ``model`` itself (pickled with the factory). ``fingerprint``
    (the weights' hash) names the work done with it, so other weights never reuse it.

    Examples
    --------
    >>> import torch
    >>> factory = ModelFactory.of(torch.nn.Linear(2, 2))
    >>> factory() is factory.model, len(factory.fingerprint)
    (True, 32)
    """

    fingerprint: str
    spec: str | None = None
    weights: str | None = None
    model: Any = None

    @classmethod
    def of(
        cls, model: Any, spec: str | None = None, weights: str | os.PathLike[str] | None = None
    ) -> ModelFactory:
        """The factory of ``model``: built again from ``spec`` and ``weights`` on each
        worker when given (the workers must see the same files), else sent as it is."""
        fingerprint = weights_hash(model)
        if spec is None:
            return cls(fingerprint, model=model)
        return cls(fingerprint, spec, None if weights is None else str(weights))

    def __call__(self) -> Any:
        if self.spec is None:
            return self.model
        return load_model(self.spec, self.weights)[0]


def resolved_path(path: str | os.PathLike[str] | None) -> str | None:
    """``path`` made absolute (for a run's ``config.toml``, so the run can be reported or
    evaluated from any directory); None stays None."""
    return None if path is None else str(Path(path).expanduser().resolve())


def resolved_model_spec(spec: str) -> str:
    """``spec`` with its path made absolute: a model directory, or the file of
    ``file.py:function``; module names and torchvision names are kept as given."""
    if Path(spec).is_dir():
        return str(resolved_path(spec))
    module, sep, function = spec.rpartition(":")
    if sep and module.endswith(".py") and Path(module).is_file():
        return f"{resolved_path(module)}:{function}"
    return spec


def _looks_like_a_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith((".", "~")) or os.path.lexists(spec)


def vision_tower(model: Any) -> Any:
    """The image side of a dual-encoder transformers model (CLIP, SigLIP, ...): a module
    whose forward takes only ``pixel_values`` and runs ``model.vision_model``, under the
    same module names (``vision_model.encoder.layers.11``), so image layers can be
    captured from a model that would otherwise also want text. Its text tower is left
    out: its layers never run on images."""
    import torch

    class VisionTower(torch.nn.Module):
        def __init__(self, vision_model: Any) -> None:
            super().__init__()
            self.vision_model = vision_model

        def forward(self, pixel_values: Any) -> Any:
            return self.vision_model(pixel_values=pixel_values)

    return VisionTower(model.vision_model)


def _import(name: str) -> Any:
    if name.endswith(".py"):
        file = Path(name)
        if not file.is_file():
            raise PyneuronError(f"model file {name} does not exist")
        spec = importlib.util.spec_from_file_location(file.stem, file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise PyneuronError(f"cannot import {name}: {error}") from None


@dataclass(frozen=True)
class ImageNetTransform:
    """PIL image -> (3, size, size) float tensor, resized (bilinear) and ImageNet-normalized.

    A plain picklable object whose ``repr`` names its size, so that Ray workers receive it
    and a run's parts are named by it.

    Examples
    --------
    >>> from PIL import Image
    >>> ImageNetTransform(8)(Image.new("RGB", (20, 10))).shape
    torch.Size([3, 8, 8])
    """

    size: int

    def __call__(self, image: Any) -> Any:
        import torch
        from PIL import Image

        mean = np.array(IMAGENET_MEAN, dtype=np.float32)
        std = np.array(IMAGENET_STD, dtype=np.float32)
        resized = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        array = (np.asarray(resized, dtype=np.float32) / 255.0 - mean) / std
        return torch.from_numpy(array).permute(2, 0, 1)


def image_transform(size: int) -> ImageNetTransform:
    """PIL image -> (3, size, size) float tensor, resized and ImageNet-normalized."""
    return ImageNetTransform(int(size))
