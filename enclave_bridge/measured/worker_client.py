"""Enclave-side client of a `veilcam gpu-worker` process.

Reconnects lazily: after a transport failure the current request raises `TransportError` (the
evaluator then finishes that window on the enclave path); the next request reconnects and, if
the worker restarted and lost its state, re-uploads the model weights it was given.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import TransportError
from enclave_bridge.shared.ring import P
from enclave_bridge.shared.shm import Arena, aligned
from enclave_bridge.shared.wire import (
    connect,
    pack_tensor,
    raw_desc,
    recv_frame,
    recv_raw,
    send_frame,
    send_raw,
    unpack_tensor,
)
from enclave_bridge.shared.worker_proto import Term

log = logging.getLogger(__name__)


class WorkerClient:
    """Talks to one worker at `addr` (`host:port` or `unix:/path`).

    Same-host workers (Unix sockets) get a shared-memory arena (`shm`): the evaluator masks
    straight into `reserve()`d input views and reads replies in place; only control frames cross
    the socket. `shared_memory=False` (or a TCP address) sends tensors inline in the frames.
    """

    def __init__(self, addr: str, timeout_s: float = 120.0, shared_memory: bool | None = None) -> None:
        self.address = addr
        self.timeout_s = timeout_s
        self.shared_memory = addr.startswith("unix:") if shared_memory is None else shared_memory
        self._arena: Arena | None = None
        self._layout: tuple[list[int], int] | None = None  # input offsets, first output offset
        self._sock: socket.socket | None = None
        self._models: dict[str, list[dict[str, Any]]] = {}
        self.bytes_sent = self.bytes_received = 0
        self.reconnects = 0
        self.device: str | None = None
        self.raw_frames = False  # the worker takes raw tensor segments (no msgpack payload copies)
        self.raw_calls = 0

    # -- connection --------------------------------------------------------------------------
    def _connection(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = connect(self.address, self.timeout_s)
        self._sock = sock
        try:
            hello = self._call_raw({"op": "hello"})
            if hello.get("modulus") != P:
                raise TransportError(f"worker uses modulus {hello.get('modulus')}, expected {P}")
            self.device = str(hello.get("device"))
            self.raw_frames = hello.get("raw") is True
            if self._arena is not None:
                self._attach()
            for model_id, ops in self._models.items():
                self._load_raw(model_id, ops)
        except TransportError:
            self._drop()
            raise
        self.reconnects += 1
        log.info("connected to gpu worker %s (device %s)", self.address, self.device)
        return sock

    def _attach(self) -> None:
        assert self._arena is not None
        reply = self._call_raw({"op": "attach", "name": self._arena.name, "size": self._arena.size})
        if not reply.get("ok"):
            log.warning(
                "worker %s cannot map shared memory (%s); sending tensors inline",
                self.address,
                reply.get("error"),
            )
            self._arena.close()
            self._arena = None
            self.shared_memory = False

    def reserve(
        self, in_shapes: list[tuple[int, ...]], out_shapes: list[tuple[int, ...]]
    ) -> list[npt.NDArray[np.int64]] | None:
        """Input views in the arena for the next `compute` (None: no shared memory, use arrays)."""
        if not self.shared_memory:
            return None
        offs, pos = [], 0
        for shp in in_shapes:
            offs.append(pos)
            pos += aligned(8 * int(np.prod(shp)))
        need = pos + sum(aligned(8 * int(np.prod(s))) for s in out_shapes)
        if self._arena is None or self._arena.size < need:
            if self._arena is not None:
                self._arena.close()
            self._arena = Arena(max(need + need // 4, 16 << 20))
            if self._sock is not None:
                self._attach()
            else:
                self._connection()
            if self._arena is None:
                return None
        self._layout = (offs, pos)
        return [self._arena.view(o, s) for o, s in zip(offs, in_shapes, strict=True)]

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None

    def _call_raw(self, msg: dict[str, Any]) -> dict[str, Any]:
        sock = self._sock
        if sock is None:
            raise TransportError("not connected")
        try:
            self.bytes_sent += send_frame(sock, msg)
            reply = recv_frame(sock)
        except TransportError:
            self._drop()
            raise
        if not isinstance(reply, dict):
            self._drop()
            raise TransportError("worker sent a malformed reply")
        self.bytes_received += _reply_bytes(reply)
        return reply

    def _call_segments(
        self, msg: dict[str, Any], arrays: list[npt.NDArray[np.int64]]
    ) -> tuple[dict[str, Any], list[npt.NDArray[Any]]]:
        """`msg` followed by raw segments; the reply's raw segments land in fresh arrays."""
        sock = self._sock
        if sock is None:
            raise TransportError("not connected")
        try:
            self.bytes_sent += send_frame(sock, {**msg, "raw": [raw_desc(a) for a in arrays]})
            self.bytes_sent += send_raw(sock, arrays)
            reply = recv_frame(sock)
            if not isinstance(reply, dict):
                raise TransportError("worker sent a malformed reply")
            outs = recv_raw(sock, reply["raw"]) if "raw" in reply else []
        except TransportError:
            self._drop()
            raise
        self.raw_calls += 1
        self.bytes_received += _reply_bytes(reply) + sum(a.nbytes for a in outs)
        return reply, outs

    def _load_raw(self, model_id: str, ops: list[dict[str, Any]]) -> None:
        wire_ops = [
            {"name": o["name"], "meta": o["meta"], "slots": [pack_tensor(w) for w in o["slots"]]} for o in ops
        ]
        reply = self._call_raw({"op": "load", "model_id": model_id, "ops": wire_ops})
        if not reply.get("ok"):
            raise TransportError(f"worker refused the model: {reply.get('error')}")

    # -- API (same as LocalWorker) -----------------------------------------------------------
    def load(self, model_id: str, ops: list[dict[str, Any]]) -> None:
        """Upload ring weights once; remembered for re-upload after a worker restart."""
        self._models[model_id] = ops
        if self._sock is not None:
            try:
                self._load_raw(model_id, ops)
            except TransportError:
                log.warning("model upload to %s failed; will retry on the next request", self.address)
        else:
            try:
                self._connection()
            except TransportError as e:
                log.warning("gpu worker %s not reachable yet: %s", self.address, e)

    def compute(
        self,
        model_id: str,
        names: list[str],
        terms: list[Term],
        out_shapes: list[tuple[int, ...]] | None = None,
    ) -> tuple[list[npt.NDArray[np.int64]], float]:
        """Masked ring elements (or seeds) in, ring results out (+ the worker's compute seconds)."""
        self._connection()
        msg: dict[str, Any] = {"op": "compute", "model_id": model_id, "names": names}
        arena, layout = self._arena, self._layout
        self._layout = None
        wire_terms = []
        segments: list[npt.NDArray[np.int64]] = []
        for t in terms:
            if arena is not None and t.x is not None and (off := _offset_in(arena, t.x)) is not None:
                wire_terms.append({"slot": t.slot, "sign": t.sign, "shm": off, "shape": list(t.x.shape)})
            elif arena is None and self.raw_frames and t.x is not None:
                wire_terms.append({"slot": t.slot, "sign": t.sign, "raw": len(segments)})
                segments.append(t.x)
            else:
                wire_terms.append(t.to_wire())
        msg["terms"] = wire_terms
        raw_outs: list[npt.NDArray[Any]] = []
        use_raw = arena is None and self.raw_frames
        out_offs: list[int] | None = None
        if arena is not None and layout is not None and out_shapes is not None:
            out_offs, pos = [], layout[1]
            for shp in out_shapes:
                out_offs.append(pos)
                pos += aligned(8 * int(np.prod(shp)))
            msg["out"] = out_offs
        if use_raw:
            msg["raw_reply"] = True

        def call() -> dict[str, Any]:
            nonlocal raw_outs
            if not use_raw:
                return self._call_raw(msg)
            reply, raw_outs = self._call_segments(msg, segments)
            return reply

        try:
            reply = call()
        except TransportError as e:
            # A connection the worker closed while idle (its idle timeout) fails at once: compute is
            # stateless, so reconnect (re-attaching the arena) and send it again, once. A timeout
            # is not retried: a hung worker must cost one timeout_s, not two.
            if "timed out" in str(e):
                raise
            log.info("gpu worker %s connection lost (%s): reconnecting once", self.address, e)
            self._connection()
            reply = call()
        if not reply.get("ok") and reply.get("code") == "unknown_model" and model_id in self._models:
            self._load_raw(model_id, self._models[model_id])
            reply = call()
        if not reply.get("ok"):
            raise TransportError(f"worker error: {reply.get('error')}")
        outs = reply.get("outputs")
        if not isinstance(outs, list) or len(outs) != len(names):
            raise TransportError("worker reply has the wrong number of outputs")
        compute_s = reply.get("compute_s", 0.0)
        if out_offs is not None:
            assert arena is not None and out_shapes is not None
            arrays = []
            for o, off, shp in zip(outs, out_offs, out_shapes, strict=True):
                if not isinstance(o, dict) or o.get("shm") != off or o.get("shape") != list(shp):
                    raise TransportError("worker placed a reply outside the agreed arena region")
                arrays.append(arena.view(off, tuple(shp)))
            self.bytes_sent += sum(t.x.nbytes for t in terms if t.x is not None)  # via the arena
            self.bytes_received += sum(a.nbytes for a in arrays)
            return arrays, float(compute_s) if isinstance(compute_s, float) else 0.0
        if use_raw:
            if not all(isinstance(o, dict) and o.get("raw") == i for i, o in enumerate(outs)) or len(
                raw_outs
            ) != len(outs):
                raise TransportError("worker reply does not match its raw segments")
            arrays = raw_outs
        else:
            arrays = [unpack_tensor(o) for o in outs]
        if any(a.dtype != np.int64 for a in arrays):
            raise TransportError("worker reply is not int64 ring elements")
        return arrays, float(compute_s) if isinstance(compute_s, float) else 0.0

    def unload(self, model_id: str) -> None:
        self._models.pop(model_id, None)
        if self._sock is not None:
            with contextlib.suppress(TransportError):
                self._call_raw({"op": "unload", "model_id": model_id})

    def close(self) -> None:
        self._drop()
        if self._arena is not None:
            self._arena.close()
            self._arena = None


def _offset_in(arena: Arena, x: npt.NDArray[np.int64]) -> int | None:
    """Offset of `x` inside the arena if it is a contiguous view into it, else None."""
    buf = arena._shm.buf
    if buf is None:  # a closed arena holds nothing
        return None
    base = np.frombuffer(buf, dtype=np.uint8)
    ptr = x.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    if x.flags.c_contiguous and ptr >= 0 and ptr + x.nbytes <= arena.size and ptr % 8 == 0:
        return int(ptr)
    return None


def _reply_bytes(reply: dict[str, Any]) -> int:
    """Approximate frame size of a reply (exact tensor bytes + a small header allowance)."""
    outs = reply.get("outputs")
    if not isinstance(outs, list):
        return 64
    return sum(len(o["data"]) for o in outs if isinstance(o, dict) and isinstance(o.get("data"), bytes)) + 64


def wait_for_worker(addr: str, timeout_s: float = 30.0) -> None:
    """Block until a worker answers `hello` on `addr` (process start-up in tests/benchmarks)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            sock = connect(addr, 5.0)
            with sock:
                send_frame(sock, {"op": "hello"})
                if recv_frame(sock).get("ok"):
                    return
        except (TransportError, AttributeError) as e:
            last = e
        time.sleep(0.1)
    raise TransportError(f"gpu worker at {addr} did not come up: {last}")


__all__ = ["WorkerClient", "wait_for_worker"]
