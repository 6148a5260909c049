"""`SecureEvaluator`: ST-GCN inference with the linear layers delegated, masked, to GPU workers.

Modes (docs/ARCHITECTURE.md §5, README "Secure evaluation", docs/SPLIT_TRUST.md):
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

import numpy as np
import numpy.typing as npt
import torch

from enclave_bridge.measured import freivalds, kernels
from enclave_bridge.measured.backends import (
    DelegatedBackend,
    ExactBackend,
    SecureStats,
    Worker,
)
from enclave_bridge.measured.masking import DELEGATED_MODES, MASKED_MODES, WORKERS_NEEDED, MaskingEngine
from enclave_bridge.measured.pool import PrecomputePool, StageMasks, WindowKey
from enclave_bridge.measured.secure_layers import (
    QuantModel,
    quantised_forward,
)
from enclave_bridge.measured.stgcn.fold import FoldedSTGCN, fold_batchnorm
from enclave_bridge.measured.stgcn.model import STGCN
from enclave_bridge.shared.errors import IntegrityError, TransportError
from enclave_bridge.shared.ring import MaskRNG

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
        self.local = ExactBackend(self.stats)
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
            self._delegated = DelegatedBackend(self)
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

    def evaluate(self, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
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

    def exact_reference(self, x: npt.ArrayLike) -> npt.NDArray[np.float64]:
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
