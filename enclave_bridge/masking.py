"""Masking modes: what the worker holds and how the enclave masks inputs and unmasks outputs.

- `slalom`: the worker holds Ŵ (weights visible, input hidden). x̄ = x̂ + r1, ȳ = x̄·Ŵ,
  y = ȳ − u with u = r1·Ŵ from the precompute pool. On-line enclave work: O(|x| + |y|).
- `paper` (extended SLALOM, SECRYPT'23): the worker holds W̄ = Ŵ + R2 (R2 uniform, drawn once
  per model load, never leaves the enclave). ȳ = x̄·W̄ = x̂Ŵ + x̂R2 + r1W̄, so
  y = ȳ − u − u3 with u = r1·W̄ (= the paper's u1 + u2, precomputed) and u3 = x̂·R2 on-line —
  u3 costs as much as the layer itself, computed as one exact float64 GEMM (|x̂| ≤ 2^10).

Masking and unmasking themselves are the int32 fast paths `ring.mask32` / `ring.unmask32`.
Everything the worker receives (W̄ or Ŵ once, x̄ per stage) is a ring element; x̄ is uniform in
F_p whatever x̂ is, because r1 is uniform and fresh for every stage of every window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from enclave_bridge.quant import BX
from enclave_bridge.ring import MaskRNG, P, add_mod, centred, exact_linear, to_ring
from enclave_bridge.secure_layers import LinearOp, QuantModel, linear_fn

MASKED_MODES = ("paper", "slalom")


@dataclass
class OpMasks:
    """Per-op material for one model load."""

    op: LinearOp
    worker_weight: torch.Tensor  # int64 in [0, p): what the worker gets (Ŵ or W̄)
    worker_centred: torch.Tensor  # float64 centred copy, for computing u = r1·W_worker
    worker_l1: int  # max_o Σ_d |W_worker[d, o]| (centred)
    r2: torch.Tensor | None  # paper: float64 centred R2 (D, C_out)
    r2_l1: int


class MaskingEngine:
    """Holds the per-load weight masks of a `QuantModel` and does mask / unmask / precompute."""

    def __init__(self, qm: QuantModel, mode: str, rng: MaskRNG) -> None:
        if mode not in MASKED_MODES:
            raise ValueError(f"masking mode must be one of {MASKED_MODES}, got {mode!r}")
        self.qm, self.mode = qm, mode
        self.ops: dict[str, OpMasks] = {}
        for name, op in qm.ops.items():
            w_ring = to_ring(op.q.w_int)
            r2 = None
            r2_l1 = 0
            if mode == "paper":
                r2_ring = rng.uniform(tuple(op.q.w_int.shape))
                w_ring = add_mod(w_ring, r2_ring)
                r2 = centred(r2_ring).to(torch.float64)
                r2_l1 = int(r2.abs().sum(dim=0).max().item())
            wc = centred(w_ring).to(torch.float64)
            self.ops[name] = OpMasks(op, w_ring, wc, int(wc.abs().sum(dim=0).max().item()), r2, r2_l1)

    def worker_payload(self) -> list[dict[str, object]]:
        """What is uploaded to the worker once per model load: meta + ring weights (uint32)."""
        return [
            {"name": name, "meta": om.op.meta.to_wire(), "weight": om.worker_weight.numpy().astype(np.uint32)}
            for name, om in self.ops.items()
        ]

    def precompute_u(self, name: str, r1: torch.Tensor) -> torch.Tensor:
        """u = r1·W_worker mod p (off-line; r1 is a full ring element → limb products)."""
        om = self.ops[name]
        return exact_linear(linear_fn(om.op.meta, om.worker_centred), r1, P - 1, max(om.worker_l1, 1))

    def u3(self, name: str, xq: torch.Tensor) -> torch.Tensor:
        """Paper mode on-line term x̂·R2 mod p."""
        om = self.ops[name]
        if om.r2 is None:
            raise ValueError("u3 exists only in paper mode")
        return exact_linear(linear_fn(om.op.meta, om.r2), xq, BX, max(om.r2_l1, 1))


__all__ = ["MASKED_MODES", "MaskingEngine", "OpMasks"]
