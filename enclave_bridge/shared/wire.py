"""Socket framing shared by the enclave and GPU-worker protocols (docs/ARCHITECTURE.md §2).

A frame is a 4-byte big-endian length followed by one msgpack map. Tensors travel as
`{"dtype": str, "shape": [..], "data": bytes}`. Frames above `max_bytes` are refused before any
allocation, so a hostile peer cannot make us buffer unbounded memory.

Why one module of ~440 lines: framing, raw tensor segments, addresses, listening sockets and
connection limits are the one transport both sides of every trust boundary share; each piece
checks limits the others rely on, so they are reviewed (and measured) together.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import TransportError

DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")
_ALLOWED_DTYPES = frozenset(
    {"int8", "uint8", "int16", "int32", "int64", "uint32", "uint64", "float32", "float64"}
)


def pack_tensor(arr: npt.NDArray[Any]) -> dict[str, Any]:
    """Encode an array as raw C-order bytes + dtype + shape (no pickle, ever)."""
    if arr.dtype.name not in _ALLOWED_DTYPES:
        raise TransportError(f"dtype {arr.dtype.name} not allowed on the wire")
    data = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data  # a memoryview: msgpack copies it once
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": data}


def unpack_tensor(obj: Any) -> npt.NDArray[Any]:
    """Decode `pack_tensor` output, validating dtype, shape and byte count."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise TransportError("malformed tensor: expected {dtype, shape, data}")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in _ALLOWED_DTYPES:
        raise TransportError(f"malformed tensor: dtype {dtype!r} not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(s, int) and 0 <= s < 2**31 for s in shape)
    ):
        raise TransportError("malformed tensor: bad shape")
    # memoryview: an in-process round trip of `pack_tensor` (msgpack itself always yields bytes)
    if not isinstance(data, bytes | memoryview):
        raise TransportError("malformed tensor: data is not bytes")
    dt = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if n * dt.itemsize != (data.nbytes if isinstance(data, memoryview) else len(data)):
        raise TransportError(f"malformed tensor: {len(data)} bytes for shape {shape} {dtype}")
    return np.frombuffer(data, dtype=dt).reshape(tuple(shape))


def encode_frame(obj: Any) -> bytes:
    """msgpack-encode `obj` and prefix its length."""
    body = msgpack.packb(obj, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Any:
    """Decode one frame body; any msgpack error becomes a TransportError."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=len(body))
    except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as e:
        raise TransportError(f"malformed msgpack frame: {type(e).__name__}") from e


_RECV_CHUNK = 1 << 20


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    # Memory grows with the bytes actually received: `bytearray(n)` would zero (and so commit)
    # the size a peer merely *announces*, letting a few connections exhaust the service's memory.
    # Chunks are joined once at the end (one copy, not a growing buffer re-copied as it grows).
    chunks: list[bytes] = []
    got = 0
    while got < n:
        try:
            chunk = sock.recv(min(n - got, _RECV_CHUNK))
        except TimeoutError as e:
            raise TransportError("peer timed out") from e
        except OSError as e:
            raise TransportError(f"socket error: {e.strerror or e}") from e
        if not chunk:
            raise TransportError("peer closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def send_frame(sock: socket.socket, obj: Any) -> int:
    """Send one frame; returns the number of bytes written (for boundary-traffic metrics)."""
    body = msgpack.packb(obj, use_bin_type=True)
    try:
        sock.sendall(_HEADER.pack(len(body)))  # header apart: no copy of a large body
        sock.sendall(body)
    except OSError as e:
        raise TransportError(f"send failed: {e.strerror or e}") from e
    return _HEADER.size + len(body)


def recv_frame(sock: socket.socket, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Any:
    """Receive one frame, refusing frames larger than `max_bytes` before reading their body."""
    (length,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if length > max_bytes:
        raise TransportError(f"frame of {length} bytes exceeds limit {max_bytes}")
    return decode_body(_recv_exact(sock, length))


# -- raw tensor segments ------------------------------------------------------------------------
# A frame may be followed by raw tensor segments: its map carries `raw: [{dtype, shape}, ...]` and
# the segments follow in that order, each an 8-byte length and the C-order bytes. The sender
# writes straight from the array's buffer and the receiver reads straight into a preallocated
# array (`recv_into`): no msgpack copy of a payload on either side. Every length is checked
# against the announced dtype/shape, and the total against the frame limit, before a byte is read.
_RAW = struct.Struct(">Q")
MAX_RAW_TENSORS = 16


def raw_desc(arr: npt.NDArray[Any]) -> dict[str, Any]:
    """The `{dtype, shape}` entry of one raw segment."""
    if arr.dtype.name not in _ALLOWED_DTYPES:
        raise TransportError(f"dtype {arr.dtype.name} not allowed on the wire")
    return {"dtype": arr.dtype.name, "shape": list(arr.shape)}


def send_raw(sock: socket.socket, arrays: list[npt.NDArray[Any]]) -> int:
    """Send the raw segments announced by the frame just sent; returns bytes written."""
    n = 0
    try:
        for a in arrays:
            mv = np.ascontiguousarray(a).data.cast("B")  # ndarray.data: the array's memoryview
            sock.sendall(_RAW.pack(mv.nbytes))
            sock.sendall(mv)
            n += _RAW.size + mv.nbytes
    except OSError as e:
        raise TransportError(f"send failed: {e.strerror or e}") from e
    return n


def _raw_buffers(descs: Any, max_bytes: int) -> list[npt.NDArray[Any]]:
    if not isinstance(descs, list) or len(descs) > MAX_RAW_TENSORS:
        raise TransportError("malformed raw segment list")
    out, total = [], 0
    for d in descs:
        if not isinstance(d, dict) or set(d) != {"dtype", "shape"} or d["dtype"] not in _ALLOWED_DTYPES:
            raise TransportError("malformed raw segment descriptor")
        shape = d["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(isinstance(x, int) and 0 <= x < 2**31 for x in shape)
        ):
            raise TransportError("malformed raw segment: bad shape")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(d["dtype"]).itemsize
        total += nbytes
        if total > max_bytes:
            raise TransportError(f"raw segments of {total} bytes exceed limit {max_bytes}")
        # np.empty commits no memory until the bytes arrive (unlike a zeroed buffer)
        out.append(np.empty(tuple(shape), dtype=np.dtype(d["dtype"])))
    return out


def recv_raw(
    sock: socket.socket, descs: Any, max_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> list[npt.NDArray[Any]]:
    """Receive the raw segments a frame announced, each straight into a new array."""
    arrays = _raw_buffers(descs, max_bytes)
    for a in arrays:
        (length,) = _RAW.unpack(_recv_exact(sock, _RAW.size))
        if length != a.nbytes:
            raise TransportError(f"raw segment of {length} bytes, announced {a.nbytes}")
        mv = a.data.cast("B")
        got = 0
        while got < length:
            try:
                k = sock.recv_into(mv[got:], min(length - got, _RECV_CHUNK))
            except TimeoutError as e:
                raise TransportError("peer timed out") from e
            except OSError as e:
                raise TransportError(f"socket error: {e.strerror or e}") from e
            if k == 0:
                raise TransportError("peer closed the connection")
            got += k
    return arrays


def parse_address(addr: str) -> tuple[int, Any]:
    """`unix:/path`, `/path.sock` or `host:port` → (socket family, address)."""
    if addr.startswith("unix:"):
        return socket.AF_UNIX, addr[5:]
    if addr.startswith("/") or addr.endswith(".sock"):
        return socket.AF_UNIX, addr
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise TransportError(f"bad address {addr!r}: expected host:port or unix:/path")
    return socket.AF_INET, (host.strip("[]") or "127.0.0.1", int(port))


def connect(addr: str, timeout_s: float = 30.0) -> socket.socket:
    """Open a client socket to `addr` (see `parse_address`)."""
    family, target = parse_address(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(target)
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot connect to {addr}: {e.strerror or e}") from e
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


_BOUND_INODES: dict[str, int] = {}  # socket path -> inode of the file this process bound


def _probe_unix(path: str) -> bool:
    """True when a live process accepts connections on the Unix socket `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False  # refused / not a socket: nobody listens (a stale file from a dead process)
    finally:
        probe.close()
    return True


def listen(addr: str, backlog: int = 16) -> socket.socket:
    """Bind a listening socket on `addr`.

    For a Unix socket the directory is created (mode 0750) when missing; an existing socket file is
    probed first: if a live process answers, we refuse to start (unlinking it would silently cut
    that process off), a stale file left by a dead one is replaced. Every failure is a
    `TransportError` naming the path, in one line.
    """
    family, target = parse_address(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            path = str(target)
            parent = os.path.dirname(path) or "."
            try:
                os.makedirs(parent, mode=0o750, exist_ok=True)
            except OSError as e:
                raise TransportError(
                    f"cannot create the socket directory {parent} for {path}: {e.strerror or e}"
                ) from e
            if os.path.lexists(path):
                if not stat.S_ISSOCK(os.lstat(path).st_mode):
                    raise TransportError(f"{path} exists and is not a socket: refusing to replace it")
                if _probe_unix(path):
                    raise TransportError(
                        f"{path}: another process is listening on this socket; stop it first "
                        "or choose another --listen path"
                    )
                os.unlink(path)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(target)
            sock.listen(backlog)
            if family == socket.AF_UNIX:
                _BOUND_INODES[str(target)] = os.lstat(str(target)).st_ino
        except OSError as e:
            raise TransportError(f"cannot listen on {addr}: {e.strerror or e}") from e
    except BaseException:
        sock.close()
        raise
    return sock


def unlink_socket(sock: socket.socket) -> None:
    """Remove a listening Unix socket's file on exit, if it is still the one we bound (another
    instance may have replaced a stale file since; its socket must stay)."""
    if sock.family != socket.AF_UNIX:
        return
    try:
        path = sock.getsockname()
    except OSError:
        return
    if not isinstance(path, str) or not path:
        return
    ino = _BOUND_INODES.pop(path, None)
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISSOCK(st.st_mode) and st.st_ino == ino:
        with contextlib.suppress(OSError):
            os.unlink(path)


def set_idle_timeout(conn: socket.socket, seconds: float | None) -> None:
    """Bound how long one read or write on `conn` may wait. Set twice: as Python's socket timeout
    and as the kernel's SO_RCVTIMEO/SO_SNDTIMEO, so a handler that makes the socket blocking again
    (`settimeout(None)`) is still bounded (its recv then fails with EAGAIN → `TransportError`)."""
    conn.settimeout(seconds)
    if seconds is None:
        return
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ConnectionLimiter:
    """Accept loop shared by every socket service: a connection cap, an idle timeout per
    connection, and an `accept` that survives running out of file descriptors (EMFILE)."""

    def __init__(
        self,
        name: str,
        max_connections: int = 64,
        idle_timeout_s: float | None = 300.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.name = name
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.log = logger or logging.getLogger(__name__)
        self.active = 0
        self.accepted = 0
        self.refused = 0
        self.accept_errors = 0
        self._lock = threading.Lock()

    def serve(
        self,
        sock: socket.socket,
        handle: Callable[[socket.socket, str], None],
        stop: threading.Event,
    ) -> None:
        """Accept until `stop`; each connection runs `handle(conn, peer)` in its own thread with
        `conn`'s timeout set to the idle timeout (a peer silent that long is disconnected)."""
        sock.settimeout(0.5)
        backoff = 0.05
        while not stop.is_set():
            try:
                conn, peer = sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if stop.is_set():
                    break
                if e.errno not in _ACCEPT_ERRNOS:
                    raise
                self.accept_errors += 1
                if self.accept_errors == 1 or self.accept_errors % 100 == 0:
                    self.log.warning(
                        "%s: accept failed (%s, %d so far; %d connections open): backing off %.2f s",
                        self.name,
                        errno.errorcode.get(e.errno or 0, e.errno),
                        self.accept_errors,
                        self.active,
                        backoff,
                    )
                if stop.wait(backoff):
                    break
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            with self._lock:
                full = self.active >= self.max_connections
                if not full:
                    self.active += 1
                    self.accepted += 1
            if full:
                self.refused += 1
                if self.refused == 1 or self.refused % 100 == 0:
                    self.log.warning(
                        "%s: connection limit %d reached; closing a new connection (%d refused so far)",
                        self.name,
                        self.max_connections,
                        self.refused,
                    )
                with contextlib.suppress(OSError):
                    conn.close()
                continue
            set_idle_timeout(conn, self.idle_timeout_s)
            peer_s = str(peer) or "unix"
            try:
                threading.Thread(target=self._run, args=(handle, conn, peer_s), daemon=True).start()
            except RuntimeError as e:  # cannot start a thread: the same shortage as EMFILE
                self._release()
                with contextlib.suppress(OSError):
                    conn.close()
                self.log.warning("%s: cannot start a connection thread (%s)", self.name, e)
                stop.wait(backoff)

    def _run(self, handle: Callable[[socket.socket, str], None], conn: socket.socket, peer: str) -> None:
        try:
            handle(conn, peer)
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            self._release()

    def _release(self) -> None:
        with self._lock:
            self.active -= 1


__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "ConnectionLimiter",
    "connect",
    "decode_body",
    "encode_frame",
    "listen",
    "pack_tensor",
    "parse_address",
    "raw_desc",
    "recv_frame",
    "recv_raw",
    "send_frame",
    "send_raw",
    "set_idle_timeout",
    "unlink_socket",
    "unpack_tensor",
]
