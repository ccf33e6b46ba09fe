"""compexp's / NetDissect-Lite's ``QuantileVector`` (``util/vecquantile.py``), re-derived
from the published algorithm as a slow reference, with a different representation from
pyneuron's (each level a growing array, not a preallocated buffer with a fill count), to
check :mod:`pyneuron.compexp_quantiles` against.

How compexp uses it (``FeatureOperator.quantile_threshold``): ``QuantileVector(depth=U,
seed=1)``; for each batch of 64 images, ``add(batch.transpose(0, 2, 3, 1).reshape(-1,
U))``; threshold = ``readout(1000)[:, int(1000 * (1 - q) - 1)]``.
"""

from __future__ import annotations

import numpy as np


class QuantileVectorReference:
    def __init__(self, depth: int, resolution: int = 24 * 1024, seed: int = 1) -> None:
        self.resolution = resolution
        self.smallest = min(128, (resolution + 7) // 8)
        self.capacity = [resolution]  # per level
        self.items = [np.zeros((depth, 0))]  # per level, float64
        self.random = np.random.RandomState(seed)
        self.low = np.full(depth, np.nan)
        self.high = np.full(depth, np.nan)
        self.size = 0

    # -- adding ---------------------------------------------------------------------------
    def add(self, rows: np.ndarray) -> None:
        """rows: (n, depth), appended in order."""
        self.size += rows.shape[0]
        i = 0
        while i < rows.shape[0]:
            if self.free(0) == 0:
                self.shift()
            take = min(self.free(0), rows.shape[0] - i)
            self.items[0] = np.concatenate([self.items[0], rows[i : i + take].T.astype(float)], 1)
            i += take

    def free(self, level: int) -> int:
        return self.capacity[level] - self.items[level].shape[1]

    def keep_free(self, level: int) -> int:
        return (self.capacity[level - 1] + 1) // 2 if level > 0 else 1

    def see(self, values: np.ndarray) -> None:
        self.low = np.fmin(self.low, values.min(axis=1))
        self.high = np.fmax(self.high, values.max(axis=1))

    def compact(self, level: int, see: bool) -> np.ndarray:
        values = np.sort(self.items[level], axis=1)
        if see:
            self.see(values)
        coin = self.random.binomial(1, 0.5)
        return values[:, coin::2]

    def shift(self) -> None:
        level = 0
        while self.free(level) < self.keep_free(level):
            if level + 1 == len(self.items):
                self.expand()
                return
            half = self.compact(level, see=level == 0)
            self.items[level + 1] = np.concatenate([self.items[level + 1], half], 1)
            self.items[level] = self.items[level][:, :0]
            level += 1

    def expand(self) -> None:
        cap = np.ceil(self.resolution * np.power(0.67, len(self.items)))
        assert cap >= 2, "the original would subsample from here on"
        self.capacity.insert(0, max(self.smallest, int(cap)))
        self.items.insert(0, self.items[0][:, :0])
        for level in range(1, len(self.items)):
            count = self.items[level].shape[1]
            if count == 0:
                continue
            below = self.items[level - 1].shape[1]
            if self.capacity[level - 1] - (count + below) >= self.keep_free(level - 1):
                moved = [self.items[level - 1], self.items[level]]
                self.items[level - 1] = np.concatenate(moved, 1)
                self.items[level] = self.items[level][:, :0]
            else:
                self.items[level] = self.compact(level, see=level == 1)

    # -- reading --------------------------------------------------------------------------
    def readout(self, count: int = 1000) -> np.ndarray:
        """quantiles(linspace(0, 1, count), old_style=True): (depth, count)."""
        if self.size == 0:
            return np.full((self.low.shape[0], count), np.nan)
        if self.items[0].shape[1]:
            self.see(self.items[0])
        summary = [np.stack([self.low, self.high], 1)]
        weights = [np.zeros(2, dtype="float32")]
        for level, values in enumerate(self.items):
            if values.shape[1]:
                summary.append(values)
                weights.append(np.full(values.shape[1], 2.0**level, dtype="float32"))
        summary = np.concatenate(summary, 1)
        weights = np.concatenate(weights)
        order = np.argsort(summary)
        summary = summary[np.arange(summary.shape[0])[:, None], order]
        weights = weights[order]
        cumulative = np.cumsum(weights, axis=-1) - weights / 2
        cumulative -= cumulative[:, 0:1]
        cumulative /= cumulative[:, -1:]
        levels = np.linspace(0.0, 1.0, count)
        return np.stack([np.interp(levels, cumulative[d], summary[d]) for d in range(len(summary))])


def compexp_threshold(features: np.ndarray, q: float = 0.005, resolution: int = 24 * 1024):
    """compexp's quantile_threshold on (N, U, h, w) features."""
    quant = QuantileVectorReference(features.shape[1], resolution=resolution, seed=1)
    for i in range(0, features.shape[0], 64):
        batch = features[i : i + 64]
        quant.add(np.transpose(batch, axes=(0, 2, 3, 1)).reshape(-1, features.shape[1]))
    return quant.readout(1000)[:, int(1000 * (1 - q) - 1)]
