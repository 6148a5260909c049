"""The folded ST-GCN's linear ops as ring operations, and the quantised forward pass around them.

Every linear op is one GEMM after a fixed re-indexing of its input ("rows"):

| kind    | input (B, C, T, V) rows             | weight (D, C_out)                 | output         |
|---------|-------------------------------------|-----------------------------------|----------------|
| joint   | (B·T, C·V)                          | Σ_k W[k,o,c,v]·A[k,v,w]  (C·V, C_out·V) | (B, C_out, T, V) |
| agg     | (B·C·T, V)                          | A[k,v,w] as (V, K·V)              | (B, K·C, T, V) |
| conv1x1 | (B·T'·V, C), T' = T[::stride]       | Wᵀ (C, C_out)                     | (B, C_out, T', V) |
| tconv   | (B·T'·V, C·9) (9×1 taps, pad 4)     | W (C_out, C·9)ᵀ                   | (B, C_out, T', V) |
| dense   | (B, D)                              | W (D, C_out)                      | (B, C_out)     |

The graph conv of blocks 1–9 is delegated as two ops — `agg` (aggregate joints with the K
adjacency partitions) then a `conv1x1` over K·C channels — which is the same linear map as the
reference's "1×1 conv then aggregate" with the factors in the cheaper order; block 0's per-joint
graph conv (it absorbed `data_bn`) is one `joint` op (54 × 1152). The same functions serve the
enclave (exact ring results), the Freivalds check and the worker, so all agree by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from enclave_bridge.quant import ACT_LIMBS, BX, QuantWeight, limb_bound, quantise_act, quantise_weight
from enclave_bridge.stgcn.fold import FoldedSTGCN, fold_batchnorm
from enclave_bridge.stgcn.model import STGCN, TEMPORAL_KERNEL

KINDS = ("joint", "agg", "conv1x1", "tconv", "dense")
_PAD = (TEMPORAL_KERNEL - 1) // 2


@dataclass(frozen=True, slots=True)
class OpMeta:
    """Shape parameters of a linear op (public: the worker gets them too)."""

    kind: str
    stride: int = 1
    v: int = 0  # joints (joint/agg)
    k: int = 0  # adjacency partitions (agg)

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
        return OpMeta(str(kind), int(stride), int(v), int(k))  # type: ignore[call-overload]


def x_rows(meta: OpMeta, x: torch.Tensor) -> torch.Tensor:
    """Input tensor → GEMM rows (see the module table)."""
    kind = meta.kind
    if kind == "dense":
        return x
    b, c, t, v = x.shape
    if kind == "joint":
        return x.permute(0, 2, 1, 3).reshape(b * t, c * v)
    if kind == "agg":
        return x.reshape(b * c * t, v)
    if kind == "conv1x1":
        return x[:, :, :: meta.stride].permute(0, 2, 3, 1).reshape(-1, c)
    if kind == "tconv":
        xp = F.pad(x, (0, 0, _PAD, _PAD))
        cols = xp.unfold(2, TEMPORAL_KERNEL, meta.stride)  # (B, C, T', V, 9)
        return cols.permute(0, 2, 3, 1, 4).reshape(-1, c * TEMPORAL_KERNEL)
    raise ValueError(f"unknown op kind {kind!r}")


def out_shape(meta: OpMeta, in_shape: tuple[int, ...], c_out: int) -> tuple[int, ...]:
    """Output shape for an input shape and the weight's output width."""
    if meta.kind == "dense":
        return (in_shape[0], c_out)
    b, c, t, v = in_shape
    if meta.kind == "joint":
        return (b, c_out // v, t, v)
    if meta.kind == "agg":
        return (b, meta.k * c, t, v)
    t_out = (t - 1) // meta.stride + 1
    return (b, c_out, t_out, v)


def y_from_rows(meta: OpMeta, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """GEMM result rows → output tensor of `shape`."""
    kind = meta.kind
    if kind == "dense":
        return rows
    if kind == "joint":
        b, co, t, v = shape
        return rows.reshape(b, t, co, v).permute(0, 2, 1, 3).contiguous()
    if kind == "agg":
        b, kc, t, v = shape
        c = kc // meta.k
        return rows.reshape(b, c, t, meta.k, v).permute(0, 3, 1, 2, 4).reshape(shape)
    b, co, t, v = shape
    return rows.reshape(b, t, v, co).permute(0, 3, 1, 2).contiguous()


def y_rows(meta: OpMeta, y: torch.Tensor) -> torch.Tensor:
    """Output tensor → GEMM rows (inverse of `y_from_rows`), used by Freivalds."""
    kind = meta.kind
    if kind == "dense":
        return y
    if kind == "joint":
        b, co, t, v = y.shape
        return y.permute(0, 2, 1, 3).reshape(b * t, co * v)
    if kind == "agg":
        b, kc, t, v = y.shape
        c = kc // meta.k
        return y.reshape(b, meta.k, c, t, v).permute(0, 2, 3, 1, 4).reshape(b * c * t, meta.k * v)
    b, co, t, v = y.shape
    return y.permute(0, 2, 3, 1).reshape(-1, co)


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
    """Float linear map: x (input layout) with GEMM weight w (D, C_out) → output layout."""
    if meta.kind == "tconv":
        return _tconv(x, w, meta.stride)
    if meta.kind == "conv1x1":
        xs = x[:, :, :: meta.stride] if meta.stride > 1 else x
        b, c, t, v = xs.shape
        return torch.matmul(w.T, xs.reshape(b, c, t * v)).view(b, -1, t, v)
    shape = out_shape(meta, tuple(x.shape), int(w.shape[1]))
    return y_from_rows(meta, x_rows(meta, x) @ w, shape)


def contract_outputs(meta: OpMeta, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Σ over each output row's features of y·s: y (output layout), s (C_out, J) → rows × J.

    Same rows as `y_rows(meta, y) @ s` (up to layout), without copying y.
    """
    kind = meta.kind
    if kind == "dense":
        return y @ s
    b, co, t, v = y.shape
    if kind in ("tconv", "conv1x1"):
        return torch.matmul(s.T, y.reshape(b, co, t * v))  # (B, J, T·V)
    if kind == "joint":
        return torch.einsum("botw,owj->btj", y, s.view(co, v, -1))
    # agg: Σ_k y[:, k] (B, C·T, V) @ s[k] (V, J) — strided batched GEMMs, no copy of y
    c = co // meta.k
    yv = y.view(b, meta.k, c * t, v)
    sv = s.view(meta.k, v, -1)
    acc = torch.matmul(yv[:, 0], sv[0])
    for k in range(1, meta.k):
        acc += torch.matmul(yv[:, k], sv[k])
    return acc.view(b, c, t, -1)


def linear_fn(meta: OpMeta, w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Closure for `ring.exact_linear`."""
    return lambda t: apply_linear(meta, t, w)


@dataclass
class LinearOp:
    """One delegated linear op: public meta + float weights + their quantisation."""

    name: str
    meta: OpMeta
    weight: torch.Tensor  # float64 (D, C_out)
    q: QuantWeight = field(init=False)

    col_scale: torch.Tensor = field(init=False)  # 2^−col_exp, broadcast to the output layout

    def __post_init__(self) -> None:
        # agg (the adjacency, 18 inputs) keeps one exponent: its columns map to (partition, joint)
        # pairs spread over the output channels, and it is already quantised finely.
        self.q = quantise_weight(self.weight, per_column=self.meta.kind != "agg")
        s = torch.pow(2.0, -self.q.col_exp.to(torch.float64))
        kind = self.meta.kind
        if kind == "dense":
            self.col_scale = s[None, :]
        elif kind in ("conv1x1", "tconv"):
            self.col_scale = s[None, :, None, None]
        elif kind == "joint":
            self.col_scale = s.view(-1, self.meta.v)[None, :, None, :]
        else:
            self.col_scale = s[:1].reshape(1, 1, 1, 1)

    @property
    def c_out(self) -> int:
        return int(self.weight.shape[1])

    @property
    def macs_per_row(self) -> int:
        return int(self.weight.shape[0] * self.weight.shape[1])


@dataclass
class QBlock:
    """One st-gcn block as ring ops + the enclave-side constants (biases)."""

    gcn_joint: LinearOp | None  # block 0
    agg: LinearOp | None  # blocks 1..9
    gcn: LinearOp | None  # blocks 1..9 (1×1 conv over K·C channels)
    tcn: LinearOp
    res: LinearOp | None  # residual == "conv"
    residual: str
    stride: int
    gcn_bias: torch.Tensor  # (C_out, V)
    tcn_bias: torch.Tensor  # (C_out,)
    res_bias: torch.Tensor | None


class QuantModel:
    """The folded ST-GCN re-expressed as ring ops (weights quantised with the proven bound)."""

    def __init__(self, model: STGCN | FoldedSTGCN, act_limbs: int = ACT_LIMBS) -> None:
        self.act_limbs = act_limbs
        self.act_bound = limb_bound(act_limbs)  # |x̂| of every quantised activation
        folded = fold_batchnorm(model.eval()) if isinstance(model, STGCN) else model
        self.folded = folded.double()
        self.num_class = folded.num_class
        self.blocks: list[QBlock] = []
        for i, b in enumerate(folded.blocks):
            k, c_out = int(b.gcn_weight.shape[0]), b.out_channels
            v = int(b.A.shape[1])
            gj = agg = gcn = None
            if b.gcn_per_joint:
                m = torch.einsum("kocv,kvw->cvow", b.gcn_weight, b.A).reshape(-1, c_out * v)
                gj = LinearOp(f"b{i}.gcn", OpMeta("joint", 1, v, k), m)
            else:
                a_mat = b.A.permute(1, 0, 2).reshape(v, k * v)
                agg = LinearOp(f"b{i}.agg", OpMeta("agg", 1, v, k), a_mat)
                w = b.gcn_weight.permute(1, 0, 2).reshape(c_out, -1)  # (o, k·C + c)
                gcn = LinearOp(f"b{i}.gcn", OpMeta("conv1x1", 1), w.T.contiguous())
            tw = b.tcn_weight.reshape(c_out, -1).T.contiguous()
            tcn = LinearOp(f"b{i}.tcn", OpMeta("tconv", b.stride), tw)
            res = None
            if b.residual == "conv":
                assert b.res_weight is not None
                res = LinearOp(f"b{i}.res", OpMeta("conv1x1", b.stride), b.res_weight.T.contiguous())
            self.blocks.append(
                QBlock(gj, agg, gcn, tcn, res, b.residual, b.stride, b.gcn_bias, b.tcn_bias, b.res_bias)
            )
        self.fc = LinearOp("fc", OpMeta("dense"), folded.fcn_weight.T.contiguous())
        self.fc_bias = folded.fcn_bias
        self.ops: dict[str, LinearOp] = {}
        for blk in self.blocks:
            for op in (blk.gcn_joint, blk.agg, blk.gcn, blk.tcn, blk.res):
                if op is not None:
                    self.ops[op.name] = op
        self.ops[self.fc.name] = self.fc

    def stage_plan(
        self, n: int, t: int, m: int, limbs: int | None = None
    ) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
        """(input shape, op names) of every ring stage of one window, in forward order.

        Shapes are those of the masked tensors the worker gets: the activation digits are
        stacked on the batch axis, so the batch is `limbs` (default: the model's) times larger.
        """
        plan: list[tuple[tuple[int, ...], tuple[str, ...]]] = []
        limbs = self.act_limbs if limbs is None else limbs
        b_ = n * m * limbs
        c = int(self.folded.blocks[0].in_channels)
        v = self.folded.num_joints
        for blk in self.blocks:
            if blk.gcn_joint is not None:
                plan.append(((b_, c, t, v), (blk.gcn_joint.name,)))
            else:
                assert blk.agg is not None and blk.gcn is not None
                plan.append(((b_, c, t, v), (blk.agg.name,) + ((blk.res.name,) if blk.res else ())))
                plan.append(((b_, blk.agg.meta.k * c, t, v), (blk.gcn.name,)))
            c = blk.tcn.c_out
            plan.append(((b_, c, t, v), (blk.tcn.name,)))
            t = (t - 1) // blk.stride + 1
        plan.append(((n * limbs, c), (self.fc.name,)))
        return plan

    def macs(self, n: int, t: int, m: int, limbs: int = 1) -> int:
        """Multiply-accumulates of the linear ops for one window (× `limbs` for the ring work)."""
        total = 0
        for shape, names in self.stage_plan(n, t, m, limbs):
            for name in names:
                op = self.ops[name]
                rows = x_rows(op.meta, torch.empty(shape, dtype=torch.float32, device="meta")).shape[0]
                total += int(rows) * op.macs_per_row
        return total


class RingBackend(Protocol):
    """Computes exact integer results of a stage: y = x̂·Ŵ for each op (int64 or float64).

    x̂ is the full quantised activation (|x̂| ≤ `QuantModel.act_bound`); a delegating backend
    splits it into ring-sized digits itself (`quant.split_limbs`).
    """

    def run(self, xq: torch.Tensor, ops: list[LinearOp]) -> list[torch.Tensor]: ...


def _deq(y: torch.Tensor, e_x: int, op: LinearOp) -> torch.Tensor:
    """Integer result → float: y·2^−(fx+fw[o]) (a fresh float64 tensor, safe to modify in place)."""
    return torch.mul(y.to(torch.float64), op.col_scale * 2.0 ** (-e_x))


def quantised_forward(qm: QuantModel, x: np.ndarray, backend: RingBackend) -> np.ndarray:
    """Forward pass: linear ops through `backend`, ReLU/add/bias/pooling here. (N,3,T,V,M) → (N, classes)."""
    if x.ndim != 5:
        raise ValueError(f"expected (N, C, T, V, M), got shape {x.shape}")
    n, m = x.shape[0], x.shape[4]
    h = FoldedSTGCN.to_blocks_input(torch.from_numpy(np.ascontiguousarray(x)).to(torch.float64))
    bx = qm.act_bound
    for blk in qm.blocks:
        xq, e_x = quantise_act(h, bx)
        res_out = None
        if blk.gcn_joint is not None:
            (g,) = backend.run(xq, [blk.gcn_joint])
            g_real = _deq(g, e_x, blk.gcn_joint)
        else:
            assert blk.agg is not None and blk.gcn is not None
            outs = backend.run(xq, [blk.agg] + ([blk.res] if blk.res is not None else []))
            z = _deq(outs[0], e_x, blk.agg)
            if blk.res is not None:
                res_out = _deq(outs[1], e_x, blk.res)
            zq, e_z = quantise_act(z, bx)
            (g,) = backend.run(zq, [blk.gcn])
            g_real = _deq(g, e_z, blk.gcn)
        hh = torch.relu_(g_real.add_(blk.gcn_bias[None, :, None, :]))
        hq, e_h = quantise_act(hh, bx)
        (tc,) = backend.run(hq, [blk.tcn])
        out = _deq(tc, e_h, blk.tcn).add_(blk.tcn_bias[None, :, None, None])
        if blk.residual == "identity":
            out += h
        elif blk.residual == "conv":
            assert res_out is not None and blk.res_bias is not None
            out += res_out.add_(blk.res_bias[None, :, None, None])
        h = torch.relu_(out)
    pooled = h.mean(dim=(2, 3)).view(n, m, -1).mean(dim=1)
    pq, e_p = quantise_act(pooled, bx)
    (lg,) = backend.run(pq, [qm.fc])
    logits = _deq(lg, e_p, qm.fc) + qm.fc_bias
    return logits.numpy()


__all__ = [
    "BX",
    "KINDS",
    "LinearOp",
    "OpMeta",
    "QBlock",
    "QuantModel",
    "RingBackend",
    "apply_linear",
    "contract_outputs",
    "linear_fn",
    "out_shape",
    "quantised_forward",
    "x_rows",
    "y_from_rows",
    "y_rows",
]
