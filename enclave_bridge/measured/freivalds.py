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
import numpy.typing as npt
import torch

from enclave_bridge.measured import kernels
from enclave_bridge.measured.secure_layers import LinearOp
from enclave_bridge.shared.ring import MaskRNG, P, limb_bits, mul_pow2, reduce

REPS = kernels.REPS


def soundness_bits(reps: int = REPS) -> float:
    """−log2 of the probability that a wrong reply passes."""
    return reps * (kernels.T_BITS - 1)


@dataclass
class Check:
    """The secret vectors of one op's check and the enclave-side accumulators.

    Convs and the dense op: s depends on the output channel only, so tᵀY·s needs one sum per
    channel (`kernels.finish_flat`, flat contiguous loops). The per-joint op (block 0): s
    depends on (channel, joint) and t on the row (b, t) only (`kernels.finish`).
    """

    op: LinearOp
    tv: npt.NDArray[np.int64]  # joint: (R, B, T, V) broadcast view; others: (R, B, T'·V) contiguous
    s: torch.Tensor  # (R, C_out) int64: s over the GEMM's output columns
    s2: npt.NDArray[np.int64]  # joint: (R, C, V); others: (R, C)
    z: npt.NDArray[np.int64]  # joint: (2, R, C, V) hi/lo accumulators; others: (2R, C) folded mod p

    @property
    def flat(self) -> bool:
        return self.op.meta.kind != "joint"

    @staticmethod
    def draw(op: LinearOp, out4: tuple[int, ...], rng: MaskRNG, reps: int = REPS) -> Check:
        """Fresh t and s for an output of shape (B, C, T', V) (dense: (B, C, 1, 1))."""
        b, c, t, v = out4
        s = rng.small((reps, op.c_out), kernels.T_BITS)
        if op.meta.kind == "joint":
            tv = np.broadcast_to(rng.small((reps, b, t, 1), kernels.T_BITS).numpy(), (reps, b, t, v))
            return Check(op, tv, s, s.numpy().reshape(reps, c, v), np.zeros((2, reps, c, v), np.int64))
        tv = rng.small((reps, b, t * v), kernels.T_BITS).numpy()
        return Check(op, tv, s, s.numpy(), np.zeros((2 * reps, c), np.int64))

    def finish(
        self,
        ys: list[npt.NDArray[np.int64]],
        signs: tuple[int, int],
        scale: npt.NDArray[np.float64],
        out: npt.NDArray[np.float32],
    ) -> int:
        """Combine/centre/range-check/dequantise the replies into `out`, accumulating tᵀY."""
        a, b, c = ys
        if self.flat:
            sh = (a.shape[0], a.shape[1], -1)
            return int(
                kernels.finish_flat(
                    a.reshape(sh), b.reshape(sh), c.reshape(c.shape[0], c.shape[1], -1),
                    signs[0], signs[1], np.ascontiguousarray(scale[:, 0]), self.tv, out.reshape(sh), self.z,
                )
            )  # fmt: skip
        return int(kernels.finish(a, b, c, signs[0], signs[1], scale, self.tv, out, self.z[0], self.z[1]))

    def y_side(self) -> npt.NDArray[np.int64]:
        """tᵀ·Y·s mod p per repetition, from the accumulators `finish` filled."""
        res: npt.NDArray[np.int64]  # (R,) int64; the numba kernels are untyped
        if self.flat:
            res = kernels.y_projection_c(self.z, np.ascontiguousarray(self.s2))
        else:
            res = kernels.y_projection(self.z[0], self.z[1], np.ascontiguousarray(self.s2))
        return res

    def x_side(self, xq: npt.NDArray[np.int32]) -> npt.NDArray[np.int64]:
        """(tᵀ·X̂)·(Ŵ·s) mod p per repetition, for the op's quantised input (int32, (B, C, T, V) or (B, C))."""
        meta = self.op.meta
        reps = self.tv.shape[0]
        xq4 = xq.reshape(xq.shape[0], xq.shape[1], 1, 1) if xq.ndim == 2 else xq
        bsz, c, t, v = xq4.shape
        taps, pad = meta.taps, (meta.taps - 1) // 2
        if not self.flat:
            u = np.zeros((reps, c, 1, v), dtype=np.int64)
            kernels.x_project(xq4, self.tv, 1, 1, 0, True, u)
        elif taps > 1:
            u = x_project_blas(xq4, self.tv.reshape(reps, bsz, -1, v), meta.stride, taps, pad)
        elif meta.stride == 1:
            u = np.zeros((reps, c, taps), dtype=np.int64)
            kernels.x_project_flat(xq4.reshape(bsz, c, t * v), self.tv, taps, pad, v, u)
        else:
            u = np.zeros((reps, c, taps, 1), dtype=np.int64)
            tv4 = self.tv.reshape(reps, bsz, -1, v)
            kernels.x_project(xq4, tv4, meta.stride, taps, pad, False, u)
        res: npt.NDArray[np.int64] = kernels.dot_mod(u.reshape(reps, -1), weight_times_s(self.op, self.s))
        return res


_T_LO = 12  # t = hi·2^12 + lo: |x̂|·2^12·(T·V ≤ 2^21) < 2^53 keeps every float64 sum exact


def x_project_blas(
    xq4: npt.NDArray[np.int32], tv4: npt.NDArray[np.int64], stride: int, taps: int, pad: int
) -> npt.NDArray[np.int64]:
    """tᵀ·X̂ for a temporal conv with float64 BLAS, exactly: u[r, c, k] (int64, (R, C, taps)).

    Row (b, t', v) of the conv's GEMM reads x̂[b, c, t'·stride + k − pad, v] for tap k, so
    u[:, c, k] = Σ_(t, v) x̂[b, c, t, v]·T_k[(t, v)] with T_k the row vector t placed at the input
    frames tap k reads. One GEMM (C × T·V) @ (T·V × taps·2R) per person-window; t is split into
    12- and 11-bit halves so that |x̂|·2^12·T·V < 2^53: every sum is an exact integer.
    """
    bsz, c, t, v = xq4.shape
    reps, _, t_out, _ = tv4.shape
    lo = (tv4 & ((1 << _T_LO) - 1)).astype(np.float64)
    hi = (tv4 >> _T_LO).astype(np.float64)
    u = np.zeros((reps, c, taps), dtype=np.int64)
    for b in range(bsz):
        tm = np.zeros((t, v, taps, 2, reps))
        for k in range(taps):
            first = max(0, -((k - pad) // stride) if k < pad else 0)
            while first * stride + k - pad < 0:
                first += 1
            last = t_out
            while last > first and (last - 1) * stride + k - pad > t - 1:
                last -= 1
            if last <= first:
                continue
            rows = slice(first * stride + k - pad, (last - 1) * stride + k - pad + 1, stride)
            tm[rows, :, k, 0, :] = lo[:, b, first:last, :].transpose(1, 2, 0)
            tm[rows, :, k, 1, :] = hi[:, b, first:last, :].transpose(1, 2, 0)
        x = torch.from_numpy(xq4[b].reshape(c, t * v)).to(torch.float64)
        prod = (x @ torch.from_numpy(tm.reshape(t * v, -1))).numpy().reshape(c, taps, 2, reps)
        part = prod[:, :, 0, :].astype(np.int64) + (prod[:, :, 1, :].astype(np.int64) << _T_LO)
        u += part.transpose(2, 0, 1)
    return u


def weight_times_s(op: LinearOp, s: torch.Tensor) -> npt.NDArray[np.int64]:
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
