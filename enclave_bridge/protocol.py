"""`SecureEvaluator`: ST-GCN inference with the linear layers delegated, masked, to a GPU worker.

Modes (DESIGN §5):
- `paper`   input and weights hidden (x̄ = x̂ + r1, W̄ = Ŵ + R2; y = ȳ − r1·W̄ − x̂·R2).
- `slalom`  input hidden, weights visible to the worker (y = ȳ − r1·Ŵ).
- `enclave` no delegation: the same exact integer arithmetic inside the enclave.
- `plaintext` the float folded model, no protection (benchmarks only; needs allow_plaintext=True).

`paper`, `slalom` and `enclave` compute the *same integers* (exact ring arithmetic with the proven
no-wrap bound of `quant`), so their logits are bit-identical; they differ from the float model only
by fixed-point quantisation. Every worker reply is Freivalds-checked; a failed check or a broken
worker connection is counted and that op (after a transport error: the rest of the window) is
recomputed on the enclave path, so `evaluate` still returns the correct logits.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from enclave_bridge import freivalds
from enclave_bridge.errors import IntegrityError, TransportError
from enclave_bridge.masking import MASKED_MODES, MaskingEngine
from enclave_bridge.pool import PrecomputePool, StageMasks, WindowKey, WindowMasks
from enclave_bridge.quant import ACT_LIMBS, join_limbs, split_limbs
from enclave_bridge.ring import EXACT, MaskRNG, P, centred, centred32, mask32, unmask32
from enclave_bridge.secure_layers import LinearOp, QuantModel, linear_fn, out_shape, quantised_forward
from enclave_bridge.stgcn.fold import FoldedSTGCN
from enclave_bridge.stgcn.model import STGCN

log = logging.getLogger(__name__)

MODES = ("paper", "slalom", "enclave", "plaintext")
TIMING_PARTS = (
    "decrypt",
    "mask",
    "unmask",
    "u3",
    "freivalds",
    "worker",
    "transport",
    "precompute",
    "enclave_linear",
    "nonlinear",
    "total",
)


class Worker(Protocol):
    """What the evaluator needs from a worker (`LocalWorker` or `WorkerClient`)."""

    bytes_sent: int
    bytes_received: int

    def load(self, model_id: str, ops: list[dict[str, Any]]) -> None: ...

    def compute(self, model_id: str, x: np.ndarray, names: list[str]) -> tuple[list[np.ndarray], float]: ...

    def close(self) -> None: ...


@dataclass
class SecureStats:
    """Counters and per-part timings (seconds, cumulative and of the last window)."""

    mode: str = ""
    windows: int = 0
    stages: int = 0
    delegated_ops: int = 0
    freivalds_checks: int = 0
    freivalds_failures: int = 0
    enclave_recomputes: int = 0
    transport_errors: int = 0
    pool_hits: int = 0
    pool_misses: int = 0
    pool_depth: int = 0
    bytes_to_worker: int = 0
    bytes_from_worker: int = 0
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    last: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("timings", "last")}
        d["timings"] = dict(self.timings)
        d["last"] = dict(self.last)
        return d


class _Timer:
    def __init__(self, stats: SecureStats, part: str) -> None:
        self.stats, self.part = stats, part

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.stats.last[self.part] += time.perf_counter() - self.t0


class _EnclaveBackend:
    """Exact integer linear ops inside the enclave (mode `enclave`, and the fallback path).

    No ring and no digits are needed here: |x̂|·‖Ŵ_o‖₁ < 2^53 (checked at load), so one float64
    GEMM on the full activation gives the exact integer result the delegated path reassembles.
    """

    def __init__(self, qm: QuantModel, stats: SecureStats) -> None:
        self.stats = stats
        self._w = {name: op.q.w_int.to(torch.float64) for name, op in qm.ops.items()}
        worst = max((op.q.col_l1 for op in qm.ops.values()), default=0)
        if qm.act_bound * worst >= EXACT:
            raise ValueError("activation × weight bound exceeds exact float64 range")

    def one(self, xq: torch.Tensor, op: LinearOp) -> torch.Tensor:
        with _Timer(self.stats, "enclave_linear"):
            return linear_fn(op.meta, self._w[op.name])(xq.to(torch.float64))

    def run(self, xq: torch.Tensor, ops: list[LinearOp]) -> list[torch.Tensor]:
        return [self.one(xq, op) for op in ops]


class _DelegatedBackend:
    """Masked delegation of each stage to the worker, Freivalds-verified."""

    def __init__(self, ev: SecureEvaluator) -> None:
        self.ev = ev
        self.window: WindowMasks | None = None
        self.degraded = False

    def begin_without_pool(self) -> None:
        self.degraded = False
        self.window = None

    def begin(self, key: WindowKey) -> None:
        self.degraded = False
        self.window = self.ev.pool.take(key) if self.ev.pool is not None else None
        if self.window is None:
            self.ev.stats.pool_misses += 1
        else:
            self.ev.stats.pool_hits += 1

    def run(self, xq: torch.Tensor, ops: list[LinearOp]) -> list[torch.Tensor]:
        ev, st = self.ev, self.ev.stats
        st.stages += 1
        names = tuple(op.name for op in ops)
        limbs = ev.qm.act_limbs
        xd = split_limbs(xq, limbs)  # ring-sized digits stacked on the batch axis
        shape = tuple(xd.shape)
        if self.window is not None:
            stage = self.window.next_stage(shape, names)
        else:
            with _Timer(st, "precompute"):
                stage = ev.make_stage(shape, names, ev.rng)
        r1, u = stage.consume()
        if self.degraded:
            st.enclave_recomputes += len(ops)
            return ev.local.run(xq, ops)
        with _Timer(st, "mask"):
            x_bar = mask32(xd, r1).numpy().view(np.uint32)
        t0 = time.perf_counter()
        try:
            outs, worker_s = ev.worker.compute(ev.model_id, x_bar, list(names))
        except TransportError as e:
            st.transport_errors += 1
            log.warning("gpu worker failed (%s); finishing this window in the enclave", e)
            if not ev.fallback:
                raise
            self.degraded = True
            st.enclave_recomputes += len(ops)
            return ev.local.run(xq, ops)
        wall = time.perf_counter() - t0
        st.last["worker"] += min(worker_s, wall)
        st.last["transport"] += max(wall - worker_s, 0.0)
        results = []
        xf = xd.to(torch.float64)  # shared by the Freivalds checks of this stage
        for op, y_bar in zip(ops, outs, strict=True):
            st.delegated_ops += 1
            try:
                y_digits = self._verified(op, xd, xf, shape, y_bar, u[op.name])
                with _Timer(st, "unmask"):
                    results.append(join_limbs(y_digits, limbs))
            except IntegrityError as e:
                st.freivalds_failures += 1
                log.warning("rejected worker reply for %s: %s; recomputing in the enclave", op.name, e)
                st.enclave_recomputes += 1
                results.append(ev.local.one(xq, op))
        return results

    def _verified(
        self,
        op: LinearOp,
        xq: torch.Tensor,
        xf: torch.Tensor,
        shape: tuple[int, ...],
        y_bar: np.ndarray,
        u: torch.Tensor,
    ) -> torch.Tensor:
        """Unmask, lift and Freivalds-check one reply; returns the exact result as float64."""
        ev, st = self.ev, self.ev.stats
        expect = out_shape(op.meta, shape, op.c_out)
        if y_bar.dtype != np.uint32 or tuple(y_bar.shape) != expect or bool((y_bar >= P).any()):
            raise IntegrityError(f"malformed reply {y_bar.dtype} {y_bar.shape}, expected uint32 {expect}")
        with _Timer(st, "unmask"):
            # ȳ − u in numpy (ȳ may be a read-only wire buffer), then the int32 fix-up to [0, p)
            y = torch.from_numpy(y_bar.view(np.int32) - u.numpy())
            y += y.bitwise_right_shift(31).bitwise_and_(P)
        if ev.mode == "paper":
            with _Timer(st, "u3"):
                u3 = ev.engine.u3(op.name, xq).to(torch.int32)
            with _Timer(st, "unmask"):
                y = unmask32(y, u3)
        with _Timer(st, "unmask"):
            yf = centred32(y).to(torch.float64)  # exact: |y| ≤ HALF
        with _Timer(st, "freivalds"):
            st.freivalds_checks += 1
            ok = freivalds.check(op, xq, yf, ev.rng, ev.freivalds_reps, xf=xf)
        if not ok:
            raise IntegrityError(f"Freivalds check failed for {op.name}")
        return yf


class SecureEvaluator:
    """Evaluate ST-GCN on a (N, 3, T, V, M) window with the chosen protection mode.

    `worker=None` starts an in-process worker on the best torch device; a string is the address
    of a `veilcam gpu-worker` (`host:port` or `unix:/path`); any object with the `Worker`
    interface is used as is. Options: `allow_plaintext`, `pool_window=(N, T, M)` (shape the
    precompute pool fills for; default: the shape of the first evaluated window, re-keyed when
    the shape changes), `pool_capacity` (default 2 windows, 0 = no pool), `background_pool`
    (default True), `freivalds_reps` (default 2: soundness 2⁻⁶²), `fallback` (default True:
    finish a window in the enclave if the worker fails), `timeout_s` for a remote worker,
    `act_limbs` (default 2: ~20-bit activations, logits within ~0.05 % of the float model; 1 halves
    the delegated work at ~1 % logit error, enough to flip near-tie top-1 classes).
    """

    def __init__(
        self,
        model: STGCN | FoldedSTGCN,
        mode: str = "paper",
        worker: str | Worker | None = None,
        *,
        allow_plaintext: bool = False,
        pool_window: WindowKey | None = None,
        pool_capacity: int = 2,
        background_pool: bool = True,
        freivalds_reps: int = freivalds.REPS,
        fallback: bool = True,
        timeout_s: float = 120.0,
        act_limbs: int = ACT_LIMBS,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "plaintext" and not allow_plaintext:
            raise ValueError("mode 'plaintext' gives no protection; pass allow_plaintext=True to use it")
        if freivalds_reps < 1 or freivalds_reps * 31 < 40:
            raise ValueError("freivalds_reps must give soundness ≤ 2^-40 (≥ 2 repetitions)")
        self.mode = mode
        self.stats = SecureStats(mode=mode)
        self.qm = QuantModel(model, act_limbs=act_limbs)
        self.freivalds_reps, self.fallback = freivalds_reps, fallback
        self._lock = threading.Lock()
        self.rng = MaskRNG()
        self.local = _EnclaveBackend(self.qm, self.stats)
        self.worker: Worker | None = None
        self.pool: PrecomputePool | None = None
        self.model_id = secrets.token_hex(8)
        if mode in MASKED_MODES:
            self.engine = MaskingEngine(self.qm, mode, self.rng)
            if worker is None:
                from enclave_bridge.gpu_worker import LocalWorker

                self.worker = LocalWorker()
            elif isinstance(worker, str):
                from enclave_bridge.worker_client import WorkerClient

                self.worker = WorkerClient(worker, timeout_s=timeout_s)
            else:
                self.worker = worker
            self.worker.load(self.model_id, self.engine.worker_payload())
            self._pool_capacity, self._background_pool = pool_capacity, background_pool
            if pool_window is not None:
                self._ensure_pool(tuple(pool_window))  # type: ignore[arg-type]
            self._delegated = _DelegatedBackend(self)
        log.info(
            "secure evaluator ready: mode %s, %d ring ops, modulus 2^31-1, %d activation digit(s)",
            mode,
            len(self.qm.ops),
            act_limbs,
        )

    def _ensure_pool(self, key: WindowKey) -> None:
        """(Re)key the precompute pool to the window shape in use (entries are shape-specific)."""
        if self._pool_capacity <= 0 or (self.pool is not None and self.pool.key == key):
            return
        if self.pool is not None:
            log.info("window shape changed to %s: re-keying the mask pool", key)
            self.pool.close()
        self.pool = PrecomputePool(
            lambda k: self.qm.stage_plan(*k),
            self.make_stage,
            key,
            capacity=self._pool_capacity,
            background=self._background_pool,
        )

    def make_stage(self, shape: tuple[int, ...], names: tuple[str, ...], rng: MaskRNG) -> StageMasks:
        """Fresh r1 for one stage (stored centred, int32) and u = r1·W_worker mod p per op (int32)."""
        r1 = rng.uniform(shape)
        u = {n: self.engine.precompute_u(n, r1).to(torch.int32) for n in names}
        return StageMasks(tuple(shape), tuple(names), centred(r1).to(torch.int32), u)

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, T, V, M) float32 window → (N, num_class) float64 logits."""
        x = np.asarray(x)
        if x.ndim != 5 or x.shape[1] != 3 or x.shape[3] != self.qm.folded.num_joints:
            raise ValueError(f"expected (N, 3, T, {self.qm.folded.num_joints}, M), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("window contains non-finite values")
        with self._lock:
            self.stats.last = defaultdict(float)
            t0 = time.perf_counter()
            sent0 = self.worker.bytes_sent if self.worker else 0
            recv0 = self.worker.bytes_received if self.worker else 0
            ctx = self.pool.busy() if self.pool is not None else _null()
            rekey: WindowKey | None = None
            with ctx:
                if self.mode == "plaintext":
                    with torch.no_grad():
                        out = self.qm.folded(torch.from_numpy(x).to(torch.float64)).numpy()
                elif self.mode == "enclave":
                    out = quantised_forward(self.qm, x, self.local)
                else:
                    key = (x.shape[0], x.shape[2], x.shape[4])
                    if self.pool is None or self.pool.key != key:
                        self.stats.pool_misses += 1  # masks for this window are made on-line
                        self._delegated.begin_without_pool()
                    else:
                        self._delegated.begin(key)
                    out = quantised_forward(self.qm, x, self._delegated)
                    self._delegated.window = None
                    rekey = key
            last = self.stats.last
            last["total"] = time.perf_counter() - t0
            if rekey is not None:
                self._ensure_pool(rekey)  # fill (in the background, while idle) for the shape in use
            accounted = sum(v for k, v in last.items() if k not in ("total", "nonlinear", "decrypt"))
            last["nonlinear"] = max(last["total"] - accounted, 0.0)
            for k, v in last.items():
                self.stats.timings[k] += v
            self.stats.windows += 1
            if self.worker is not None:
                self.stats.bytes_to_worker += self.worker.bytes_sent - sent0
                self.stats.bytes_from_worker += self.worker.bytes_received - recv0
            if self.pool is not None:
                self.stats.pool_depth = self.pool.depth
            return np.asarray(out, dtype=np.float64)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.worker is not None:
            self.worker.close()

    def __enter__(self) -> SecureEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


__all__ = ["MODES", "TIMING_PARTS", "SecureEvaluator", "SecureStats", "Worker"]
