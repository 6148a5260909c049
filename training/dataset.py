"""Deterministic synthetic datasets for training and evaluation.

Training draws *fresh* samples every epoch (indices `epoch·n … epoch·n+n−1` of the train split),
which is cheap (a few ms per window, far below the cost of a training step) and avoids
over-fitting a small fixed set. Validation and test sets are fixed slices of their own splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from enclave_bridge.shared.errors import ConfigError
from training.synth import CLASSES, SynthConfig, generate


@dataclass(frozen=True, slots=True)
class SplitSpec:
    """Which samples a set holds: `n` samples of `split` from index `start`, generated with `seed`."""

    seed: int
    split: str
    n: int
    start: int = 0


def make_arrays(spec: SplitSpec, cfg: SynthConfig) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """X (n, 3, T, 18, M) float32 and y (n,) int64 for `spec`."""
    if spec.n < 1:
        raise ConfigError(f"dataset size must be ≥ 1, got {spec.n}")
    return generate(spec.n, spec.seed, spec.split, cfg, start=spec.start, classes=CLASSES)


def epoch_spec(seed: int, epoch: int, n: int) -> SplitSpec:
    """The training samples of one epoch (disjoint from every other epoch's)."""
    return SplitSpec(seed, "train", n, start=epoch * n)


def batches(
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    batch_size: int,
    rng: np.random.Generator | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split arrays into torch batches, shuffled when `rng` is given (drop nothing)."""
    order = rng.permutation(len(y)) if rng is not None else np.arange(len(y))
    out = []
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        out.append((torch.from_numpy(x[idx]), torch.from_numpy(y[idx])))
    return out


def load_real_windows(path: str, cfg: object) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Annotated real windows (npz `x`, `y`) whose shape matches the training windows."""
    try:
        with np.load(path) as z:
            x, y = z["x"].astype(np.float32), z["y"].astype(np.int64)
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"--real-windows {path}: {e}") from e
    T, M = getattr(cfg, "T", x.shape[2]), getattr(cfg, "M", x.shape[4])
    if x.ndim != 5 or x.shape[1:] != (3, T, 18, M) or len(x) != len(y) or not len(y):
        raise ConfigError(f"--real-windows {path}: windows of shape {x.shape}, expected (N, 3, {T}, 18, {M})")
    return x, y


def real_clip_names(path: str) -> list[str]:
    """The clips an exported real-window file was cut from (sorted; empty for files without)."""
    try:
        with np.load(path) as z:
            return sorted({str(c) for c in z["clip"]}) if "clip" in z.files else []
    except (OSError, ValueError) as e:
        raise ConfigError(f"--real-windows {path}: {e}") from e


def augment_real(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], n: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """`n` real windows drawn class-balanced (each class as often, so a long clip of one activity
    does not dominate), each mirrored or not, scaled about its centre by ±15 %, shifted by up to
    0.1 frame, and jittered per joint (σ 0.4 % of the frame): a handful of clips must not be
    learnt by heart. Missing joints stay zero."""
    if n <= 0:
        return x[:0], y[:0]
    classes = np.unique(y)
    pick = np.concatenate([rng.choice(np.flatnonzero(y == c), 1) for c in rng.choice(classes, n)])
    out = x[pick].copy()
    present = out[:, 2:3] > 0
    mirror = np.where(rng.random(n) < 0.5, -1.0, 1.0)[:, None, None, None, None]
    scale = rng.uniform(0.85, 1.15, (n, 1, 1, 1, 1))
    shift = rng.uniform(-0.1, 0.1, (n, 2, 1, 1, 1))
    xy = out[:, :2] * scale + shift
    xy[:, :1] *= mirror
    xy += rng.normal(0, 0.004, xy.shape)
    out[:, :2] = np.where(present, np.clip(xy, -0.5, 0.5), 0.0)
    return out.astype(np.float32), y[pick]


__all__ = [
    "SplitSpec",
    "augment_real",
    "batches",
    "epoch_spec",
    "load_real_windows",
    "make_arrays",
    "real_clip_names",
]
