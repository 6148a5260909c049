"""Client side of the enclave services: the daemon's `EnclaveClient` and the owners' provisioning.

`EnclaveClient` keeps one connection, serialises requests with a lock and reconnects once for
idempotent requests (`hello`, `evidence`, `stats`, `status`). `submit` is never retried blindly: a
resent window would be counted as a replay, so the caller decides; when the caller resends a window
whose reply was lost, the request is flagged `resend` and the enclave answers it idempotently.

Owner-side helpers (`provision_model`, `provision_data_key`, `fetch_evidence`) implement the remote
attestation flow of `enclave_bridge.shared.attest` against a running enclave / key enclave.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import socket
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from enclave_bridge.measured.model_package import package_kid
from enclave_bridge.shared.attest import VerifiedEnclave, Verifier, new_nonce, wrap_secret
from enclave_bridge.shared.errors import IntegrityError, TransportError
from enclave_bridge.shared.keys import DataKey, ModelKey, PartyKey
from enclave_bridge.shared.rpc import (
    DATA_KEY_WRAP_INFO,
    DEFAULT_GRACE_S,
    MODEL_KEY_INFO,
    HelloRequest,
    SubmitRequest,
    SubmitResult,
    error_class,
    provision_data_key_message,
    provision_model_message,
)
from enclave_bridge.shared.wire import connect, recv_frame, send_frame

log = logging.getLogger(__name__)

MAX_REPLY_BYTES = 64 * 1024 * 1024


class _Rpc:
    """One request/response connection to an enclave service."""

    def __init__(self, addr: str, timeout_s: float) -> None:
        self.addr, self.timeout_s = addr, timeout_s
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.bytes_sent = 0

    def _ensure(self) -> socket.socket:
        if self._sock is None:
            self._sock = connect(self.addr, self.timeout_s)
        return self._sock

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.close()
                self._sock = None

    def call(self, op: str, retry: bool = False, **kw: Any) -> dict[str, Any]:
        """Send `{op, id, **kw}` and return the reply; a refused request raises its typed error."""
        with self._lock:
            for attempt in (0, 1):
                try:
                    sock = self._ensure()
                    rid = next(self._ids)
                    self.bytes_sent += send_frame(sock, {"op": op, "id": rid, **kw})
                    rep = recv_frame(sock, MAX_REPLY_BYTES)
                    break
                except TransportError:
                    if self._sock is not None:
                        with contextlib.suppress(OSError):
                            self._sock.close()
                    self._sock = None
                    if not retry or attempt == 1:
                        raise
                    log.info("enclave connection lost; reconnecting to %s", self.addr)
        if not isinstance(rep, dict) or rep.get("id") != rid:
            raise TransportError(f"{op}: malformed or mismatched reply")
        if not rep.get("ok"):
            raise error_class(str(rep.get("error")))(f"{op}: {rep.get('message')}")
        return rep


class EnclaveClient:
    """The daemon's handle on the evaluation enclave (`veilcam enclave --listen ADDR`)."""

    def __init__(self, addr: str, timeout_s: float = 60.0) -> None:
        self._rpc = _Rpc(addr, timeout_s)
        self.addr = addr
        self._unanswered: bytes | None = None  # digest of the last window whose reply was lost

    def __enter__(self) -> EnclaveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._rpc.close()

    def hello(self, device: str, rules: Mapping[str, Any] | None) -> dict[str, Any]:
        """Register `device` and its alert rules (`{labels, min_score, debounce_s}`)."""
        req = HelloRequest(device, dict(rules) if rules else None)
        rep = self._rpc.call("hello", retry=True, **req.to_wire())
        return {k: v for k, v in rep.items() if k not in ("id", "ok")}

    def submit(self, blob: bytes, retry: bool | None = None) -> SubmitResult:
        """One sealed window in; alerts (if any) out. Rejections are results, not exceptions.

        `retry=True` marks a resubmission of a window whose reply was lost: if the enclave had
        accepted it (it was its last window for the device), it returns the same result and alert
        envelopes instead of a `replay` rejection. `None` = automatic: true when this client's
        previous submit of the very same blob failed in transit.
        """
        digest = hashlib.sha256(blob).digest()
        if retry is None:
            retry = digest == self._unanswered
        try:
            rep = self._rpc.call("submit", **SubmitRequest(blob, retry).to_wire())
        except TransportError:
            self._unanswered = digest
            raise
        self._unanswered = None
        return SubmitResult.from_wire(rep)

    def evidence(self, nonce: bytes | None = None) -> dict[str, Any]:
        """Attestation evidence (measurement-bearing quote + the enclave's alert-signing key)."""
        return dict(self._rpc.call("evidence", retry=True, nonce=nonce or new_nonce())["evidence"])

    def stats(self) -> dict[str, Any]:
        return dict(self._rpc.call("stats", retry=True)["stats"])

    def status(self) -> dict[str, Any]:
        rep = self._rpc.call("status", retry=True)
        return {k: v for k, v in rep.items() if k not in ("id", "ok")}

    def set_policy(self, policy_doc: Mapping[str, Any]) -> dict[str, Any]:
        import json

        rep = self._rpc.call("set_policy", policy=json.dumps(policy_doc, sort_keys=True))
        return {"version": rep["version"], "digest": rep["digest"]}


def _attested_call(addr: str, verifier: Verifier, timeout_s: float) -> tuple[_Rpc, VerifiedEnclave, bytes]:
    rpc = _Rpc(addr, timeout_s)
    nonce = new_nonce()
    try:
        ev = rpc.call("evidence", nonce=nonce, kind="quote")["evidence"]
        verified = verifier.verify(ev, nonce)
    except BaseException:
        rpc.close()
        raise
    return rpc, verified, nonce


def fetch_evidence(
    addr: str, verifier: Verifier, timeout_s: float = 30.0
) -> tuple[dict[str, Any], VerifiedEnclave]:
    """Challenge an enclave with a fresh nonce and verify its evidence."""
    rpc = _Rpc(addr, timeout_s)
    nonce = new_nonce()
    try:
        ev = rpc.call("evidence", nonce=nonce, kind="quote")["evidence"]
    finally:
        rpc.close()
    return ev, verifier.verify(ev, nonce)


def provision_model(
    addr: str,
    package: bytes,
    model_key: ModelKey,
    owner: PartyKey,
    verifier: Verifier,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Model owner: attest the evaluation enclave, then send the package and its key wrapped to it."""
    if owner.role != "model-owner":
        raise IntegrityError(f"provisioning a model needs the model-owner key, not {owner.role}")
    if package_kid(package) != model_key.kid:
        raise IntegrityError(f"package is encrypted under {package_kid(package)!r}, key is {model_key.kid!r}")
    rpc, enclave, nonce = _attested_call(addr, verifier, timeout_s)
    try:
        wrapped = wrap_secret(enclave.kx_pub, model_key.export_secret(), MODEL_KEY_INFO, nonce)
        sig = owner.sign(provision_model_message(nonce, package, wrapped))
        rep = rpc.call("provision_model", package=package, wrapped=wrapped, sig=sig)
    finally:
        rpc.close()
    log.info("model %s provisioned to enclave %s", model_key.kid, enclave.measurement[:16])
    return {"model_kid": rep["model_kid"], "num_class": rep["num_class"], "measurement": enclave.measurement}


def provision_data_key(
    addr: str,
    data_key: DataKey,
    owner: PartyKey,
    verifier: Verifier,
    allow_eval_measurements: Iterable[str],
    grace_s: float = DEFAULT_GRACE_S,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Data owner: attest the key enclave, then send the data key and the evaluation allow-list."""
    if owner.role != "data-owner":
        raise IntegrityError(f"provisioning a data key needs the data-owner key, not {owner.role}")
    allow = sorted({m.lower() for m in allow_eval_measurements})
    rpc, enclave, nonce = _attested_call(addr, verifier, timeout_s)
    try:
        wrapped = wrap_secret(enclave.kx_pub, data_key.export_secret(), DATA_KEY_WRAP_INFO, nonce)
        sig = owner.sign(provision_data_key_message(nonce, data_key.kid, grace_s, allow, wrapped))
        rep = rpc.call(
            "provision_data_key",
            kid=data_key.kid,
            grace_s=float(grace_s),
            allow=allow,
            wrapped=wrapped,
            sig=sig,
        )
    finally:
        rpc.close()
    log.info("data key %s provisioned to key enclave %s", data_key.kid, enclave.measurement[:16])
    return {"kid": rep["kid"], "kids": rep["kids"], "measurement": enclave.measurement}


def key_enclave_status(addr: str, timeout_s: float = 10.0) -> dict[str, Any]:
    rpc = _Rpc(addr, timeout_s)
    try:
        rep = rpc.call("status")
    finally:
        rpc.close()
    return {k: v for k, v in rep.items() if k not in ("id", "ok")}


__all__ = [
    "EnclaveClient",
    "SubmitResult",
    "fetch_evidence",
    "key_enclave_status",
    "provision_data_key",
    "provision_model",
]
