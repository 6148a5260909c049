"""The key enclave (`veilcam key-enclave`): holds the data owner's window keys, hands them only to
evaluation enclaves the data owner allowed, after local attestation (docs/ARCHITECTURE.md §6).

Ops:
- `evidence {nonce, kind}`               attestation evidence (starts a session on the connection)
- `provision_data_key {wrapped, kid, grace_s, allow, sig}`   data owner: the key wrapped to the
  session key; `allow` = evaluation-enclave measurements that may receive it; signed by the data
  owner whose public key is pinned in the (measured) config. Earlier keys stay valid for
  `grace_s` seconds (rotation), then expire.
- `challenge {}` / `get_data_keys {evidence}`  local attestation of an evaluation enclave: its
  report must answer our challenge, come from this platform, have role "eval" and an allowed
  measurement; the reply wraps the keyring to its session key and is signed by our identity key.
- `status {}`                            kids (not keys), expiry times, allow-list.

The keyring is sealed, so the key enclave restarts without the data owner online.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import msgpack

from enclave_bridge.measured.enclave_config import load_enclave_config, make_backend
from enclave_bridge.measured.service import (
    Connection,
    EnclaveIdentity,
    Handler,
    RequestServer,
    evidence_handler,
    install_signal_handlers,
    open_state,
    require_session,
)
from enclave_bridge.shared.attest import EnclaveBackend, Verifier, new_nonce, unwrap_secret, wrap_secret
from enclave_bridge.shared.errors import AttestationError, ConfigError, IntegrityError
from enclave_bridge.shared.keys import DataKey, b64d, verify_ed25519
from enclave_bridge.shared.rpc import DATA_KEY_WRAP_INFO, DEFAULT_GRACE_S, provision_data_key_message
from enclave_bridge.shared.sealing import SealedStore, Sealer
from enclave_bridge.shared.wire import listen, unlink_socket

log = logging.getLogger(__name__)

DATA_KEYS_INFO = b"veilcam-data-keys"  # the keyring wrapped to an evaluation enclave
DATA_KEYS_SIG_DOMAIN = b"veilcam-data-keys-v1\0"


class KeyEnclave:
    """State and handlers of the key enclave."""

    def __init__(
        self, cfg: dict[str, Any], backend: EnclaveBackend, state_dir: str | os.PathLike[str]
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.measurement = backend.measurement().hex()
        self.store = SealedStore(Path(state_dir) / "sealed", Sealer(backend.sealing_key()))
        self.identity = EnclaveIdentity(self.store)
        self.do_pub = b64d(cfg["data_owner_pub"], "data_owner_pub")
        self._lock = threading.Lock()
        raw = self.store.get("keyring")
        doc = msgpack.unpackb(raw, raw=False) if raw is not None else {"keys": [], "allow": []}
        self._ring: list[dict[str, Any]] = doc["keys"]
        self._allow: list[str] = doc["allow"]
        self.served = 0
        self.refused = 0
        if self._ring:
            log.info("keyring reloaded from sealed state: kids %s", [e["kid"] for e in self._ring])
        else:
            log.info("no data key yet (waiting for `veilcam provision data-key`)")

    def _save(self) -> None:
        self.store.put(
            "keyring", msgpack.packb({"keys": self._ring, "allow": self._allow}, use_bin_type=True)
        )

    def _live(self) -> list[dict[str, Any]]:
        now = time.time()
        return [e for e in self._ring if e["retire_at"] is None or e["retire_at"] > now]

    def handlers(self) -> dict[str, Handler]:
        return {
            "evidence": evidence_handler(self.backend, "key", self.identity),
            "provision_data_key": self.h_provision,
            "challenge": self.h_challenge,
            "get_data_keys": self.h_get_keys,
            "status": self.h_status,
        }

    def h_provision(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        session, nonce = require_session(conn)
        kid, grace_s, allow, wrapped, sig = (
            req["kid"],
            req["grace_s"],
            req["allow"],
            req["wrapped"],
            req["sig"],
        )
        if not isinstance(kid, str) or not isinstance(allow, list) or not isinstance(grace_s, int | float):
            raise IntegrityError("provision_data_key: malformed request")
        if not allow or not all(isinstance(m, str) and len(m) == 64 for m in allow):
            raise ConfigError("provision_data_key: allow must list evaluation-enclave measurements (64 hex)")
        verify_ed25519(
            self.do_pub,
            sig,
            provision_data_key_message(nonce, kid, grace_s, allow, wrapped),
            "provision_data_key (data owner)",
        )
        raw = unwrap_secret(session.exchange, session.public, wrapped, DATA_KEY_WRAP_INFO, nonce)
        key = DataKey(raw, kid)  # validates size and kid
        now = time.time()
        with self._lock:
            if any(e["kid"] == kid for e in self._ring):
                raise ConfigError(f"kid {kid!r} already provisioned; rotate with a new kid")
            for e in self._ring:
                if e["retire_at"] is None or e["retire_at"] > now + grace_s:
                    e["retire_at"] = now + float(grace_s)
            self._ring = [*self._live(), {"kid": kid, "secret": key.export_secret(), "retire_at": None}]
            self._allow = sorted({m.lower() for m in allow})
            self._save()
        conn.session = conn.session_nonce = None
        log.info("data key %s provisioned and sealed (older keys expire in %.0f s)", kid, grace_s)
        return {"kid": kid, "kids": [e["kid"] for e in self._ring]}

    def h_challenge(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        conn.challenge = new_nonce()
        return {"nonce": conn.challenge}

    def h_get_keys(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        if conn.challenge is None:
            raise AttestationError("get_data_keys: request a challenge first")
        challenge, conn.challenge = conn.challenge, None  # single use
        plat = getattr(self.backend, "platform_public", None)
        if plat is None:
            raise AttestationError("local attestation is not available on this backend")
        with self._lock:
            allow, live = list(self._allow), self._live()
        try:
            peer = Verifier(plat(), allow, role="eval", kind="report").verify(req["evidence"], challenge)
        except AttestationError:
            self.refused += 1
            raise
        if not live:
            raise IntegrityError("no data key provisioned")
        ring = [{"kid": e["kid"], "secret": e["secret"], "retire_at": e["retire_at"]} for e in live]
        wrapped = wrap_secret(peer.kx_pub, msgpack.packb(ring, use_bin_type=True), DATA_KEYS_INFO, challenge)
        sig = self.identity.sign(DATA_KEYS_SIG_DOMAIN + challenge + msgpack.packb(wrapped, use_bin_type=True))
        self.served += 1
        log.info(
            "data keys %s released to evaluation enclave %s", [e["kid"] for e in live], peer.measurement[:16]
        )
        return {"wrapped": wrapped, "sig": sig}

    def h_status(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": self.backend.name,
                "measurement": self.measurement,
                "signing_kid": self.identity.kid,
                "keys": [{"kid": e["kid"], "retire_at": e["retire_at"]} for e in self._live()],
                "allow": list(self._allow),
                "served": self.served,
                "refused": self.refused,
            }


def run_key_enclave(config_path: str, state_dir: str, listen_addr: str, platform_key: str | None) -> int:
    """Entry point of `veilcam key-enclave`."""
    cfg = load_enclave_config(config_path, "key")
    # bind first: a second instance on a live socket must refuse before it touches the sealed state
    sock = listen(listen_addr)
    try:
        backend = make_backend(cfg, platform_key, "key")
        ke = open_state(lambda: KeyEnclave(cfg, backend, state_dir), backend, state_dir)
    except BaseException:
        unlink_socket(sock)
        sock.close()
        raise
    log.info(
        "key enclave ready: backend %s, measurement %s, signing key %s",
        backend.name,
        ke.measurement,
        ke.identity.kid,
    )
    # few, short requests (the evaluation enclave's key fetch, owners' provisioning): tight limits
    server = RequestServer(
        "key-enclave", ke.handlers(), max_request_bytes=1024 * 1024, max_connections=32, idle_timeout_s=60.0
    )
    install_signal_handlers(server)
    server.serve(listen_addr, sock=sock)
    return 0


__all__ = [
    "DATA_KEY_WRAP_INFO",
    "DEFAULT_GRACE_S",
    "KeyEnclave",
    "provision_data_key_message",
    "run_key_enclave",
]
