"""Fixed-point quantisation with a proven no-wrap bound for every ring operation.

Activations: `x̂ = round(x·2^fx)` with |x̂| ≤ BX = 2^ACT_BITS − 1. The exponent fx is chosen per
layer *per window* from the tensor's actual max |x| (the enclave sees the plaintext), so nothing
is ever clipped and no calibration set is needed for the activations.

Weights: `Ŵ = round(W·2^fw)` with the largest fw such that

    BX · max_o Σ_d |Ŵ[d, o]|  ≤  (p − 1)/2        (proven bound, checked on the integers)

so every true integer output |y_o| = |Σ_d x̂_d Ŵ[d, o]| ≤ BX·‖Ŵ_o‖₁ < p/2 and the centred
representative of the ring result *is* the integer result: no wrap, exact.

Activation limbs: 10-bit activations alone cost about 1 % logit error (enough to flip the top-1
class of near-ties). So activations are quantised to `ACT_LIMBS` balanced base-2^10 digits,
x̂ = Σ_i d_i·2^(10·i) with |d_i| ≤ BX (about 20 bits for two limbs). Each digit goes through the
ring with the *same* weights and the same proven bound; the enclave recombines the exact
integer results y = Σ_i y_i·2^(10·i) (|y| < 2^41, exact in int64/float64). Weights stay as they
are, so the worker's GEMMs stay single exact float64 products; the delegated work doubles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from enclave_bridge.ring import HALF

ACT_BITS = 10  # bits of one activation digit (limb) sent through the ring
BX = 2**ACT_BITS - 1  # bound on one digit: |d_i| ≤ BX
ACT_LIMBS = 2  # digits per activation (default); 1 = the fast, ~1 %-error variant
MAX_LIMBS = 3  # 3 digits × 20-bit weight norms stay < 2^53 for the enclave's direct GEMM
_HALF_DIGIT = 1 << (ACT_BITS - 1)


def limb_bound(limbs: int) -> int:
    """Largest |x̂| representable by `limbs` balanced digits (top digit ≤ BX, lower ≤ 2^9 − 1)."""
    if not 1 <= limbs <= MAX_LIMBS:
        raise ValueError(f"activation limbs must be 1..{MAX_LIMBS}, got {limbs}")
    low = sum((_HALF_DIGIT - 1) << (ACT_BITS * i) for i in range(limbs - 1))
    return (BX << (ACT_BITS * (limbs - 1))) + low


def split_limbs(xq: torch.Tensor, limbs: int) -> torch.Tensor:
    """x̂ (int, |x̂| ≤ limb_bound) → its digits stacked on dim 0, lowest digit last.

    Returns int32 (limbs·B, ...): rows [i·B, (i+1)·B) hold digit limbs−1−i, so the top digit
    comes first. Lower digits are balanced in [−2^9, 2^9 − 1]; the top digit is |d| ≤ BX.
    Written straight into one int32 buffer (|x̂| < 2^31): no int64 temporaries, no concatenation.
    """
    rest = xq.to(torch.int32)
    if limbs == 1:
        return rest
    b = rest.shape[0]
    out = torch.empty((limbs * b, *rest.shape[1:]), dtype=torch.int32)
    for i in range(limbs - 1, 0, -1):
        d = out[i * b : (i + 1) * b]
        torch.add(rest, _HALF_DIGIT, out=d)
        d.bitwise_and_(2 * _HALF_DIGIT - 1).sub_(_HALF_DIGIT)
        rest = (rest - d).bitwise_right_shift_(ACT_BITS)
    out[:b] = rest
    return out


def join_limbs(y: torch.Tensor, limbs: int) -> torch.Tensor:
    """Per-digit exact results stacked as by `split_limbs` → Σ_i y_i·2^(10·i).

    Works in y's dtype: int64, or float64 holding integers (|Σ| < 2^53 stays exact).
    """
    if limbs == 1:
        return y
    parts = y.chunk(limbs, dim=0)
    acc = torch.add(parts[1], parts[0], alpha=1 << ACT_BITS)
    for part in parts[2:]:
        acc = torch.add(part, acc, alpha=1 << ACT_BITS)
    return acc


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
    w: torch.Tensor, bx: int = BX, budget: int = HALF, per_column: bool = True
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
    "QuantWeight",
    "act_exponent",
    "join_limbs",
    "limb_bound",
    "quantise_act",
    "quantise_weight",
    "split_limbs",
]
