"""Fixed-point quantisation with a proven no-wrap bound for every ring operation.

Activations: `x̂ = round(x·2^fx)` with |x̂| ≤ BX = 2^20 − 1, one ring element each. The exponent
fx is chosen per layer *per window* from the tensor's actual max |x| (the enclave sees the
plaintext), so nothing is ever clipped and no calibration set is needed.

Weights: `Ŵ[:, o] = round(W[:, o]·2^fw[o])` with the largest per-column exponent such that

    BX · Σ_d |Ŵ[d, o]|  ≤  WEIGHT_BUDGET = 2^52        (proven bound, checked on the integers)

so every true integer output |y_o| = |Σ_d x̂_d Ŵ[d, o]| ≤ 2^52 < p/2 (p = 2^61 − 1): the centred
representative of the ring result *is* the integer result — no wrap, exact — and the same
integer is also exact in one float64 GEMM (< 2^53), which is what the enclave's own fallback path
and the Freivalds check rely on. A column keeps ‖Ŵ_o‖₁ ≈ 2^32, i.e. its largest weight has at
least 32 − log2(D) ≥ 19 significant bits (D ≤ 4608).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ACT_BITS = 20  # bits of a quantised activation (one ring element)
BX: int = 2**ACT_BITS - 1  # |x̂| ≤ BX
WEIGHT_BUDGET = 2**52  # BX·‖Ŵ_o‖₁ ≤ this: exact in float64, far below p/2
ACT_LIMBS = 1  # kept for configuration compatibility: activations are one ring element
MAX_LIMBS = 1


def limb_bound(limbs: int = 1) -> int:
    """Largest |x̂| (kept for callers of the digit API: one limb only)."""
    if limbs != 1:
        raise ValueError("activations are one ring element in F_(2^61-1): act_limbs must be 1")
    return BX


@dataclass(frozen=True, slots=True)
class QuantWeight:
    """Integer weights of one linear op in GEMM form (D, C_out) and their bound.

    Each output column o has its own exponent (Ŵ[:, o] = round(W[:, o]·2^col_exp[o])): a column
    with a small L1 norm gets more bits instead of inheriting the worst column's scale. The
    dequantisation multiplies output channel o by 2^−col_exp[o], so this costs nothing on-line.
    """

    w_int: torch.Tensor  # int64 (D, C_out), centred integers
    exp: int  # min over columns of col_exp (a single exponent when per_column=False)
    col_l1: int  # max_o Σ_d |Ŵ[d, o]|: bounds |y| ≤ BX·col_l1
    row_l1: int  # max_d Σ_o |Ŵ[d, o]|: needed to combine output channels exactly (Freivalds)
    col_exp: torch.Tensor  # int64 (C_out,)

    @property
    def bound(self) -> int:
        """Proven bound on |x̂·Ŵ| for |x̂| ≤ BX."""
        return BX * self.col_l1


_EXP_CAP = 60  # columns of (near-)zero weights: keep 2^exp finite and harmless


def quantise_weight(
    w: torch.Tensor, bx: int = BX, budget: int = WEIGHT_BUDGET, per_column: bool = True
) -> QuantWeight:
    """Quantise a float (D, C_out) GEMM weight with the largest exponent(s) meeting the bound."""
    w = w.to(torch.float64)
    c_out = w.shape[1] if w.ndim == 2 else 0
    if w.numel() == 0 or float(w.abs().max()) == 0.0:
        zero = torch.zeros(w.shape, dtype=torch.int64)
        return QuantWeight(zero, 0, 0, 0, torch.zeros(c_out, dtype=torch.int64))
    l1 = w.abs().sum(dim=0)
    if not per_column:
        l1 = l1.max().expand(c_out)
    # Σ|round(w·2^e)| ≤ l1·2^e + D/2: start one above that estimate, step down until it holds.
    d = w.shape[0]
    room = max(budget / bx - d / 2, 1e-300)
    est = torch.floor(torch.log2(room / l1.clamp(min=1e-300))) + 1
    exps = est.clamp(max=_EXP_CAP).to(torch.int64)
    while True:
        scale = torch.pow(2.0, exps.to(torch.float64))
        w_int = torch.round(w * scale).to(torch.int64)
        cols = w_int.abs().sum(dim=0)
        bad = bx * cols > budget
        if per_column:
            if not bool(bad.any()):
                break
            exps = exps - bad.to(torch.int64)
        else:
            if not bool(bad.any()):
                break
            exps = exps - 1
    row_l1 = int(w_int.abs().sum(dim=1).max().item())
    return QuantWeight(w_int, int(exps.min()), int(cols.max()), row_l1, exps)


def act_exponent(max_abs: float, bx: int = BX) -> int:
    """Largest e with round(max_abs·2^e) ≤ bx (0 for an all-zero tensor)."""
    if not math.isfinite(max_abs):
        raise ValueError("activation is not finite")
    if max_abs <= 0.0:
        return 0
    e = math.floor(math.log2(bx / max_abs))
    while round(max_abs * 2.0**e) > bx:
        e -= 1
    return e


def quantise_act(x: torch.Tensor, bx: int = BX) -> tuple[torch.Tensor, int]:
    """Float activation → (int32 x̂, exponent) with |x̂| ≤ bx, never clipping."""
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.int32), 0
    lo, hi = torch.aminmax(x)  # one pass, no |x| temporary
    e = act_exponent(max(-float(lo), float(hi)), bx)
    xq = x.mul(2.0**e).round_().to(torch.int32)  # 5× faster than torch.round(x * s).to(...)
    return xq, e


__all__ = [
    "ACT_BITS",
    "ACT_LIMBS",
    "BX",
    "MAX_LIMBS",
    "WEIGHT_BUDGET",
    "QuantWeight",
    "act_exponent",
    "limb_bound",
    "quantise_act",
    "quantise_weight",
]
