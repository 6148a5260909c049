"""The evaluation enclave service (`veilcam enclave`): decrypt windows, run ST-GCN, emit sealed alerts.

A separate OS process reached over `enclave_bridge.shared.wire` frames (Unix or TCP). Requests are msgpack
maps `{op, id, ...}`; replies `{id, ok: true, ...}` or `{id, ok: false, error: <class>, message}`.
Ops (see docs/ARCHITECTURE.md "Enclave service"):

- `hello {device, rules}`          register a camera and its alert rules
- `submit {blob}`                  one sealed window → `{status, reason, alerts, window_seq}`
- `evidence {nonce, kind?}`        attestation evidence; starts a provisioning session on this connection
- `provision_model {package, wrapped, sig}`   model owner: encrypted package + model key wrapped to
                                   the session key, signed by the model owner (pinned in config)
- `set_policy {policy}`            access policy JSON signed by both owners
- `status {}` / `stats {}`         non-sensitive state and counters

State in `--state-dir` (sealed with the measurement-bound key): the enclave's alert-signing key, the
model key, the access policy, replay counters and per-device alert `seq`. The model package itself
is stored as the owner encrypted it. Data keys are never stored here: they come from the key enclave
by local attestation at start and whenever a window names an unknown kid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enclave_bridge.measured.model_inputs import input_transform_of
from enclave_bridge.measured.window_eval import TorchEvaluator, WindowEvaluator
from enclave_bridge.shared import errors
from enclave_bridge.shared.attest import (
    EnclaveBackend,
    PlatformKey,
    SessionKey,
    SimulatedBackend,
    Verifier,
    make_evidence,
    new_nonce,
    unwrap_secret,
)
from enclave_bridge.shared.errors import (
    AttestationError,
    ConfigError,
    EnclaveError,
    IntegrityError,
    TransportError,
    VeilcamError,
)
from enclave_bridge.shared.keys import DataKey, ModelKey, b64d, fingerprint, raw_public_bytes, verify_ed25519
from enclave_bridge.shared.measurement import compute_measurement
from enclave_bridge.shared.sealing import SealedStore, Sealer
from enclave_bridge.shared.wire import (
    ConnectionLimiter,
    connect,
    listen,
    recv_frame,
    send_frame,
    unlink_socket,
)

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 600 * 1024 * 1024
PROVISION_MODEL_DOMAIN = b"veilcam-provision-model-v1\0"
MODEL_KEY_INFO = b"veilcam-model-key"
DATA_KEYS_INFO = b"veilcam-data-keys"
DATA_KEYS_SIG_DOMAIN = b"veilcam-data-keys-v1\0"
EVALUATOR_MODES = ("paper", "slalom", "split2", "split3", "enclave", "plaintext")
KEY_REFRESH_S = 60.0
DEFAULT_MAX_CONNECTIONS = 64  # cameras + owners + monitoring; more are refused at accept
DEFAULT_IDLE_TIMEOUT_S = 600.0  # a silent connection is closed (the daemon reconnects on demand)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


def load_enclave_config(path: str | os.PathLike[str], role: str) -> dict[str, Any]:
    """Read and validate an enclave config (YAML or JSON). The returned dict is what is measured."""
    p = Path(path)
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: enclave config not found") from e
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: cannot parse enclave config: {e}") from e
    return validate_enclave_config(cfg, role, str(p))


def validate_enclave_config(cfg: Any, role: str, where: str = "enclave config") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a mapping")
    allowed = {
        "eval": {"role", "backend", "data_owner_pub", "model_owner_pub", "key_enclave", "evaluator", "topk"},
        "key": {"role", "backend", "data_owner_pub"},
    }[role]
    unknown = set(cfg) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    if cfg.get("role") != role:
        raise ConfigError(f"{where}.role: must be {role!r} for this enclave")
    if cfg.get("backend", "simulated") not in ("simulated", "gramine-sgx"):
        raise ConfigError(f"{where}.backend: 'simulated' or 'gramine-sgx'")
    owners = ("data_owner_pub", "model_owner_pub") if role == "eval" else ("data_owner_pub",)
    for k in owners:
        try:
            if len(b64d(cfg.get(k), f"{where}.{k}")) != 32:
                raise ConfigError(f"{where}.{k}: must be a 32-byte Ed25519 public key (base64)")
        except ConfigError as e:
            raise ConfigError(f"{e} — copy `sign_pub` from the owner's .pub file") from None
    if role == "eval":
        ke = cfg.get("key_enclave")
        if not isinstance(ke, dict) or not isinstance(ke.get("address"), str):
            raise ConfigError(f"{where}.key_enclave.address: required (e.g. unix:/run/veilcam/key.sock)")
        meas = ke.get("measurements", [])
        if not isinstance(meas, list) or not all(isinstance(m, str) and len(m) == 64 for m in meas):
            raise ConfigError(f"{where}.key_enclave.measurements: a list of 64-hex measurements")
        ev = cfg.get("evaluator", {"mode": "enclave"})
        if not isinstance(ev, dict) or ev.get("mode") not in EVALUATOR_MODES:
            raise ConfigError(f"{where}.evaluator.mode: one of {EVALUATOR_MODES}")
        if ev.get("worker") is not None and not isinstance(ev.get("worker"), str):
            raise ConfigError(f"{where}.evaluator.worker: an address string or null")
        wl = ev.get("workers")
        need = {"split2": 2, "split3": 3}.get(str(ev.get("mode")), 0)
        if wl is not None and (
            not isinstance(wl, list) or not all(isinstance(a, str) for a in wl) or len(set(wl)) != len(wl)
        ):
            raise ConfigError(f"{where}.evaluator.workers: a list of distinct worker addresses")
        if need and wl is not None and len(wl) != need:
            raise ConfigError(f"{where}.evaluator.workers: mode {ev.get('mode')} needs {need} workers")
        t = ev.get("timeout_s")
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 3600):
            raise ConfigError(f"{where}.evaluator.timeout_s: seconds in (0, 3600] (GPU worker replies)")
        limbs = ev.get("act_limbs")
        if limbs is not None and (isinstance(limbs, bool) or limbs not in (1, 2, 3)):
            raise ConfigError(f"{where}.evaluator.act_limbs: 1, 2 or 3 activation digits")
        topk = cfg.get("topk", 5)
        if not isinstance(topk, int) or not 1 <= topk <= 100:
            raise ConfigError(f"{where}.topk: an integer in 1..100")
    return cfg


def make_backend(cfg: Mapping[str, Any], platform_key_path: str | None, role: str) -> EnclaveBackend:
    """The configured TEE backend; its measurement covers this package's code and `cfg`."""
    backend = cfg.get("backend", "simulated")
    if backend == "gramine-sgx":
        from enclave_bridge.measured.gramine_backend import GramineBackend

        return GramineBackend()
    if not platform_key_path:
        raise ConfigError("simulated backend needs --platform-key (created by `veilcam platform init`)")
    return SimulatedBackend(PlatformKey.load(platform_key_path), compute_measurement(cfg), role)


# ---------------------------------------------------------------------------------------------
# generic request server
# ---------------------------------------------------------------------------------------------


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


def error_class(name: str) -> type[VeilcamError]:
    """Map a reply's `error` name back to the error tree (unknown names → EnclaveError)."""
    cls = getattr(errors, str(name), None)
    return cls if isinstance(cls, type) and issubclass(cls, VeilcamError) else EnclaveError


def install_signal_handlers(server: RequestServer) -> None:
    def _stop(signum: int, _frame: object) -> None:
        log.info("%s: signal %d, stopping", server.name, signum)
        server.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


# ---------------------------------------------------------------------------------------------
# enclave identity (alert-signing key), sealed
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


def make_evaluator(
    model: Any,
    mode: str,
    worker: str | None,
    timeout_s: float | None = None,
    act_limbs: int | None = None,
    workers: list[str] | None = None,
) -> Any:
    """`SecureEvaluator` in the configured mode (falls back to torch for mode "enclave" only)."""
    try:
        from enclave_bridge.measured.protocol import SecureEvaluator
    except ImportError:
        if mode != "enclave":
            raise EnclaveError(
                f"evaluator mode {mode!r} needs enclave_bridge.measured.protocol, which is not available"
            ) from None
        log.info("enclave_bridge.measured.protocol not available; evaluating in-enclave with torch")
        return TorchEvaluator(model)
    kw: dict[str, Any] = {"allow_plaintext": True} if mode == "plaintext" else {}
    if timeout_s is not None and (worker is not None or workers):
        kw["timeout_s"] = timeout_s  # a hung GPU worker costs a window at most this, then the enclave path
    if act_limbs not in (None, 1):
        log.warning("evaluator.act_limbs is obsolete (activations are one 20-bit ring element); ignored")
    if workers:
        return SecureEvaluator(model, mode=mode, workers=list(workers), **kw)
    return SecureEvaluator(model, mode=mode, worker=worker, **kw)


@dataclass
class _Device:
    rules: Any  # AlertRules | None


class EvaluationEnclave:
    """State and request handlers of the evaluation enclave."""

    def __init__(
        self, cfg: dict[str, Any], backend: EnclaveBackend, state_dir: str | os.PathLike[str]
    ) -> None:
        from enclave_bridge.shared.windows import ReplayGuard

        self.cfg = cfg
        self.backend = backend
        self.measurement = backend.measurement().hex()
        self.store = SealedStore(Path(state_dir) / "sealed", Sealer(backend.sealing_key()))
        self.state_dir = Path(state_dir)
        self.identity = EnclaveIdentity(self.store)
        self.do_pub = b64d(cfg["data_owner_pub"], "data_owner_pub")
        self.mo_pub = b64d(cfg["model_owner_pub"], "model_owner_pub")
        ev = cfg.get("evaluator", {"mode": "enclave"})
        self.mode: str = ev["mode"]
        self.worker: str | None = ev.get("worker")
        self.worker_timeout_s: float | None = ev.get("timeout_s")
        self.act_limbs: int | None = ev.get("act_limbs")
        self.workers: list[str] | None = ev.get("workers")
        self.topk = int(cfg.get("topk", 5))
        self._lock = threading.RLock()  # guards model/evaluator/keys/counters
        self._keys: dict[str, tuple[DataKey, float | None]] = {}
        self._last_key_fetch = 0.0
        # the model's evaluator, labels and pre-processing (model.json), replaced on provisioning
        self.window_eval: WindowEvaluator | None = None
        self.model_kid: str | None = None
        self.policy: Any = None
        self.devices: dict[str, _Device] = {}
        counters = self._load_json("counters") or {}
        self.guard = ReplayGuard(counters.get("replay", {}))
        self.alert_seq: dict[str, int] = {str(k): int(v) for k, v in counters.get("alert_seq", {}).items()}
        # Per device, the last accepted window's (seq, blob digest, reply alerts): a `resend` of exactly
        # that window (a caller whose reply was lost, also across an enclave restart) gets the same
        # reply instead of a `replay` rejection that would lose the window and its numbered alerts.
        self._last_result: dict[str, tuple[int, str, list[bytes]]] = {
            str(k): (int(v["seq"]), str(v["digest"]), [bytes.fromhex(a) for a in v["alerts"]])
            for k, v in counters.get("last_result", {}).items()
        }
        self.stats_counters: dict[str, Any] = {
            "windows_ok": 0,
            "windows_rejected": {},
            "alerts": 0,
            "eval_s_total": 0.0,
            "eval_s_last": 0.0,
            "key_fetches": 0,
            "key_fetch_failures": 0,
            "windows_retried": 0,
        }
        self._reject_logged: dict[tuple[str, str], int] = {}
        self._load_model_from_state()
        self._load_policy_from_state()

    # -- persistence ------------------------------------------------------------------------
    def _load_json(self, name: str) -> Any:
        raw = self.store.get(name)
        return None if raw is None else json.loads(raw)

    def _save_counters(self) -> None:
        last = {
            d: {"seq": q, "digest": h, "alerts": [a.hex() for a in al]}
            for d, (q, h, al) in self._last_result.items()
        }
        doc = {"replay": self.guard.state(), "alert_seq": self.alert_seq, "last_result": last}
        self.store.put("counters", json.dumps(doc, sort_keys=True).encode())

    def _load_model_from_state(self) -> None:
        raw = self.store.get("model_key")
        pkg_path = self.state_dir / "model.pkg"
        if raw is None or not pkg_path.exists():
            log.info("no model provisioned yet (waiting for `veilcam provision model`)")
            return
        doc = msgpack.unpackb(raw, raw=False)
        try:
            self._install_model(pkg_path.read_bytes(), ModelKey(doc["secret"], doc["kid"]))
        except IntegrityError as e:
            raise EnclaveError(
                f"stored model package {pkg_path} does not match the sealed model key ({e}); "
                "it was modified on disk: provision the model again"
            ) from e
        log.info("model %s reloaded from sealed state", self.model_kid)

    def _load_policy_from_state(self) -> None:
        doc = self._load_json("policy")
        if doc is None:
            log.info("no access policy yet: alerts are refused until one is set")
            return
        from enclave_bridge.shared.policy import verify_policy

        self.policy = verify_policy(doc, self.do_pub, self.mo_pub)
        log.info(
            "access policy v%d reloaded (%d recipients)", self.policy.version, len(self.policy.recipients)
        )

    def _install_model(self, package: bytes, key: ModelKey) -> None:
        from enclave_bridge.measured.model_package import build_model_checked, open_package

        bundle = open_package(package, key)
        model = build_model_checked(bundle)
        evaluator = make_evaluator(
            model, self.mode, self.worker, self.worker_timeout_s, self.act_limbs, self.workers
        )
        new = WindowEvaluator(evaluator, bundle.labels, input_transform_of(bundle.meta), self.topk)
        with self._lock:
            old = self.window_eval
            if old is not None:
                new.engine = old.engine  # debounce state and counts carry over a model update
            self.window_eval, self.model_kid = new, key.kid
        if old is not None:
            old.close()

    # -- data keys via local attestation ----------------------------------------------------
    def fetch_data_keys(self) -> None:
        """Local attestation to the key enclave; replaces the in-memory keyring."""
        ke = self.cfg["key_enclave"]
        self._last_key_fetch = time.monotonic()
        self.stats_counters["key_fetches"] += 1
        try:
            keys = fetch_keys_from_key_enclave(
                ke["address"],
                self.backend,
                self.identity,
                ke.get("measurements") or None,
                self._platform_pub(),
            )
        except VeilcamError:
            self.stats_counters["key_fetch_failures"] += 1
            raise
        with self._lock:
            self._keys = keys
        log.info("data keys loaded from key enclave: kids %s", sorted(keys))

    def _platform_pub(self) -> bytes | None:
        get = getattr(self.backend, "platform_public", None)
        return get() if get is not None else None

    def _active_keys(self) -> dict[str, DataKey]:
        now = time.time()
        with self._lock:
            return {kid: k for kid, (k, retire) in self._keys.items() if retire is None or retire > now}

    # -- handlers ---------------------------------------------------------------------------
    def handlers(self) -> dict[str, Handler]:
        return {
            "hello": self.h_hello,
            "submit": self.h_submit,
            "evidence": evidence_handler(self.backend, "eval", self.identity),
            "provision_model": self.h_provision_model,
            "set_policy": self.h_set_policy,
            "status": self.h_status,
            "stats": self.h_stats,
        }

    def h_hello(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        from enclave_bridge.shared.rules import AlertRules

        device = req["device"]
        if not isinstance(device, str) or not device or len(device) > 128 or "|" in device:
            raise ConfigError("hello: bad device id")
        rules = req.get("rules")
        parsed = AlertRules.from_dict(rules, f"cameras.{device}.rules") if rules else None
        with self._lock:
            self.devices[device] = _Device(parsed)
        policy_rules = self.policy is not None and self.policy.rules_for(device) is not None
        log.info(
            "camera %s registered (rules from %s)", device, "policy" if policy_rules else "camera config"
        )
        return {
            "device": device,
            "rules_source": "policy" if policy_rules else "hello",
            "kid": self.identity.kid,
        }

    def _reject(self, device: str, reason: str, message: str, seq: int) -> dict[str, Any]:
        rej = self.stats_counters["windows_rejected"]
        rej[reason] = rej.get(reason, 0) + 1
        n = self._reject_logged.get((device, reason), 0) + 1
        self._reject_logged[(device, reason)] = n
        if n == 1 or n % 100 == 0:
            log.warning("window rejected (%s, %d so far for %s): %s", reason, n, device, message)
        return {"status": "rejected", "reason": reason, "alerts": [], "window_seq": seq}

    def h_submit(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        from enclave_bridge.shared.windows import WindowRejected, open_window, parse_header

        blob = req["blob"]
        try:
            hdr, _, _ = parse_header(blob)
        except WindowRejected as e:
            return self._reject("?", e.reason, str(e), -1)
        dev = self.devices.get(hdr.device)
        if dev is None:
            return self._reject(
                hdr.device, "unknown_device", f"device {hdr.device!r}: call hello first", hdr.seq
            )
        we = self.window_eval
        if we is None:
            return self._reject(hdr.device, "no_model", "no model provisioned", hdr.seq)
        if self.policy is None:
            return self._reject(
                hdr.device, "no_policy", "no valid access policy: refusing to publish", hdr.seq
            )
        keys = self._active_keys()
        since = time.monotonic() - self._last_key_fetch
        # unknown kid: maybe rotated (at most one fetch per second); otherwise refresh periodically so
        # a rotation's grace period ends even if the capture host keeps using the old key
        if (hdr.kid not in keys and since > 1.0) or since > KEY_REFRESH_S:
            try:
                self.fetch_data_keys()
            except VeilcamError as e:
                log.warning("cannot refresh data keys: %s", e)
            keys = self._active_keys()
        digest = hashlib.sha256(blob).hexdigest()
        with self._lock:
            last = self._last_result.get(hdr.device)
            if req.get("resend") is True and last is not None and last[0] == hdr.seq and last[1] == digest:
                # the caller lost our reply to exactly the window accepted last (authenticated then)
                self.stats_counters["windows_retried"] += 1
                log.info("window %s/%d resubmitted: returning its earlier result", hdr.device, hdr.seq)
                return {"status": "ok", "reason": None, "alerts": list(last[2]), "window_seq": hdr.seq}
            try:
                w = open_window(blob, keys, self.guard)
            except WindowRejected as e:
                return self._reject(hdr.device, e.reason, str(e), hdr.seq)
            t = time.perf_counter()
            try:
                verdict = we.classify(w)
            except VeilcamError as e:  # e.g. GPU worker unreachable: the window is lost, counted
                self._save_counters()
                return self._reject(w.device, "eval_error", f"{type(e).__name__}: {e}", w.seq)
            except (ValueError, RuntimeError, IndexError) as e:  # authentic, but not what the model takes
                self._save_counters()
                return self._reject(
                    w.device,
                    "malformed",
                    f"window {tuple(w.data.shape)} does not fit the model ({type(e).__name__})",
                    w.seq,
                )
            dt = time.perf_counter() - t
            self.stats_counters["windows_ok"] += 1
            self.stats_counters["eval_s_total"] += dt
            self.stats_counters["eval_s_last"] = dt
            rules = self.policy.rules_for(w.device) or dev.rules
            alerts = we.alerts(
                w,
                verdict,
                rules,
                self._next_alert_seq,
                self.policy.recipients,
                self.identity.sign,
                self.identity.kid,
            )
            self.stats_counters["alerts"] += len(alerts)
            # window seq, alert seq and this result are persisted (sealed) together before the reply
            # leaves: after a crash before this point nothing was consumed or sent, so the caller's
            # retry is simply evaluated again; after it, the retry gets this very reply
            self._last_result[w.device] = (w.seq, digest, alerts)
            self._save_counters()
        return {"status": "ok", "reason": None, "alerts": alerts, "window_seq": w.seq}

    def _next_alert_seq(self, device: str) -> int:
        """Next alert number of `device`; persisted by h_submit before the alert leaves."""
        seq = self.alert_seq.get(device, 0) + 1
        self.alert_seq[device] = seq
        return seq

    def h_provision_model(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        session, nonce = require_session(conn)
        package, wrapped, sig = req["package"], req["wrapped"], req["sig"]
        if not isinstance(package, bytes) or not isinstance(sig, bytes):
            raise IntegrityError("provision_model: malformed request")
        signed = provision_model_message(nonce, package, wrapped)
        verify_ed25519(self.mo_pub, sig, signed, "provision_model (model owner)")
        raw = unwrap_secret(session.exchange, session.public, wrapped, MODEL_KEY_INFO, nonce)
        from enclave_bridge.measured.model_package import package_kid

        key = ModelKey(raw, package_kid(package))
        self._install_model(package, key)
        (self.state_dir / "model.pkg").write_bytes(package)
        self.store.put("model_key", msgpack.packb({"kid": key.kid, "secret": raw}, use_bin_type=True))
        conn.session = conn.session_nonce = None  # one provisioning per attestation
        n = len(self.window_eval.labels) if self.window_eval is not None else 0
        log.info("model %s provisioned (%d classes) and sealed", key.kid, n)
        return {"model_kid": key.kid, "num_class": n}

    def h_set_policy(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        from enclave_bridge.shared.policy import verify_policy

        raw = req["policy"]
        doc = json.loads(raw) if isinstance(raw, str | bytes) else raw
        policy = verify_policy(doc, self.do_pub, self.mo_pub)
        with self._lock:
            if self.policy is not None and policy.version < self.policy.version:
                raise IntegrityError(
                    f"policy version {policy.version} is older than current {self.policy.version}"
                )
            self.store.put("policy", json.dumps(doc, sort_keys=True).encode())
            self.policy = policy
        log.info("access policy v%d set (%d recipients)", policy.version, len(policy.recipients))
        return {"version": policy.version, "digest": policy.digest}

    def h_status(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        return {
            "backend": self.backend.name,
            "insecure": bool(getattr(self.backend, "insecure", False)),
            "measurement": self.measurement,
            "signing_kid": self.identity.kid,
            "model_kid": self.model_kid,
            "policy_version": None if self.policy is None else self.policy.version,
            "data_kids": sorted(self._active_keys()),
            "mode": self.mode,
            "devices": sorted(self.devices),
        }

    def h_stats(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        s = dict(self.stats_counters)
        s["windows_rejected"] = dict(s["windows_rejected"])
        we = self.window_eval
        s["alerts_suppressed"] = we.engine.suppressed if we is not None else 0
        ev_stats = getattr(we.evaluator if we is not None else None, "stats", None)
        as_dict = getattr(ev_stats, "as_dict", None)
        if callable(as_dict):  # SecureEvaluator counters: Freivalds, pool, bytes, per-part timings
            s["evaluator"] = {
                k: (dict(v) if isinstance(v, Mapping) else v)
                for k, v in as_dict().items()
                if isinstance(v, int | float | str | Mapping)
            }
        return {"stats": s}


def provision_model_message(nonce: bytes, package: bytes, wrapped: Mapping[str, Any]) -> bytes:
    """What the model owner signs: the attestation nonce, the package digest and the wrapped key."""
    return (
        PROVISION_MODEL_DOMAIN
        + nonce
        + hashlib.sha256(package).digest()
        + msgpack.packb([wrapped["epk"], wrapped["nonce"], wrapped["ct"]], use_bin_type=True)
    )


def fetch_keys_from_key_enclave(
    address: str,
    backend: EnclaveBackend,
    identity: EnclaveIdentity,
    allowed_key_measurements: list[str] | None,
    platform_pub: bytes | None,
) -> dict[str, tuple[DataKey, float | None]]:
    """Mutual local attestation with the key enclave, then receive the wrapped keyring.

    1. we challenge the key enclave (`evidence`, kind report) and verify: same platform, role "key",
       measurement pin if configured; 2. it challenges us (`challenge`), we answer with our report;
    3. it wraps the keyring to our session key and signs it with the key bound in its evidence.
    """
    if platform_pub is None:
        raise AttestationError("local attestation needs the platform key")
    sock = connect(address, timeout_s=10.0)
    with contextlib.closing(sock):

        def call(op: str, **kw: Any) -> dict[str, Any]:
            send_frame(sock, {"op": op, "id": 0, **kw})
            rep = recv_frame(sock, 16 * 1024 * 1024)
            if not isinstance(rep, dict) or not rep.get("ok"):
                msg = rep.get("message") if isinstance(rep, dict) else "malformed reply"
                raise error_class(rep.get("error", "") if isinstance(rep, dict) else "")(
                    f"key enclave: {msg}"
                )
            return rep

        my_nonce = new_nonce()
        ev = call("evidence", nonce=my_nonce, kind="report")["evidence"]
        ke = Verifier(platform_pub, allowed_key_measurements, role="key", kind="report").verify(ev, my_nonce)
        challenge = call("challenge")["nonce"]
        session = SessionKey()
        mine = make_evidence(backend, "eval", challenge, session, identity.public, kind="report")
        rep = call("get_data_keys", evidence=mine)
        wrapped, sig = rep["wrapped"], rep["sig"]
        verify_ed25519(
            ke.sign_pub,
            sig,
            DATA_KEYS_SIG_DOMAIN + challenge + msgpack.packb(wrapped, use_bin_type=True),
            "key enclave reply",
        )
        ring = msgpack.unpackb(
            unwrap_secret(session.exchange, session.public, wrapped, DATA_KEYS_INFO, challenge), raw=False
        )
    out: dict[str, tuple[DataKey, float | None]] = {}
    for entry in ring:
        out[entry["kid"]] = (DataKey(entry["secret"], entry["kid"]), entry.get("retire_at"))
    return out


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


def run_enclave(
    config_path: str,
    state_dir: str,
    listen_addr: str,
    platform_key: str | None,
    policy_path: str | None = None,
) -> int:
    """Entry point of `veilcam enclave`."""
    cfg = load_enclave_config(config_path, "eval")
    # bind first: a second instance on a live socket must refuse before it touches the sealed state
    sock = listen(listen_addr)
    try:
        backend = make_backend(cfg, platform_key, "eval")
        enclave = open_state(lambda: EvaluationEnclave(cfg, backend, state_dir), backend, state_dir)
        if policy_path:
            from enclave_bridge.shared.policy import load_policy_doc

            enclave.h_set_policy(Connection("cli"), {"policy": load_policy_doc(policy_path)})
        try:
            enclave.fetch_data_keys()
        except VeilcamError as e:
            log.warning("data keys not available yet (%s); will retry when a window arrives", e)
    except BaseException:
        unlink_socket(sock)
        sock.close()
        raise
    log.info(
        "evaluation enclave ready: backend %s, measurement %s, signing key %s, mode %s",
        backend.name,
        enclave.measurement,
        enclave.identity.kid,
        enclave.mode,
    )
    server = RequestServer("enclave", enclave.handlers())
    install_signal_handlers(server)
    server.serve(listen_addr, sock=sock)
    return 0


__all__ = [
    "EvaluationEnclave",
    "RequestServer",
    "error_class",
    "fetch_keys_from_key_enclave",
    "load_enclave_config",
    "make_backend",
    "make_evaluator",
    "provision_model_message",
    "run_enclave",
    "validate_enclave_config",
]


def main(argv: list[str] | None = None) -> int:
    """`python -m enclave_bridge.measured.enclave --role eval|key ...`: the entry point inside Gramine, where
    only the measured `enclave_bridge` package is present (no `pipeline`)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m enclave_bridge.measured.enclave")
    p.add_argument("--role", choices=("eval", "key"), required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--platform-key")
    p.add_argument("--policy")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.role == "key":
            from enclave_bridge.measured.keyenclave import run_key_enclave

            return run_key_enclave(args.config, args.state_dir, args.listen, args.platform_key)
        return run_enclave(args.config, args.state_dir, args.listen, args.platform_key, args.policy)
    except VeilcamError as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
