"""Precompute pool: input masks r1 and their products u = r1·W_worker, made off-line.

One `WindowMasks` holds, for every ring stage of a window shape (N, T, M), a fresh r1 and the u of
each op of that stage. Each stage is handed out exactly once (`StageMasks.consume` refuses a second
call) and whole windows leave the pool by `popleft` — a mask can never be used twice. The pool is
bounded (`capacity` windows), filled by a background thread only while the evaluator is idle, and
exports its depth, hits and misses. Persisting is only ever sealed (AES-256-GCM) and *moves* the
entries out of memory; `restore` deletes the file before returning, so a crash cannot resurrect
used masks from it (a host that copies the file can still roll it back — documented limitation of
sealing without a monotonic counter).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_bridge.shared.errors import EnclaveError, IntegrityError
from enclave_bridge.shared.ring import MaskRNG

log = logging.getLogger(__name__)

WindowKey = tuple[int, int, int]  # (N, T, M)


class MaskReuseError(EnclaveError):
    """A mask was requested a second time — a bug that would break the masking's secrecy."""


@dataclass
class StageMasks:
    """r1 (input-shaped, uniform in F_p) and u per op name for one ring stage."""

    shape: tuple[int, ...]
    names: tuple[str, ...]
    r1: torch.Tensor | None
    u: dict[str, torch.Tensor] | None
    consumed: bool = False

    def consume(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hand out the masks once; afterwards the stage holds nothing."""
        if self.consumed or self.r1 is None or self.u is None:
            raise MaskReuseError(f"masks for stage {self.names} already used")
        r1, u = self.r1, self.u
        self.r1 = self.u = None
        self.consumed = True
        return r1, u


@dataclass
class WindowMasks:
    """All stage masks of one window, handed out in forward order."""

    key: WindowKey
    stages: deque[StageMasks] = field(default_factory=deque)

    def next_stage(self, shape: tuple[int, ...], names: tuple[str, ...]) -> StageMasks:
        if not self.stages:
            raise MaskReuseError("window masks exhausted")
        st = self.stages.popleft()
        if st.shape != tuple(shape) or st.names != tuple(names):
            raise EnclaveError(f"mask plan mismatch: have {st.names} {st.shape}, need {names} {shape}")
        return st


StageFactory = Callable[[tuple[int, ...], tuple[str, ...], MaskRNG], StageMasks]
PlanFn = Callable[[WindowKey], list[tuple[tuple[int, ...], tuple[str, ...]]]]


@dataclass
class PoolStats:
    depth: int = 0
    capacity: int = 0
    hits: int = 0
    misses: int = 0
    generated: int = 0
    fill_seconds: float = 0.0


class PrecomputePool:
    """Bounded pool of `WindowMasks` for one window shape, filled in the background when idle."""

    def __init__(
        self,
        plan: PlanFn,
        make_stage: StageFactory,
        key: WindowKey,
        capacity: int = 2,
        background: bool = True,
    ) -> None:
        if capacity < 0:
            raise ValueError("capacity must be ≥ 0")
        self._plan, self._make_stage, self.key = plan, make_stage, key
        self.capacity = capacity
        self._entries: deque[WindowMasks] = deque()
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.stats = PoolStats(capacity=capacity)
        self._rng = MaskRNG()  # the filler's own CSPRNG (MaskRNG is not thread-safe)
        self._thread: threading.Thread | None = None
        if background and capacity > 0:
            self._thread = threading.Thread(target=self._fill_loop, name="mask-pool", daemon=True)
            self._thread.start()

    @property
    def depth(self) -> int:
        with self._lock:
            return len(self._entries)

    def generate(self, key: WindowKey, rng: MaskRNG, wait_idle: bool = False) -> WindowMasks | None:
        """Make a full `WindowMasks` (None if stopped meanwhile)."""
        wm = WindowMasks(key)
        for shape, names in self._plan(key):
            if wait_idle:
                while not self._idle.wait(0.2):
                    if self._stop.is_set():
                        return None
            if self._stop.is_set():
                return None
            wm.stages.append(self._make_stage(shape, names, rng))
        return wm

    def fill(self, count: int | None = None) -> int:
        """Synchronously add up to `count` entries (default: until full). Returns how many."""
        import time

        added = 0
        while self.depth < self.capacity and (count is None or added < count):
            t0 = time.perf_counter()
            wm = self.generate(self.key, self._rng)
            if wm is None:
                break
            self._put(wm, time.perf_counter() - t0)
            added += 1
        return added

    def _put(self, wm: WindowMasks, seconds: float) -> None:
        with self._lock:
            self._entries.append(wm)
            self.stats.generated += 1
            self.stats.fill_seconds += seconds
            self.stats.depth = len(self._entries)

    def _fill_loop(self) -> None:
        import time

        while not self._stop.is_set():
            if self.depth >= self.capacity:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            t0 = time.perf_counter()
            try:
                wm = self.generate(self.key, self._rng, wait_idle=True)
            except Exception:  # keep the evaluator alive; misses are computed on-line
                log.exception("mask pool filler failed; pausing it")
                self._stop.wait(5.0)
                continue
            if wm is not None:
                self._put(wm, time.perf_counter() - t0)

    def take(self, key: WindowKey) -> WindowMasks | None:
        """Pop one window's masks (None = miss: the caller makes them on-line)."""
        with self._lock:
            if key == self.key and self._entries:
                wm = self._entries.popleft()
                self.stats.hits += 1
                self.stats.depth = len(self._entries)
                self._wake.set()
                return wm
            self.stats.misses += 1
            return None

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Pause background filling while the evaluator runs (it fills only when idle)."""
        self._idle.clear()
        try:
            yield
        finally:
            self._idle.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- sealed persistence ------------------------------------------------------------------
    def persist(self, path: str | Path, seal_key: bytes) -> int:
        """Seal every pooled entry to `path` (AES-256-GCM) and drop them from memory."""
        with self._lock:
            entries = list(self._entries)
            self._entries.clear()
            self.stats.depth = 0
        doc = [
            {
                "key": list(wm.key),
                "stages": [
                    {
                        "shape": list(st.shape),
                        "names": list(st.names),
                        "r1": _enc(st.r1),
                        "u": {k: _enc(v) for k, v in (st.u or {}).items()},
                    }
                    for st in wm.stages
                ],
            }
            for wm in entries
        ]
        nonce = os.urandom(12)
        blob = nonce + AESGCM(seal_key).encrypt(
            nonce, msgpack.packb(doc, use_bin_type=True), b"veilcam-pool-v1"
        )
        tmp = Path(str(path) + ".tmp")
        tmp.write_bytes(blob)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return len(entries)

    def restore(self, path: str | Path, seal_key: bytes) -> int:
        """Load sealed entries and delete the file first, so they can be used only once."""
        p = Path(path)
        blob = p.read_bytes()
        p.unlink()
        try:
            plain = AESGCM(seal_key).decrypt(blob[:12], blob[12:], b"veilcam-pool-v1")
        except Exception as e:
            raise IntegrityError("sealed mask pool failed authentication") from e
        doc = msgpack.unpackb(plain, raw=False)
        n = 0
        for d in doc:
            wm = WindowMasks(tuple(d["key"]))
            for s in d["stages"]:
                wm.stages.append(
                    StageMasks(
                        tuple(s["shape"]),
                        tuple(s["names"]),
                        _dec(s["r1"]),
                        {k: _dec(v) for k, v in s["u"].items()},
                    )
                )
            with self._lock:
                if len(self._entries) < self.capacity:
                    self._entries.append(wm)
                    n += 1
                self.stats.depth = len(self._entries)
        return n


def _enc(t: torch.Tensor | None) -> dict[str, object]:
    if t is None:
        raise MaskReuseError("cannot persist consumed masks")
    a = t.numpy().astype(np.uint32)
    return {"shape": list(a.shape), "data": a.tobytes()}


def _dec(d: dict[str, Any]) -> torch.Tensor:
    """Inverse of `_enc` for an authenticated (AES-GCM) pool file: `{shape: [int], data: bytes}`."""
    shape = tuple(d["shape"])
    a = np.frombuffer(d["data"], dtype=np.uint32).astype(np.int64)
    return torch.from_numpy(a.reshape(shape))


__all__ = ["MaskReuseError", "PoolStats", "PrecomputePool", "StageMasks", "WindowKey", "WindowMasks"]
