"""Open-vocabulary segmenters: (images, concept names) -> per-concept score maps.

A segmenter is any callable ``segmenter(images, concepts)`` taking a list of RGB PIL
images and a list of K concept names and returning float scores in [0, 1] per concept
and pixel, either as one array (B, K, h, w) or as B arrays (K, h_i, w_i) (any size:
:func:`~pyneuron.concepts.segment` resizes them to its grid). For provenance and
caching it may carry a ``name`` and a ``fingerprint`` string that changes whenever its
outputs would (:class:`Segmenter` is the protocol).

Adapters for transformers models, loaded from a local directory or the user's cache by
``from_pretrained`` (nothing is downloaded unless transformers itself does so):

- :class:`CLIPSegSegmenter` (default): each image is encoded once, then CLIPSeg's light
  decoder runs for every concept with conditional embeddings computed once per concept
  list; score = sigmoid(logits), at the processor's resolution (352 x 352).
- :class:`GroundingDinoSamSegmenter`: Grounding DINO turns text into boxes, SAM turns
  boxes into masks; score map of a concept = max over its boxes of box score x mask.
- :class:`Owlv2SamSegmenter`: the same with OWLv2 boxes.
- :class:`Sam3Segmenter`: SAM 3 (``Sam3Model``), text-prompted concept segmentation; each
  image is encoded once, each prompt's text once, then the prompt-dependent part runs
  per (image, concept); score = sigmoid of SAM 3's semantic segmentation head.

Devices and precision (``device=``, ``dtype=`` of every adapter, of ``from_pretrained``
and of :func:`~pyneuron.concepts.segment`): ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``
or a ``torch.device``; ``"float32"``, ``"float16"``, ``"bfloat16"`` or a ``torch`` dtype.
By default the models run on CUDA in float16 when a GPU is available, else on the CPU in
float32. A device this machine does not have is refused (naming those it has) before any
model loads. float16 is allowed on the CPU, where torch emulates it slowly; bfloat16 is
the CPU's reduced precision. On CUDA, image tensors are copied from pinned memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..devices import resolve_placement
from ..errors import PyneuronError
from ..weights import weights_hash

DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"
DEFAULT_GROUNDING_DINO = "IDEA-Research/grounding-dino-tiny"
DEFAULT_OWLV2 = "google/owlv2-base-patch16-ensemble"
DEFAULT_SAM = "facebook/sam-vit-base"
DEFAULT_SAM3 = "facebook/sam3"


@runtime_checkable
class Segmenter(Protocol):
    """What :func:`~pyneuron.concepts.segment` calls.

    Attributes
    ----------
    name
        Short human-readable name, recorded in the store's metadata.
    fingerprint
        A string that changes whenever the outputs for the same inputs would change
        (model weights, preprocessing, settings); it keys the segmentation cache.
    """

    name: str
    fingerprint: str

    def __call__(
        self, images: list[Any], concepts: Sequence[str]
    ) -> np.ndarray | Sequence[np.ndarray]:
        """Score maps in [0, 1]: (B, K, h, w), or B arrays of shape (K, h_i, w_i)."""
        ...


class CallableSegmenter:
    """Wrap a plain function as a :class:`Segmenter`.

    Parameters
    ----------
    function
        ``function(images, concepts)`` returning score maps (see the module docs).
    name
        Defaults to the function's qualified name.
    fingerprint
        Required for caching: a string you change whenever the function's outputs change.
        Defaults to the function's own ``fingerprint`` attribute, if any.

    Examples
    --------
    >>> import numpy as np
    >>> def flat(images, concepts):
    ...     return np.full((len(images), len(concepts), 4, 4), 0.5, dtype=np.float32)
    >>> seg = CallableSegmenter(flat, fingerprint="flat-v1")
    >>> seg.name, seg.fingerprint
    ('flat', 'flat-v1')
    """

    def __init__(
        self,
        function: Callable[[list[Any], Sequence[str]], Any],
        *,
        name: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if not callable(function):
            raise PyneuronError(f"a segmenter must be callable, got {type(function).__name__}")
        self.function = function
        self.name = name or getattr(function, "name", None) or _qualname(function)
        given = fingerprint if fingerprint is not None else getattr(function, "fingerprint", None)
        self._fingerprint = str(given) if given is not None else None

    @property
    def has_fingerprint(self) -> bool:
        """Whether a fingerprint was given (needed for caching)."""
        return self._fingerprint is not None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            return f"callable:{self.name}"
        return self._fingerprint

    def __call__(self, images: list[Any], concepts: Sequence[str]) -> Any:
        return self.function(images, concepts)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": "callable", "fingerprint": self.fingerprint}


def _qualname(function: Any) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__


# -- torch / transformers helpers -------------------------------------------------------


def _torch() -> Any:
    import torch

    return torch


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - an optional dependency
        raise ImportError(
            "open-vocabulary segmentation needs transformers: pip install 'pyneuron[hf]'"
        ) from error
    return transformers


def _pretrained(load: Callable[[str], Any], model: str, role: str, option: str) -> Any:
    """``load(model)``, turning transformers' "not found / cannot connect" errors into
    a message that names the model and how to give a local copy instead."""
    try:
        return load(model)
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PyneuronError(
            f"cannot load the {role} {model!r}: it is not a local directory and not in the "
            f"Hugging Face cache, and could not be downloaded ({reason}). Download it once "
            f"where there is network (`hf download {model}`), or give a local copy: {option}"
        ) from None


def _to_device(tensor: Any, device: Any, dtype: Any = None) -> Any:
    """``tensor`` (on the CPU) moved to ``device`` and cast to ``dtype`` (if given); onto a
    CUDA device it is copied from pinned memory, asynchronously."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)


def _prepare(model: Any, device: Any, dtype: Any) -> Any:
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model


def _processor_description(processor: Any) -> Any:
    parts: dict[str, Any] = {"class": type(processor).__name__}
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None and hasattr(image_processor, "to_dict"):
        parts["image_processor"] = image_processor.to_dict()
    elif hasattr(processor, "to_dict"):
        parts["image_processor"] = processor.to_dict()
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # padding/truncation state changes with use; the rest defines the tokens
            state = json.loads(backend.to_str())
            state.pop("padding", None)
            state.pop("truncation", None)
            vocabulary = json.dumps(state, sort_keys=True)
        else:
            vocabulary = str(sorted(tokenizer.get_vocab().items()))
        parts["tokenizer"] = {
            "class": type(tokenizer).__name__,
            "hash": hashlib.blake2b(vocabulary.encode(), digest_size=16).hexdigest(),
            "model_max_length": getattr(tokenizer, "model_max_length", None),
        }
    return parts


def _hash_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _check_concepts(concepts: Sequence[str]) -> list[str]:
    if isinstance(concepts, str):
        raise PyneuronError(f"concepts must be a list of names, not the string {concepts!r}")
    concepts = list(concepts)
    if not concepts:
        raise PyneuronError("no concepts given; give at least one concept name")
    return concepts


class _TransformersSegmenter:
    """Shared machinery: settings, device, dtype, lazily computed fingerprint."""

    name = "segmenter"

    def __init__(self, settings: Any, device: Any, dtype: Any) -> None:
        self.settings = settings
        self.device, self.dtype = resolve_placement(device, dtype)
        self._fingerprint: str | None = None

    def _fingerprint_parts(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """Hash of the adapter class, settings, weights, preprocessing, dtype and device type."""
        if self._fingerprint is None:
            self._fingerprint = _hash_json(
                {
                    "class": type(self).__name__,
                    "settings": dataclasses.asdict(self.settings),
                    "dtype": str(self.dtype),
                    "device": self.device.type,
                    **self._fingerprint_parts(),
                }
            )
        return self._fingerprint

    def _models(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance: adapter, models, settings, device type, dtype, fingerprint."""
        return {
            "name": self.name,
            "type": type(self).__name__,
            "models": {
                role: getattr(getattr(m, "config", None), "_name_or_path", "") or type(m).__name__
                for role, m in self._models().items()
            },
            "settings": dataclasses.asdict(self.settings),
            "device": self.device.type,
            "dtype": str(self.dtype).replace("torch.", ""),
            "fingerprint": self.fingerprint,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()['models']}, {self.settings})"


# -- CLIPSeg ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CLIPSegSettings:
    """Settings of :class:`CLIPSegSegmenter`.

    Attributes
    ----------
    prompt
        Template turning a concept name into the text prompt (``"{}"``: the name itself;
        e.g. ``"a photo of a {}."``).
    decoder_batch
        (image, concept) pairs per decoder call; bounds memory for many concepts.
    """

    prompt: str = "{}"
    decoder_batch: int = 64

    def __post_init__(self) -> None:
        if "{}" not in self.prompt:
            raise PyneuronError(f"prompt template {self.prompt!r} must contain '{{}}'")
        if self.decoder_batch < 1:
            raise PyneuronError(f"decoder_batch must be >= 1, got {self.decoder_batch}")


class CLIPSegSegmenter(_TransformersSegmenter):
    """CLIPSeg (``CLIPSegForImageSegmentation``): encode each image once, decode all concepts.

    The text conditionals are computed once per concept list (``get_conditional_embeddings``)
    and kept; per image batch the CLIP vision encoder runs once, then the decoder runs for
    every (image, concept) pair. Scores are ``sigmoid(logits)`` at the processor's
    resolution — the same numbers as calling the model with ``processor(text=concepts,
    images=[image] * K)``, without encoding the image K times.

    Parameters
    ----------
    model
        A ``CLIPSegForImageSegmentation``.
    processor
        Its ``CLIPSegProcessor`` (image processor + tokenizer).
    settings
        :class:`CLIPSegSettings` (prompt template, decoder batch).
    device, dtype
        Where and in which precision to run (see :func:`pyneuron.devices.resolve_device` and
        ``resolve_dtype``); default CUDA + float16 when available, else CPU +
        float32. The model is moved there.

    Examples
    --------
    ``CLIPSegSegmenter.from_pretrained("CIDAS/clipseg-rd64-refined")`` loads the model from
    the Hugging Face cache or a local directory; ``segmenter(images, ["cat", "sky"])`` then
    returns an array (B, 2, 352, 352).
    """

    name = "clipseg"

    def __init__(
        self,
        model: Any,
        processor: Any,
        settings: CLIPSegSettings = CLIPSegSettings(),
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(settings, device, dtype)
        self.processor = processor
        self.model = _prepare(model, self.device, self.dtype)
        self._conditionals: tuple[tuple[str, ...], Any] | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_CLIPSEG,
        *,
        device: Any = None,
        dtype: Any = None,
        **settings: Any,
    ) -> CLIPSegSegmenter:
        """Load model and processor by model id (user cache) or local directory.

        ``settings`` are :class:`CLIPSegSettings` fields (``prompt``, ``decoder_batch``).
        """
        device, dtype = resolve_placement(device, dtype)  # a wrong device fails before loading
        transformers = _transformers()
        option = "--segmenter clipseg:DIR (Python: segmenter='DIR')"
        processor = _pretrained(
            transformers.AutoProcessor.from_pretrained, model, "CLIPSeg processor", option
        )
        network = _pretrained(
            transformers.CLIPSegForImageSegmentation.from_pretrained, model, "CLIPSeg model", option
        )
        return cls(network, processor, CLIPSegSettings(**settings), device=device, dtype=dtype)

    def _models(self) -> dict[str, Any]:
        return {"clipseg": self.model}

    def _fingerprint_parts(self) -> dict[str, Any]:
        return {
            "weights": weights_hash(self.model),
            "processor": _processor_description(self.processor),
        }

    def conditional_embeddings(self, concepts: Sequence[str]) -> Any:
        """Text conditionals (K, projection_dim) of the prompts, computed once per list."""
        torch = _torch()
        key = tuple(concepts)
        if self._conditionals is not None and self._conditionals[0] == key:
            return self._conditionals[1]
        prompts = [self.settings.prompt.format(c) for c in concepts]
        text = self.processor.tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            embeddings = self.model.get_conditional_embeddings(
                batch_size=len(prompts),
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
            )
        self._conditionals = (key, embeddings)
        return embeddings

    def __call__(self, images: list[Any], concepts: Sequence[str]) -> np.ndarray:
        torch = _torch()
        concepts = _check_concepts(concepts)
        conditionals = self.conditional_embeddings(concepts)
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        pixel_values = _to_device(pixel_values, self.device, self.dtype)
        n_images, n_concepts = pixel_values.shape[0], len(concepts)
        with torch.inference_mode():
            vision = self.model.clip.get_image_features(
                pixel_values=pixel_values, output_hidden_states=True
            )
            activations = [vision.hidden_states[i + 1] for i in self.model.extract_layers]
            scores = None
            pairs = n_images * n_concepts
            step = self.settings.decoder_batch
            for start in range(0, pairs, step):
                index = torch.arange(start, min(start + step, pairs), device=self.device)
                image_index, concept_index = index // n_concepts, index % n_concepts
                logits = self.model.decoder(
                    [a[image_index] for a in activations], conditionals[concept_index]
                ).logits
                logits = logits.reshape(len(index), *logits.shape[-2:])
                if scores is None:
                    scores = torch.empty(
                        (pairs, *logits.shape[-2:]), dtype=torch.float32, device=self.device
                    )
                scores[index] = torch.sigmoid(logits.float())
        assert scores is not None
        return scores.reshape(n_images, n_concepts, *scores.shape[-2:]).cpu().numpy()


# -- box prompts -> SAM masks ------------------------------------------------------------


@dataclass(frozen=True)
class Detections:
    """Boxes found in one image.

    Attributes
    ----------
    boxes
        float32 (n, 4): x0, y0, x1, y1 in pixels of the original image.
    scores
        float32 (n,): the box's score for its concept, in [0, 1].
    labels
        int64 (n,): index of the concept (in the list given to the detector).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class BoxSettings:
    """Settings of the detector + SAM segmenters.

    Attributes
    ----------
    prompt
        Template turning a concept name into its text prompt.
    box_threshold
        A box is kept for a concept when its score for that concept is > this.
    max_boxes
        At most this many boxes per concept and image (the best-scoring ones).
    sam_batch
        Boxes per SAM mask-decoder call.
    mask_threshold
        SAM mask logits > this are inside the mask (SAM's default 0).
    """

    prompt: str = "{}"
    box_threshold: float = 0.3
    max_boxes: int = 10
    sam_batch: int = 32
    mask_threshold: float = 0.0

    def __post_init__(self) -> None:
        if "{}" not in self.prompt:
            raise PyneuronError(f"prompt template {self.prompt!r} must contain '{{}}'")
        if not 0.0 <= self.box_threshold < 1.0:
            raise PyneuronError(f"box_threshold must be in [0, 1), got {self.box_threshold}")
        if self.max_boxes < 1 or self.sam_batch < 1:
            raise PyneuronError("max_boxes and sam_batch must be >= 1")


def _select_boxes(
    scores: Any, boxes_xyxy: Any, threshold: float, max_boxes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per concept column of ``scores`` (Q, K): the best ``max_boxes`` boxes with score > t."""
    torch = _torch()
    kept_boxes, kept_scores, kept_labels = [], [], []
    for k in range(scores.shape[1]):
        column = scores[:, k]
        candidates = torch.nonzero(column > threshold).flatten()
        if candidates.numel() == 0:
            continue
        order = torch.argsort(column[candidates], descending=True, stable=True)[:max_boxes]
        chosen = candidates[order]
        kept_boxes.append(boxes_xyxy[chosen])
        kept_scores.append(column[chosen])
        kept_labels.append(torch.full((len(chosen),), k, dtype=torch.int64))
    if not kept_scores:
        return (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    return (
        torch.cat(kept_boxes).float().cpu().numpy(),
        torch.cat(kept_scores).float().cpu().numpy(),
        torch.cat(kept_labels).numpy(),
    )


def _corners(boxes: Any) -> Any:
    """(cx, cy, w, h) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return _torch().stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


class SamMasker:
    """SAM (``SamModel``) turning boxes into binary masks, image embeddings computed once.

    :meth:`score_maps` gives, per image, K maps at the original image size: for each
    concept the max over its boxes of box score x SAM mask (0 where no box covers).
    """

    def __init__(self, model: Any, processor: Any, device: Any, dtype: Any) -> None:
        self.processor = processor
        self.device, self.dtype = device, dtype
        self.model = _prepare(model, device, dtype)

    def score_maps(
        self,
        images: list[Any],
        detections: Sequence[Detections],
        n_concepts: int,
        settings: BoxSettings,
    ) -> list[np.ndarray]:
        torch = _torch()
        maps = [np.zeros((n_concepts, im.height, im.width), np.float32) for im in images]
        todo = [i for i, d in enumerate(detections) if len(d)]
        if not todo:
            return maps
        inputs = self.processor(images=[images[i] for i in todo], return_tensors="pt")
        pixel_values = _to_device(inputs["pixel_values"], self.device, self.dtype)
        with torch.inference_mode():
            embeddings = self.model.get_image_embeddings(pixel_values)
            for row, i in enumerate(todo):
                found = detections[i]
                original = [int(v) for v in inputs["original_sizes"][row]]
                reshaped = [int(v) for v in inputs["reshaped_input_sizes"][row]]
                scale = np.array(
                    [reshaped[1] / original[1], reshaped[0] / original[0]] * 2, dtype=np.float64
                )
                boxes = torch.from_numpy(found.boxes.astype(np.float64) * scale)
                result = torch.zeros(
                    (n_concepts, original[0], original[1]), dtype=torch.float32, device=self.device
                )
                for start in range(0, len(found), settings.sam_batch):
                    stop = start + settings.sam_batch
                    chunk = boxes[start:stop].to(self.device, self.dtype)
                    masks = self.model(
                        image_embeddings=embeddings[row : row + 1],
                        input_boxes=chunk[None],
                        multimask_output=False,
                    ).pred_masks[0]
                    binary = self.processor.post_process_masks(
                        [masks.float()],
                        [original],
                        [reshaped],
                        mask_threshold=settings.mask_threshold,
                    )[0][:, 0]
                    for j, mask in enumerate(binary):
                        k = int(found.labels[start + j])
                        scored = mask.float() * float(found.scores[start + j])
                        result[k] = torch.maximum(result[k], scored)
                maps[i] = result.cpu().numpy()
        return maps


class _BoxSamSegmenter(_TransformersSegmenter):
    """Detector boxes -> SAM masks; subclasses implement :meth:`detect` and name their
    transformers detector class and defaults."""

    detector_class = ""  # transformers class of the detector
    default_detector = ""
    cli_name = ""  # its kind in ``--segmenter KIND:DET,SAM``
    default_box_threshold = 0.3

    def __init__(
        self,
        detector: Any,
        detector_processor: Any,
        sam: Any,
        sam_processor: Any,
        settings: BoxSettings | None = None,
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if settings is None:
            settings = BoxSettings(box_threshold=self.default_box_threshold)
        super().__init__(settings, device, dtype)
        self.detector = _prepare(detector, self.device, self.dtype)
        self.detector_processor = detector_processor
        self.sam = SamMasker(sam, sam_processor, self.device, self.dtype)

    @classmethod
    def from_pretrained(
        cls,
        detector: str | None = None,
        sam: str = DEFAULT_SAM,
        *,
        device: Any = None,
        dtype: Any = None,
        **settings: Any,
    ) -> Any:
        """Load the detector and SAM by model id (user cache) or local directory.

        ``settings`` are :class:`BoxSettings` fields (``box_threshold`` defaults to the
        class's ``default_box_threshold``).
        """
        device, dtype = resolve_placement(device, dtype)  # a wrong device fails before loading
        transformers = _transformers()
        settings.setdefault("box_threshold", cls.default_box_threshold)
        detector = detector or cls.default_detector
        option = f"--segmenter {cls.cli_name}:DETECTOR_DIR,SAM_DIR"
        return cls(
            _pretrained(
                getattr(transformers, cls.detector_class).from_pretrained,
                detector,
                "detector",
                option,
            ),
            _pretrained(transformers.AutoProcessor.from_pretrained, detector, "detector", option),
            _pretrained(transformers.SamModel.from_pretrained, sam, "SAM model", option),
            _pretrained(transformers.AutoProcessor.from_pretrained, sam, "SAM processor", option),
            BoxSettings(**settings),
            device=device,
            dtype=dtype,
        )

    def detect(self, images: list[Any], concepts: Sequence[str]) -> list[Detections]:
        raise NotImplementedError

    def _models(self) -> dict[str, Any]:
        return {"detector": self.detector, "sam": self.sam.model}

    def _fingerprint_parts(self) -> dict[str, Any]:
        return {
            "detector": weights_hash(self.detector),
            "detector_processor": _processor_description(self.detector_processor),
            "sam": weights_hash(self.sam.model),
            "sam_processor": _processor_description(self.sam.processor),
        }

    def __call__(self, images: list[Any], concepts: Sequence[str]) -> list[np.ndarray]:
        concepts = _check_concepts(concepts)
        images = [im.convert("RGB") for im in images]
        detections = self.detect(images, concepts)
        return self.sam.score_maps(images, detections, len(concepts), self.settings)


class GroundingDinoSamSegmenter(_BoxSamSegmenter):
    """Grounding DINO boxes from text, SAM masks from boxes.

    Concepts are joined into prompts ``"a. b. c."`` (lower-cased, as Grounding DINO's
    processor does), split over several prompts when they exceed the model's
    ``max_text_len`` tokens. A query box's score for a concept is the max over that
    concept's tokens of ``sigmoid(logits)``, so each box is scored for every concept
    (rather than labelled by decoding thresholded tokens as
    ``post_process_grounded_object_detection`` does). Per concept the ``max_boxes``
    best boxes with score > ``box_threshold`` are kept; boxes are the model's
    ``pred_boxes`` in pixels of the original image.

    Parameters
    ----------
    detector, detector_processor
        ``GroundingDinoForObjectDetection`` and its ``GroundingDinoProcessor``.
    sam, sam_processor
        ``SamModel`` and its ``SamProcessor``.
    settings
        :class:`BoxSettings`.
    device, dtype
        As for :class:`CLIPSegSegmenter`.
    """

    name = "grounding-dino+sam"
    detector_class = "GroundingDinoForObjectDetection"
    default_detector = DEFAULT_GROUNDING_DINO
    cli_name = "grounding-dino"
    default_box_threshold = 0.3

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._chunks: tuple[tuple[str, ...], list[tuple[str, list[tuple[int, list[int]]]]]] | None
        self._chunks = None

    def prompts(self, concepts: Sequence[str]) -> list[tuple[str, list[tuple[int, list[int]]]]]:
        """Prompt chunks: (text, [(concept index, token positions in the text)])."""
        key = tuple(concepts)
        if self._chunks is not None and self._chunks[0] == key:
            return self._chunks[1]
        tokenizer = self.detector_processor.tokenizer
        budget = int(self.detector.config.max_text_len)
        texts = [self.settings.prompt.format(c).strip().lower() for c in concepts]
        for concept, text in zip(concepts, texts):
            if "." in text:
                raise PyneuronError(
                    f"Grounding DINO separates concepts with '.', so the prompt {text!r} of "
                    f"concept {concept!r} cannot contain one; rename the concept or change the "
                    "prompt template"
                )
        chunks: list[list[int]] = [[]]
        for k, text in enumerate(texts):
            trial = chunks[-1] + [k]
            if chunks[-1] and self._n_tokens([texts[i] for i in trial]) > budget:
                chunks.append([k])
            else:
                chunks[-1] = trial
            if self._n_tokens([text]) > budget:
                raise PyneuronError(
                    f"concept {concepts[k]!r} takes more than the detector's {budget} text tokens"
                )
        result = []
        for chunk in chunks:
            prompt, spans = "", []
            for k in chunk:
                start = len(prompt)
                prompt += texts[k]
                spans.append((k, start, len(prompt)))
                prompt += ". "
            prompt = prompt.rstrip()  # "a. b." as GroundingDinoProcessor merges labels
            encoding = tokenizer(prompt, return_offsets_mapping=True)
            offsets = encoding["offset_mapping"]
            positions = []
            for k, lo, hi in spans:
                tokens = [t for t, (a, b) in enumerate(offsets) if b > a and a >= lo and b <= hi]
                if not tokens:
                    raise PyneuronError(
                        f"concept {concepts[k]!r} has no tokens in the detector's vocabulary"
                    )
                positions.append((k, tokens))
            result.append((prompt, positions))
        self._chunks = (key, result)
        return result

    def _n_tokens(self, texts: Sequence[str]) -> int:
        prompt = ". ".join(texts) + "."
        return len(self.detector_processor.tokenizer(prompt)["input_ids"])

    def detect(self, images: list[Any], concepts: Sequence[str]) -> list[Detections]:
        """Boxes per image: for every concept its best boxes scoring > ``box_threshold``."""
        torch = _torch()
        concepts = _check_concepts(concepts)
        pixels = self.detector_processor.image_processor(images=images, return_tensors="pt")
        pixels = {  # moved once for every prompt chunk
            k: _to_device(v, self.device, self.dtype if k == "pixel_values" else None)
            for k, v in pixels.items()
        }
        n_images = len(images)
        sizes = torch.tensor([[im.width, im.height, im.width, im.height] for im in images])
        per_image: list[list[tuple[Any, Any]]] = [[] for _ in images]
        with torch.inference_mode():
            for prompt, positions in self.prompts(concepts):
                text = self.detector_processor.tokenizer(
                    [prompt] * n_images, padding=True, return_token_type_ids=True,
                    return_tensors="pt",
                )  # fmt: skip
                inputs = {k: v.to(self.device) for k, v in text.items()}
                output = self.detector(**pixels, **inputs)
                probs = torch.sigmoid(output.logits.float())  # (B, Q, max_text_len)
                scores = torch.stack([probs[..., t].amax(-1) for _, t in positions], dim=-1)
                boxes = _corners(output.pred_boxes.float()).cpu() * sizes[:, None, :]
                for b in range(n_images):
                    per_image[b].append((scores[b].cpu(), boxes[b], [k for k, _ in positions]))
        result = []
        for parts in per_image:
            found = []
            for scores, boxes, labels in parts:
                kept_boxes, kept_scores, kept_labels = _select_boxes(
                    scores, boxes, self.settings.box_threshold, self.settings.max_boxes
                )
                found.append((kept_boxes, kept_scores, np.asarray(labels)[kept_labels]))
            result.append(
                Detections(
                    np.concatenate([f[0] for f in found]),
                    np.concatenate([f[1] for f in found]),
                    np.concatenate([f[2] for f in found]).astype(np.int64),
                )
            )
        return result


class Owlv2SamSegmenter(_BoxSamSegmenter):
    """OWLv2 boxes from text queries, SAM masks from boxes.

    Each concept is one text query; query embeddings are computed once per concept list
    and each image is embedded once. A patch box's score for a concept is
    ``sigmoid(logit)``; boxes are scaled to pixels of the original image the way
    ``Owlv2Processor.post_process_object_detection`` does (OWLv2 pads images to squares).

    Parameters
    ----------
    detector, detector_processor
        ``Owlv2ForObjectDetection`` and its ``Owlv2Processor`` (its image processor needs
        scipy, or torchvision for the fast variant).
    sam, sam_processor, settings, device, dtype
        As for :class:`GroundingDinoSamSegmenter`.
    """

    name = "owlv2+sam"
    detector_class = "Owlv2ForObjectDetection"
    default_detector = DEFAULT_OWLV2
    cli_name = "owlv2"
    default_box_threshold = 0.1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queries: tuple[tuple[str, ...], Any] | None = None

    def query_embeddings(self, concepts: Sequence[str]) -> Any:
        """Normalised text query embeddings (K, D), computed once per concept list."""
        torch = _torch()
        key = tuple(concepts)
        if self._queries is not None and self._queries[0] == key:
            return self._queries[1]
        prompts = [self.settings.prompt.format(c) for c in concepts]
        text = self.detector_processor(text=[prompts], return_tensors="pt")
        with torch.inference_mode():
            embeds = self.detector.owlv2.get_text_features(
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
            ).pooler_output
            embeds = embeds / torch.linalg.norm(embeds, ord=2, dim=-1, keepdim=True)
        self._queries = (key, embeds)
        return embeds

    def detect(self, images: list[Any], concepts: Sequence[str]) -> list[Detections]:
        """Boxes per image: for every concept its best boxes scoring > ``box_threshold``."""
        torch = _torch()
        concepts = _check_concepts(concepts)
        queries = self.query_embeddings(concepts)
        pixel_values = self.detector_processor(images=images, return_tensors="pt")["pixel_values"]
        pixel_values = _to_device(pixel_values, self.device, self.dtype)
        n_images = len(images)
        with torch.inference_mode():
            feature_map = self.detector.image_embedder(pixel_values=pixel_values)[0]
            b, h, w, d = feature_map.shape
            image_feats = feature_map.reshape(b, h * w, d)
            query_embeds = queries[None].expand(n_images, -1, -1)
            query_mask = torch.ones(query_embeds.shape[:2], dtype=torch.bool, device=self.device)
            logits = self.detector.class_predictor(image_feats, query_embeds, query_mask)[0]
            boxes = self.detector.box_predictor(image_feats, feature_map)
            scores = torch.sigmoid(logits.float()).cpu()
            corners = _corners(boxes.float()).cpu()
        result = []
        for i, image in enumerate(images):
            side = max(image.width, image.height)  # boxes are relative to the padded square
            kept = _select_boxes(
                scores[i], corners[i] * side, self.settings.box_threshold, self.settings.max_boxes
            )
            result.append(Detections(*kept))
        return result


# -- SAM 3 ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sam3Settings:
    """Settings of :class:`Sam3Segmenter`.

    Attributes
    ----------
    prompt
        Template turning a concept name into its text prompt (``"{}"``: the name itself).
    output
        Which of SAM 3's outputs becomes a concept's score map (both at the mask
        decoder's resolution, 288 x 288 for ``facebook/sam3``):

        - ``"semantic"`` (default): ``sigmoid(semantic_seg)``, SAM 3's semantic
          segmentation head, one dense map per prompt;
        - ``"instances"``: per pixel the max over the DETR queries ``q`` of
          ``sigmoid(pred_logits[q]) * sigmoid(presence_logits) * sigmoid(pred_masks[q])``:
          each instance mask weighted by the score that
          ``post_process_instance_segmentation`` thresholds (unthresholded, unbinarized).
    prompt_batch
        (image, concept) pairs per call of the prompt-dependent part; each pair holds a
        copy of its image's feature pyramid and position encodings (about 110 MB in
        float16 for ``facebook/sam3``), so this bounds memory.
    """

    prompt: str = "{}"
    output: str = "semantic"
    prompt_batch: int = 8

    def __post_init__(self) -> None:
        if "{}" not in self.prompt:
            raise PyneuronError(f"prompt template {self.prompt!r} must contain '{{}}'")
        if self.output not in ("semantic", "instances"):
            raise PyneuronError(f"output must be 'semantic' or 'instances', got {self.output!r}")
        if self.prompt_batch < 1:
            raise PyneuronError(f"prompt_batch must be >= 1, got {self.prompt_batch}")


class Sam3Segmenter(_TransformersSegmenter):
    """SAM 3 (``Sam3Model``): text-prompted concept segmentation, one encoding per image.

    SAM 3 splits into a vision encoder (ViT + feature pyramid), a text encoder, and a
    prompt-dependent part (DETR encoder fusing image and text, DETR decoder, mask decoder
    with its semantic head). Here each image batch goes through the vision encoder once
    (``get_vision_features``); each prompt goes through the text encoder once
    (``get_text_features``, kept per prompt for later calls); then for every
    (image, concept) pair the model runs with ``vision_embeds=`` and ``text_embeds=``, in
    batches of ``prompt_batch`` pairs. The scores equal, to float rounding, those of the
    full forward ``model(pixel_values=..., input_ids=..., attention_mask=...)`` with one
    prompt at a time, which would encode the image once per concept.

    The score map of a concept is the sigmoid of SAM 3's semantic segmentation head
    (``semantic_seg``, :attr:`Sam3Settings.output` ``"semantic"``): the head SAM 3 has for
    dense, per-prompt segmentation. It covers stuff as well as things and needs no score
    threshold, which is what a per-concept score map of a concept store needs.
    ``output="instances"`` gives instead the instance masks weighted by their detection
    scores (see :class:`Sam3Settings`), near zero where no query's mask covers a pixel.

    Maps come at the mask decoder's resolution for the whole (resized, unpadded) image:
    (B, K, 288, 288) for ``facebook/sam3``.

    Parameters
    ----------
    model
        A ``Sam3Model``.
    processor
        Its ``Sam3Processor`` (image processor + CLIP tokenizer; ``facebook/sam3``'s image
        processor needs torchvision).
    settings
        :class:`Sam3Settings` (prompt template, output, pair batch).
    device, dtype
        As for :class:`CLIPSegSegmenter`.

    Examples
    --------
    ``Sam3Segmenter.from_pretrained("facebook/sam3")`` loads the model from the Hugging
    Face cache or a local directory; ``segmenter(images, ["cat", "sky"])`` then returns an
    array (B, 2, 288, 288).
    """

    name = "sam3"
    cli_name = "sam3"  # its kind in ``--segmenter sam3:MODEL``

    def __init__(
        self,
        model: Any,
        processor: Any,
        settings: Sam3Settings = Sam3Settings(),
        *,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(settings, device, dtype)
        self.processor = processor
        self.model = _prepare(model, self.device, self.dtype)
        self._prompts: dict[str, tuple[Any, Any]] = {}
        self._texts: tuple[tuple[str, ...], tuple[Any, Any]] | None = None

    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_SAM3,
        *,
        device: Any = None,
        dtype: Any = None,
        **settings: Any,
    ) -> Sam3Segmenter:
        """Load model and processor by model id (user cache) or local directory.

        ``settings`` are :class:`Sam3Settings` fields (``prompt``, ``output``,
        ``prompt_batch``).
        """
        device, dtype = resolve_placement(device, dtype)  # a wrong device fails before loading
        transformers = _transformers()
        if not hasattr(transformers, "Sam3Model"):
            raise PyneuronError(
                f"SAM 3 needs a transformers with Sam3Model (installed: "
                f"{transformers.__version__}): pip install -U transformers"
            )
        option = "--segmenter sam3:DIR (Python: Sam3Segmenter.from_pretrained('DIR'))"
        network = _pretrained(transformers.Sam3Model.from_pretrained, model, "SAM 3 model", option)
        try:
            processor = _pretrained(
                transformers.Sam3Processor.from_pretrained, model, "SAM 3 processor", option
            )
        except (ImportError, ValueError) as error:  # transformers' "missing torchvision"
            hint = (
                "; SAM 3's image processor runs on torchvision: pip install torchvision (the "
                "build matching your torch)"
                if "torchvision" in str(error).lower()
                else ""
            )
            raise PyneuronError(
                f"cannot load the SAM 3 processor of {model!r}: {str(error).strip()}{hint}"
            ) from None
        return cls(network, processor, Sam3Settings(**settings), device=device, dtype=dtype)

    def _models(self) -> dict[str, Any]:
        return {"sam3": self.model}

    def _fingerprint_parts(self) -> dict[str, Any]:
        return {
            "weights": weights_hash(self.model),
            "processor": _processor_description(self.processor),
        }

    def text_embeddings(self, concepts: Sequence[str]) -> tuple[Any, Any]:
        """Projected text features (K, L, D) and attention masks (K, L) of the prompts.

        Each prompt is encoded once and kept (L x D numbers, 16 KB in float16 for
        ``facebook/sam3``), so a later list reuses the prompts it shares with earlier
        ones; the same list again returns the same tensors.
        """
        torch = _torch()
        key = tuple(concepts)
        if self._texts is not None and self._texts[0] == key:
            return self._texts[1]
        prompts = [self.settings.prompt.format(c) for c in concepts]
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompts))
        if missing:
            limit = int(self.model.config.text_config.max_position_embeddings)
            lengths = self.processor.tokenizer(missing)["input_ids"]
            for prompt, ids in zip(missing, lengths):
                if len(ids) > limit:
                    raise PyneuronError(
                        f"the prompt {prompt!r} takes {len(ids)} text tokens, more than SAM 3's "
                        f"{limit}; shorten the concept name or the prompt template"
                    )
            text = self.processor(text=missing, return_tensors="pt")
            mask = text["attention_mask"].to(self.device)
            with torch.inference_mode():
                features = self.model.get_text_features(
                    input_ids=text["input_ids"].to(self.device), attention_mask=mask
                ).pooler_output
            for i, prompt in enumerate(missing):
                self._prompts[prompt] = (features[i], mask[i])
        result = (
            torch.stack([self._prompts[p][0] for p in prompts]),
            torch.stack([self._prompts[p][1] for p in prompts]),
        )
        self._texts = (key, result)
        return result

    def _score_maps(self, output: Any) -> Any:
        """(pairs, h, w) float32 scores of one prompt-dependent call (see Sam3Settings)."""
        torch = _torch()
        if self.settings.output == "semantic":
            return torch.sigmoid(output.semantic_seg[:, 0].float())
        scores = torch.sigmoid(output.pred_logits.float())
        if output.presence_logits is not None:
            scores = scores * torch.sigmoid(output.presence_logits.float())
        masks = torch.sigmoid(output.pred_masks.float())
        return (scores[:, :, None, None] * masks).amax(dim=1)

    def __call__(self, images: list[Any], concepts: Sequence[str]) -> np.ndarray:
        torch = _torch()
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        concepts = _check_concepts(concepts)
        features, mask = self.text_embeddings(concepts)
        images = [im.convert("RGB") for im in images]
        pixel_values = self.processor.image_processor(images=images, return_tensors="pt")
        pixel_values = _to_device(pixel_values["pixel_values"], self.device, self.dtype)
        n_images, n_concepts = pixel_values.shape[0], len(concepts)
        pairs = n_images * n_concepts
        scores = None
        with torch.inference_mode():
            vision = self.model.get_vision_features(pixel_values=pixel_values)
            for start in range(0, pairs, self.settings.prompt_batch):
                stop = min(start + self.settings.prompt_batch, pairs)
                index = torch.arange(start, stop, device=self.device)
                image_index, concept_index = index // n_concepts, index % n_concepts
                output = self.model(
                    vision_embeds=type(vision)(
                        fpn_hidden_states=tuple(f[image_index] for f in vision.fpn_hidden_states),
                        fpn_position_encoding=tuple(
                            p[image_index] for p in vision.fpn_position_encoding
                        ),
                    ),
                    text_embeds=BaseModelOutputWithPooling(pooler_output=features[concept_index]),
                    attention_mask=mask[concept_index],
                )
                maps = self._score_maps(output)
                if scores is None:
                    scores = torch.empty(
                        (pairs, *maps.shape[-2:]), dtype=torch.float32, device=self.device
                    )
                scores[start:stop] = maps
        assert scores is not None
        return scores.reshape(n_images, n_concepts, *scores.shape[-2:]).cpu().numpy()


def checkpoint_type(model: str) -> str | None:
    """The ``model_type`` in the ``config.json`` of ``model`` (a local directory or a model
    id in the Hugging Face cache), or ``None`` when there is none to read; nothing is
    downloaded.

    Examples
    --------
    >>> import json, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> _ = (Path(folder) / "config.json").write_text(json.dumps({"model_type": "sam3"}))
    >>> checkpoint_type(folder), checkpoint_type(folder + "/missing")
    ('sam3', None)
    """
    path = Path(model) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except (ImportError, ValueError):  # no hub client, or not a model id
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def as_segmenter(segmenter: Any, *, device: Any = None, dtype: Any = None) -> Any:
    """A :class:`Segmenter` from an adapter, a callable, or a model id / local directory.

    Parameters
    ----------
    segmenter
        A model id or directory (loaded as :class:`Sam3Segmenter` when its config is a
        SAM 3 one, ``model_type`` ``"sam3"`` or ``"sam3_video"``, else as
        :class:`CLIPSegSegmenter`), an adapter, a :class:`Segmenter`, or a callable
        ``(images, concepts) -> score maps``.
    device, dtype
        Where and in which precision to load a model given by id or directory (see
        :func:`pyneuron.devices.resolve_device`, ``resolve_dtype``; checked before it loads).

    Raises
    ------
    PyneuronError
        ``device`` or ``dtype`` given with a segmenter that is already built (an adapter
        runs where it was built, a callable where it runs itself: give them when building
        it), or a segmenter of none of these kinds.
    """
    if isinstance(segmenter, str):
        adapter = (
            Sam3Segmenter
            if checkpoint_type(segmenter) in ("sam3", "sam3_video")
            else CLIPSegSegmenter
        )
        return adapter.from_pretrained(segmenter, device=device, dtype=dtype)
    if not callable(segmenter):
        raise PyneuronError(
            f"segmenter must be a model id or directory (CLIPSeg or SAM 3), a Segmenter, or a "
            f"callable (images, concepts) -> score maps; got {type(segmenter).__name__}"
        )
    if device is not None or dtype is not None:
        built = (
            f" (on {segmenter.device.type}, in {str(segmenter.dtype).removeprefix('torch.')})"
            if isinstance(segmenter, _TransformersSegmenter)
            else ""
        )
        raise PyneuronError(
            "device and dtype apply to a segmenter given as a model id or directory, loaded "
            f"here; this {type(segmenter).__name__} is already built{built}: give them when "
            "building it (e.g. CLIPSegSegmenter.from_pretrained(model, device=..., dtype=...))"
        )
    if isinstance(segmenter, (_TransformersSegmenter, CallableSegmenter, Segmenter)):
        return segmenter
    return CallableSegmenter(segmenter)
