"""Intervention faithfulness: does hiding what a formula names silence the unit?

For each explained unit, its top images (highest peak activation among the images where
its formula's mask is not empty) are shown to the model again with the formula's pixels
replaced by a neutral fill, and with random regions of the same shape and area (the
formula's mask rolled by random non-zero offsets, wrapping around) filled the same way.
A faithful explanation makes the first drop far larger than the second.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..engine.checks import check_table, positive_int
from ..engine.formula import Formula
from ..engine.null import roll_masks
from ..engine.store import ConceptStore
from ..errors import PyneuronError
from ..image_files import list_images, open_image
from ..progress import progress_bar
from .activations import LayerFormat, capture

#: Columns :func:`faithfulness` adds.
FAITHFULNESS_COLUMNS = ("activation_drop", "activation_drop_random", "faithfulness_images")
FILLS = ("mean", "blur")


def faithfulness(
    model: Any,
    layer: str,
    images: Any,
    store: ConceptStore,
    table: pd.DataFrame,
    *,
    top_k: int = 8,
    random_regions: int = 4,
    fill: str | Sequence[float] = "mean",
    blur_sigma: float | None = None,
    seed: int = 0,
    activations: np.ndarray | None = None,
    batch_size: int = 32,
    device: Any = None,
    dtype: Any = None,
    transform: Callable[..., Any] | None = None,
    layer_format: LayerFormat | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Measure how much each unit's activation drops when its formula's pixels are hidden.

    Parameters
    ----------
    model, layer
        The model (in eval mode) and the layer the table explains.
    images
        The store's probing images, in its order, as pixels: an array (N, H, W, 3)
        uint8 or (N, 3, H, W) float, a folder, or a list of files or PIL images.
        Concept masks are resized to the images (nearest neighbour).
    store
        The concepts the formulas are written in.
    table
        One layer's explanations (``unit``, ``formula``), e.g. from :func:`pyneuron.dissect`.
    top_k
        Images per unit: its highest peak activations among images where the formula holds.
    random_regions
        Random regions (the formula's mask rolled by random offsets) per image.
    fill
        ``"mean"``: the mean colour of the images used; ``"blur"``: the image blurred
        (Gaussian, ``blur_sigma`` pixels, default 1/16 of the larger side); or one value
        per channel.
    activations
        The layer's captured activations (N, U, h, w), to rank images without a new pass.
    batch_size, device, dtype, transform, layer_format
        As in :func:`pyneuron.capture` (``transform`` applies to PIL images and files).

    Returns
    -------
    pandas.DataFrame
        A copy of ``table`` with ``activation_drop`` (1 − mean peak activation with the
        formula's pixels filled / mean peak activation, on the unit's top images),
        ``activation_drop_random`` (the same with random regions of the same area) and
        ``faithfulness_images`` (top images used). Rows without a formula, or whose
        formula holds in no image, get NaN and 0; so do units whose mean peak
        activation on those images is not positive.

    Examples
    --------
    >>> import numpy as np, pandas as pd, torch, pyneuron
    >>> images = np.full((6, 8, 8, 3), 128, dtype=np.uint8)
    >>> red = np.zeros((1, 6, 8, 8), dtype=bool); red[0, :, 2:5, 2:5] = True
    >>> images[red[0]] = (255, 0, 0)
    >>> store = pyneuron.ConceptStore.from_masks(red, ["red"])
    >>> conv = torch.nn.Conv2d(3, 1, 1)   # a "red" detector: R - G - B
    >>> _ = conv.weight.data.copy_(torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1))
    >>> _ = conv.bias.data.zero_()
    >>> model = torch.nn.Sequential(conv, torch.nn.ReLU()).eval()
    >>> table = pd.DataFrame({"unit": [0], "formula": ["red"]})
    >>> out = pyneuron.faithfulness(model, "1", images, store, table, progress=False)
    >>> columns = ["activation_drop", "activation_drop_random", "faithfulness_images"]
    >>> [round(float(out.loc[0, c]), 2) for c in columns]  # the square vs random 3x3 patches
    [1.0, 0.0, 6.0]
    """
    check_table(table, ("unit", "formula"))
    if "range" in table.columns:
        raise PyneuronError("faithfulness of activation ranges is not supported; use thresholds")
    top_k = positive_int(top_k, "top_k")
    random_regions = positive_int(random_regions, "random_regions")
    pixels = _Pixels(images)
    if len(pixels) != store.grid.n_images:
        raise PyneuronError(
            f"{len(pixels)} images but the concept store covers {store.grid.n_images}; pass "
            "the store's probing images, in its order"
        )
    capture_options = dict(
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        transform=transform,
        formats=layer_format,
        progress=False,
    )
    if activations is None:
        options = {**capture_options, "progress": progress}
        activations = capture(model, layer, pixels.source, **options)[layer]
    if activations.shape[0] != len(pixels):
        raise PyneuronError(f"activations cover {activations.shape[0]} images, not {len(pixels)}")
    peaks = activations.reshape(activations.shape[0], activations.shape[1], -1).max(axis=2)

    plans = [_top_images(row, peaks, store, top_k) for row in table.itertuples()]
    used = sorted({i for plan in plans for i, _ in plan})
    fill_value = _fill(fill, pixels, used)
    units = [int(row.unit) if plan else -1 for row, plan in zip(table.itertuples(), plans)]
    jobs = _plan_jobs(plans, units, pixels, random_regions, np.random.default_rng(seed))
    # measured[r][j, 0]: peak of the unit of row r on its j-th top image; [j, 1]: with the
    # formula's pixels filled; [j, 2:]: with the random regions filled.
    measured = [np.empty((len(plan), 2 + random_regions), dtype=np.float32) for plan in plans]
    _, _, masked, unmasked = _count_variants(jobs, random_regions)
    _forward_variants(
        model,
        layer,
        pixels,
        _variants(jobs, pixels, fill_value, blur_sigma, random_regions),
        measured,
        total=masked + unmasked,
        describe=_describe(jobs, top_k, random_regions, batch_size, layer),
        capture_options=capture_options,
        progress=progress,
    )
    drops = np.full((len(plans), 2), np.nan)
    counts = np.zeros(len(plans), dtype=np.int64)
    for r, plan in enumerate(plans):
        if not plan:
            continue
        base = measured[r][:, 0].mean()
        if base > 0:
            drops[r] = (
                1.0 - measured[r][:, 1].mean() / base,
                1.0 - measured[r][:, 2:].mean() / base,
            )
        counts[r] = len(plan)
    result = table.copy()
    result["activation_drop"] = drops[:, 0]
    result["activation_drop_random"] = drops[:, 1]
    result["faithfulness_images"] = counts
    return result


def _top_images(
    row: Any, peaks: np.ndarray, store: ConceptStore, top_k: int
) -> list[tuple[int, np.ndarray]]:
    """(image, formula mask on the grid) of the unit's top images where the formula holds."""
    if not isinstance(row.formula, str) or not row.formula.strip():
        return []
    unit = int(row.unit)
    if not 0 <= unit < peaks.shape[1]:
        raise PyneuronError(f"unit {unit} is not a unit of the layer ({peaks.shape[1]} units)")
    formula = Formula.parse(row.formula)
    chosen = []
    for image in np.argsort(-peaks[:, unit], kind="stable"):
        mask = formula.image_mask(store, int(image))
        if mask.any():
            chosen.append((int(image), mask))
            if len(chosen) == top_k:
                break
    return chosen


@dataclasses.dataclass(frozen=True)
class _Job:
    """One (row, top image) pair: the row's unit, its formula's mask and random offsets."""

    row: int
    slot: int
    unit: int
    grid_mask: np.ndarray
    offsets: np.ndarray


#: Per image id (ascending): its pairs, grouped by formula mask (equal masks together).
_Jobs = dict[int, list[list[_Job]]]
#: (pairs, column, image): a model input, and the pairs whose ``column`` its peaks fill.
_Variant = tuple[list[_Job], int, np.ndarray]


def _plan_jobs(
    plans: list[list[tuple[int, np.ndarray]]],
    units: list[int],
    pixels: _Pixels,
    random_regions: int,
    rng: np.random.Generator,
) -> _Jobs:
    """The (row, top image) pairs per image, those with equal formula masks grouped.

    The random offsets are drawn row by row, image by image, exactly as a loop over one
    unit at a time draws them, so a seed gives the same regions whatever the batching.
    """
    by_image: dict[int, dict[bytes, list[_Job]]] = {}
    shapes: dict[int, tuple[int, int]] = {}
    for r, plan in enumerate(plans):
        for slot, (image, grid_mask) in enumerate(plan):
            if image not in shapes:
                shapes[image] = pixels.shape(image)
            h, w = shapes[image]
            offsets = rng.integers(1, max(2, h * w), size=random_regions)  # never (0, 0)
            key = repr(grid_mask.shape).encode() + np.packbits(grid_mask).tobytes()
            groups = by_image.setdefault(image, {})
            groups.setdefault(key, []).append(_Job(r, slot, units[r], grid_mask, offsets))
    return {image: list(by_image[image].values()) for image in sorted(by_image)}


def _count_variants(jobs: _Jobs, random_regions: int) -> tuple[int, int, int, int]:
    """(units, (unit, image) pairs, masked images, unmasked images) of a plan."""
    pairs = [job for groups in jobs.values() for group in groups for job in group]
    masked = sum(len(groups) for groups in jobs.values()) + len(pairs) * random_regions
    return len({job.row for job in pairs}), len(pairs), masked, len(jobs)


def _variants(
    jobs: _Jobs,
    pixels: _Pixels,
    fill_value: np.ndarray | None,
    blur_sigma: float | None,
    random_regions: int,
) -> Iterator[_Variant]:
    """The images to show the model, one image id at a time, as (pairs, column, image):
    the unmasked image once (column 0 of every pair that uses it), each distinct formula
    mask filled once (column 1 of the pairs with that mask), and each pair's random
    regions filled (columns 2, 3, ...)."""
    for image, groups in jobs.items():
        original = pixels.get(image)
        yield [job for group in groups for job in group], 0, original
        filler = _blur(original, blur_sigma) if fill_value is None else fill_value
        for group in groups:
            region = _resize_mask(group[0].grid_mask, original.shape[:2])
            yield group, 1, _filled(original, region, filler)
            h, w = region.shape
            for job in group:
                shifted = roll_masks(
                    np.repeat(region[None], random_regions, axis=0),
                    job.offsets // w,
                    job.offsets % w,
                )
                for k, mask in enumerate(shifted):
                    yield [job], 2 + k, _filled(original, mask, filler)


def _filled(original: np.ndarray, mask: np.ndarray, filler: np.ndarray) -> np.ndarray:
    return np.where(mask[..., None], filler, original)


def _forward_variants(
    model: Any,
    layer: str,
    pixels: _Pixels,
    variants: Iterator[_Variant],
    measured: list[np.ndarray],
    *,
    total: int,
    describe: Callable[[float], str],
    capture_options: dict[str, Any],
    progress: bool,
) -> None:
    """Run the variants through the model in full batches and store each one's peaks.

    After the first batch (when more follow) a line with the number of images and an
    estimate of the time left at the first batch's rate is written to stderr.
    """
    batch_size = capture_options["batch_size"]
    bar = progress_bar(total=total, desc=f"faithfulness {layer}", unit="img", enabled=progress)
    started = time.perf_counter()
    done = 0
    with bar:
        while True:
            batch = list(itertools.islice(variants, batch_size))
            if not batch:
                break
            inputs = pixels.build([image for _, _, image in batch])
            maps = capture(model, layer, inputs, **capture_options)[layer]
            peaks = maps.reshape(maps.shape[0], maps.shape[1], -1).max(axis=2)
            for v, (pairs, column, _) in enumerate(batch):
                for job in pairs:
                    measured[job.row][job.slot, column] = peaks[v, job.unit]
            if done == 0 and progress and len(batch) < total:
                rate = len(batch) / max(time.perf_counter() - started, 1e-9)
                bar.write(describe(rate), file=sys.stderr)
            done += len(batch)
            bar.update(len(batch))


def _describe(
    jobs: _Jobs, top_k: int, random_regions: int, batch_size: int, layer: str
) -> Callable[[float], str]:
    """The estimate line of :func:`_forward_variants`, given the measured images/second."""
    units, _, masked, unmasked = _count_variants(jobs, random_regions)
    total = masked + unmasked
    passes = -(-total // batch_size)

    def line(rate: float) -> str:
        seconds = total / rate
        when = f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
        return (
            f"faithfulness {layer}: {units:,} units x up to {top_k} images x "
            f"{1 + random_regions} variants = {masked:,} masked images (+ {unmasked:,} "
            f"unmasked) in {passes:,} forward passes of {batch_size}; ~{when} at the "
            f"measured rate ({rate:,.0f} images/s)"
        )

    return line


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask (pixel centres)."""
    rows = ((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(np.int64)
    cols = ((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(np.int64)
    return mask[rows[:, None], cols[None, :]]


def _fill(fill: str | Sequence[float], pixels: _Pixels, used: list[int]) -> np.ndarray | None:
    """The constant fill colour, or None for a blur."""
    if isinstance(fill, str):
        if fill not in FILLS:
            raise PyneuronError(f"fill must be one of {', '.join(FILLS)} or a colour, got {fill!r}")
        if fill == "blur" or not used:
            return None if fill == "blur" else np.zeros(pixels.channels, dtype=np.float32)
        return np.mean([pixels.get(i).mean(axis=(0, 1)) for i in used], axis=0)
    colour = np.asarray(fill, dtype=np.float32).reshape(-1)
    if colour.shape[0] != pixels.channels or not np.isfinite(colour).all():
        raise PyneuronError(f"a fill colour needs {pixels.channels} finite values, got {fill!r}")
    return colour


def _blur(image: np.ndarray, sigma: float | None) -> np.ndarray:
    """Gaussian blur of an (H, W, C) float image, reflecting at the borders."""
    if sigma is None:
        sigma = max(image.shape[:2]) / 16
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise PyneuronError(f"blur_sigma must be a positive number, got {sigma!r}")
    radius = max(1, int(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    out = image
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect" if out.shape[axis] > radius else "edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=axis)
        out = windows @ kernel
    return out.astype(np.float32)


class _Pixels:
    """Probing images as (H, W, C) float32 arrays, and back to what :func:`capture` takes."""

    def __init__(self, images: Any) -> None:
        self.source = images
        self.files: list[Any] | None = None
        self.array: np.ndarray | None = None
        if isinstance(images, np.ndarray):
            if images.ndim != 4:
                raise PyneuronError(
                    f"an image array must be (N, H, W, 3) or (N, 3, H, W), got {images.shape}"
                )
            self.channels_last = images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3)
            self.array = images
            self.channels = images.shape[-1] if self.channels_last else images.shape[1]
        elif isinstance(images, (str, os.PathLike)):
            self.files = list_images(images)
            self.channels = 3
        elif isinstance(images, (list, tuple)):
            self.files = list(images)
            self.channels = 3
        else:
            raise PyneuronError(
                f"faithfulness needs the images' pixels: an array, a folder, or a list of files "
                f"or PIL images, got {type(images).__name__}"
            )

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.array)  # type: ignore[arg-type]

    def shape(self, i: int) -> tuple[int, int]:
        """(height, width) of image ``i``, without decoding a file's pixels."""
        if self.array is not None:
            return self.array.shape[1:3] if self.channels_last else self.array.shape[2:4]
        item = self.files[i]  # type: ignore[index]
        if isinstance(item, (str, os.PathLike)):
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(item) as image:
                    return image.height, image.width
            except (UnidentifiedImageError, OSError) as error:
                raise PyneuronError(f"cannot decode image {item}: {error}") from None
        return item.height, item.width

    def get(self, i: int) -> np.ndarray:
        if self.array is not None:
            image = self.array[i] if self.channels_last else self.array[i].transpose(1, 2, 0)
            return np.asarray(image, dtype=np.float32)
        item = self.files[i]  # type: ignore[index]
        if isinstance(item, (str, os.PathLike)):
            item = open_image(Path(item))
        return np.asarray(item.convert("RGB"), dtype=np.float32)

    def build(self, images: list[np.ndarray]) -> Any:
        """Modified images in the source's form (array of its dtype, or PIL images)."""
        from PIL import Image

        if self.array is None:
            return [Image.fromarray(_to_uint8(image)) for image in images]
        stacked = np.stack(images)
        if self.array.dtype == np.uint8:
            stacked = _to_uint8(stacked)
        stacked = stacked.astype(self.array.dtype, copy=False)
        return stacked if self.channels_last else stacked.transpose(0, 3, 1, 2)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
