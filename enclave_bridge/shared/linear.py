"""What a delegated linear op computes: the op kinds, their public shape parameters and the one
GEMM each reduces to. The enclave (`measured.secure_layers`) and the untrusted worker
(`gpu.worker`) must agree on this exactly, so it lives on neither side.

| kind    | GEMM rows                  | weight (D, C_out)                        | output              |
|---------|----------------------------|------------------------------------------|---------------------|
| joint   | (B·T, C·V)                 | Σ_k W[k,o,c,v]·A[k,v,w]  (C·V, C_out·V)  | (B, C_out, T, V)    |
| conv1x1 | (B·T'·V, C), T' = T[::s]   | Wᵀ (C, C_out)                            | (B, C_out, T', V)   |
| tconv   | (B·T'·V, C·9), 9×1, pad 4  | W (C_out, C·9)ᵀ                          | (B, C_out, T', V)   |
| dense   | (B, D)                     | W (D, C_out)                             | (B, C_out)          |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

TEMPORAL_KERNEL = 9  # ST-GCN's temporal convolution (the reference architecture, docs/ARCHITECTURE.md §4)
KINDS = ("joint", "conv1x1", "tconv", "dense")
_PAD = (TEMPORAL_KERNEL - 1) // 2


@dataclass(frozen=True, slots=True)
class OpMeta:
    """Shape parameters of a linear op (public: the workers get them too)."""

    kind: str
    stride: int = 1
    v: int = 0  # joints (joint)
    k: int = 0  # adjacency partitions folded into the op (informational)

    def to_wire(self) -> dict[str, object]:
        return {"kind": self.kind, "stride": self.stride, "v": self.v, "k": self.k}

    @staticmethod
    def from_wire(d: dict[str, object]) -> OpMeta:
        kind = d.get("kind")
        if kind not in KINDS:
            raise ValueError(f"unknown op kind {kind!r}")
        stride, v, k = d.get("stride", 1), d.get("v", 0), d.get("k", 0)
        if not all(isinstance(a, int) and 0 <= a < 1 << 16 for a in (stride, v, k)) or stride == 0:
            raise ValueError("bad op parameters")
        if kind == "joint" and v == 0:
            raise ValueError("joint op needs v > 0")
        return OpMeta(str(kind), int(stride), int(v), int(k))  # type: ignore[call-overload]

    @property
    def taps(self) -> int:
        return TEMPORAL_KERNEL if self.kind == "tconv" else 1


def out_shape(meta: OpMeta, in_shape: tuple[int, ...], c_out: int) -> tuple[int, ...]:
    """Output shape for an input shape and the weight's output width."""
    if meta.kind == "dense":
        return (in_shape[0], c_out)
    b, _, t, v = in_shape
    if meta.kind == "joint":
        return (b, c_out // v, t, v)
    t_out = (t - 1) // meta.stride + 1
    return (b, c_out, t_out, v)


def _tconv(x: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    """9×1 temporal conv as one GEMM over channels for all taps, then a shifted sum of the taps.

    x (B, C, T, V), w (C·9, C_out) → (B, C_out, T', V). Avoids the 9× im2col copy: the GEMM reads x
    once; every partial sum is a sub-sum of the full one, so float64 exactness carries over.
    """
    b, c, t, v = x.shape
    c_out = w.shape[1]
    taps = w.reshape(c, TEMPORAL_KERNEL, c_out).permute(2, 1, 0).reshape(c_out * TEMPORAL_KERNEL, c)
    q = torch.matmul(taps, x.reshape(b, c, t * v)).view(b, c_out, TEMPORAL_KERNEL, t, v)
    t_out = (t - 1) // stride + 1
    out = torch.zeros((b, c_out, t_out, v), dtype=x.dtype, device=x.device)
    for k in range(TEMPORAL_KERNEL):
        # output t' reads input t'·stride + k − pad
        lo = 0
        while lo * stride + k - _PAD < 0:
            lo += 1
        hi = t_out
        while hi > lo and (hi - 1) * stride + k - _PAD > t - 1:
            hi -= 1
        if hi <= lo:
            continue
        start = lo * stride + k - _PAD
        out[:, :, lo:hi, :] += q[:, :, k, start : start + (hi - lo - 1) * stride + 1 : stride, :]
    return out


def apply_linear(meta: OpMeta, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Linear map: x (input layout) with GEMM weight w (D, C_out) → output layout (x's dtype)."""
    kind = meta.kind
    if kind == "tconv":
        return _tconv(x, w, meta.stride)
    if kind == "conv1x1":
        xs = x[:, :, :: meta.stride] if meta.stride > 1 else x
        b, c, t, v = xs.shape
        return torch.matmul(w.T, xs.reshape(b, c, t * v)).view(b, -1, t, v)
    if kind == "dense":
        return x @ w
    if kind == "joint":
        b, c, t, v = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(b * t, c * v) @ w
        return rows.reshape(b, t, -1, v).permute(0, 2, 1, 3).contiguous()
    raise ValueError(f"unknown op kind {kind!r}")


def linear_fn(meta: OpMeta, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Closure for `ring.exact_linear`."""
    return lambda t: apply_linear(meta, t, w)


def as4d(t: torch.Tensor) -> torch.Tensor:
    """Dense tensors (B, C) as (B, C, 1, 1): every kernel works on (B, C, T, V)."""
    return t.view(t.shape[0], t.shape[1], 1, 1) if t.ndim == 2 else t


__all__ = ["KINDS", "TEMPORAL_KERNEL", "OpMeta", "apply_linear", "as4d", "linear_fn", "out_shape"]
