"""`SecureEvaluator`: ST-GCN inference with the linear layers delegated, masked, to GPU workers.

Modes (DESIGN §5, README "Secure evaluation", docs/SPLIT_TRUST.md):
- `paper`   one worker, input and weights hidden (x̄ = x̂ + r1, W̄ = Ŵ + R2; y = ȳ − r1·W̄ − x̂·R2).
- `slalom`  one worker, input hidden, weights visible (y = ȳ − r1·Ŵ).
- `split2`  two non-colluding workers, input hidden, weights visible; nothing precomputed.
- `split3`  three workers (pairwise non-colluding), input and weights hidden; nothing precomputed.
- `enclave` no delegation: the folded float32 model inside the enclave (plain-model cost).
- `plaintext` the folded float model, no protection (benchmarks only; needs allow_plaintext=True).

The four delegated modes compute the *same integers* x̂·Ŵ (exact arithmetic in F_(2^61−1) with
the proven no-wrap bound of `quant`) and the same float operations around them, so their logits
are bit-identical; they differ from the float model only by fixed-point quantisation (20-bit
activations, ≥ 19-bit weights per column: ~1e-5 of the largest logit). Every reply is
Freivalds-checked; a failed check is blamed on the worker(s) whose reply differs from what an
honest one returns, counted, and the op recomputed in the enclave; a transport failure finishes
the window in the enclave — `evaluate` always returns the right logits.
"""

from __future__ import annotations

import copy
import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from enclave_bridge.measured import freivalds, kernels
from enclave_bridge.measured.masking import DELEGATED_MODES, MASKED_MODES, WORKERS_NEEDED, MaskingEngine
from enclave_bridge.measured.pool import PrecomputePool, StageMasks, WindowKey, WindowMasks
from enclave_bridge.measured.quant import BX, act_exponent
from enclave_bridge.measured.secure_layers import (
    LinearOp,
    QuantModel,
    apply_linear,
    as4d,
    out_shape,
    quantised_forward,
)
from enclave_bridge.measured.stgcn.fold import FoldedSTGCN, fold_batchnorm
from enclave_bridge.measured.stgcn.model import STGCN
from enclave_bridge.shared.errors import IntegrityError, TransportError
from enclave_bridge.shared.ring import MaskRNG, prg_raw
from enclave_bridge.shared.worker_proto import Term

log = logging.getLogger(__name__)

MODES = ("paper", "slalom", "split2", "split3", "enclave", "plaintext")
TIMING_PARTS = (
    "mask",
    "finish",
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

    def compute(
        self, model_id: str, names: list[str], terms: list[Term]
    ) -> tuple[list[np.ndarray], float]: ...

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


class _Timer:
    def __init__(self, stats: SecureStats, part: str) -> None:
        self.stats, self.part = stats, part

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.stats.last[self.part] += time.perf_counter() - self.t0


def _quantise(h: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float, int]:
    """Stage input (float32) → (h as contiguous numpy, x̂ int32 buffer, scale 2^e, e)."""
    hn = np.ascontiguousarray(h.detach().numpy())
    if hn.size == 0:
        return hn, np.zeros(hn.shape, np.int32), 1.0, 0
    lo, hi = torch.aminmax(h)
    e = act_exponent(max(-float(lo), float(hi)), BX)
    return hn, np.empty(hn.shape, np.int32), 2.0**e, e


class _EnclaveBackend:
    """Exact integer linear ops inside the enclave (fallback path, and reference for tests).

    |x̂|·‖Ŵ_o‖₁ ≤ 2^52 (checked at load), so one float64 GEMM gives the exact integer result that
    the delegated modes reassemble from the workers' ring replies; the dequantisation is the same
    float operation, so the logits are bit-identical.
    """

    def __init__(self, stats: SecureStats) -> None:
        self.stats = stats

    def quantised(self, h: torch.Tensor) -> tuple[np.ndarray, int]:
        hn, xq, scale, e = _quantise(h)
        kernels.quant_mask(hn.reshape(-1), scale, np.zeros(1, np.int64), 0, xq.reshape(-1), xq.reshape(-1))
        return xq, e

    def one(self, xq: np.ndarray, e: int, op: LinearOp) -> torch.Tensor:
        with _Timer(self.stats, "enclave_linear"):
            y = apply_linear(op.meta, torch.from_numpy(xq).to(torch.float64), op.w_f64)
            scale = torch.from_numpy(op.scale2 * 2.0**-e)
            return (as4d(y) * scale[None, :, None, :]).to(torch.float32).view(y.shape)

    def run(self, h: torch.Tensor, ops: list[LinearOp]) -> list[torch.Tensor]:
        xq, e = self.quantised(h)
        return [self.one(xq, e, op) for op in ops]


class _DelegatedBackend:
    """Masked delegation of each stage to the workers, Freivalds-verified, fused passes."""

    def __init__(self, ev: SecureEvaluator) -> None:
        self.ev = ev
        self.window: WindowMasks | None = None
        self.degraded = False
        self._views: list[list[np.ndarray] | None] = []

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

    def _buffer(self, k: int, shape: tuple[int, ...], outs: list[tuple[int, ...]]) -> np.ndarray:
        """Where worker k's masked input goes: its shared-memory arena when it has one."""
        views = self._views[k] if k < len(self._views) else None
        return views[0] if views else np.empty(shape, np.int64)

    def _requests(
        self,
        hn: np.ndarray,
        xq: np.ndarray,
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
                with _Timer(ev.stats, "precompute"):
                    stage = ev.make_stage(shape, names, ev.rng)
            r1, u = stage.consume()
            with _Timer(ev.stats, "mask"):
                kernels.quant_mask(flat_h, scale, r1.numpy().reshape(-1), 1, flat_q, bar.reshape(-1))
            return [[Term(0, 1, x=bar)]], u
        if mode == "split2":
            seed = ev.rng.seed()
            with _Timer(ev.stats, "mask"):
                kernels.quant_mask(flat_h, scale, prg_raw(seed, n), -1, flat_q, bar.reshape(-1))
            return [[Term(0, 1, x=bar)], [Term(0, 1, seed=seed, shape=shape)]], None
        seed_a, seed_b = ev.rng.seed(), ev.rng.seed()
        bar_b = self._buffer(1, shape, outs)
        with _Timer(ev.stats, "mask"):
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
    ) -> list[list[np.ndarray]]:
        """Send each worker its request (in parallel when there are several)."""
        ev = self.ev
        t0 = time.perf_counter()
        if len(ev.workers) == 1:
            got, worker_s = _compute(ev.workers[0], ev.model_id, names, requests[0], outs)
            replies, busy = [got], worker_s
        else:
            assert ev._executor is not None
            futs = [
                ev._executor.submit(_compute, w, ev.model_id, names, req, outs)
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
        hn, xq, scale, e = _quantise(h)
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

    def _reply(self, y: np.ndarray, expect: tuple[int, ...], k: int) -> np.ndarray:
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or tuple(y.shape) != expect:
            raise IntegrityError(f"malformed reply from worker {k}: expected int64 {expect}")
        return y.reshape(y.shape[0], y.shape[1], 1, 1) if y.ndim == 2 else y

    def _finish(
        self,
        op: LinearOp,
        ys: list[np.ndarray],
        u: Any,
        xq: np.ndarray,
        xq4: np.ndarray,
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
                with _Timer(st, "u3"):
                    c_term = ev.engine.u3(op.name, torch.from_numpy(xq)).numpy().reshape(out4)
                sc = -1
            a, b, sb = ys[0], b_term, -1
        elif mode == "split2":
            a, b, sb, c_term, sc = ys[0], ys[1], 1, dummy, 0
        else:
            a, b, sb, c_term, sc = ys[0], ys[1], 1, ys[2], -1
        out = np.empty(out4, np.float32)
        scale = np.ascontiguousarray(np.broadcast_to(op.scale2 * 2.0**-e, (out4[1], out4[3])))
        with _Timer(st, "finish"):
            bad = check.finish([a, b, c_term], (sb, sc), scale, out)
        with _Timer(st, "freivalds"):
            st.freivalds_checks += 1
            if bad:
                raise IntegrityError(f"{bad} values of {op.name} outside the proven bound")
            if not np.array_equal(check.y_side(), check.x_side(xq)):
                raise IntegrityError(f"Freivalds check failed for {op.name}")
        return torch.from_numpy(out).view(expect)

    def _blame(
        self, op: LinearOp, requests: list[list[Term]], replies: list[np.ndarray], expect: tuple[int, ...]
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


class SecureEvaluator:
    """Evaluate ST-GCN on a (N, 3, T, V, M) window batch with the chosen protection mode.

    Workers: `worker=` (one address, object or None) for `paper`/`slalom`; `workers=[…]` (one per
    party: 2 for `split2`, 3 for `split3`, or 1 for the single-worker modes). `None` starts
    in-process workers (tests); a string is the address of a `veilcam gpu-worker`
    (`host:port` or `unix:/path`); any object with the `Worker` interface is used as is.
    Options: `allow_plaintext`, `pool_window=(N, T, M)` (the shape the precompute pool of
    `slalom`/`paper` fills for; default: the first evaluated shape), `pool_capacity` (default 2
    windows, 0 = no pool), `background_pool` (default True), `freivalds_reps` (default 2:
    soundness 2⁻⁴⁴), `fallback` (default True: finish a window in the enclave if a worker
    fails), `timeout_s` for remote workers, `act_limbs` (accepted for compatibility; must be 1).
    """

    def __init__(
        self,
        model: STGCN | FoldedSTGCN,
        mode: str = "paper",
        worker: str | Worker | None = None,
        *,
        workers: Sequence[str | Worker | None] | None = None,
        allow_plaintext: bool = False,
        pool_window: WindowKey | None = None,
        pool_capacity: int = 2,
        background_pool: bool = True,
        freivalds_reps: int = freivalds.REPS,
        fallback: bool = True,
        timeout_s: float = 120.0,
        act_limbs: int = 1,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "plaintext" and not allow_plaintext:
            raise ValueError("mode 'plaintext' gives no protection; pass allow_plaintext=True to use it")
        if freivalds_reps < 1 or freivalds.soundness_bits(freivalds_reps) < 40:
            raise ValueError("freivalds_reps must give soundness ≤ 2^-40 (≥ 2 repetitions)")
        if act_limbs != 1:
            raise ValueError("act_limbs must be 1: activations are one element of F_(2^61-1)")
        self.mode = mode
        self.stats = SecureStats(mode=mode)
        self.qm = QuantModel(_as_float64_copy(model))
        self.folded32 = _float32_copy(self.qm.folded)
        self.freivalds_reps, self.fallback = freivalds_reps, fallback
        self._lock = threading.Lock()
        self.rng = MaskRNG()
        self.local = _EnclaveBackend(self.stats)
        self.workers: list[Worker] = []
        self.worker_names: list[str] = []
        self.pool: PrecomputePool | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.model_id = secrets.token_hex(8)
        self._pool_capacity, self._background_pool = pool_capacity, background_pool
        if mode in DELEGATED_MODES:
            need = WORKERS_NEEDED[mode]
            specs: list[str | Worker | None]
            if workers is not None:
                specs = list(workers)
                if worker is not None:
                    raise ValueError("pass either worker= or workers=, not both")
            else:
                specs = [worker] * need if need == 1 or worker is None else []
            if len(specs) != need:
                raise ValueError(f"mode {mode!r} needs {need} worker(s), got {len(specs)}")
            if need > 1 and len({s for s in specs if isinstance(s, str)}) < sum(
                isinstance(s, str) for s in specs
            ):
                raise ValueError(f"mode {mode!r} needs {need} *distinct* non-colluding workers")
            self.engine = MaskingEngine(self.qm, mode, self.rng)
            for k, spec in enumerate(specs):
                w = _make_worker(spec, timeout_s)
                self.workers.append(w)
                self.worker_names.append(str(getattr(w, "address", f"worker{k}")))
                w.load(self.model_id, self.engine.worker_payload(k))
            if need > 1:
                self._executor = ThreadPoolExecutor(max_workers=need, thread_name_prefix="veilcam-dispatch")
            if pool_window is not None:
                self._ensure_pool(tuple(pool_window))  # type: ignore[arg-type]
            self._delegated = _DelegatedBackend(self)
            self._warm_up()
        log.info(
            "secure evaluator ready: mode %s, %d ring ops, modulus 2^61-1, %d worker(s)",
            mode,
            len(self.qm.ops),
            len(self.workers),
        )

    def _warm_up(self) -> None:
        """One tiny window through the delegated path, so numba's kernels are compiled (or loaded
        from their on-disk cache) before the first real window is timed; stats are reset."""
        v = self.qm.folded.num_joints
        x = np.zeros((1, 3, 4, v, 1), np.float32)
        x[:, :, :, :, 0] = np.linspace(-0.5, 0.5, 3 * 4 * v, dtype=np.float32).reshape(1, 3, 4, v)
        try:
            with torch.no_grad():
                self._delegated.begin(None)
                quantised_forward(self.qm, x, self._delegated)
        except (TransportError, IntegrityError) as e:
            log.info("warm-up skipped (%s): kernels compile on the first window", e)
        finally:
            self._delegated.window = None
            mode = self.stats.mode
            self.stats = SecureStats(mode=mode)
            self.local.stats = self.stats

    @property
    def worker(self) -> Worker | None:
        """The first worker (single-worker modes)."""
        return self.workers[0] if self.workers else None

    def _ensure_pool(self, key: WindowKey) -> None:
        """(Re)key the precompute pool (`slalom`/`paper` only) to the window shape in use."""
        if self.mode not in MASKED_MODES or self._pool_capacity <= 0:
            return
        if self.pool is not None and self.pool.key == key:
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
        """Fresh r1 for one stage and u = r1·W_worker mod p per op (`slalom`/`paper`)."""
        r1 = rng.uniform(shape)
        u = {n: self.engine.precompute_u(n, r1) for n in names}
        return StageMasks(tuple(shape), tuple(names), r1, u)

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, T, V, M) float window batch → (N, num_class) float64 logits."""
        x = np.asarray(x)
        if x.ndim != 5 or x.shape[1] != 3 or x.shape[3] != self.qm.folded.num_joints:
            raise ValueError(f"expected (N, 3, T, {self.qm.folded.num_joints}, M), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("window contains non-finite values")
        rows = x.shape[0] * x.shape[4] * x.shape[2]
        if rows > kernels.MAX_T_ROWS and x.shape[0] > 1:  # Freivalds accumulators' proven range
            per = max(kernels.MAX_T_ROWS // (x.shape[4] * x.shape[2]), 1)
            return np.concatenate([self.evaluate(x[i : i + per]) for i in range(0, x.shape[0], per)])
        if rows > kernels.MAX_T_ROWS and self.mode in DELEGATED_MODES:
            raise ValueError(f"window too long: T·M = {rows} > {kernels.MAX_T_ROWS}")
        with self._lock:
            self.stats.last = defaultdict(float)
            t0 = time.perf_counter()
            sent0 = sum(w.bytes_sent for w in self.workers)
            recv0 = sum(w.bytes_received for w in self.workers)
            ctx = self.pool.busy() if self.pool is not None else _null()
            rekey: WindowKey | None = None
            with ctx, torch.no_grad():
                if self.mode == "plaintext":
                    out = self.qm.folded(torch.from_numpy(x).to(torch.float64)).numpy()
                elif self.mode == "enclave":
                    out = (
                        self.folded32(torch.from_numpy(np.ascontiguousarray(x, np.float32))).double().numpy()
                    )
                else:
                    key = (x.shape[0], x.shape[2], x.shape[4])
                    window = None
                    if self.pool is not None and self.pool.key == key:
                        window = self.pool.take(key)
                    if self.mode in MASKED_MODES:
                        if window is None:
                            self.stats.pool_misses += 1
                        else:
                            self.stats.pool_hits += 1
                    self._delegated.begin(window)
                    out = quantised_forward(self.qm, x, self._delegated)
                    self._delegated.window = None
                    rekey = key
            last = self.stats.last
            last["total"] = time.perf_counter() - t0
            if rekey is not None:
                self._ensure_pool(rekey)  # fill (in the background, while idle) for the shape in use
            accounted = sum(v for k, v in last.items() if k not in ("total", "nonlinear"))
            last["nonlinear"] = max(last["total"] - accounted, 0.0)
            for k, v in last.items():
                self.stats.timings[k] += v
            self.stats.windows += 1
            self.stats.bytes_to_worker += sum(w.bytes_sent for w in self.workers) - sent0
            self.stats.bytes_from_worker += sum(w.bytes_received for w in self.workers) - recv0
            if self.pool is not None:
                self.stats.pool_depth = self.pool.depth
            return np.asarray(out, dtype=np.float64)

    def exact_reference(self, x: np.ndarray) -> np.ndarray:
        """The delegated modes' logits computed entirely in the enclave (tests, benchmarks)."""
        with torch.no_grad():
            return quantised_forward(self.qm, np.asarray(x), self.local)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        for w in self.workers:
            w.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def __enter__(self) -> SecureEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # safe to drop without close()
        try:
            if self.pool is not None:
                self.pool.close()
            if self._executor is not None:
                self._executor.shutdown(wait=False)
        except Exception:  # noqa: S110 - interpreter shutdown: nothing left to release
            pass


def _compute(
    w: Worker, model_id: str, names: list[str], terms: list[Term], outs: list[tuple[int, ...]]
) -> tuple[list[np.ndarray], float]:
    """`w.compute`, telling workers with a shared-memory arena where the replies go."""
    if getattr(w, "reserve", None) is not None:
        return w.compute(model_id, names, terms, outs)  # type: ignore[call-arg]
    return w.compute(model_id, names, terms)


_local_worker_factory: Callable[[], Worker] | None = None


def register_local_worker(factory: Callable[[], Worker] | None) -> None:
    """Say how `worker=None` makes an in-process worker (tests, the demo, simulated enclaves).

    The worker is injected, never imported: the enclave's measured code must not import the
    untrusted worker's package. `enclave_bridge.protocol` (the host-side import path of this
    module) and the simulated enclave's host process register `gpu.worker.LocalWorker`; under
    Gramine nothing registers one, and `worker=None` in a delegated mode is refused.
    """
    global _local_worker_factory
    _local_worker_factory = factory


def _make_worker(spec: str | Worker | None, timeout_s: float) -> Worker:
    if spec is None:
        if _local_worker_factory is None:
            raise ValueError(
                "no in-process worker is registered: pass worker=ADDRESS (a `veilcam gpu-worker`), "
                "a worker object, or import enclave_bridge.protocol, which registers one"
            )
        return _local_worker_factory()
    if isinstance(spec, str):
        from enclave_bridge.measured.worker_client import WorkerClient

        return WorkerClient(spec, timeout_s=timeout_s)
    return spec


def _as_float64_copy(model: STGCN | FoldedSTGCN) -> FoldedSTGCN:
    """Folded float64 copy (the caller's model object is left as it was)."""
    if isinstance(model, STGCN):
        return fold_batchnorm(model.eval())
    return copy.deepcopy(model).double()


def _float32_copy(folded: FoldedSTGCN) -> FoldedSTGCN:
    return copy.deepcopy(folded).to(torch.float32)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def soundness_bits(reps: int = freivalds.REPS) -> float:
    return freivalds.soundness_bits(reps)


__all__ = [
    "MODES",
    "TIMING_PARTS",
    "SecureEvaluator",
    "SecureStats",
    "Worker",
    "register_local_worker",
    "soundness_bits",
]
