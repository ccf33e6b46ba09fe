"""CLIP image and text embeddings through transformers, from a local directory or cache."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import PyneuronError
from ..progress import progress_bar
from .result import place_model

#: The CLIP model CLIP-Dissect uses by default (ViT-B/16), as a transformers model id.
DEFAULT_CLIP = "openai/clip-vit-base-patch16"


def _features(output: Any) -> Any:
    """Embeddings from ``get_*_features``: a tensor (transformers 4) or an output object
    whose ``pooler_output`` holds the projected embeddings (transformers 5)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    for name in ("pooler_output", "text_embeds", "image_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise PyneuronError(f"cannot find embeddings in a {type(output).__name__}")


def load_pretrained(spec: str | os.PathLike[str], kind: str, loader: Any) -> Any:
    """``loader.from_pretrained(spec, local_files_only=True)`` with an error that says what
    to do when the model is neither a directory nor in the local cache."""
    try:
        return loader.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as error:
        raise PyneuronError(
            f"cannot load the {kind} {str(spec)!r} without downloading ({error}); give a "
            "directory saved with save_pretrained(), or fetch the model into the Hugging Face "
            "cache once (e.g. `hf download MODEL_ID`)"
        ) from None


class ClipEncoder:
    """Unit-normalized CLIP image and text embeddings (any transformers dual encoder with
    ``get_image_features`` / ``get_text_features``).

    Parameters
    ----------
    model, processor
        A transformers ``CLIPModel`` (or similar) and its processor (image processor +
        tokenizer).
    device
        Where to run (default: the model's device).
    batch_size
        Images or texts per forward pass.
    prompt
        Template for texts, ``"{}"`` (CLIP-Dissect's choice) or e.g. ``"a photo of {}"``.

    Examples
    --------
    >>> encoder = ClipEncoder.load("path/to/clip")  # doctest: +SKIP
    >>> encoder.encode_texts(["dog", "cat"]).shape  # doctest: +SKIP
    (2, 512)
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        device: Any = None,
        batch_size: int = 64,
        prompt: str = "{}",
    ) -> None:
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(model, method):
                raise PyneuronError(
                    f"{type(model).__name__} has no {method}(): give a CLIP-like dual encoder"
                )
        if "{}" not in prompt:
            raise PyneuronError(f"prompt must contain '{{}}' for the concept, got {prompt!r}")
        if batch_size < 1:
            raise PyneuronError(f"batch_size must be positive, got {batch_size}")
        self.model, self.device = place_model(model, device)
        self.processor = processor
        self.batch_size = batch_size
        self.prompt = prompt
        self.name = (
            str(getattr(getattr(model, "config", None), "_name_or_path", ""))
            or type(model).__name__
        )

    @classmethod
    def load(
        cls,
        spec: str | os.PathLike[str] | ClipEncoder | tuple[Any, Any] = DEFAULT_CLIP,
        **options: Any,
    ) -> ClipEncoder:
        """An encoder from a directory or cached model id (nothing is downloaded), a
        ``(model, processor)`` pair, or an encoder (returned as is)."""
        if isinstance(spec, ClipEncoder):
            return spec
        if isinstance(spec, tuple):
            return cls(*spec, **options)
        import transformers

        model = load_pretrained(spec, "CLIP model", transformers.AutoModel)
        processor = load_pretrained(spec, "CLIP processor", transformers.AutoProcessor)
        encoder = cls(model, processor, **options)
        encoder.name = str(spec)
        return encoder

    @property
    def logit_scale(self) -> float:
        """CLIP's learned inverse temperature (100 for OpenAI CLIP; 1 if the model has none)."""
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.detach().exp()) if scale is not None else 1.0

    def _max_text_length(self) -> int | None:
        config = getattr(self.model, "config", None)
        text_config = getattr(config, "text_config", None)
        return getattr(text_config, "max_position_embeddings", None)

    def encode_images(self, images: Sequence[Any], *, progress: bool = False) -> np.ndarray:
        """(N, D) float32 unit-norm embeddings of PIL images, ``batch_size`` at a time."""
        import torch

        image_processor = getattr(self.processor, "image_processor", self.processor)
        chunks = []
        with torch.inference_mode():
            for start in progress_bar(
                range(0, len(images), self.batch_size),
                desc="CLIP images",
                enabled=progress,
            ):
                batch = [images[i] for i in range(start, min(len(images), start + self.batch_size))]
                pixels = image_processor(images=batch, return_tensors="pt")["pixel_values"]
                output = self.model.get_image_features(pixel_values=pixels.to(self.device))
                chunks.append(_normalize(_features(output)))
        if not chunks:
            raise PyneuronError("no images to embed")
        return np.concatenate(chunks)

    def encode_texts(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """(T, D) float32 unit-norm embeddings of ``prompt.format(text)`` for each text."""
        import torch

        if len(texts) == 0:
            raise PyneuronError("no texts to embed: the concept list is empty")
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        max_length = self._max_text_length()
        chunks = []
        with torch.inference_mode():
            for start in progress_bar(
                range(0, len(texts), self.batch_size),
                desc="CLIP texts",
                enabled=progress,
            ):
                batch = [self.prompt.format(t) for t in texts[start : start + self.batch_size]]
                tokens = tokenizer(
                    batch,
                    padding=True,
                    truncation=max_length is not None,
                    max_length=max_length,
                    return_tensors="pt",
                )
                inputs = {
                    key: value.to(self.device)
                    for key, value in tokens.items()
                    if key in ("input_ids", "attention_mask")
                }
                chunks.append(_normalize(_features(self.model.get_text_features(**inputs))))
        return np.concatenate(chunks)


def _normalize(features: Any) -> np.ndarray:
    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return features.cpu().numpy()
