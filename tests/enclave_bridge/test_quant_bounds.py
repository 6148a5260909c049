"""Quantisation: the proven no-wrap bound holds for every op of the folded ST-GCN and is tight."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from enclave_bridge.quant import (
    BX,
    act_exponent,
    join_limbs,
    limb_bound,
    quantise_act,
    quantise_weight,
    split_limbs,
)
from enclave_bridge.ring import HALF
from enclave_bridge.secure_layers import QuantModel, quantised_forward
from enclave_bridge.stgcn import fold_batchnorm
from tests.enclave_bridge.secure_helpers import calibrated_model, skeleton_windows


@pytest.fixture(scope="module")
def qm() -> QuantModel:
    return QuantModel(calibrated_model(10, seed=3, t=24))


def test_every_op_meets_the_bound_and_exponent_is_maximal(qm):
    assert len(qm.ops) == 32  # 10 tcn + 9 agg + 10 gcn + 2 res + fc
    for op in qm.ops.values():
        q = op.q
        assert q.bound == BX * q.col_l1 <= HALF, op.name
        assert int(q.w_int.abs().sum(dim=0).max()) == q.col_l1
        scale = torch.pow(2.0, q.col_exp.double())[None, :]
        # one more bit of weight precision would break the bound (per column; one exponent for agg)
        bigger = torch.round(op.weight * scale * 2).to(torch.int64)
        if op.meta.kind == "agg":
            assert int(q.col_exp.unique().numel()) == 1
            assert BX * int(bigger.abs().sum(dim=0).max()) > HALF, op.name
        else:
            assert (BX * bigger.abs().sum(dim=0) > HALF).all(), op.name
        # quantisation error of each weight ≤ half a step
        assert float((op.weight * scale - q.w_int).abs().max()) <= 0.5 + 1e-9


def test_worst_case_input_reaches_but_never_exceeds_the_bound(qm):
    op = qm.ops["b5.tcn"]
    w = op.q.w_int
    col = int(w.abs().sum(dim=0).argmax())
    # x̂ = ±BX with the sign of the weights: |y| = BX·‖Ŵ_col‖₁ exactly
    worst = (BX * torch.sign(w[:, col])).to(torch.int64)
    y = int((worst * w[:, col]).sum())
    assert y == op.q.bound <= HALF


@pytest.mark.parametrize("max_abs", [1e-6, 0.3, 1.0, 7.5, 1023.0, 5e4])
def test_activation_exponent_never_clips(max_abs):
    e = act_exponent(max_abs)
    assert round(max_abs * 2.0**e) <= BX
    assert round(max_abs * 2.0 ** (e + 1)) > BX  # and uses the range


def test_quantise_act_zero_and_nonfinite():
    xq, e = quantise_act(torch.zeros(3, 4, dtype=torch.float64))
    assert e == 0 and int(xq.abs().max()) == 0
    with pytest.raises(ValueError):
        act_exponent(math.inf)


def test_zero_weights_quantise_to_zero():
    q = quantise_weight(torch.zeros(5, 3, dtype=torch.float64))
    assert q.col_l1 == 0 and int(q.w_int.abs().sum()) == 0


def test_quantisation_error_is_small_on_calibrated_weights(qm):
    x = skeleton_windows(4, 24, 2, seed=11)

    class RingDigits:
        """Every activation digit through the ring (|d| ≤ BX), exact results recombined."""

        def run(self, xq, ops):
            from enclave_bridge.ring import centred, exact_linear
            from enclave_bridge.secure_layers import linear_fn

            assert int(xq.abs().max()) > BX  # the full activation has more bits than one digit
            xd = split_limbs(xq, qm.act_limbs)
            return [
                join_limbs(
                    centred(exact_linear(linear_fn(o.meta, o.q.w_int.double()), xd, BX, o.q.col_l1)), 2
                )
                for o in ops
            ]

    got = quantised_forward(qm, x, RingDigits())
    ref = fold_batchnorm(calibrated_model(10, seed=3, t=24))(torch.from_numpy(x).double()).numpy()
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 2e-3, rel  # one 10-bit digit alone gives ~1e-2
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_activation_digits_round_trip_and_stay_in_the_ring_bound():
    for limbs in (1, 2, 3):
        b = limb_bound(limbs)
        x = torch.cat([torch.randint(-b, b + 1, (500, 4)), torch.tensor([[b, -b, 0, 1]])])
        d = split_limbs(x, limbs)
        assert d.shape == (limbs * x.shape[0], 4) and int(d.abs().max()) <= BX
        assert torch.equal(join_limbs(d.to(torch.int64), limbs), x)
    assert limb_bound(2) >= 2**20 - 2**10
    with pytest.raises(ValueError):
        limb_bound(4)
