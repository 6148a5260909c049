"""What each worker holds per delegation mode, and the enclave's copies for unmasking and blame.

One worker:
- `slalom`: the worker holds Ŵ (weights visible, input hidden). x̄ = x̂ + r1, ȳ = x̄·Ŵ,
  y = ȳ − u with u = r1·Ŵ (precompute pool, or made on-line).
- `paper` (extended SLALOM, SECRYPT'23): the worker holds W̄ = Ŵ + R2 (R2 uniform, drawn per
  model load). ȳ = x̄·W̄, y = ȳ − u − u3 with u = r1·W̄ (precomputed) and u3 = x̂·R2 on-line.

Several non-colluding workers (no GEMM and no precompute in the enclave, docs/SPLIT_TRUST.md):
- `split2` (input hidden, weights visible): A and B hold Ŵ. Per stage a fresh seed expands to a
  uniform r; A gets x̂ − r, B gets the seed and returns r·Ŵ; y = A + B.
- `split3` (input and weights hidden): Ŵ = W1 + W2 + W3 with W1, W2 uniform (per model load).
  A holds W1 + W2; B holds W2, W3; C holds W1, W3. Per stage fresh seeds a, b:
  A: (x̂ + a)(W1 + W2); B: (x̂ + b)W3 − a·W2; C: a·W1 + b·W3;  y = A + B − C.

Workers receive ring elements only. A `slot` is one weight matrix a worker holds for an op; a
request term is (input tensor or PRG seed, slot, sign) and a worker returns Σ sign·input·W[slot].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from enclave_bridge.measured.quant import BX
from enclave_bridge.measured.secure_layers import LinearOp, QuantModel, apply_linear
from enclave_bridge.shared.ring import MaskRNG, RingWeight, add_mod, sub_mod, to_ring

MASKED_MODES = ("paper", "slalom")
SPLIT_MODES = ("split2", "split3")
DELEGATED_MODES = MASKED_MODES + SPLIT_MODES
WORKERS_NEEDED = {"paper": 1, "slalom": 1, "split2": 2, "split3": 3}


@dataclass
class OpMaterial:
    """Per-op weights of one model load: what each worker holds, and enclave-side helpers."""

    op: LinearOp
    slots: list[list[torch.Tensor]]  # per worker: its slot weights (int64 ring, (D, C_out))
    u_weight: RingWeight | None = None  # slalom/paper: W_worker, for u = r1·W_worker
    r2: RingWeight | None = None  # paper: R2, for u3 = x̂·R2
    _ring: dict[tuple[int, int], RingWeight] = field(default_factory=dict)

    def ring(self, worker: int, slot: int) -> RingWeight:
        """RingWeight of a worker's slot (built on first use: only the blame path needs it)."""
        key = (worker, slot)
        if key not in self._ring:
            self._ring[key] = RingWeight(self.slots[worker][slot])
        return self._ring[key]


class MaskingEngine:
    """Weight material of a `QuantModel` for one delegation mode."""

    def __init__(self, qm: QuantModel, mode: str, rng: MaskRNG) -> None:
        if mode not in DELEGATED_MODES:
            raise ValueError(f"delegation mode must be one of {DELEGATED_MODES}, got {mode!r}")
        self.qm, self.mode = qm, mode
        self.ops: dict[str, OpMaterial] = {}
        for name, op in qm.ops.items():
            w = to_ring(op.q.w_int)
            if mode == "slalom":
                mat = OpMaterial(op, [[w]], u_weight=RingWeight(w))
            elif mode == "paper":
                r2 = rng.uniform(tuple(w.shape))
                w_bar = add_mod(w, r2)
                mat = OpMaterial(op, [[w_bar]], u_weight=RingWeight(w_bar), r2=RingWeight(r2))
            elif mode == "split2":
                mat = OpMaterial(op, [[w], [w]])
            else:
                w1, w2 = rng.uniform(tuple(w.shape)), rng.uniform(tuple(w.shape))
                w3 = sub_mod(sub_mod(w, w1), w2)
                mat = OpMaterial(op, [[add_mod(w1, w2)], [w2, w3], [w1, w3]])
            self.ops[name] = mat

    @property
    def n_workers(self) -> int:
        return WORKERS_NEEDED[self.mode]

    def worker_payload(self, worker: int = 0) -> list[dict[str, object]]:
        """What worker `worker` gets once per model load: op meta + its slot weights (int64)."""
        return [
            {"name": name, "meta": m.op.meta.to_wire(), "slots": [s.numpy() for s in m.slots[worker]]}
            for name, m in self.ops.items()
        ]

    def precompute_u(self, name: str, r1: torch.Tensor) -> torch.Tensor:
        """u = r1·W_worker mod p (slalom/paper; r1 a full ring element → limb products)."""
        m = self.ops[name]
        assert m.u_weight is not None
        meta = m.op.meta
        return m.u_weight.apply(lambda t, w: apply_linear(meta, t, w), r1)

    def u3(self, name: str, xq: torch.Tensor) -> torch.Tensor:
        """Paper mode on-line term x̂·R2 mod p (x̂ small signed)."""
        m = self.ops[name]
        if m.r2 is None:
            raise ValueError("u3 exists only in paper mode")
        meta = m.op.meta
        return m.r2.apply(lambda t, w: apply_linear(meta, t, w), xq.to(torch.int64), BX)

    def expected_reply(
        self, name: str, worker: int, terms: list[tuple[torch.Tensor, int, int]]
    ) -> npt.NDArray[np.int64]:
        """What an honest worker returns for (input, slot, sign) terms (blame path only)."""
        m = self.ops[name]
        meta = m.op.meta
        acc: torch.Tensor | None = None
        for x, slot, sign in terms:
            part = m.ring(worker, slot).apply(lambda t, w: apply_linear(meta, t, w), x)
            if acc is None:
                acc = part if sign > 0 else sub_mod(torch.zeros_like(part), part)
            else:
                acc = add_mod(acc, part) if sign > 0 else sub_mod(acc, part)
        assert acc is not None
        return acc.numpy()


__all__ = ["DELEGATED_MODES", "MASKED_MODES", "SPLIT_MODES", "WORKERS_NEEDED", "MaskingEngine", "OpMaterial"]
