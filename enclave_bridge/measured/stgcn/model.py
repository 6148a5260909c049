"""ST-GCN (Yan et al., AAAI 2018), exactly the reference yysijie/st-gcn `net/st_gcn.py`.

Module names, parameter/buffer names and shapes equal the reference's, so released checkpoints
(`st_gcn.kinetics.pt`, `st_gcn.ntu-xsub.pt`) load as they are. The `inplace` ReLU/Dropout of the
reference are replaced by out-of-place ones (same values; keeps autograd and folding simple).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from enclave_bridge.measured.stgcn.graph import Graph
from enclave_bridge.shared.errors import CheckpointError

log = logging.getLogger(__name__)

TEMPORAL_KERNEL = 9
# (in, out, stride, residual) of the ten st-gcn blocks; in=None means the model's input channels.
BLOCK_SPEC: tuple[tuple[int | None, int, int, bool], ...] = (
    (None, 64, 1, False),
    (64, 64, 1, True),
    (64, 64, 1, True),
    (64, 64, 1, True),
    (64, 128, 2, True),
    (128, 128, 1, True),
    (128, 128, 1, True),
    (128, 256, 2, True),
    (256, 256, 1, True),
    (256, 256, 1, True),
)


class ConvTemporalGraphical(nn.Module):
    """1×1 conv to K·C_out channels, then aggregation over joints with the K adjacency partitions.

    Shapes: x (N, C_in, T, V), A (K, V, V) → (N, C_out, T, V).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(in_channels, out_channels * kernel_size, kernel_size=(1, 1))

    def forward(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        n, kc, t, v = x.shape
        x = x.view(n, self.kernel_size, kc // self.kernel_size, t, v)
        return torch.einsum("nkctv,kvw->nctw", x, A).contiguous()


class _Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), dtype=x.dtype, device=x.device)


class STGCNBlock(nn.Module):
    """One spatial-temporal block: gcn → BN → ReLU → 9×1 conv → BN → dropout, + residual, ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_kernel: int,
        stride: int = 1,
        dropout: float = 0.0,
        residual: bool = True,
    ) -> None:
        super().__init__()
        pad = (TEMPORAL_KERNEL - 1) // 2
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.gcn = ConvTemporalGraphical(in_channels, out_channels, spatial_kernel)
        self.tcn = nn.Sequential(
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, (TEMPORAL_KERNEL, 1), (stride, 1), (pad, 0)),
            nn.BatchNorm2d(out_channels),
            nn.Dropout(dropout),
        )
        self.residual: nn.Module
        if not residual:
            self.residual_kind = "none"
            self.residual = _Zero()
        elif in_channels == out_channels and stride == 1:
            self.residual_kind = "identity"
            self.residual = nn.Identity()
        else:
            self.residual_kind = "conv"
            self.residual = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=(stride, 1)),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        res = self.residual(x)
        x = self.gcn(x, A)
        out: torch.Tensor = self.relu(self.tcn(x) + res)
        return out


class STGCN(nn.Module):
    """The reference ST-GCN. Input (N, C, T, V, M) → logits (N, num_class).

    `data_bn` normalises channel `v·C + c` of the (N·M, V·C, T) view, blocks run on (N·M, C, T, V),
    then global average pooling over (T, V), mean over the M persons and a 1×1 conv classifier.
    """

    A: torch.Tensor  # (K, V, V) adjacency, a registered buffer
    edge_importance: nn.ParameterList | None  # one (K, V, V) mask per block, or None

    def __init__(
        self,
        num_class: int,
        layout: str = "openpose",
        strategy: str = "spatial",
        edge_importance_weighting: bool = True,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_class < 1:
            raise ValueError(f"num_class must be ≥ 1, got {num_class}")
        self.graph = Graph(layout=layout, strategy=strategy)
        self.num_class, self.in_channels = num_class, in_channels
        self.layout, self.strategy = layout, strategy
        self.edge_importance_weighting = edge_importance_weighting
        self.register_buffer("A", torch.tensor(self.graph.A, dtype=torch.float32))
        k, v = self.A.shape[0], self.A.shape[1]
        self.data_bn = nn.BatchNorm1d(in_channels * v)
        self.st_gcn_networks = nn.ModuleList(
            STGCNBlock(
                in_channels if c_in is None else c_in,
                c_out,
                k,
                stride,
                dropout=0.0 if c_in is None else dropout,
                residual=residual,
            )
            for c_in, c_out, stride, residual in BLOCK_SPEC
        )
        if edge_importance_weighting:
            self.edge_importance = nn.ParameterList(
                nn.Parameter(torch.ones(self.A.shape)) for _ in self.st_gcn_networks
            )
        else:
            self.edge_importance = None
        self.fcn = nn.Conv2d(256, num_class, kernel_size=1)

    def importance(self, i: int) -> torch.Tensor:
        """Effective adjacency of block `i`: A × edge importance, (K, V, V)."""
        if self.edge_importance is None:
            return self.A
        mask: torch.Tensor = self.edge_importance[i]
        return self.A * mask

    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, V, M) → data_bn → (N·M, C, T, V)."""
        n, c, t, v, m = x.shape
        x = x.permute(0, 4, 3, 1, 2).contiguous().view(n * m, v * c, t)
        x = self.data_bn(x)
        return x.view(n, m, v, c, t).permute(0, 1, 3, 4, 2).contiguous().view(n * m, c, t, v)

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features after the last block, (N·M, 256, T', V)."""
        h = self.normalise_input(x)
        for i, block in enumerate(self.st_gcn_networks):
            h = block(h, self.importance(i))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels or x.shape[3] != self.A.shape[1]:
            raise ValueError(
                f"expected input (N, {self.in_channels}, T, {self.A.shape[1]}, M), got {tuple(x.shape)}"
            )
        n, m = x.shape[0], x.shape[4]
        h = self.extract(x)
        h = F.avg_pool2d(h, h.shape[2:])
        h = h.view(n, m, -1, 1, 1).mean(dim=1)
        logits: torch.Tensor = self.fcn(h).view(n, -1)
        return logits

    # -- checkpoints -------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        num_class: int | None = None,
        *,
        map_location: str | torch.device = "cpu",
        **kwargs: object,
    ) -> STGCN:
        """Build a model and load a reference-format state_dict file (strict key/shape check).

        `num_class` defaults to the classifier's output size in the file. Accepts files that are
        a bare state_dict or `{"state_dict": ...}`/`{"model": ...}` wrappers, and tolerates only
        missing `num_batches_tracked` (released reference checkpoints lack them).
        """
        try:
            obj = torch.load(str(path), map_location=map_location, weights_only=True)
        except FileNotFoundError as e:
            raise CheckpointError(f"checkpoint {path} not found") from e
        except Exception as e:  # torch raises many types for corrupt files
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
        state = unwrap_state_dict(obj, source=str(path))
        if num_class is None:
            w = state.get("fcn.weight")
            if not isinstance(w, torch.Tensor) or w.dim() != 4:
                raise CheckpointError(f"{path}: no 'fcn.weight' (num_class, 256, 1, 1) to infer num_class")
            num_class = int(w.shape[0])
        if "layout" not in kwargs and "A" in state and state["A"].dim() == 3:
            kwargs["layout"] = "ntu-rgb+d" if state["A"].shape[1] == 25 else "openpose"
        model = cls(num_class, **kwargs)  # type: ignore[arg-type]
        model.load_reference_state_dict(state, source=str(path))
        return model

    def load_reference_state_dict(
        self, state: Mapping[str, torch.Tensor], source: str = "state_dict"
    ) -> None:
        """Strictly load `state`: every key and shape must match, except absent `num_batches_tracked`."""
        own = self.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        wrong = [
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and tuple(state[k].shape) != tuple(own[k].shape)
        ]
        problems = []
        if missing:
            problems.append(f"missing keys {missing[:10]}{' …' if len(missing) > 10 else ''}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}")
        if wrong:
            problems.append(f"shape mismatches {wrong[:10]}{' …' if len(wrong) > 10 else ''}")
        if problems:
            raise CheckpointError(
                f"{source} does not match ST-GCN({self.num_class}, {self.layout}, "
                f"{self.strategy}): " + "; ".join(problems)
            )
        if "A" in state and not torch.allclose(state["A"].float(), self.A, atol=1e-6):
            raise CheckpointError(
                f"{source}: adjacency buffer 'A' differs from the {self.layout}/"
                f"{self.strategy} graph (wrong layout or strategy?)"
            )
        result = self.load_state_dict(dict(state), strict=False)
        bad = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if bad or result.unexpected_keys:  # pragma: no cover - checked above
            raise CheckpointError(f"{source}: unexpected load result {result}")
        log.info("loaded ST-GCN checkpoint %s (%d tensors)", source, len(state))


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the tensor mapping inside common checkpoint wrappers, or raise CheckpointError."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
        if all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
    raise CheckpointError(f"{source} is not a state_dict of tensors")


def load_label_map(path: str | os.PathLike[str]) -> list[str]:
    """One label a line; blank lines and surrounding whitespace ignored, '#' starts a comment line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"cannot read label map {path}: {e.strerror or e}") from e
    labels = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not labels:
        raise CheckpointError(f"label map {path} is empty")
    return labels


__all__ = ["STGCN", "ConvTemporalGraphical", "STGCNBlock", "load_label_map", "unwrap_state_dict"]
