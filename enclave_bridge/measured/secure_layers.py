"""The folded ST-GCN's linear ops as ring operations, and the forward pass around them.

Every delegated linear op is one GEMM after a fixed re-indexing of its input (B, C, T, V):

| kind    | GEMM rows                  | weight (D, C_out)                        | output              |
|---------|----------------------------|------------------------------------------|---------------------|
| joint   | (B·T, C·V)                 | Σ_k W[k,o,c,v]·A[k,v,w]  (C·V, C_out·V)  | (B, C_out, T, V)    |
| conv1x1 | (B·T'·V, C), T' = T[::s]   | Wᵀ (C, C_out)                            | (B, C_out, T', V)   |
| tconv   | (B·T'·V, C·9), 9×1, pad 4  | W (C_out, C·9)ᵀ                          | (B, C_out, T', V)   |
| dense   | (B, D)                     | W (D, C_out)                             | (B, C_out)          |

Block 0's graph conv absorbed `data_bn` per joint, so it is one `joint` op (C·V = 54 inputs).
Blocks 1–9 delegate the graph conv in the reference's order: a 1×1 conv C → K·C_out on the block
input (sharing the masked input with the residual 1×1 conv), then the enclave aggregates the K
partitions with the adjacency in float (K·V·V MACs per output joint — as cheap as a bias add).
So each block is two ring stages, each fed by one masked tensor the size of an activation.

Why not delegate the aggregation too: it multiplies by an 18×54 matrix (54 MACs per element) but
its output is K = 3 times larger than its input; unmasking and re-masking that tensor costs the
enclave more than the aggregation itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from enclave_bridge.measured.quant import BX, WEIGHT_BUDGET, QuantWeight, quantise_weight
from enclave_bridge.measured.stgcn.fold import FoldedSTGCN, fold_batchnorm
from enclave_bridge.measured.stgcn.model import STGCN, TEMPORAL_KERNEL
from enclave_bridge.shared.linear import KINDS, OpMeta, apply_linear, as4d, linear_fn, out_shape
from enclave_bridge.shared.linear import TEMPORAL_KERNEL as _WIRE_KERNEL

if TEMPORAL_KERNEL != _WIRE_KERNEL:  # the worker's op semantics must match the model's
    raise ImportError("shared.linear.TEMPORAL_KERNEL differs from the ST-GCN's")


@dataclass
class LinearOp:
    """One delegated linear op: public meta + float weights + their quantisation."""

    name: str
    meta: OpMeta
    weight: torch.Tensor  # float64 (D, C_out)
    q: QuantWeight = field(init=False)
    scale2: npt.NDArray[np.float64] = field(init=False)  # (C_out channels, V or 1) float64: 2^−col_exp
    w_f64: torch.Tensor = field(init=False)  # Ŵ as float64 (exact integers)

    def __post_init__(self) -> None:
        self.q = quantise_weight(self.weight, per_column=True)
        if BX * self.q.col_l1 > WEIGHT_BUDGET:  # pragma: no cover - guaranteed by quantise_weight
            raise ValueError(f"{self.name}: weight bound exceeded")
        s = np.power(2.0, -self.q.col_exp.numpy().astype(np.float64))
        self.scale2 = s.reshape(-1, self.meta.v) if self.meta.kind == "joint" else s.reshape(-1, 1)
        self.w_f64 = self.q.w_int.to(torch.float64)

    @property
    def c_out(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_channels(self) -> int:
        return int(self.scale2.shape[0])

    @property
    def macs_per_row(self) -> int:
        return int(self.weight.shape[0] * self.weight.shape[1])

    def rows(self, in_shape: tuple[int, ...]) -> int:
        """GEMM rows for an input shape."""
        if self.meta.kind == "dense":
            return int(in_shape[0])
        b, _, t, v = in_shape
        if self.meta.kind == "joint":
            return b * t
        return b * ((t - 1) // self.meta.stride + 1) * v


@dataclass
class QBlock:
    """One st-gcn block as ring ops + the enclave-side constants."""

    gcn: LinearOp  # joint (block 0) or conv1x1 C → K·C_out
    tcn: LinearOp
    res: LinearOp | None  # residual == "conv"
    residual: str
    stride: int
    A: torch.Tensor | None  # (K, V, V) float32: aggregation done in the enclave (conv1x1 gcn)
    gcn_bias: torch.Tensor  # (C_out, V) float32
    tcn_bias: torch.Tensor  # (C_out,)
    res_bias: torch.Tensor | None


class QuantModel:
    """The folded ST-GCN re-expressed as ring ops (weights quantised with the proven bound)."""

    def __init__(self, model: STGCN | FoldedSTGCN) -> None:
        folded = fold_batchnorm(model.eval()) if isinstance(model, STGCN) else model
        self.folded = folded.double()
        self.num_class = folded.num_class
        self.blocks: list[QBlock] = []
        f32 = torch.float32
        for i, b in enumerate(self.folded.blocks):
            k, c_out = int(b.gcn_weight.shape[0]), b.out_channels
            v = int(b.A.shape[1])
            a_mat: torch.Tensor | None = None
            if b.gcn_per_joint:
                m = torch.einsum("kocv,kvw->cvow", b.gcn_weight, b.A).reshape(-1, c_out * v)
                gcn = LinearOp(f"b{i}.gcn", OpMeta("joint", 1, v, k), m)
            else:
                w = b.gcn_weight.reshape(k * c_out, -1)  # (k·C_out + o, C)
                gcn = LinearOp(f"b{i}.gcn", OpMeta("conv1x1", 1, 0, k), w.T.contiguous())
                a_mat = b.A.to(f32).contiguous()
            tw = b.tcn_weight.reshape(c_out, -1).T.contiguous()
            tcn = LinearOp(f"b{i}.tcn", OpMeta("tconv", b.stride), tw)
            res = None
            if b.residual == "conv":
                assert b.res_weight is not None
                res = LinearOp(f"b{i}.res", OpMeta("conv1x1", b.stride), b.res_weight.T.contiguous())
            self.blocks.append(
                QBlock(
                    gcn,
                    tcn,
                    res,
                    b.residual,
                    b.stride,
                    a_mat,
                    b.gcn_bias.to(f32),
                    b.tcn_bias.to(f32),
                    None if b.res_bias is None else b.res_bias.to(f32),
                )
            )
        self.fc = LinearOp("fc", OpMeta("dense"), self.folded.fcn_weight.T.contiguous())
        self.fc_bias = self.folded.fcn_bias.to(f32)
        self.ops: dict[str, LinearOp] = {}
        for blk in self.blocks:
            for op in (blk.gcn, blk.res, blk.tcn):
                if op is not None:
                    self.ops[op.name] = op
        self.ops[self.fc.name] = self.fc
        self.act_bound = BX

    def stage_plan(self, n: int, t: int, m: int) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
        """(input shape, op names) of every ring stage of one window batch, in forward order."""
        plan: list[tuple[tuple[int, ...], tuple[str, ...]]] = []
        b_ = n * m
        c = int(self.folded.blocks[0].in_channels)
        v = self.folded.num_joints
        for blk in self.blocks:
            plan.append(((b_, c, t, v), (blk.gcn.name,) + ((blk.res.name,) if blk.res else ())))
            c = blk.tcn.c_out
            plan.append(((b_, c, t, v), (blk.tcn.name,)))
            t = (t - 1) // blk.stride + 1
        plan.append(((n, c), (self.fc.name,)))
        return plan

    def macs(self, n: int, t: int, m: int) -> int:
        """Multiply-accumulates of the delegated linear ops for one window batch."""
        return sum(
            self.ops[name].rows(shape) * self.ops[name].macs_per_row
            for shape, names in self.stage_plan(n, t, m)
            for name in names
        )

    def weight_elements(self) -> int:
        """|Ŵ| over all ops (the per-window cost of computing Ŵ·s for Freivalds)."""
        return sum(int(op.weight.numel()) for op in self.ops.values())


class RingBackend(Protocol):
    """Runs one ring stage: the ops' outputs x·W for a float32 input, dequantised, no bias.

    The backend quantises the input (one exponent for the stage), computes the exact integer
    results (in the enclave, or masked on workers and verified) and returns float32 tensors.
    """

    def run(self, h: torch.Tensor, ops: list[LinearOp]) -> list[torch.Tensor]: ...


def aggregate(g: torch.Tensor, a_mat: torch.Tensor) -> torch.Tensor:
    """(B, K·C, T, V) graph-conv channels → (B, C, T, V): Σ_k Σ_v g[:, k, c, :, v]·A[k, v, w]."""
    b, kc, t, v = g.shape
    k = a_mat.shape[0]
    return torch.einsum("nkctv,kvw->nctw", g.view(b, k, kc // k, t, v), a_mat)


def quantised_forward(
    qm: QuantModel, x: npt.NDArray[np.floating[Any]], backend: RingBackend
) -> npt.NDArray[np.float64]:
    """Forward pass: linear ops through `backend`, aggregation/bias/ReLU/pooling here, float32.

    (N, 3, T, V, M) → (N, classes) float64 logits.
    """
    if x.ndim != 5:
        raise ValueError(f"expected (N, C, T, V, M), got shape {x.shape}")
    n, m = x.shape[0], x.shape[4]
    h = FoldedSTGCN.to_blocks_input(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    for blk in qm.blocks:
        outs = backend.run(h, [blk.gcn] + ([blk.res] if blk.res is not None else []))
        g = outs[0] if blk.A is None else aggregate(outs[0], blk.A)
        hh = torch.relu_(g.add_(blk.gcn_bias[None, :, None, :]))
        (tc,) = backend.run(hh, [blk.tcn])
        out = tc.add_(blk.tcn_bias[None, :, None, None])
        if blk.residual == "identity":
            out += h
        elif blk.residual == "conv":
            assert blk.res_bias is not None
            out += outs[1].add_(blk.res_bias[None, :, None, None])
        h = torch.relu_(out)
    pooled = h.mean(dim=(2, 3)).view(n, m, -1).mean(dim=1)
    (lg,) = backend.run(pooled.contiguous(), [qm.fc])
    logits = lg.view(n, -1) + qm.fc_bias
    return logits.to(torch.float64).numpy()


__all__ = [
    "KINDS",
    "LinearOp",
    "OpMeta",
    "QBlock",
    "QuantModel",
    "RingBackend",
    "aggregate",
    "apply_linear",
    "as4d",
    "linear_fn",
    "out_shape",
    "quantised_forward",
]
