"""Freivalds verification of every worker reply, in the unmasked domain.

After unmasking, the enclave holds y (claimed x̂·Ŵ mod p). For both masking modes
y − x̂·Ŵ ≡ ȳ − x̄·W_worker (mod p) — the unmasking terms cancel exactly — so checking
`y·S ≡ x̂·(Ŵ·S) (mod p)` catches any deviation of the worker's reply. S is (C_out, reps) uniform
over F_p from the enclave's CSPRNG, fresh per check; a wrong reply passes one column with
probability ≤ 1/p, so `reps = 2` gives soundness error ≤ p⁻² < 2⁻⁶¹ (≤ 2⁻⁴⁰ required).

Cost per check (a random combination of output channels, ≈ layer cost · reps / C_out):
- Ŵ·S: D·C_out·reps, tiny;
- x̂·(ŴS): one exact float64 pass over x̂ (|x̂| ≤ 2^10, |ŴS| ≤ p/2, D ≤ 4608 → < 2^53);
- y·S: one float64 pass over y with S split into L limbs as L·reps columns of one GEMM.
Nothing here touches the large masked operands.
"""

from __future__ import annotations

import math

import torch

from enclave_bridge.quant import BX
from enclave_bridge.ring import HALF, MaskRNG, P, add_mod, centred, exact_linear, limb_bits, pow2_mod, reduce
from enclave_bridge.secure_layers import LinearOp, apply_linear, contract_outputs, x_rows

REPS = 2  # soundness error ≤ p^-REPS < 2^-61


def soundness_bits(reps: int = REPS) -> float:
    """−log2 of the probability that a wrong reply passes."""
    return reps * math.log2(P)


def _channels_last(meta_kind: str, r: torch.Tensor) -> torch.Tensor:
    """Put the combination axis last: conv outputs carry it at dim 1."""
    return r.movedim(1, -1) if meta_kind in ("tconv", "conv1x1") else r


def check(
    op: LinearOp,
    xq: torch.Tensor,
    y_c: torch.Tensor,
    rng: MaskRNG,
    reps: int = REPS,
    xf: torch.Tensor | None = None,
) -> bool:
    """True iff y ≡ x̂·Ŵ (mod p) passes `reps` random output-channel combinations.

    xq: the op's quantised input (|x̂| ≤ BX), `xf` optionally the same as float64 (shared by the
    ops of one stage); y_c: claimed result, centred (|y| ≤ HALF), integer or float64.
    """
    if reps < 1:
        raise ValueError("reps must be ≥ 1")
    meta = op.meta
    s = rng.uniform((op.c_out, reps))  # (C_out, reps) in [0, p)
    w = op.q.w_int.to(torch.float64)
    ws = exact_linear(lambda t: t @ w.T, s.T.contiguous(), P - 1, max(op.q.row_l1, 1))  # (reps, D)
    wsc = centred(ws).T.contiguous().to(torch.float64)  # (D, reps)
    if xf is None:
        xf = xq.to(torch.float64)
    if meta.kind in ("tconv", "conv1x1"):
        rhs_f = apply_linear(meta, xf, wsc)  # (B, reps, T', V)
        rhs_f = rhs_f.reshape(rhs_f.shape[0], reps, -1)
    else:
        rhs_f = x_rows(meta, xf) @ wsc
    if BX * int(wsc.abs().sum(dim=0).max().item()) >= 2**53:  # pragma: no cover - excluded by D ≤ 4608
        raise ValueError("Freivalds bound exceeded")
    rhs = reduce(_channels_last(meta.kind, rhs_f).to(torch.int64))
    # lhs: y·S with S in L limbs of b bits (|y| ≤ HALF, C_out terms per output).
    b = limb_bits(op.c_out * (HALF + 1))
    n_limbs = -(-31 // b)
    limbs = torch.cat([(s >> (i * b)) & ((1 << b) - 1) for i in range(n_limbs)], dim=1).to(torch.float64)
    r = contract_outputs(meta, y_c.to(torch.float64), limbs)
    r = reduce(_channels_last(meta.kind, r).to(torch.int64))  # (..., L·reps)
    lhs = r[..., :reps]
    for i in range(1, n_limbs):
        lhs = add_mod(lhs, reduce(r[..., i * reps : (i + 1) * reps] * pow2_mod(i * b)))
    return bool(torch.equal(lhs.reshape(rhs.shape), rhs))


__all__ = ["REPS", "check", "soundness_bits"]
