"""Freivalds verification of every worker reply, in the unmasked domain.

After unmasking, the enclave holds y (claimed x̂·Ŵ mod p). For both masking modes
y − x̂·Ŵ ≡ ȳ − x̄·W_worker (mod p) — the unmasking terms cancel exactly — so checking
`y·S ≡ x̂·(Ŵ·S) (mod p)` catches any deviation of the worker's reply. S is (C_out, reps) uniform
over F_p from the enclave's CSPRNG, fresh per check; a wrong reply passes one column with
probability ≤ 1/p, so `reps = 2` gives soundness error ≤ p⁻² < 2⁻⁶¹ (≤ 2⁻⁴⁰ required).

Cost per check: Ŵ·S (D·C_out·reps, tiny), x̂·(ŴS) (rows·D·reps — the layer's cost / C_out·reps)
and y·S (rows·C_out·reps, split in a few limbs). x̂ is small (|x̂| ≤ 2^10), so x̂·(ŴS) is one exact
float64 product; nothing here touches the large masked operands.
"""

from __future__ import annotations

import torch

from enclave_bridge.quant import BX
from enclave_bridge.ring import HALF, MaskRNG, P, centred, exact_linear
from enclave_bridge.secure_layers import LinearOp, x_rows, y_rows

REPS = 2  # soundness error ≤ p^-REPS = 2^-62


def soundness_bits(reps: int = REPS) -> float:
    """−log2 of the probability that a wrong reply passes."""
    import math

    return reps * math.log2(P)


def check(op: LinearOp, xq: torch.Tensor, y: torch.Tensor, rng: MaskRNG, reps: int = REPS) -> bool:
    """True iff y ≡ x̂·Ŵ (mod p) passes `reps` random output-channel combinations.

    xq: the op's quantised input (int64, |x̂| ≤ BX), y: claimed result in [0, p) (int64).
    """
    if reps < 1:
        raise ValueError("reps must be ≥ 1")
    s = rng.uniform((op.c_out, reps))  # (C_out, reps) in [0, p)
    w = op.q.w_int.to(torch.float64)
    ws = exact_linear(lambda t: t @ w.T, s.T.contiguous(), P - 1, max(op.q.row_l1, 1))  # (reps, D)
    wsc = centred(ws).T.contiguous().to(torch.float64)  # (D, reps)
    ws_l1 = int(wsc.abs().sum(dim=0).max().item())
    rhs = exact_linear(lambda t: x_rows(op.meta, t) @ wsc, xq, BX, max(ws_l1, 1))
    sc = centred(s).to(torch.float64)
    lhs = exact_linear(lambda t: y_rows(op.meta, t) @ sc, y, P - 1, max(op.c_out * HALF, 1))
    return bool(torch.equal(lhs, rhs))


__all__ = ["REPS", "check", "soundness_bits"]
