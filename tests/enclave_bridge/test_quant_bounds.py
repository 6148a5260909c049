"""Quantisation: the proven no-wrap bound BX·‖Ŵ_o‖₁ ≤ 2^52 holds for every op and is tight."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from enclave_bridge.measured.quant import (
    ACT_LIMBS,
    BX,
    WEIGHT_BUDGET,
    act_exponent,
    limb_bound,
    quantise_act,
    quantise_weight,
)
from enclave_bridge.measured.secure_layers import QuantModel, apply_linear, as4d, quantised_forward
from enclave_bridge.measured.stgcn import fold_batchnorm
from enclave_bridge.shared.ring import HALF, RingWeight, centred, to_ring
from tests.enclave_bridge.secure_helpers import calibrated_model, skeleton_windows


@pytest.fixture(scope="module")
def qm() -> QuantModel:
    return QuantModel(calibrated_model(10, seed=3, t=24))


def test_constants_one_ring_element_per_activation():
    assert BX == 2**20 - 1 and WEIGHT_BUDGET == 2**52 and ACT_LIMBS == 1
    assert WEIGHT_BUDGET < HALF  # exact centred representative …
    assert WEIGHT_BUDGET <= 2**53  # … and exact in one float64 GEMM
    assert limb_bound(1) == BX
    for bad in (0, 2, 3):
        with pytest.raises(ValueError, match="act_limbs"):
            limb_bound(bad)


def test_ops_of_the_folded_model(qm):
    """Block 0: one per-joint op; blocks 1–9: gcn as conv1x1 C → K·C_out (aggregated in the
    enclave), tcn, and a residual 1×1 conv where the width changes; then fc. No `agg` op."""
    kinds = {n: o.meta.kind for n, o in qm.ops.items()}
    assert len(qm.ops) == 23  # 10 gcn + 10 tcn + 2 res + fc
    assert kinds["b0.gcn"] == "joint" and kinds["fc"] == "dense"
    assert all(kinds[f"b{i}.gcn"] == "conv1x1" for i in range(1, 10))
    assert all(kinds[f"b{i}.tcn"] == "tconv" for i in range(10))
    assert sorted(n for n in kinds if n.endswith(".res")) == ["b4.res", "b7.res"]
    for i in range(1, 10):
        blk = qm.blocks[i]
        assert blk.A is not None and blk.gcn.c_out == blk.A.shape[0] * blk.tcn.c_out
    assert set(kinds.values()) == {"joint", "conv1x1", "tconv", "dense"}


def test_every_op_meets_the_bound_and_every_column_exponent_is_maximal(qm):
    for op in qm.ops.values():
        q = op.q
        assert q.bound == BX * q.col_l1 <= WEIGHT_BUDGET, op.name
        assert int(q.w_int.abs().sum(dim=0).max()) == q.col_l1
        assert int(q.w_int.abs().sum(dim=1).max()) == q.row_l1
        cols = q.w_int.abs().sum(dim=0)
        assert bool((BX * cols <= WEIGHT_BUDGET).all()), op.name
        scale = torch.pow(2.0, q.col_exp.double())[None, :]
        assert torch.equal(q.w_int, torch.round(op.weight * scale).to(torch.int64))
        # one more bit in any column would break the bound (per column, not the worst column's)
        bigger = torch.round(op.weight * scale * 2).to(torch.int64)
        live = op.weight.abs().sum(dim=0) > 0
        assert bool((BX * bigger.abs().sum(dim=0) > WEIGHT_BUDGET)[live].all()), op.name
        # ≥ 19 significant bits in every column's largest weight
        top = q.w_int.abs().max(dim=0).values[live]
        assert int(top.min()).bit_length() >= 19, op.name
        assert float((op.weight * scale - q.w_int).abs().max()) <= 0.5 + 1e-9


def test_per_column_exponents_differ_when_column_norms_do():
    w = torch.tensor([[1.0, 1e-3], [-2.0, 2e-3], [0.5, -1e-3]], dtype=torch.float64)
    q = quantise_weight(w)
    assert int(q.col_exp[1]) >= int(q.col_exp[0]) + 9  # the small column keeps its precision
    one = quantise_weight(w, per_column=False)
    assert int(one.col_exp.unique().numel()) == 1
    assert BX * one.col_l1 <= WEIGHT_BUDGET


def test_worst_case_input_reaches_but_never_exceeds_the_bound(qm):
    for name in ("b5.tcn", "b0.gcn", "fc"):
        op = qm.ops[name]
        w = op.q.w_int
        col = int(w.abs().sum(dim=0).argmax())
        # x̂ = ±BX with the sign of the weights: |y| = BX·‖Ŵ_col‖₁ exactly
        worst = (BX * torch.sign(w[:, col])).to(torch.int64)
        y = int((worst * w[:, col]).sum())
        assert y == op.q.bound <= WEIGHT_BUDGET
        assert op.q.bound > WEIGHT_BUDGET // 2  # tight: within a bit of the budget
        # the ring result of the worst case is the integer (no wrap), and float64 agrees
        ring = RingWeight(to_ring(w[:, col : col + 1])).apply(lambda t, wl: t @ wl, worst[None, :], BX)
        assert int(centred(ring)[0, 0]) == y
        assert int((worst.double() @ w[:, col].double()).item()) == y


@pytest.mark.parametrize("max_abs", [1e-6, 0.3, 1.0, 7.5, 1023.0, 5e4])
def test_activation_exponent_never_clips(max_abs):
    e = act_exponent(max_abs)
    assert round(max_abs * 2.0**e) <= BX
    assert round(max_abs * 2.0 ** (e + 1)) > BX  # and uses the range


def test_quantise_act_zero_nonfinite_and_full_range():
    xq, e = quantise_act(torch.zeros(3, 4, dtype=torch.float64))
    assert e == 0 and int(xq.abs().max()) == 0
    with pytest.raises(ValueError):
        act_exponent(math.inf)
    xq, e = quantise_act(torch.tensor([-3.0, 0.1, 2.0]))
    assert int(xq.abs().max()) <= BX and int(xq.abs().max()) > BX // 2
    assert xq.dtype == torch.int32


def test_zero_weights_quantise_to_zero():
    q = quantise_weight(torch.zeros(5, 3, dtype=torch.float64))
    assert q.col_l1 == 0 and int(q.w_int.abs().sum()) == 0


def test_quantisation_error_is_small_on_calibrated_weights(qm):
    """Every op through the ring (x̂ signed, Ŵ as ring elements, centred result) ≈ float model."""
    x = skeleton_windows(4, 24, 2, seed=11)

    class RingExact:
        """One stage: quantise (one exponent), exact x̂·Ŵ mod p, centre, dequantise."""

        def run(self, h, ops):
            xq, e = quantise_act(h)
            assert int(xq.abs().max()) <= BX
            outs = []
            for o in ops:
                y = RingWeight(to_ring(o.q.w_int)).apply(
                    lambda t, w, m=o.meta: apply_linear(m, t, w), xq.to(torch.int64), BX
                )
                yc = centred(y)
                assert int(yc.abs().max()) <= o.q.bound
                sc = torch.from_numpy(o.scale2 * 2.0**-e)
                outs.append((as4d(yc).double() * sc[None, :, None, :]).to(torch.float32).view(yc.shape))
            return outs

    got = quantised_forward(qm, x, RingExact())
    ref = fold_batchnorm(calibrated_model(10, seed=3, t=24))(torch.from_numpy(x).double()).numpy()
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"max relative logit error {rel:.2e}")
    assert rel < 1e-4, rel  # 20-bit activations, ≥ 19-bit weights (float32 in between)
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_stage_plan_and_macs(qm):
    plan = qm.stage_plan(1, 8, 2)
    assert len(plan) == 2 * 10 + 1
    assert plan[0] == ((2, 3, 8, 18), ("b0.gcn",))
    assert plan[-1][1] == ("fc",) and plan[-1][0] == (1, 256)
    names = [n for _, ns in plan for n in ns]
    assert sorted(names) == sorted(qm.ops)  # every op exactly once per window
    assert ("b4.gcn", "b4.res") in [ns for _, ns in plan]  # residual shares the gcn's masked input
    want = 0
    for shape, ns in plan:
        for n in ns:
            want += qm.ops[n].rows(shape) * qm.ops[n].weight.numel()
    assert qm.macs(1, 8, 2) == want > 0
