"""The untrusted GPU worker: exact ring GEMMs on masked operands, over a socket or in-process.

The worker only ever sees elements of F_p = Z/(2^61 − 1): its slot weights once per model load
(plain-quantised Ŵ, masked W̄, or additive shares — see `masking`) and, per stage, masked inputs
or 32-byte PRG seeds it expands itself. It returns Σ sign·x·W[slot] mod p exactly (float64 limb
GEMMs, `ring.RingWeight`) with torch on CUDA when present, else CPU. It is not trusted: every
reply is checked by the enclave (Freivalds), and `tamper` injects faults to show that.

Wire protocol (msgpack frames from `enclave_bridge.shared.wire`), one request → one reply:
- `{op: "hello"}` → `{ok, device, modulus, version}`
- `{op: "load", model_id, ops: [{name, meta: {kind, stride, v, k}, slots: [tensor int64]}]}` → `{ok}`
- `{op: "compute", model_id, names: [..], terms: [{slot, sign, input: tensor int64} |
  {slot, sign, seed: 32 bytes, shape: [..]}]}` → `{ok, outputs: [tensor int64], compute_s}`;
  `{ok: false, error, code}` on failure (`code: "unknown_model"` tells the client to re-upload
  after a worker restart).
- `{op: "unload", model_id}`, `{op: "ping"}`.
"""

from __future__ import annotations

import functools
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from enclave_bridge.shared.errors import TransportError
from enclave_bridge.shared.linear import OpMeta, apply_linear
from enclave_bridge.shared.ring import P, RingWeight, add_mod, sub_mod
from enclave_bridge.shared.wire import (
    listen,
    pack_tensor,
    raw_desc,
    recv_frame,
    recv_raw,
    send_frame,
    send_raw,
    unpack_tensor,
)
from enclave_bridge.shared.worker_proto import Term, WorkerError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 2
TAMPER_MODES = ("flip", "scale", "replace", "garbage", "stall")
MAX_MODELS = 8


def best_device(requested: str | None = None) -> torch.device:
    """`cuda` when available (or requested), else `cpu`."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TransportError("CUDA requested but not available")
    return dev


@dataclass
class _Op:
    meta: OpMeta
    slots: list[RingWeight]  # the ring weights this worker holds for the op, on its device


class WorkerCore:
    """State and arithmetic of a worker; shared by the socket server and `LocalWorker`."""

    def __init__(
        self, device: str | None = None, tamper: str | None = None, tamper_rate: float = 0.0
    ) -> None:
        if tamper is not None and tamper not in TAMPER_MODES:
            raise ValueError(f"tamper must be one of {TAMPER_MODES}")
        if not 0.0 <= tamper_rate <= 1.0:
            raise ValueError("tamper_rate must be in [0, 1]")
        self.device = best_device(device)
        self.tamper, self.tamper_rate = tamper, tamper_rate
        self._rand = random.Random()  # fault injection only, not a secret
        self.models: dict[str, dict[str, _Op]] = {}
        self.tampered = 0
        self.stalled = 0
        self._lock = threading.Lock()

    # -- requests ---------------------------------------------------------------------------
    def load(self, model_id: str, ops: list[dict[str, Any]]) -> None:
        """Keep the ring weights of one model (uploaded once per model load)."""
        if not isinstance(model_id, str) or not 0 < len(model_id) <= 128:
            raise WorkerError("bad model_id")
        table: dict[str, _Op] = {}
        for d in ops:
            try:
                meta = OpMeta.from_wire(d["meta"])
                raw = d["slots"]
                if not isinstance(raw, list) or not 0 < len(raw) <= 8:
                    raise ValueError("slots must be a non-empty list")
                slots = [w if isinstance(w, np.ndarray) else unpack_tensor(w) for w in raw]
            except (KeyError, TypeError, ValueError, TransportError) as e:
                raise WorkerError(f"bad op description: {e}") from e
            for w in slots:
                if w.dtype != np.int64 or w.ndim != 2 or bool((w < 0).any()) or bool((w >= P).any()):
                    raise WorkerError("weights must be (D, C_out) int64 ring elements")
            ring = [RingWeight(torch.from_numpy(np.array(w)), self.device) for w in slots]
            table[str(d["name"])] = _Op(meta, ring)
        with self._lock:
            if model_id not in self.models and len(self.models) >= MAX_MODELS:
                self.models.pop(next(iter(self.models)))
            self.models[model_id] = table
        log.info("loaded model %s: %d ops on %s", model_id, len(table), self.device)

    def compute(self, model_id: str, names: list[str], terms: list[Term]) -> list[npt.NDArray[np.int64]]:
        """Σ_terms sign·x·W[slot] mod p for each named op (x: ring elements or PRG(seed))."""
        table = self.models.get(model_id)
        if table is None:
            raise WorkerError(f"unknown model {model_id!r}", code="unknown_model")
        if not terms or len(terms) > 4:
            raise WorkerError("a request has 1 to 4 terms")
        inputs = []
        for term in terms:
            x = term.tensor()
            if x.dtype != np.int64 or bool((x < 0).any()) or bool((x >= P).any()):
                raise WorkerError("inputs must be int64 ring elements")
            inputs.append(torch.from_numpy(np.array(x)).to(self.device))
        if len({tuple(x.shape) for x in inputs}) != 1:
            raise WorkerError("terms of one request must have one shape")
        outs = []
        for name in names:
            op = table.get(name)
            if op is None:
                raise WorkerError(f"unknown op {name!r}")
            acc: torch.Tensor | None = None
            for term, xt in zip(terms, inputs, strict=True):
                if term.slot >= len(op.slots):
                    raise WorkerError(f"op {name} has no slot {term.slot}")
                try:
                    part = op.slots[term.slot].apply(functools.partial(apply_linear, op.meta), xt)
                except (RuntimeError, ValueError) as e:
                    raise WorkerError(f"op {name}: input shape {tuple(xt.shape)} does not fit") from e
                if acc is None:
                    acc = part if term.sign > 0 else sub_mod(torch.zeros_like(part), part)
                else:
                    acc = add_mod(acc, part) if term.sign > 0 else sub_mod(acc, part)
            assert acc is not None
            outs.append(self._maybe_tamper(acc.cpu().numpy()))
        return outs

    def _maybe_tamper(self, y: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        if self.tamper is None or self._rand.random() >= self.tamper_rate or y.size == 0:
            return y
        if self.tamper == "stall":
            self.stalled += 1
            time.sleep(3600)
        y = y.copy()
        flat = y.reshape(-1)
        i = self._rand.randrange(flat.size)
        if self.tamper == "flip":
            flat[i] = (int(flat[i]) ^ (1 << self._rand.randrange(61))) % P
        elif self.tamper == "scale":
            k = self._rand.randrange(2, 1 << 20)
            flat[:] = np.asarray([(int(v) * k) % P for v in flat[:4096]] + list(flat[4096:]), dtype=np.int64)
        elif self.tamper == "garbage":
            flat[:] = np.frombuffer(random.randbytes(8 * flat.size), dtype=np.int64) & np.int64(P - 1)
        else:
            flat[i] = (int(flat[i]) + self._rand.randrange(1, P)) % P
        self.tampered += 1
        return y

    def handle(
        self, msg: Any, arena: Any = None, raw: list[npt.NDArray[Any]] | None = None
    ) -> dict[str, Any]:
        """Dispatch one decoded request to a reply dict (never raises for bad requests).

        `arena`: the connection's shared-memory arena (`shm.Arena`), when the client attached one;
        `raw`: the raw tensor segments that followed the request frame. A `raw_reply` request gets
        its outputs as raw segments: the reply's `_raw` entry holds the arrays to send after it.
        """
        if not isinstance(msg, dict):
            return {"ok": False, "error": "request must be a map", "code": "bad_request"}
        op = msg.get("op")
        try:
            if op == "hello":
                return {
                    "ok": True,
                    "device": str(self.device),
                    "modulus": P,
                    "version": PROTOCOL_VERSION,
                    "raw": True,  # raw tensor segments after frames (TCP clients, no msgpack copies)
                }
            if op == "ping":
                return {"ok": True}
            if op == "load":
                self.load(msg.get("model_id"), msg.get("ops") or [])  # type: ignore[arg-type]
                return {"ok": True}
            if op == "unload":
                with self._lock:
                    self.models.pop(str(msg.get("model_id")), None)
                return {"ok": True}
            if op == "compute":
                names = msg.get("names")
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise WorkerError("names must be a list of strings")
                raw_terms = msg.get("terms")
                if not isinstance(raw_terms, list):
                    raise WorkerError("terms must be a list")
                terms = [Term.from_wire(t, arena, raw) for t in raw_terms]
                out_at = msg.get("out")
                if out_at is not None and (
                    arena is None
                    or not isinstance(out_at, list)
                    or len(out_at) != len(names)
                    or not all(isinstance(o, int) for o in out_at)
                ):
                    raise WorkerError("bad output offsets (attach shared memory first)")
                t0 = time.perf_counter()
                outs = self.compute(str(msg.get("model_id")), names, terms)
                dt = time.perf_counter() - t0
                if out_at is None and msg.get("raw_reply") is True:
                    return {
                        "ok": True,
                        "outputs": [{"raw": i} for i in range(len(outs))],
                        "raw": [raw_desc(o) for o in outs],
                        "compute_s": dt,
                        "_raw": outs,
                    }
                if out_at is None:
                    return {"ok": True, "outputs": [pack_tensor(o) for o in outs], "compute_s": dt}
                placed = []
                for off, o in zip(out_at, outs, strict=True):
                    try:
                        arena.view(off, o.shape, np.int64)[...] = o
                    except TransportError as e:
                        raise WorkerError(str(e)) from e
                    placed.append({"shm": off, "shape": list(o.shape)})
                return {"ok": True, "outputs": placed, "compute_s": dt}
            raise WorkerError(f"unknown op {op!r}")
        except WorkerError as e:
            return {"ok": False, "error": str(e), "code": e.code}
        except TransportError as e:
            return {"ok": False, "error": str(e), "code": "bad_request"}


class LocalWorker:
    """In-process worker with the client's interface (tests, `worker=None`)."""

    _count = 0  # distinct names in stats.worker_faults

    def __init__(
        self, device: str | None = None, tamper: str | None = None, tamper_rate: float = 0.0
    ) -> None:
        self.core = WorkerCore(device, tamper, tamper_rate)
        self.bytes_sent = self.bytes_received = 0
        LocalWorker._count += 1
        self.address = f"in-process:{self.core.device}#{LocalWorker._count}"

    def load(self, model_id: str, ops: list[dict[str, Any]]) -> None:
        self.bytes_sent += sum(int(w.nbytes) for o in ops for w in o["slots"])
        self.core.load(model_id, ops)

    def compute(
        self, model_id: str, names: list[str], terms: list[Term]
    ) -> tuple[list[npt.NDArray[np.int64]], float]:
        t0 = time.perf_counter()
        self.bytes_sent += sum(t.x.nbytes if t.x is not None else 40 for t in terms)
        try:
            outs = self.core.compute(model_id, names, terms)
        except WorkerError as e:
            raise TransportError(f"worker refused: {e}") from e
        self.bytes_received += sum(o.nbytes for o in outs)
        return outs, time.perf_counter() - t0

    def close(self) -> None:
        self.core.models.clear()


def _serve_conn(core: WorkerCore, conn: socket.socket, peer: str) -> None:
    from enclave_bridge.shared.shm import Arena

    conn.settimeout(None)
    arena: Arena | None = None  # shared memory the client attached (same-host clients)
    with conn:
        while True:
            try:
                msg = recv_frame(conn)
            except TransportError as e:
                log.info("connection %s closed: %s", peer, e)
                if arena is not None:
                    arena.close()
                return
            if isinstance(msg, dict) and msg.get("op") == "attach":
                if arena is not None:
                    arena.close()
                    arena = None
                try:
                    arena = Arena(int(msg.get("size", 0)), str(msg.get("name")))
                    reply: dict[str, Any] = {"ok": True}
                except (TransportError, TypeError, ValueError) as e:
                    reply = {"ok": False, "error": f"attach failed: {e}", "code": "bad_request"}
            else:
                raw = None
                if isinstance(msg, dict) and "raw" in msg:
                    try:  # the segments follow the frame: a bad one desynchronises the stream
                        raw = recv_raw(conn, msg["raw"])
                    except TransportError as e:
                        log.info("connection %s closed: %s", peer, e)
                        if arena is not None:
                            arena.close()
                        return
                reply = core.handle(msg, arena, raw)
            out_raw = reply.pop("_raw", None)
            try:
                send_frame(conn, reply)
                if out_raw is not None:
                    send_raw(conn, out_raw)
            except TransportError as e:
                log.info("connection %s lost while replying: %s", peer, e)
                return


def serve(
    addr: str,
    core: WorkerCore,
    ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    *,
    max_connections: int = 16,
    idle_timeout_s: float | None = 600.0,
) -> None:
    """Accept connections on `addr` until `stop`, one thread per connection, at most
    `max_connections` at once; a connection idle for `idle_timeout_s` is closed (the enclave's
    worker client reconnects on its next request), and EMFILE at accept backs off instead of
    ending the worker (`wire.ConnectionLimiter`). A Unix socket file is removed on exit."""
    from enclave_bridge.shared.wire import ConnectionLimiter, unlink_socket

    sock = listen(addr)
    bound = sock.getsockname()
    shown = f"{bound[0]}:{bound[1]}" if isinstance(bound, tuple) else f"unix:{bound}"
    log.info(
        "gpu worker listening on %s (device %s, tamper %s@%s)",
        shown,
        core.device,
        core.tamper,
        core.tamper_rate,
    )
    if ready is not None:
        ready(shown)
    limiter = ConnectionLimiter("gpu worker", max_connections, idle_timeout_s, log)
    try:
        limiter.serve(sock, lambda conn, peer: _serve_conn(core, conn, peer), stop or threading.Event())
    finally:
        unlink_socket(sock)
        sock.close()


__all__ = [
    "PROTOCOL_VERSION",
    "TAMPER_MODES",
    "LocalWorker",
    "WorkerCore",
    "WorkerError",
    "best_device",
    "serve",
]
