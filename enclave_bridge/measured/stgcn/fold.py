"""Inference form of ST-GCN: every BatchNorm folded into a neighbouring linear layer.

The result is made only of linear ops (1×1 graph conv + adjacency aggregation, 9×1 temporal conv,
1×1 residual conv, classifier) plus ReLU, add and pooling: the split the secure protocol needs —
linear ops go (masked) to the GPU worker, the rest stays in the enclave.

Folding rules (eval mode, running statistics):
- BN(z) = s·z + b with s = γ/√(σ²+ε), b = β − s·μ.
- `data_bn` acts on the input per (joint, channel); it has no linear layer in front, so it is pushed
  *forward* into block 0's graph conv, which becomes per-joint: W'[k,o,c,v] = W[k,o,c]·s[v,c]; the
  shift becomes a constant that is aggregated like any other input.
- The BN after the graph conv is pushed *backward* into the conv (it precedes a ReLU).
- The BN after the temporal conv and the residual BN are pushed backward into their convs.
- The graph conv's bias is added before aggregation in the reference; after folding every constant
  of the graph conv is carried as one (C_out, V) bias added after aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from enclave_bridge.measured.stgcn.model import STGCN, TEMPORAL_KERNEL, STGCNBlock

_M = TypeVar("_M", bound=nn.Module)


def _bn_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) such that bn(z) == scale·z + shift in eval mode."""
    var = bn.running_var if bn.running_var is not None else torch.ones_like(bn.weight)
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros_like(bn.weight)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - scale * mean


def _layer(seq: nn.Module, i: int, kind: type[_M]) -> _M:
    """Layer `i` of one of the reference's `nn.Sequential`s, checked to be a `kind`."""
    m = seq[i] if isinstance(seq, nn.Sequential) else None
    if not isinstance(m, kind):
        raise TypeError(f"expected a {kind.__name__} at index {i} of {type(seq).__name__}")
    return m


def _bias(conv: nn.Conv2d) -> torch.Tensor:
    """A convolution's bias (every convolution of the reference ST-GCN has one)."""
    if conv.bias is None:
        raise ValueError("ST-GCN convolution without a bias")
    return conv.bias


@dataclass
class FoldedBlock:
    """Tensors of one folded st-gcn block (see docs/ARCHITECTURE.md for the contract)."""

    gcn_weight: torch.Tensor  # (K, C_out, C_in) or (K, C_out, C_in, V) when gcn_per_joint
    gcn_per_joint: bool
    A: torch.Tensor  # (K, V, V): graph adjacency × edge importance
    gcn_bias: torch.Tensor  # (C_out, V), added after aggregation
    tcn_weight: torch.Tensor  # (C_out, C_out, 9)
    tcn_bias: torch.Tensor  # (C_out,)
    stride: int
    residual: str  # "none" | "identity" | "conv"
    res_weight: torch.Tensor | None  # (C_out, C_in)
    res_bias: torch.Tensor | None  # (C_out,)

    @property
    def in_channels(self) -> int:
        return int(self.gcn_weight.shape[2])

    @property
    def out_channels(self) -> int:
        return int(self.gcn_weight.shape[1])

    def graph_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Linear part 1: (N, C_in, T, V) → (N, C_out, T, V), without bias."""
        if self.gcn_per_joint:
            return torch.einsum("kocv,nctv,kvw->notw", self.gcn_weight, x, self.A)
        return torch.einsum("koc,nctv,kvw->notw", self.gcn_weight, x, self.A)

    def temporal_conv(self, h: torch.Tensor) -> torch.Tensor:
        """Linear part 2: 9×1 conv with stride, padding 4, without bias."""
        return F.conv2d(
            h, self.tcn_weight.unsqueeze(-1), None, (self.stride, 1), ((TEMPORAL_KERNEL - 1) // 2, 0)
        )

    def residual_conv(self, x: torch.Tensor) -> torch.Tensor:
        """Linear part 3: 1×1 conv with stride, without bias (only for residual == 'conv')."""
        if self.res_weight is None:
            raise ValueError("block has no residual conv")
        return F.conv2d(x, self.res_weight[:, :, None, None], None, (self.stride, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.graph_conv(x) + self.gcn_bias[None, :, None, :])
        out = self.temporal_conv(h) + self.tcn_bias[None, :, None, None]
        if self.residual == "identity":
            out = out + x
        elif self.residual == "conv":
            assert self.res_bias is not None
            out = out + self.residual_conv(x) + self.res_bias[None, :, None, None]
        return torch.relu(out)


class FoldedSTGCN(nn.Module):
    """Eval-only ST-GCN with all BatchNorms folded. Input (N, C, T, V, M) → logits (N, num_class)."""

    def __init__(
        self,
        blocks: list[FoldedBlock],
        fcn_weight: torch.Tensor,
        fcn_bias: torch.Tensor,
        num_class: int,
        layout: str,
        strategy: str,
    ) -> None:
        super().__init__()
        self.blocks = blocks
        self.fcn_weight = fcn_weight
        self.fcn_bias = fcn_bias
        self.num_class, self.layout, self.strategy = num_class, layout, strategy

    @property
    def num_joints(self) -> int:
        return int(self.blocks[0].A.shape[1])

    @staticmethod
    def to_blocks_input(x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, V, M) → (N·M, C, T, V), persons fastest after N (reference order)."""
        n, c, t, v, m = x.shape
        return x.permute(0, 4, 1, 2, 3).contiguous().view(n * m, c, t, v)

    def head(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """Global average pool over (T, V), mean over persons, classifier: (N·M, 256, T', V) → (N, K)."""
        pooled = h.mean(dim=(2, 3)).view(n, -1, h.shape[1]).mean(dim=1)
        return pooled @ self.fcn_weight.T + self.fcn_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.to_blocks_input(x)
        for block in self.blocks:
            h = block.forward(h)
        return self.head(h, n)

    def to(self, *args: Any, **kwargs: Any) -> FoldedSTGCN:
        """Move/cast every folded tensor (they are plain attributes, not parameters)."""
        for b in self.blocks:
            for name in ("gcn_weight", "A", "gcn_bias", "tcn_weight", "tcn_bias", "res_weight", "res_bias"):
                t = getattr(b, name)
                if t is not None:
                    setattr(b, name, t.to(*args, **kwargs))
        self.fcn_weight = self.fcn_weight.to(*args, **kwargs)
        self.fcn_bias = self.fcn_bias.to(*args, **kwargs)
        return self

    def double(self) -> FoldedSTGCN:
        return self.to(torch.float64)


@torch.no_grad()
def fold_batchnorm(model: STGCN, dtype: torch.dtype = torch.float64) -> FoldedSTGCN:
    """Fold every BatchNorm of `model` (eval statistics) into its neighbouring linear layer.

    Computed in float64 by default so the folding itself adds no error worth measuring.
    """
    v = model.A.shape[1]
    c_in0 = model.in_channels
    # data_bn: channel index v*C + c  →  (V, C) scale/shift.
    s_in, b_in = (t.to(dtype).view(v, c_in0) for t in _bn_affine(model.data_bn))
    blocks: list[FoldedBlock] = []
    # nn.ModuleList yields plain Modules; STGCN builds it from STGCNBlocks only
    for i, blk in enumerate(cast(list[STGCNBlock], list(model.st_gcn_networks))):
        k = blk.gcn.kernel_size
        c_out = blk.out_channels
        a_eff = model.importance(i).detach().to(dtype)
        w = blk.gcn.conv.weight.detach().to(dtype).view(k, c_out, -1)  # (K, C_out, C_in)
        b = _bias(blk.gcn.conv).detach().to(dtype).view(k, c_out)  # (K, C_out)
        # Constant per (k, o, v) entering the aggregation: conv bias (+ data_bn shift for block 0).
        const = b[:, :, None].expand(k, c_out, v).clone()
        per_joint = i == 0
        if per_joint:
            const = const + torch.einsum("koc,vc->kov", w, b_in)
            w = w[:, :, :, None] * s_in.T[None, None, :, :]  # (K, C_out, C_in, V)
        bias_agg = torch.einsum("kov,kvw->ow", const, a_eff)  # (C_out, V)
        s1, b1 = (t.to(dtype) for t in _bn_affine(_layer(blk.tcn, 0, nn.BatchNorm2d)))
        w = w * (s1.view(1, c_out, 1, 1) if per_joint else s1.view(1, c_out, 1))
        bias_agg = s1[:, None] * bias_agg + b1[:, None]
        s2, b2 = (t.to(dtype) for t in _bn_affine(_layer(blk.tcn, 3, nn.BatchNorm2d)))
        conv_t = _layer(blk.tcn, 2, nn.Conv2d)
        tw = conv_t.weight.detach().to(dtype)[..., 0] * s2[:, None, None]
        tb = s2 * _bias(conv_t).detach().to(dtype) + b2
        res_w = res_b = None
        if blk.residual_kind == "conv":
            rconv, rbn = _layer(blk.residual, 0, nn.Conv2d), _layer(blk.residual, 1, nn.BatchNorm2d)
            s3, b3 = (t.to(dtype) for t in _bn_affine(rbn))
            res_w = rconv.weight.detach().to(dtype)[:, :, 0, 0] * s3[:, None]
            res_b = s3 * _bias(rconv).detach().to(dtype) + b3
        blocks.append(
            FoldedBlock(
                gcn_weight=w.contiguous(),
                gcn_per_joint=per_joint,
                A=a_eff.contiguous(),
                gcn_bias=bias_agg.contiguous(),
                tcn_weight=tw.contiguous(),
                tcn_bias=tb,
                stride=blk.stride,
                residual=blk.residual_kind,
                res_weight=res_w,
                res_bias=res_b,
            )
        )
    fw = model.fcn.weight.detach().to(dtype)[:, :, 0, 0]
    fb = _bias(model.fcn).detach().to(dtype)
    return FoldedSTGCN(blocks, fw, fb, model.num_class, model.layout, model.strategy)


__all__ = ["FoldedBlock", "FoldedSTGCN", "fold_batchnorm"]
