"""Shared helpers for the secure-evaluation tests: skeleton-like windows and calibrated weights.

Purely random ST-GCN weights give near-tied logits (top-1 flips under any perturbation); we
"calibrate" a random model instead: BatchNorm running statistics are set from the activations of
skeleton-like windows, so every layer sees normalised inputs and logits spread out.
"""

from __future__ import annotations

import numpy as np
import torch

from enclave_bridge.measured.stgcn import STGCN


def skeleton_windows(n: int, t: int, m: int, seed: int) -> np.ndarray:
    """(n, 3, T, 18, M) float32: smooth joint trajectories in [-0.5, 0.5], scores in [0.3, 1]."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-0.2, 0.2, size=(n, 1, 1, 18, m))
    steps = rng.normal(0, 0.01, size=(n, 2, t, 18, m)).cumsum(axis=2)
    xy = np.clip(base + steps, -0.5, 0.5)
    score = rng.uniform(0.3, 1.0, size=(n, 1, t, 18, m))
    x = np.concatenate([xy, score], axis=1).astype(np.float32)
    if m > 1:
        x[rng.random(n) < 0.3, :, :, :, 1] = 0.0  # sometimes a single person
    return x


def calibrated_model(num_class: int = 10, seed: int = 0, t: int = 32, m: int = 2) -> STGCN:
    """Random ST-GCN with BN statistics measured on skeleton windows and random edge importance."""
    torch.manual_seed(seed)
    model = STGCN(num_class)
    with torch.no_grad():
        if model.edge_importance is not None:
            for p in model.edge_importance:
                p.uniform_(0.5, 1.5)
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                mod.momentum = None  # cumulative average over the calibration batches
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
        model.train()
        for i in range(2):
            model(torch.from_numpy(skeleton_windows(8, t, m, seed=1000 + i)))
    return model.eval()
