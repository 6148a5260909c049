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

Why one module of ~580 lines: `EvaluationEnclave` is one state machine (model, policy, data keys,
replay counters, per-device alert numbers) whose handlers share one lock and one sealed-state write;
the request server, config and window evaluation are already their own modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from enclave_bridge.measured.enclave_config import load_enclave_config, make_backend, validate_enclave_config
from enclave_bridge.measured.keyenclave import DATA_KEYS_INFO, DATA_KEYS_SIG_DOMAIN
from enclave_bridge.measured.model_inputs import input_transform_of
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
from enclave_bridge.measured.window_eval import TorchEvaluator, WindowEvaluator
from enclave_bridge.shared.attest import (
    EnclaveBackend,
    SessionKey,
    Verifier,
    make_evidence,
    new_nonce,
    unwrap_secret,
)
from enclave_bridge.shared.errors import (
    AttestationError,
    EnclaveError,
    IntegrityError,
    VeilcamError,
)
from enclave_bridge.shared.keys import DataKey, ModelKey, b64d, verify_ed25519
from enclave_bridge.shared.rpc import (
    MODEL_KEY_INFO,
    HelloReply,
    HelloRequest,
    SubmitRequest,
    SubmitResult,
    error_class,
    provision_model_message,
)
from enclave_bridge.shared.sealing import SealedStore, Sealer
from enclave_bridge.shared.wire import (
    connect,
    listen,
    recv_frame,
    send_frame,
    unlink_socket,
)

log = logging.getLogger(__name__)

KEY_REFRESH_S = 60.0
KEY_FETCH_MIN_GAP_S = 1.0  # rate limit on key-enclave fetches (see _refresh_keys)
DEFAULT_BATCH_MAX = 4


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
        # windows of several cameras queued at once are evaluated in one pass; not in paper mode,
        # whose precompute pool holds masks for one window at a time
        self.batch_max = int(ev.get("batch_max") or (1 if self.mode == "paper" else DEFAULT_BATCH_MAX))
        self.topk = int(cfg.get("topk", 5))
        self._lock = threading.RLock()  # guards model/evaluator/keys/counters
        self._fetch_lock = threading.Lock()  # one key-enclave fetch at a time
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
        self._device_locks: dict[str, threading.Lock] = {}
        self._inflight: dict[str, int | None] = {}  # device → seq accepted before its window in flight
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
        replay = self.guard.state()
        for device, prev in self._inflight.items():  # windows still being evaluated: not consumed yet
            if prev is None:
                replay.pop(device, None)
            else:
                replay[device] = prev
        doc = {"replay": replay, "alert_seq": self.alert_seq, "last_result": last}
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
        new = WindowEvaluator(
            evaluator, bundle.labels, input_transform_of(bundle.meta), self.topk, self.batch_max
        )
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

    def _refresh_keys(self, kid: str) -> dict[str, DataKey]:
        """Fetch the keyring again, at most once per KEY_FETCH_MIN_GAP_S.

        Why wait rather than reject: a window sealed under a key rotated in a moment ago must
        not be lost, and a host naming bogus kids must not flood the key enclave; so a caller
        inside the gap waits for it, and concurrent callers share one fetch."""
        with self._fetch_lock:
            keys = self._active_keys()
            since = time.monotonic() - self._last_key_fetch
            if kid in keys and since <= KEY_REFRESH_S:
                return keys  # another caller fetched while this one waited for the lock
            if since < KEY_FETCH_MIN_GAP_S:
                time.sleep(KEY_FETCH_MIN_GAP_S - since)
            try:
                self.fetch_data_keys()
            except VeilcamError as e:
                log.warning("cannot refresh data keys: %s", e)
            return self._active_keys()

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

        hello = HelloRequest.from_wire(req)
        device, rules = hello.device, hello.rules
        parsed = AlertRules.from_dict(rules, f"cameras.{device}.rules") if rules else None
        with self._lock:
            self.devices[device] = _Device(parsed)
        policy_rules = self.policy is not None and self.policy.rules_for(device) is not None
        log.info(
            "camera %s registered (rules from %s)", device, "policy" if policy_rules else "camera config"
        )
        return HelloReply(device, "policy" if policy_rules else "hello", self.identity.kid).to_wire()

    def _reject(self, device: str, reason: str, message: str, seq: int) -> dict[str, Any]:
        rej = self.stats_counters["windows_rejected"]
        rej[reason] = rej.get(reason, 0) + 1
        n = self._reject_logged.get((device, reason), 0) + 1
        self._reject_logged[(device, reason)] = n
        if n == 1 or n % 100 == 0:
            log.warning("window rejected (%s, %d so far for %s): %s", reason, n, device, message)
        return SubmitResult("rejected", reason, [], seq).to_wire()

    def h_submit(self, conn: Connection, req: dict[str, Any]) -> dict[str, Any]:
        from enclave_bridge.shared.windows import WindowRejected, parse_header

        sub = SubmitRequest.from_wire(req)
        blob = sub.blob
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
        # unknown kid: maybe just rotated; otherwise refresh periodically so a rotation's grace
        # period ends even if the capture host keeps using the old key
        if hdr.kid not in keys or time.monotonic() - self._last_key_fetch > KEY_REFRESH_S:
            keys = self._refresh_keys(hdr.kid)
        digest = hashlib.sha256(blob).hexdigest()
        # One device's windows run one at a time (rule order, replay state); different devices'
        # windows are evaluated concurrently, so the batcher can stack those that queue up.
        with self._device_lock(hdr.device):
            return self._submit_locked(sub, hdr, digest, keys, dev, we)

    def _device_lock(self, device: str) -> threading.Lock:
        with self._lock:
            return self._device_locks.setdefault(device, threading.Lock())

    def _submit_locked(
        self,
        sub: SubmitRequest,
        hdr: Any,
        digest: str,
        keys: dict[str, DataKey],
        dev: _Device,
        we: WindowEvaluator,
    ) -> dict[str, Any]:
        from enclave_bridge.shared.windows import WindowRejected, open_window

        with self._lock:
            last = self._last_result.get(hdr.device)
            if sub.resend and last is not None and last[0] == hdr.seq and last[1] == digest:
                # the caller lost our reply to exactly the window accepted last (authenticated then)
                self.stats_counters["windows_retried"] += 1
                log.info("window %s/%d resubmitted: returning its earlier result", hdr.device, hdr.seq)
                return SubmitResult("ok", None, list(last[2]), hdr.seq).to_wire()
            prev = self.guard.last(hdr.device)
            try:
                w = open_window(sub.blob, keys, self.guard)
            except WindowRejected as e:
                return self._reject(hdr.device, e.reason, str(e), hdr.seq)
            # until its result is sealed, a crash must leave this window acceptable again: the
            # persisted replay state keeps the device's previous seq while it is being evaluated
            self._inflight[w.device] = prev
        t = time.perf_counter()
        try:
            verdict = we.classify(w)  # outside the lock: other devices' windows may join the batch
        except VeilcamError as e:  # e.g. GPU worker unreachable: the window is lost, counted
            with self._lock:
                self._inflight.pop(w.device, None)
                self._save_counters()
                return self._reject(w.device, "eval_error", f"{type(e).__name__}: {e}", w.seq)
        except (ValueError, RuntimeError, IndexError) as e:  # authentic, but not what the model takes
            with self._lock:
                self._inflight.pop(w.device, None)
                self._save_counters()
                return self._reject(
                    w.device,
                    "malformed",
                    f"window {tuple(w.data.shape)} does not fit the model ({type(e).__name__})",
                    w.seq,
                )
        dt = time.perf_counter() - t
        with self._lock:
            self._inflight.pop(w.device, None)
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
        return SubmitResult("ok", None, alerts, w.seq).to_wire()

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
        if we is not None and we.batcher is not None:
            b = we.batcher.stats
            s["batches"] = {
                "count": b.batches,
                "windows": b.windows,
                "largest": b.largest,
                "sizes": {str(k): v for k, v in b.sizes.items()},
            }
        ev_stats = getattr(we.evaluator if we is not None else None, "stats", None)
        as_dict = getattr(ev_stats, "as_dict", None)
        if callable(as_dict):  # SecureEvaluator counters: Freivalds, pool, bytes, per-part timings
            s["evaluator"] = {
                k: (dict(v) if isinstance(v, Mapping) else v)
                for k, v in as_dict().items()
                if isinstance(v, int | float | str | Mapping)
            }
        return {"stats": s}


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
