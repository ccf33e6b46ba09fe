"""Upsampling against Pillow and unit masks against a dense numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import pyneuron
from pyneuron.engine.upsample import bilinear_resize, unit_masks_from_activations


def pillow_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(x.astype(np.float32)).resize((width, height), Image.BILINEAR))


@pytest.mark.parametrize(
    "sizes",
    [
        (7, 7, 112, 112),
        (14, 14, 112, 112),
        (3, 5, 17, 9),
        (5, 4, 5, 9),
        (1, 1, 3, 3),
        (2, 9, 31, 100),
        (9, 9, 4, 4),
        (6, 6, 6, 6),
        (13, 7, 56, 56),
    ],
)
def test_resize_is_bit_identical_to_pillow(sizes):
    h, w, height, width = sizes
    rng = np.random.default_rng(h * 100 + w)
    maps = (rng.standard_normal((4, h, w)) * 10).astype(np.float32)
    maps[0] = np.round(maps[0])  # ties
    ours = bilinear_resize(maps, height, width)
    for k in range(4):
        np.testing.assert_array_equal(ours[k], pillow_resize(maps[k], height, width))


def _pillow_13() -> bool:
    import PIL

    return int(PIL.__version__.split(".")[0]) >= 13


def test_resize_matches_pillow_on_random_shrinking_and_enlarging_shapes():
    """Every mix of shrinking, keeping and enlarging each axis, bit for bit (Pillow >= 13
    runs the vertical pass first when the height shrinks much more than the width; older
    Pillow always goes horizontal first, so there only those shapes are compared)."""
    rng = np.random.default_rng(15)
    kinds = set()
    checked = 0
    for _ in range(400):
        h, w, height, width = (int(v) for v in rng.integers(1, 40, 4))
        vertical_first = height < h and h - height > 2 * (w - width)
        if vertical_first and width != w and not _pillow_13():
            continue
        maps = (rng.standard_normal((2, h, w)) * 10).astype(np.float32)
        maps[1] = np.round(maps[1])  # ties
        ours = bilinear_resize(maps, height, width)
        for k in range(2):
            expected = pillow_resize(maps[k], height, width)
            assert ours[k].view(np.uint32).tolist() == expected.view(np.uint32).tolist(), (
                h,
                w,
                height,
                width,
            )
        kinds.add((np.sign(height - h), np.sign(width - w), vertical_first))
        checked += 1
    assert checked > 300
    # both shrinking, one shrinking and one growing, and both pass orders were exercised
    assert {(-1, -1), (-1, 1), (1, -1), (1, 1)} <= {k[:2] for k in kinds}
    assert {True, False} <= {k[2] for k in kinds}


def _reference_masks(acts, lo, hi, height, width):
    n, u = acts.shape[:2]
    out = np.zeros((u, n, height, width), dtype=bool)
    for i in range(n):
        for j in range(u):
            up = pillow_resize(acts[i, j], height, width).astype(np.float64)
            out[j, i] = (up > lo[j]) & (up < (np.inf if hi is None else hi[j]))
    return out


@pytest.mark.parametrize("shape", [(5, 6, 7, 7, 20, 20), (4, 3, 3, 5, 9, 13), (3, 2, 4, 4, 4, 4)])
def test_unit_masks_match_dense_reference(shape, threads):
    n, u, h, w, height, width = shape
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((n, u, h, w)).astype(np.float32)
    acts[:, 0] = -5.0  # a unit that never fires
    acts[0, 1] = 10.0  # fires on a whole image
    lo = np.quantile(acts.reshape(n, u, -1).transpose(1, 0, 2).reshape(u, -1), 0.8, axis=1)
    masks = unit_masks_from_activations(acts, lo, (height, width), batch_images=2, progress=False)
    reference = _reference_masks(acts, lo, None, height, width)
    for j in range(u):
        np.testing.assert_array_equal(masks.mask(j), reference[j])
    hi = lo + 0.5
    ranged = unit_masks_from_activations(acts, lo, (height, width), upper=hi, progress=False)
    reference = _reference_masks(acts, lo, hi, height, width)
    for j in range(u):
        np.testing.assert_array_equal(ranged.mask(j), reference[j])


def test_unit_masks_stream_to_disk(tmp_path):
    acts = np.random.default_rng(1).standard_normal((6, 3, 4, 4)).astype(np.float32)
    lo = np.zeros(3)
    in_memory = unit_masks_from_activations(acts, lo, (8, 8), progress=False)
    on_disk = unit_masks_from_activations(acts, lo, (8, 8), path=tmp_path / "u", progress=False)
    reopened = pyneuron.UnitMasks.open(tmp_path / "u")
    for j in range(3):
        np.testing.assert_array_equal(on_disk.mask(j), in_memory.mask(j))
        np.testing.assert_array_equal(reopened.mask(j), in_memory.mask(j))


def test_bad_activations():
    acts = np.zeros((3, 2, 4, 4), dtype=np.float32)
    acts[2, 1, 0, 3] = np.nan
    with pytest.raises(pyneuron.PyneuronError, match="unit 1 in image 2 is nan"):
        unit_masks_from_activations(acts, np.zeros(2), (8, 8), progress=False)
    acts[2, 1, 0, 3] = np.inf
    with pytest.raises(pyneuron.PyneuronError, match="unit 1 in image 2 is inf"):
        unit_masks_from_activations(acts, np.zeros(2), (8, 8), progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="3 thresholds for 2 units"):
        unit_masks_from_activations(np.zeros((1, 2, 4, 4)), np.zeros(3), (8, 8), progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="no images"):
        unit_masks_from_activations(np.zeros((0, 2, 4, 4)), np.zeros(2), (8, 8), progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="shape"):
        unit_masks_from_activations(np.zeros((2, 4, 4)), np.zeros(2), (8, 8), progress=False)
    ok = np.zeros((2, 2, 4, 4), dtype=np.float32)
    with pytest.raises(pyneuron.PyneuronError, match="thresholds of unit 1 is NaN"):
        unit_masks_from_activations(ok, np.array([0.0, np.nan]), (8, 8), progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="upper bounds of unit 0 is NaN"):
        unit_masks_from_activations(ok, np.zeros(2), (8, 8), upper=np.full(2, np.nan))
    with pytest.raises(pyneuron.PyneuronError, match="size must be"):
        unit_masks_from_activations(ok, np.zeros(2), (8,), progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="at most 2"):
        unit_masks_from_activations(ok, np.zeros(2), (10**6, 10**6), progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="batch_images"):
        unit_masks_from_activations(ok, np.zeros(2), (8, 8), batch_images=0)
    with pytest.raises(pyneuron.PyneuronError, match="h, w >= 1"):
        unit_masks_from_activations(ok[:, :, :0], np.zeros(2), (8, 8), progress=False)


def test_pixel_counts_cannot_overflow_and_complex_values_are_refused():
    one = np.ones((1, 1, 1, 1), np.float32)
    # 65536 x 32768 = 2**31 pixels: the int32 per-image count used to wrap to 0.
    with pytest.raises(pyneuron.PyneuronError, match="at most 2\\*\\*31 - 1 pixels"):
        unit_masks_from_activations(one, np.array([0.0]), (65536, 32768), progress=False)
    with pytest.raises(ValueError, match="at most 2\\*\\*31 - 1 pixels"):  # the engine too
        pyneuron.engine._native.upsample_threshold(one, np.zeros(1), None, 65536, 32768)
    with pytest.raises(pyneuron.PyneuronError, match="activations must be real numbers"):
        unit_masks_from_activations(one + 1j, np.zeros(1), (4, 4), progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="thresholds must be real numbers"):
        unit_masks_from_activations(one, np.zeros(1) + 0.5j, (4, 4), progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="upper bounds must be real numbers"):
        unit_masks_from_activations(one, np.zeros(1), (4, 4), upper=["x"], progress=False)
    with pytest.raises(pyneuron.PyneuronError, match="real numbers"):
        pyneuron.quantile_thresholds(one + 1j)
