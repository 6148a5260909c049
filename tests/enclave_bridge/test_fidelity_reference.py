"""Fidelity of every secure mode on reference-style random checkpoints (issue: imported models).

A user imports released ST-GCN checkpoints; their weights and BatchNorm statistics are nothing
like our calibrated test models. These are built the way the reference initialises a model
(conv/linear weights N(0, 0.02), BN γ ~ N(1, 0.02), β = 0) plus random running means/variances,
in both joint layouts. Every mode must stay within 1e-3 of the float model's largest logit per
window with the same top-1 class; the delegated modes must agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.measured.stgcn.fold import fold_batchnorm
from enclave_bridge.protocol import SecureEvaluator

TOL = 1e-3


def reference_style_model(num_class: int, layout: str, seed: int) -> STGCN:
    """Random ST-GCN initialised as the reference does, with random BN running statistics."""
    g = torch.Generator().manual_seed(seed)
    model = STGCN(num_class, layout=layout)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv2d | torch.nn.Conv1d | torch.nn.Linear):
                mod.weight.normal_(0.0, 0.02, generator=g)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                mod.weight.normal_(1.0, 0.02, generator=g)
                mod.bias.zero_()
                mod.running_mean.normal_(0.0, 0.5, generator=g)
                mod.running_var.uniform_(0.05, 4.0, generator=g)
    return model.eval()


def _windows(v: int, t: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (2, 3, t, v, 2)).astype(np.float32)
    x[1, :, :, :, 1] = 0.0  # one window with a single person
    return x


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float((np.abs(out - ref).max(axis=1) / np.abs(ref).max(axis=1)).max())


@pytest.mark.parametrize(
    ("layout", "num_class", "joints", "modes", "t"),
    [
        ("openpose", 400, 18, ("enclave", "slalom", "paper", "split2", "split3"), 8),
        ("ntu-rgb+d", 60, 25, ("enclave", "slalom", "split2", "split3"), 8),
    ],
)
def test_every_mode_within_1e3_of_float_on_reference_checkpoints(
    layout: str, num_class: int, joints: int, modes: tuple[str, ...], t: int
) -> None:
    model = reference_style_model(num_class, layout, seed=7)
    x = _windows(joints, t, seed=3)
    with torch.no_grad():
        ref = fold_batchnorm(model).double()(torch.from_numpy(x).double()).numpy()
    delegated = {}
    for mode in modes:
        with SecureEvaluator(model, mode, pool_capacity=0) as ev:
            out = ev.evaluate(x)
            assert ev.stats.freivalds_failures == 0
            if mode != "enclave":
                delegated[mode] = out
                assert ev.stats.freivalds_checks == len(ev.qm.ops)
        err = _rel_err(out, ref)
        assert err <= TOL, f"{layout} {mode}: relative logit error {err:.2e}"
        assert np.array_equal(out.argmax(axis=1), ref.argmax(axis=1)), f"{layout} {mode}: top-1 differs"
    first = next(iter(delegated.values()))
    for mode, out in delegated.items():
        assert np.array_equal(out, first), f"{mode} is not bit-identical to the other delegated modes"


def test_the_error_is_quantisation_not_luck() -> None:
    """The measured error sits far below the tolerance (≈1e-5): a regression to 10-bit weights fails."""
    model = reference_style_model(60, "ntu-rgb+d", seed=11)
    x = _windows(25, 8, seed=5)
    with torch.no_grad():
        ref = fold_batchnorm(model).double()(torch.from_numpy(x).double()).numpy()
    ev = SecureEvaluator(model, "slalom", pool_capacity=0)
    try:
        assert _rel_err(ev.exact_reference(x), ref) < 1e-4
    finally:
        ev.close()


def test_an_odd_number_of_freivalds_repetitions_is_checked_and_exact() -> None:
    """freivalds_reps=3 (allowed: ≥ 40 bits): the fused kernel pairs repetitions, the odd one alone."""
    model = reference_style_model(10, "openpose", seed=5)
    x = _windows(18, 8, seed=9)
    with SecureEvaluator(model, "split2", pool_capacity=0, freivalds_reps=3) as ev:
        out = ev.evaluate(x)
        assert np.array_equal(out, ev.exact_reference(x))
        assert ev.stats.freivalds_checks == len(ev.qm.ops)
        assert ev.stats.freivalds_failures == 0
