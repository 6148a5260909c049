"""Deterministic synthetic datasets for training and evaluation.

Training draws *fresh* samples every epoch (indices `epoch·n … epoch·n+n−1` of the train split),
which is cheap (a few ms per window, far below the cost of a training step) and avoids
over-fitting a small fixed set. Validation and test sets are fixed slices of their own splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from enclave_bridge.errors import ConfigError
from training.synth import CLASSES, SynthConfig, generate


@dataclass(frozen=True, slots=True)
class SplitSpec:
    """Which samples a set holds: `n` samples of `split` from index `start`, generated with `seed`."""

    seed: int
    split: str
    n: int
    start: int = 0


def make_arrays(spec: SplitSpec, cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """X (n, 3, T, 18, M) float32 and y (n,) int64 for `spec`."""
    if spec.n < 1:
        raise ConfigError(f"dataset size must be ≥ 1, got {spec.n}")
    return generate(spec.n, spec.seed, spec.split, cfg, start=spec.start, classes=CLASSES)


def epoch_spec(seed: int, epoch: int, n: int) -> SplitSpec:
    """The training samples of one epoch (disjoint from every other epoch's)."""
    return SplitSpec(seed, "train", n, start=epoch * n)


def batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split arrays into torch batches, shuffled when `rng` is given (drop nothing)."""
    order = rng.permutation(len(y)) if rng is not None else np.arange(len(y))
    out = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        out.append((torch.from_numpy(x[idx]), torch.from_numpy(y[idx])))
    return out


__all__ = ["SplitSpec", "batches", "epoch_spec", "make_arrays"]
