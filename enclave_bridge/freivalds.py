"""Freivalds verification of every worker reply, as a bilinear form (see `kernels` for the proof).

For one op the enclave draws fresh secret vectors t (GEMM rows) and s (output columns) uniform in
[0, 2^23) from its CSPRNG and accepts the (combined, unmasked) result Y iff

    tᵀ·Y·s ≡ (tᵀ·X̂)·(Ŵ·s)   (mod p),  REPS = 2 times  →  soundness error ≤ 2^-44.

- tᵀY is accumulated by the same fused pass that unmasks and dequantises Y (`kernels.finish`),
- tᵀX̂ by one pass over the op's quantised input (`kernels.x_project`, taps of the conv included),
- Ŵs is |Ŵ|·REPS multiply-adds (exact float64 GEMM with s split into limbs), per check.
Nothing here is a GEMM over the activations, and nothing touches the masked operands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from enclave_bridge import kernels
from enclave_bridge.ring import MaskRNG, P, limb_bits, mul_pow2, reduce
from enclave_bridge.secure_layers import LinearOp

REPS = kernels.REPS


def soundness_bits(reps: int = REPS) -> float:
    """−log2 of the probability that a wrong reply passes."""
    return reps * (kernels.T_BITS - 1)


@dataclass
class Check:
    """The secret vectors of one op's check and the enclave-side accumulators."""

    op: LinearOp
    tv: np.ndarray  # (R, B, T', V) int64 (a broadcast view for the per-joint op)
    s2: np.ndarray  # (R, C_out channels, V) int64 (a broadcast view for conv ops)
    s: torch.Tensor  # (R, C_out) int64: s over the GEMM's output columns
    zhi: np.ndarray  # (R, C, V) int64: tᵀY accumulators (filled by `kernels.finish`)
    zlo: np.ndarray

    @staticmethod
    def draw(op: LinearOp, out4: tuple[int, ...], rng: MaskRNG, reps: int = REPS) -> Check:
        """Fresh t and s for an output of shape (B, C, T', V) (dense: (B, C, 1, 1))."""
        b, c, t, v = out4
        kind = op.meta.kind
        if kind == "joint":
            tv = np.broadcast_to(rng.small((reps, b, t, 1), kernels.T_BITS).numpy(), (reps, b, t, v))
        else:
            tv = rng.small((reps, b, t, v), kernels.T_BITS).numpy()
        s = rng.small((reps, op.c_out), kernels.T_BITS)
        s_np = s.numpy()
        s2 = s_np.reshape(reps, c, v) if kind == "joint" else np.broadcast_to(s_np[:, :, None], (reps, c, v))
        z = np.zeros((reps, c, v), dtype=np.int64)
        return Check(op, tv, s2, s, z, z.copy())

    def y_side(self) -> np.ndarray:
        """tᵀ·Y·s mod p per repetition, from the accumulators `finish`/`dequant` filled."""
        return kernels.y_projection(self.zhi, self.zlo, np.ascontiguousarray(self.s2))

    def x_side(self, xq4: np.ndarray) -> np.ndarray:
        """(tᵀ·X̂)·(Ŵ·s) mod p per repetition, for the op's quantised input (B, C, T, V) int32."""
        op, meta = self.op, self.op.meta
        reps = self.tv.shape[0]
        c = xq4.shape[1]
        keep_v = meta.kind == "joint"
        u = np.zeros((reps, c, meta.taps, xq4.shape[3] if keep_v else 1), dtype=np.int64)
        pad = (meta.taps - 1) // 2
        kernels.x_project(xq4, self.tv, meta.stride, meta.taps, pad, keep_v, u)
        return kernels.dot_mod(u.reshape(reps, -1), weight_times_s(op, self.s))


def weight_times_s(op: LinearOp, s: torch.Tensor) -> np.ndarray:
    """Ŵ·sᵀ mod p → (R, D) int64, exact: s split into limbs so each float64 GEMM stays < 2^53."""
    b = min(limb_bits(max(op.q.row_l1, 1)), kernels.T_BITS)
    n_limbs = math.ceil(kernels.T_BITS / b)
    mask = (1 << b) - 1
    limbs = torch.cat([(s >> (i * b)) & mask for i in range(n_limbs)], dim=0).to(torch.float64)  # (L·R, C)
    parts = (op.w_f64 @ limbs.T).to(torch.int64)  # (D, L·R), exact
    reps = s.shape[0]
    acc = reduce(parts[:, :reps])
    for i in range(1, n_limbs):
        acc = (acc + mul_pow2(reduce(parts[:, i * reps : (i + 1) * reps]), i * b)) % P
    return np.ascontiguousarray(acc.T.numpy())


__all__ = ["REPS", "Check", "soundness_bits", "weight_times_s"]
