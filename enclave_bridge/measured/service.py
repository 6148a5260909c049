"""What both enclave services (evaluation and key enclave) run on: a bounded request/response server
over wire frames, the sealed identity key, the attestation session of a connection, and opening
the sealed state."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enclave_bridge.shared.attest import EnclaveBackend, SessionKey, make_evidence
from enclave_bridge.shared.errors import (
    AttestationError,
    EnclaveError,
    IntegrityError,
    TransportError,
    VeilcamError,
)
from enclave_bridge.shared.keys import fingerprint, raw_public_bytes
from enclave_bridge.shared.sealing import SealedStore
from enclave_bridge.shared.wire import ConnectionLimiter, listen, recv_frame, send_frame, unlink_socket

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 600 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 64  # cameras + owners + monitoring; more are refused at accept
DEFAULT_IDLE_TIMEOUT_S = 600.0  # a silent connection is closed (the daemon reconnects on demand)


class Connection:
    """Per-connection state: the attestation session key and the challenge we issued."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.session: SessionKey | None = None
        self.session_nonce: bytes | None = None
        self.challenge: bytes | None = None


Handler = Callable[[Connection, dict[str, Any]], dict[str, Any]]


class RequestServer:
    """Thread-per-connection request/response loop over wire frames; errors become typed replies.

    Bounded: at most `max_connections` at once (more are closed at accept, counted), a connection
    silent for `idle_timeout_s` is closed, and running out of file descriptors (EMFILE) makes the
    accept loop back off instead of ending the process (`wire.ConnectionLimiter`)."""

    def __init__(
        self,
        name: str,
        handlers: Mapping[str, Handler],
        max_request_bytes: int = MAX_REQUEST_BYTES,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
    ):
        self.name = name
        self.handlers = dict(handlers)
        self.max_request_bytes = max_request_bytes
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self.limiter = ConnectionLimiter(name, max_connections, idle_timeout_s, log)
        self.request_errors = 0
        self.junk_closed = 0

    @property
    def connections(self) -> int:
        return self.limiter.accepted

    def serve(
        self, addr: str, ready: Callable[[], None] | None = None, sock: socket.socket | None = None
    ) -> None:
        """Serve on `addr` (or on `sock`, already bound to it by `wire.listen`) until `stop()`."""
        self._sock = sock if sock is not None else listen(addr)
        log.info("%s listening on %s", self.name, addr)
        if ready:
            ready()
        try:
            self.limiter.serve(self._sock, self._handle, self._stop)
        finally:
            unlink_socket(self._sock)
            self._sock.close()
            log.info("%s stopped", self.name)

    def stop(self) -> None:
        self._stop.set()

    def _handle(self, sock: socket.socket, peer: str) -> None:
        conn = Connection(peer)
        while not self._stop.is_set():
            try:
                req = recv_frame(sock, self.max_request_bytes)
            except TransportError as e:
                self._closed(peer, str(e))
                return
            reply = self._dispatch(conn, req)
            try:
                send_frame(sock, reply)
            except TransportError:
                return

    def _closed(self, peer: str, why: str) -> None:
        """Say why a connection ended when it was not the peer's orderly close (never the payload)."""
        if why == "peer closed the connection":
            return
        if why == "peer timed out":
            log.info("%s: closing connection %s: idle for %s s", self.name, peer, self.limiter.idle_timeout_s)
            return
        self.junk_closed += 1
        log.warning("%s: closing connection %s on bad framing: %s", self.name, peer, why)

    def _dispatch(self, conn: Connection, req: Any) -> dict[str, Any]:
        rid = req.get("id") if isinstance(req, dict) else None
        op = req.get("op") if isinstance(req, dict) else None
        handler = self.handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            self.request_errors += 1
            return {"id": rid, "ok": False, "error": "TransportError", "message": f"unknown op {op!r}"}
        try:
            out = handler(conn, req)
        except VeilcamError as e:
            self.request_errors += 1
            log.warning("%s: %s refused: %s: %s", self.name, op, type(e).__name__, e)
            return {"id": rid, "ok": False, "error": type(e).__name__, "message": str(e)}
        except (KeyError, TypeError, ValueError) as e:
            self.request_errors += 1
            log.warning("%s: malformed %s request (%s)", self.name, op, type(e).__name__)
            return {"id": rid, "ok": False, "error": "TransportError", "message": f"malformed {op} request"}
        except Exception as e:  # a bug must not kill the connection thread silently
            self.request_errors += 1
            log.error("%s: internal error in %s: %s", self.name, op, type(e).__name__, exc_info=True)
            return {"id": rid, "ok": False, "error": "EnclaveError", "message": f"internal error in {op}"}
        out.update({"id": rid, "ok": True})
        return out


def install_signal_handlers(server: RequestServer) -> None:
    def _stop(signum: int, _frame: object) -> None:
        log.info("%s: signal %d, stopping", server.name, signum)
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


class EnclaveIdentity:
    """The enclave's long-term Ed25519 key (alert signatures), generated inside and kept sealed."""

    __slots__ = ("_priv", "public")

    def __init__(self, store: SealedStore) -> None:
        raw = store.get("identity")
        if raw is None:
            self._priv = Ed25519PrivateKey.generate()
            from enclave_bridge.shared.keys import raw_private_bytes

            store.put("identity", raw_private_bytes(self._priv))
            log.info("generated a new enclave signing key")
        else:
            self._priv = Ed25519PrivateKey.from_private_bytes(raw)
        self.public = raw_public_bytes(self._priv.public_key())

    @property
    def kid(self) -> str:
        return fingerprint(self.public)

    def sign(self, message: bytes) -> bytes:
        return self._priv.sign(message)


def evidence_handler(backend: EnclaveBackend, role: str, identity: EnclaveIdentity) -> Handler:
    def handle(conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        nonce = req["nonce"]
        kind = req.get("kind", "quote")
        conn.session = SessionKey()
        conn.session_nonce = nonce
        return {"evidence": make_evidence(backend, role, nonce, conn.session, identity.public, kind)}

    return handle


def require_session(conn: Connection) -> tuple[SessionKey, bytes]:
    if conn.session is None or conn.session_nonce is None:
        raise AttestationError("no attestation session on this connection: request evidence first")
    return conn.session, conn.session_nonce


def open_state(factory: Callable[[], Any], backend: EnclaveBackend, state_dir: str) -> Any:
    """Build the enclave from its sealed state, explaining the usual reason unsealing fails."""
    try:
        return factory()
    except IntegrityError as e:
        raise EnclaveError(
            f"{e}. The sealed state in {state_dir} belongs to another measurement: the enclave code or "
            f"config changed (now {backend.measurement().hex()[:16]}…) or another platform key is used. "
            "Restore them, or start with an empty --state-dir and provision again."
        ) from e


__all__ = [
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "Connection",
    "EnclaveIdentity",
    "Handler",
    "RequestServer",
    "evidence_handler",
    "install_signal_handlers",
    "open_state",
    "require_session",
]
