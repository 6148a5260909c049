"""Socket framing shared by the enclave and GPU-worker protocols (DESIGN §2).

A frame is a 4-byte big-endian length followed by one msgpack map. Tensors travel as
`{"dtype": str, "shape": [..], "data": bytes}`. Frames above `max_bytes` are refused before any
allocation, so a hostile peer cannot make us buffer unbounded memory.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack
import numpy as np

from enclave_bridge.errors import TransportError

DEFAULT_MAX_FRAME_BYTES = 256 * 1024 * 1024
_HEADER = struct.Struct(">I")
_ALLOWED_DTYPES = frozenset(
    {"int8", "uint8", "int16", "int32", "int64", "uint32", "uint64", "float32", "float64"}
)


def pack_tensor(arr: np.ndarray) -> dict[str, Any]:
    """Encode an array as raw C-order bytes + dtype + shape (no pickle, ever)."""
    if arr.dtype.name not in _ALLOWED_DTYPES:
        raise TransportError(f"dtype {arr.dtype.name} not allowed on the wire")
    data = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # msgpack copies it once
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": data}


def unpack_tensor(obj: Any) -> np.ndarray:
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


def listen(addr: str, backlog: int = 16) -> socket.socket:
    """Bind a listening socket on `addr`; a stale Unix socket file is replaced."""
    import os

    family, target = parse_address(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        if os.path.exists(target):
            os.unlink(target)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(target)
    sock.listen(backlog)
    return sock


__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "connect",
    "decode_body",
    "encode_frame",
    "listen",
    "pack_tensor",
    "parse_address",
    "recv_frame",
    "send_frame",
    "unpack_tensor",
]
