"""Where a stage's linear ops run: exactly inside the enclave (`ExactBackend`: the fallback path
and the reference), or masked on the workers and checked with Freivalds (`DelegatedBackend`),
plus the counters both keep. `protocol.SecureEvaluator` picks one per stage.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from enclave_bridge.measured import freivalds, kernels
from enclave_bridge.measured.masking import MASKED_MODES
from enclave_bridge.measured.pool import StageMasks, WindowMasks
from enclave_bridge.measured.quant import BX, act_exponent
from enclave_bridge.measured.secure_layers import (
    LinearOp,
    apply_linear,
    as4d,
    out_shape,
)
from enclave_bridge.shared.errors import IntegrityError, TransportError
from enclave_bridge.shared.ring import prg_raw
from enclave_bridge.shared.worker_proto import Term

if TYPE_CHECKING:
    from enclave_bridge.measured.protocol import SecureEvaluator

log = logging.getLogger(__name__)


class Worker(Protocol):
    """What the evaluator needs from a worker (`LocalWorker` or `WorkerClient`)."""

    bytes_sent: int
    bytes_received: int

    def load(self, model_id: str, ops: list[dict[str, Any]]) -> None: ...

    def compute(
        self, model_id: str, names: list[str], terms: list[Term]
    ) -> tuple[list[npt.NDArray[np.int64]], float]: ...

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
    worker_faults: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    timings: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    last: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("timings", "last", "worker_faults")}
        d["worker_faults"] = dict(self.worker_faults)
        d["timings"] = dict(self.timings)
        d["last"] = dict(self.last)
        return d


class Timer:
    def __init__(self, stats: SecureStats, part: str) -> None:
        self.stats, self.part = stats, part

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.stats.last[self.part] += time.perf_counter() - self.t0


def quantise_stage(h: torch.Tensor) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32], float, int]:
    """Stage input (float32) → (h as contiguous numpy, x̂ int32 buffer, scale 2^e, e)."""
    hn = np.ascontiguousarray(h.detach().numpy())
    if hn.size == 0:
        return hn, np.zeros(hn.shape, np.int32), 1.0, 0
    lo, hi = torch.aminmax(h)
    e = act_exponent(max(-float(lo), float(hi)), BX)
    return hn, np.empty(hn.shape, np.int32), 2.0**e, e


class ExactBackend:
    """Exact integer linear ops inside the enclave (fallback path, and reference for tests).

    |x̂|·‖Ŵ_o‖₁ ≤ 2^52 (checked at load), so one float64 GEMM gives the exact integer result that
    the delegated modes reassemble from the workers' ring replies; the dequantisation is the same
    float operation, so the logits are bit-identical.
    """

    def __init__(self, stats: SecureStats) -> None:
        self.stats = stats

    def quantised(self, h: torch.Tensor) -> tuple[npt.NDArray[np.int32], int]:
        hn, xq, scale, e = quantise_stage(h)
        kernels.quant_mask(hn.reshape(-1), scale, np.zeros(1, np.int64), 0, xq.reshape(-1), xq.reshape(-1))
        return xq, e

    def one(self, xq: npt.NDArray[np.int32], e: int, op: LinearOp) -> torch.Tensor:
        with Timer(self.stats, "enclave_linear"):
            y = apply_linear(op.meta, torch.from_numpy(xq).to(torch.float64), op.w_f64)
            scale = torch.from_numpy(op.scale2 * 2.0**-e)
            return (as4d(y) * scale[None, :, None, :]).to(torch.float32).view(y.shape)

    def run(self, h: torch.Tensor, ops: list[LinearOp]) -> list[torch.Tensor]:
        xq, e = self.quantised(h)
        return [self.one(xq, e, op) for op in ops]


class DelegatedBackend:
    """Masked delegation of each stage to the workers, Freivalds-verified, fused passes."""

    def __init__(self, ev: SecureEvaluator) -> None:
        self.ev = ev
        self.window: WindowMasks | None = None
        self.degraded = False
        self._views: list[list[npt.NDArray[np.int64]] | None] = []

    def begin(self, window: WindowMasks | None) -> None:
        self.degraded = False
        self.window = window

    # -- per-mode request building -------------------------------------------------------------
    def _reserve(self, shape: tuple[int, ...], outs: list[tuple[int, ...]]) -> None:
        """Lay out each worker's shared-memory arena (if any) for this stage: inputs, then replies."""
        tensor_input = {"split3": (0, 1)}.get(self.ev.mode, (0,))
        self._views = []
        for k, w in enumerate(self.ev.workers):
            reserve = getattr(w, "reserve", None)
            self._views.append(reserve([shape] if k in tensor_input else [], outs) if reserve else None)

    def _buffer(self, k: int, shape: tuple[int, ...], outs: list[tuple[int, ...]]) -> npt.NDArray[np.int64]:
        """Where worker k's masked input goes: its shared-memory arena when it has one."""
        views = self._views[k] if k < len(self._views) else None
        return views[0] if views else np.empty(shape, np.int64)

    def _requests(
        self,
        hn: npt.NDArray[np.float32],
        xq: npt.NDArray[np.int32],
        scale: float,
        names: tuple[str, ...],
        outs: list[tuple[int, ...]],
    ) -> tuple[list[list[Term]], Any]:
        """Quantise + mask in one pass; returns the terms per worker and the unmasking material."""
        ev, mode = self.ev, self.ev.mode
        flat_h, flat_q = hn.reshape(-1), xq.reshape(-1)
        shape = tuple(xq.shape)
        n = xq.size
        bar = self._buffer(0, shape, outs)
        if mode in MASKED_MODES:
            stage: StageMasks
            if self.window is not None:
                stage = self.window.next_stage(shape, names)
            else:
                with Timer(ev.stats, "precompute"):
                    stage = ev.make_stage(shape, names, ev.rng)
            r1, u = stage.consume()
            with Timer(ev.stats, "mask"):
                kernels.quant_mask(flat_h, scale, r1.numpy().reshape(-1), 1, flat_q, bar.reshape(-1))
            return [[Term(0, 1, x=bar)]], u
        if mode == "split2":
            seed = ev.rng.seed()
            with Timer(ev.stats, "mask"):
                kernels.quant_mask(flat_h, scale, prg_raw(seed, n), -1, flat_q, bar.reshape(-1))
            return [[Term(0, 1, x=bar)], [Term(0, 1, seed=seed, shape=shape)]], None
        seed_a, seed_b = ev.rng.seed(), ev.rng.seed()
        bar_b = self._buffer(1, shape, outs)
        with Timer(ev.stats, "mask"):
            kernels.quant_mask(flat_h, scale, prg_raw(seed_a, n), 1, flat_q, bar.reshape(-1))
            kernels.mask_from(flat_q, prg_raw(seed_b, n), 1, bar_b.reshape(-1))
        a = Term(0, 1, seed=seed_a, shape=shape)
        b = Term(1, 1, seed=seed_b, shape=shape)
        return [
            [Term(0, 1, x=bar)],
            [Term(1, 1, x=bar_b), Term(0, -1, seed=seed_a, shape=shape)],
            [Term(0, 1, seed=a.seed, shape=shape), b],
        ], None

    def _call_all(
        self, names: list[str], requests: list[list[Term]], outs: list[tuple[int, ...]]
    ) -> list[list[npt.NDArray[np.int64]]]:
        """Send each worker its request (in parallel when there are several)."""
        ev = self.ev
        t0 = time.perf_counter()
        if len(ev.workers) == 1:
            got, worker_s = compute_on(ev.workers[0], ev.model_id, names, requests[0], outs)
            replies, busy = [got], worker_s
        else:
            assert ev._executor is not None
            futs = [
                ev._executor.submit(compute_on, w, ev.model_id, names, req, outs)
                for w, req in zip(ev.workers, requests, strict=True)
            ]
            res = [f.result() for f in futs]
            replies, busy = [r[0] for r in res], max(r[1] for r in res)
        wall = time.perf_counter() - t0
        ev.stats.last["worker"] += min(busy, wall)
        ev.stats.last["transport"] += max(wall - busy, 0.0)
        return replies

    # -- a stage -----------------------------------------------------------------------------------
    def run(self, h: torch.Tensor, ops: list[LinearOp]) -> list[torch.Tensor]:
        ev, st = self.ev, self.ev.stats
        st.stages += 1
        dense = h.ndim == 2
        names = tuple(op.name for op in ops)
        if self.degraded:
            xq, e = ev.local.quantised(h)
            st.enclave_recomputes += len(ops)
            if self.window is not None:
                self.window.next_stage(tuple(xq.shape), names).consume()
            return [ev.local.one(xq, e, op) for op in ops]
        hn, xq, scale, e = quantise_stage(h)
        outs = [out_shape(op.meta, tuple(xq.shape), op.c_out) for op in ops]
        try:
            self._reserve(tuple(xq.shape), outs)
        except TransportError as err:  # a worker down before the stage: the same fallback below
            self._views = []
            log.warning("gpu worker unavailable (%s)", err)
        requests, u = self._requests(hn, xq, scale, names, outs)
        try:
            replies = self._call_all(list(names), requests, outs)
        except TransportError as err:
            st.transport_errors += 1
            log.warning("gpu worker failed (%s); finishing this window in the enclave", err)
            if not ev.fallback:
                raise
            self.degraded = True
            st.enclave_recomputes += len(ops)
            return [ev.local.one(xq, e, op) for op in ops]
        xq4 = xq.reshape(xq.shape[0], xq.shape[1], 1, 1) if dense else xq
        results = []
        for i, op in enumerate(ops):
            st.delegated_ops += 1
            expect = out_shape(op.meta, tuple(xq.shape), op.c_out)
            try:
                ys = [self._reply(r[i], expect, k) for k, r in enumerate(replies)]
                results.append(self._finish(op, ys, u, xq, xq4, e, expect))
            except IntegrityError as err:
                st.freivalds_failures += 1
                culprits = self._blame(op, requests, [r[i] for r in replies], expect)
                for c in culprits:
                    st.worker_faults[c] += 1
                log.warning(
                    "rejected reply for %s from %s: %s; recomputing in the enclave",
                    op.name,
                    ", ".join(culprits) or "unidentified worker",
                    err,
                )
                st.enclave_recomputes += 1
                results.append(ev.local.one(xq, e, op))
        return results

    def _reply(self, y: object, expect: tuple[int, ...], k: int) -> npt.NDArray[np.int64]:
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or tuple(y.shape) != expect:
            raise IntegrityError(f"malformed reply from worker {k}: expected int64 {expect}")
        return y.reshape(y.shape[0], y.shape[1], 1, 1) if y.ndim == 2 else y

    def _finish(
        self,
        op: LinearOp,
        ys: list[npt.NDArray[np.int64]],
        u: Any,
        xq: npt.NDArray[np.int32],
        xq4: npt.NDArray[np.int32],
        e: int,
        expect: tuple[int, ...],
    ) -> torch.Tensor:
        """Combine replies (and unmasking terms), check, dequantise → float32 output."""
        ev, st, mode = self.ev, self.ev.stats, self.ev.mode
        out4 = ys[0].shape
        check = freivalds.Check.draw(op, out4, ev.rng, ev.freivalds_reps)
        dummy = np.zeros((1, 1, 1, 1), np.int64)
        if mode in MASKED_MODES:
            b_term = u[op.name].numpy().reshape(out4)
            c_term, sc = dummy, 0
            if mode == "paper":
                with Timer(st, "u3"):
                    c_term = ev.engine.u3(op.name, torch.from_numpy(xq)).numpy().reshape(out4)
                sc = -1
            a, b, sb = ys[0], b_term, -1
        elif mode == "split2":
            a, b, sb, c_term, sc = ys[0], ys[1], 1, dummy, 0
        else:
            a, b, sb, c_term, sc = ys[0], ys[1], 1, ys[2], -1
        out = np.empty(out4, np.float32)
        scale = np.ascontiguousarray(np.broadcast_to(op.scale2 * 2.0**-e, (out4[1], out4[3])))
        with Timer(st, "finish"):
            bad = check.finish([a, b, c_term], (sb, sc), scale, out)
        with Timer(st, "freivalds"):
            st.freivalds_checks += 1
            if bad:
                raise IntegrityError(f"{bad} values of {op.name} outside the proven bound")
            if not np.array_equal(check.y_side(), check.x_side(xq)):
                raise IntegrityError(f"Freivalds check failed for {op.name}")
        return torch.from_numpy(out).view(expect)

    def _blame(
        self,
        op: LinearOp,
        requests: list[list[Term]],
        replies: list[npt.NDArray[np.int64]],
        expect: tuple[int, ...],
    ) -> list[str]:
        """Which workers' replies differ from an honest worker's (failure path only)."""
        ev = self.ev
        bad = []
        for k, (req, y) in enumerate(zip(requests, replies, strict=True)):
            terms = [(torch.from_numpy(np.array(t.tensor())), t.slot, t.sign) for t in req]
            try:
                want = ev.engine.expected_reply(op.name, k, terms)
            except (RuntimeError, ValueError):
                want = None
            y = np.asarray(y)
            if want is None or y.shape != tuple(expect) or not np.array_equal(y, want.reshape(y.shape)):
                bad.append(ev.worker_names[k])
        return bad


def compute_on(
    w: Worker, model_id: str, names: list[str], terms: list[Term], outs: list[tuple[int, ...]]
) -> tuple[list[npt.NDArray[np.int64]], float]:
    """`w.compute`, telling workers with a shared-memory arena where the replies go."""
    if getattr(w, "reserve", None) is not None:
        return w.compute(model_id, names, terms, outs)  # type: ignore[call-arg]
    return w.compute(model_id, names, terms)


__all__ = [
    "DelegatedBackend",
    "ExactBackend",
    "SecureStats",
    "Timer",
    "Worker",
    "compute_on",
    "quantise_stage",
]
