"""Encrypted skeleton windows (ARCHITECTURE.md §3): sealed on the capture host, opened inside the enclave.

Envelope = msgpack `{v:1, device, seq, t0, t1, kid, nonce, ct}`; AES-256-GCM under the data owner's
key with AAD `device|seq|t0|t1|kid`, so the cleartext routing fields cannot be swapped between
windows. The plaintext is msgpack `{data: tensor (3,T,V,M) float32, track_ids: [int]}`.
`ReplayGuard` enforces strictly increasing `seq` per device *after* authentication (an attacker
cannot advance the counter with forged windows).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import IntegrityError, StageError, TransportError
from enclave_bridge.shared.keys import DataKey
from enclave_bridge.shared.wire import pack_tensor, unpack_tensor

log = logging.getLogger(__name__)

WINDOW_VERSION = 1
NONCE_BYTES = 12
MAX_WINDOW_BYTES = 64 * 1024 * 1024
MAX_DEVICE_LEN = 128
_FIELDS = frozenset({"v", "device", "seq", "t0", "t1", "kid", "nonce", "ct"})


class WindowRejected(IntegrityError):
    """A window failed a check; `reason` is a short counter name (malformed, unknown_kid, replay, auth)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def window_aad(device: str, seq: int, t0: float, t1: float, kid: str) -> bytes:
    """`device|seq|t0|t1|kid`; floats as `repr` (shortest exact round-trip form)."""
    return f"{device}|{seq}|{float(t0)!r}|{float(t1)!r}|{kid}".encode()


def _check_device(device: Any) -> str:
    if not isinstance(device, str) or not device or len(device) > MAX_DEVICE_LEN or "|" in device:
        raise WindowRejected("malformed", "malformed window: bad device id")
    return device


def seal_window(
    key: DataKey,
    device: str,
    seq: int,
    t0: float,
    t1: float,
    data: npt.NDArray[np.float32],
    track_ids: Sequence[int] = (),
) -> bytes:
    """Encrypt one window `data` (3, T, V, M) float32 for the enclave; returns envelope bytes."""
    if not isinstance(device, str) or not device or len(device) > MAX_DEVICE_LEN or "|" in device:
        raise StageError("device must be a non-empty string ≤ 128 chars without '|'")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or seq >= 2**63:
        raise StageError("seq must be a non-negative int < 2**63")
    if not (math.isfinite(t0) and math.isfinite(t1)) or t1 < t0:
        raise StageError("t0/t1 must be finite with t0 <= t1")
    arr = np.asarray(data)
    if arr.ndim != 4 or arr.shape[0] != 3:
        raise StageError(f"window must be (3, T, V, M), got {arr.shape}")
    if arr.dtype != np.float32:
        raise StageError(f"window must be float32, got {arr.dtype}")
    tids = [int(t) for t in track_ids]
    plaintext = msgpack.packb({"data": pack_tensor(arr), "track_ids": tids}, use_bin_type=True)
    nonce = os.urandom(NONCE_BYTES)
    ct = key.encrypt(nonce, plaintext, window_aad(device, seq, t0, t1, key.kid))
    env = {
        "v": WINDOW_VERSION,
        "device": device,
        "seq": seq,
        "t0": float(t0),
        "t1": float(t1),
        "kid": key.kid,
        "nonce": nonce,
        "ct": ct,
    }
    return msgpack.packb(env, use_bin_type=True)


@dataclass(frozen=True, slots=True)
class WindowHeader:
    """The cleartext routing fields of an envelope (safe to log: no payload)."""

    device: str
    seq: int
    t0: float
    t1: float
    kid: str


@dataclass(frozen=True, slots=True)
class OpenedWindow:
    """A decrypted window; exists only inside the enclave. `data` is (3, T, V, M) float32."""

    device: str
    seq: int
    t0: float
    t1: float
    kid: str
    data: npt.NDArray[np.float32]
    track_ids: tuple[int, ...]

    def __repr__(self) -> str:  # never print skeletons
        return (
            f"OpenedWindow(device={self.device!r}, seq={self.seq}, kid={self.kid!r}, shape={self.data.shape})"
        )


class ReplayGuard:
    """Highest accepted `seq` per device; a window with `seq <= last` is a replay or reorder.

    Thread-safe. `state()`/`ReplayGuard(state)` let the enclave persist it (sealed) so a restart
    cannot be used to replay old windows.
    """

    def __init__(self, state: Mapping[str, int] | None = None) -> None:
        self._last: dict[str, int] = {str(k): int(v) for k, v in (state or {}).items()}
        self._lock = threading.Lock()

    def last(self, device: str) -> int | None:
        with self._lock:
            return self._last.get(device)

    def check(self, device: str, seq: int) -> None:
        with self._lock:
            last = self._last.get(device)
        if last is not None and seq <= last:
            raise WindowRejected(
                "replay", f"replayed or reordered window: device {device!r} seq {seq} <= {last}"
            )

    def accept(self, device: str, seq: int) -> None:
        """Check and advance atomically."""
        with self._lock:
            last = self._last.get(device)
            if last is not None and seq <= last:
                raise WindowRejected(
                    "replay", f"replayed or reordered window: device {device!r} seq {seq} <= {last}"
                )
            self._last[device] = seq

    def state(self) -> dict[str, int]:
        with self._lock:
            return dict(self._last)


def parse_header(blob: bytes) -> tuple[WindowHeader, bytes, bytes]:
    """Validate the envelope structure; returns (header, nonce, ct). Raises `IntegrityError`."""
    if not isinstance(blob, bytes | bytearray) or len(blob) > MAX_WINDOW_BYTES:
        raise WindowRejected("malformed", "malformed window: not bytes or too large")
    try:
        env = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as e:
        raise WindowRejected("malformed", f"malformed window: {type(e).__name__}") from e
    if not isinstance(env, dict) or set(env) != _FIELDS:
        raise WindowRejected("malformed", "malformed window: wrong fields")
    if env["v"] != WINDOW_VERSION:
        raise WindowRejected("malformed", f"malformed window: unsupported version {env['v']!r}")
    device = _check_device(env["device"])
    seq, t0, t1, kid, nonce, ct = env["seq"], env["t0"], env["t1"], env["kid"], env["nonce"], env["ct"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise WindowRejected("malformed", "malformed window: bad seq")
    if not (isinstance(t0, float) and isinstance(t1, float) and math.isfinite(t0) and math.isfinite(t1)):
        raise WindowRejected("malformed", "malformed window: bad t0/t1")
    if not isinstance(kid, str) or not kid or len(kid) > 64:
        raise WindowRejected("malformed", "malformed window: bad kid")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES or not isinstance(ct, bytes) or len(ct) < 16:
        raise WindowRejected("malformed", "malformed window: bad nonce/ct")
    return WindowHeader(device, seq, t0, t1, kid), nonce, ct


def open_window(
    blob: bytes, keys: Mapping[str, DataKey], guard: ReplayGuard, joints: int | None = None
) -> OpenedWindow:
    """Authenticate, decrypt and replay-check one envelope; with `joints`, V must be that.

    Non-finite values and empty or mis-shaped tensors are rejected with a reason (counted by the
    caller) rather than failing later inside the model as an unexplained error.

    Raises `IntegrityError` for a bad tag, unknown kid, replay/reorder or malformed content; the
    message names the header fields only, never the payload.
    """
    hdr, nonce, ct = parse_header(blob)
    key = keys.get(hdr.kid)
    if key is None:
        raise WindowRejected(
            "unknown_kid", f"unknown or expired kid {hdr.kid!r} (device {hdr.device!r} seq {hdr.seq})"
        )
    guard.check(hdr.device, hdr.seq)  # cheap early refusal; re-checked atomically below
    try:
        plaintext = key.decrypt(nonce, ct, window_aad(hdr.device, hdr.seq, hdr.t0, hdr.t1, hdr.kid))
    except IntegrityError as e:
        raise WindowRejected("auth", f"{e} (device {hdr.device!r} seq {hdr.seq})") from e
    try:
        body = msgpack.unpackb(plaintext, raw=False, strict_map_key=True)
        if not isinstance(body, dict) or set(body) != {"data", "track_ids"}:
            raise WindowRejected("malformed", "malformed window body")
        data = unpack_tensor(body["data"])
        tids = body["track_ids"]
        if not isinstance(tids, list) or not all(isinstance(t, int) for t in tids):
            raise WindowRejected("malformed", "malformed window body: track_ids")
    except (ValueError, TypeError, TransportError, msgpack.exceptions.UnpackException) as e:
        raise WindowRejected("malformed", f"malformed window body: {type(e).__name__}") from e
    if data.ndim != 4 or data.shape[0] != 3 or data.dtype != np.float32 or 0 in data.shape:
        raise WindowRejected("malformed", f"malformed window body: tensor {data.dtype} {data.shape}")
    if joints is not None and data.shape[2] != joints:
        raise WindowRejected("malformed", f"malformed window body: {data.shape[2]} joints, expected {joints}")
    if not np.isfinite(data).all():
        # authenticated but unusable (a capture-side bug): counted apart, never evaluated
        raise WindowRejected("nonfinite", f"window has NaN/inf values (device {hdr.device!r} seq {hdr.seq})")
    guard.accept(hdr.device, hdr.seq)
    return OpenedWindow(hdr.device, hdr.seq, hdr.t0, hdr.t1, hdr.kid, data.copy(), tuple(tids))


__all__ = [
    "OpenedWindow",
    "ReplayGuard",
    "WindowHeader",
    "WindowRejected",
    "open_window",
    "parse_header",
    "seal_window",
    "window_aad",
]
