"""Alert consumer (`veilcam subscribe`): MQTT in, verified + decrypted alerts out (docs/ARCHITECTURE.md §7).

Every message on `<prefix>/<device>/alerts` is opened with `enclave_bridge.measured.alerts.AlertOpener`
(enclave signature, this consumer's wrapped field keys, AES-GCM per field) *before* anything else
looks at it, so a forged message can neither print nor poison the duplicate filter. Then:
- the envelope's device must match the topic's device (a genuine alert of camera A re-published
  on camera B's topic is a replay, rejected and counted);
- delivery is at least once (the camera's outbox re-sends after reconnects and restarts), so
  byte-identical copies of an already seen `(device, seq)` are dropped as duplicates; a different
  envelope claiming a seen `(device, seq)` is counted as a replay. With `state_path` the seen set
  survives consumer restarts (SQLite).
- without that state, a consumer cannot tell an old genuine alert re-published by anyone from a new
  one, so `max_age_s` (CLI default 5 min when no `--state`) rejects alerts whose enclave timestamp
  `ts` is further than that from now (counted as `rejected_stale`).

Why one module of ~440 lines: the consumer's receive → verify → decrypt → de-duplicate → print path
is one loop over one MQTT session.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from config.broker import BrokerConfig
from enclave_bridge.host.alert_opener import AlertOpener, NoGrantError
from enclave_bridge.shared.errors import (
    AttestationError,
    ConfigError,
    IntegrityError,
    StageError,
    TransportError,
)

log = logging.getLogger(__name__)


@dataclass
class SubscriberStats:
    """Counters a consumer reports (`--json` prints them at the end)."""

    received: int = 0
    delivered: int = 0
    duplicates: int = 0
    rejected_forged: int = 0
    rejected_replayed: int = 0
    rejected_no_grant: int = 0  # genuine alerts the policy grants this consumer nothing of
    rejected_stale: int = 0  # genuine alerts older (or newer) than the freshness window


class SeenSet:
    """`(device, seq) → sha256(envelope)` of delivered alerts; optionally persisted in SQLite.

    Memory is bounded: beyond `max_entries` the oldest entries are forgotten and their device's
    floor is raised, so any `seq` at or below a device's floor still counts as a duplicate (alert
    numbers are strictly increasing per device).
    """

    def __init__(self, path: Path | None = None, max_entries: int = 100_000) -> None:
        self._mem: dict[tuple[str, int], bytes] = {}
        self._floor: dict[str, int] = {}
        self._max = max(1, max_entries)
        self._db: sqlite3.Connection | None = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS seen (device TEXT NOT NULL, seq INTEGER NOT NULL, "
                    "digest BLOB NOT NULL, PRIMARY KEY (device, seq))"
                )
            except (OSError, sqlite3.Error) as e:
                raise StageError(f"subscriber state {path}: {e}") from e

    def check_and_add(self, device: str, seq: int, digest: bytes) -> str:
        """'new', 'duplicate' (same bytes seen) or 'conflict' (same seq, other bytes)."""
        key = (device, seq)
        old = self._mem.get(key)
        if old is None and self._db is not None:
            row = self._db.execute("SELECT digest FROM seen WHERE device = ? AND seq = ?", key).fetchone()
            old = bytes(row[0]) if row else None
        if old is not None:
            return "duplicate" if old == digest else "conflict"
        if seq <= self._floor.get(device, -1):
            return "duplicate"  # older than anything still remembered in memory
        self._mem[key] = digest
        while len(self._mem) > self._max:
            (dev, old_seq), _ = next(iter(self._mem.items()))
            del self._mem[(dev, old_seq)]
            self._floor[dev] = max(self._floor.get(dev, -1), old_seq)
        if self._db is not None:
            self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", (device, seq, digest))
        return "new"

    def close(self) -> None:
        if self._db is not None:
            self._db.close()


class PoolOpener:
    """`AlertOpener` for an enclave pool: alerts signed by any of several verified enclave keys
    open, each with the key its envelope names (`kid`); any other signer is rejected as forged."""

    def __init__(self, consumer_key: Any, verify_keys: list[bytes]) -> None:
        from enclave_bridge.host.alert_opener import AlertOpener

        self._by_kid = {}
        for vk in verify_keys:
            op = AlertOpener(consumer_key, vk)
            self._by_kid[op.kid] = op

    def open(self, payload: bytes) -> dict[str, Any]:
        try:
            env = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except (ValueError, msgpack.exceptions.UnpackException) as e:
            raise IntegrityError(f"malformed alert envelope: {type(e).__name__}") from e
        kid = env.get("kid") if isinstance(env, dict) else None
        op = self._by_kid.get(kid) if isinstance(kid, str) else None
        if op is None:
            raise IntegrityError(f"alert signed by enclave key {kid!r}, not one of the pool's verified keys")
        # an alert's `seq` counts per device *and enclave* (a device moved to another pool enclave
        # starts at that enclave's number): the subscriber scopes its duplicate filter with this
        return {**op.open(payload), "enclave_kid": kid}


class AlertSubscriber:
    """Subscribes to `<prefix>/<device>/alerts` (device `+` = all) and calls `on_alert(alert)` once
    per verified, decrypted, de-duplicated alert. `alert` is `{device, seq, ts, <granted fields>}`.

    `client_id` + `persistent=True` gives the consumer a broker session (QoS 1 messages published
    while it is away are queued for it by a broker with persistence).

    `share_group` joins an MQTT 5 shared subscription `$share/<group>/<prefix>/<device>/alerts`:
    the broker hands each alert to one member of the group, so N consumer processes split the
    stream (the connection then speaks MQTT 5; the embedded 3.1.1 demo broker cannot share).
    Each member verifies and de-duplicates what it receives; a redelivery after a member dropped
    may reach another member, so give members one `state_path` per member and treat delivery as
    at least once across the group (docs/SCALE_OUT.md).
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        opener: AlertOpener,
        on_alert: Callable[[dict[str, Any]], None],
        *,
        device: str = "+",
        state_path: Path | None = None,
        client_id: str = "",
        persistent: bool = False,
        max_age_s: float | None = None,
        share_group: str | None = None,
    ) -> None:
        if persistent and not client_id:
            raise ConfigError("a persistent subscription needs a fixed --client-id")
        if share_group is not None and (not share_group or any(ch in share_group for ch in "/+#")):
            raise ConfigError(f"--share {share_group!r}: a group name is non-empty, without '/', '+' or '#'")
        self.cfg = cfg
        self.opener = opener
        self.on_alert = on_alert
        self.share_group = share_group
        self.persistent = persistent
        self.topic = cfg.topic(device, "alerts")
        if share_group is not None:
            self.topic = f"$share/{share_group}/{self.topic}"
        self.stats = SubscriberStats()
        self.seen = SeenSet(state_path)
        self.max_age_s = max_age_s
        self.subscribed = threading.Event()
        # Set when a connection attempt fails (refused, unreachable, bad credentials): a caller that
        # is not asked to wait can stop at once instead of retrying silently.
        self.connect_failed = threading.Event()
        self.connect_error = ""
        # Set on the first genuine alert that grants this key nothing (see `NoGrantError`).
        self.no_grant = threading.Event()
        self._lock = threading.Lock()
        if share_group is not None:  # shared subscriptions are MQTT 5 (clean_start at connect)
            self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            self._client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=mqtt.MQTTv311,  # works with every broker, incl. the embedded demo broker
                clean_session=not persistent,
            )
        self._client.reconnect_delay_set(cfg.reconnect_min_delay_s, cfg.reconnect_max_delay_s)  # type: ignore[arg-type]
        if cfg.username is not None:
            pw = cfg.password()
            self._client.username_pw_set(cfg.username, pw.get_secret_value() if pw else None)
        if cfg.tls is not None:
            self._client.tls_set(
                ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
                certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
            )
            self._client.tls_insecure_set(cfg.tls.insecure)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self.share_group is None:
            self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        else:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = None
            if self.persistent:  # MQTT 5: the session outlives the connection only when asked to
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = 7 * 24 * 3600
            self._client.connect_async(
                self.cfg.host,
                self.cfg.port,
                keepalive=self.cfg.keepalive_s,
                clean_start=not self.persistent,
                properties=props,
            )
        self._client.loop_start()

    def stop(self) -> None:
        if self._client.is_connected():
            self._client.disconnect()
        self._client.loop_stop()
        self.seen.close()

    # -- callbacks (paho network thread) -------------------------------------------------------------
    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            log.warning("broker %s:%d refused the subscriber: %s", self.cfg.host, self.cfg.port, rc)
            self.connect_error = f"the broker refused the connection: {rc}"
            self.connect_failed.set()
            return
        c.subscribe(self.topic, qos=1)

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        self.connect_error = "cannot connect (nothing listening, or unreachable)"
        self.connect_failed.set()

    def _on_subscribe(self, *a: Any) -> None:
        codes = a[3] if len(a) > 3 and isinstance(a[3], list) else []
        refused = [rc for rc in codes if getattr(rc, "is_failure", False)]
        if refused:  # e.g. a broker without shared subscriptions (0x9E)
            log.error(
                "broker %s:%d refused the subscription to %s: %s",
                self.cfg.host,
                self.cfg.port,
                self.topic,
                refused[0],
            )
            self.connect_error = f"the broker refused the subscription to {self.topic}: {refused[0]}"
            self.connect_failed.set()
            return
        log.info("subscribed to %s on %s:%d", self.topic, self.cfg.host, self.cfg.port)
        self.subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        alert = self.handle(msg.topic, bytes(msg.payload))
        if alert is not None:
            try:
                self.on_alert(alert)
            except Exception:  # a consumer callback must not stop the network loop
                log.exception("alert handler failed")

    # -- the consumer's checks (callable directly: tests, other transports) ----------------------------
    def handle(self, topic: str, payload: bytes) -> dict[str, Any] | None:
        """Verify, decrypt and de-duplicate one message; None when it is dropped (counted)."""
        with self._lock:
            self.stats.received += 1
            parts = topic.split("/")
            topic_device = parts[-2] if len(parts) >= 2 else ""
            try:
                alert = self.opener.open(payload)
            except NoGrantError:
                self.stats.rejected_no_grant += 1
                if not self.no_grant.is_set():
                    log.error("alert on %s is genuine but this key has no grant in the policy", topic)
                self.no_grant.set()
                return None
            except IntegrityError as e:
                self.stats.rejected_forged += 1
                log.warning("rejected alert on %s (%d bytes): %s", topic, len(payload), e)
                return None
            device, seq = str(alert["device"]), int(alert["seq"])
            if device != topic_device:
                self.stats.rejected_replayed += 1
                log.warning("rejected alert %s/%d published on %s (device mismatch)", device, seq, topic)
                return None
            age = time.time() - float(alert["ts"])
            if self.max_age_s is not None and not abs(age) <= self.max_age_s:  # NaN ts is stale too
                self.stats.rejected_stale += 1
                log.warning(
                    "rejected alert %s/%d: %.0f s old, outside the %.0f s freshness window",
                    device,
                    seq,
                    age,
                    self.max_age_s,
                )
                return None
            scope = f"{device}@{alert['enclave_kid']}" if "enclave_kid" in alert else device
            verdict = self.seen.check_and_add(scope, seq, hashlib.sha256(payload).digest())
            if verdict == "duplicate":
                self.stats.duplicates += 1
                log.debug("duplicate alert %s/%d dropped", device, seq)
                return None
            if verdict == "conflict":
                self.stats.rejected_replayed += 1
                log.warning("rejected alert %s/%d: another envelope with this seq was seen", device, seq)
                return None
            self.stats.delivered += 1
            return alert


# -- key material for the opener -----------------------------------------------------------------
def verify_key_from_evidence(
    evidence: bytes | Mapping[str, Any],
    platform_pub: bytes,
    allowed_measurements: list[str] | None,
    max_age_s: float | None = None,
) -> bytes:
    """The alert-signing key from attestation evidence (`veilcam attest --evidence-out` file or the
    retained `<prefix>/<device>/enclave` message), after checking quote, measurement and binding.

    Freshness: a file written by `veilcam attest` answered that command's nonce; `max_age_s=None`
    trusts that check. Evidence read from the broker should pass a `max_age_s`.
    """
    from enclave_bridge.shared.attest import Verifier

    if isinstance(evidence, bytes | bytearray):
        try:
            ev = msgpack.unpackb(evidence, raw=False)
        except (ValueError, msgpack.exceptions.UnpackException) as e:
            raise AttestationError(f"enclave evidence is not msgpack: {type(e).__name__}") from e
    else:
        ev = dict(evidence)
    if not isinstance(ev, dict):
        raise AttestationError("enclave evidence is not a map")
    verifier = Verifier(
        platform_pub,
        allowed_measurements,
        role="eval",
        max_age_s=float("inf") if max_age_s is None else max_age_s,
    )
    return verifier.verify(ev, None).sign_pub


def fetch_retained(cfg: BrokerConfig, topic: str, timeout_s: float = 10.0) -> tuple[str, bytes]:
    """The retained message on `topic` (wildcards allowed: the first one that arrives), e.g. the
    enclave evidence the daemon keeps on `<prefix>/<device>/enclave`."""
    got: list[tuple[str, bytes]] = []
    ready = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if cfg.username is not None:
        pw = cfg.password()
        client.username_pw_set(cfg.username, pw.get_secret_value() if pw else None)
    if cfg.tls is not None:
        client.tls_set(
            ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
            certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
            keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
        )
        client.tls_insecure_set(cfg.tls.insecure)

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        if not rc.is_failure:
            c.subscribe(topic, qos=1)

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.retain and not got:
            got.append((msg.topic, bytes(msg.payload)))
            ready.set()

    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
    except OSError as e:
        raise TransportError(f"broker {cfg.host}:{cfg.port}: {e}") from e
    client.loop_start()
    try:
        if not ready.wait(timeout_s):
            raise TransportError(f"no retained message on {topic} within {timeout_s:.0f} s")
    finally:
        if client.is_connected():
            client.disconnect()
        client.loop_stop()
    return got[0]


def format_alert(alert: Mapping[str, Any]) -> str:
    """One human-readable line; only the fields this consumer was granted appear."""
    ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(alert.get("ts", 0.0))))
    parts = [f"{ts}  {alert.get('device')} #{alert.get('seq')}"]
    if "label" in alert:
        score = alert.get("score")
        parts.append(f"{alert['label']}" + (f" {float(score):.2f}" if isinstance(score, int | float) else ""))
    if "track_id" in alert:
        parts.append(f"track {alert['track_id']}")
    if "t0" in alert and "t1" in alert:
        parts.append(f"t {float(alert['t0']):.1f}-{float(alert['t1']):.1f} s")
    if "window_seq" in alert:
        parts.append(f"window {alert['window_seq']}")
    if isinstance(alert.get("topk"), list) and alert["topk"]:
        top = ", ".join(
            f"{k[0]} {float(k[1]):.2f}" if isinstance(k, list | tuple) and len(k) == 2 else str(k)
            for k in alert["topk"][:3]
        )
        parts.append(f"[{top}]")
    return "  ".join(parts)


def alert_json(alert: Mapping[str, Any]) -> str:
    return json.dumps(
        dict(alert), sort_keys=True, default=lambda o: o.hex() if isinstance(o, bytes) else str(o)
    )


def stats_json(stats: SubscriberStats) -> str:
    return json.dumps({"subscriber_stats": asdict(stats)}, sort_keys=True)


__all__ = [
    "AlertSubscriber",
    "SeenSet",
    "SubscriberStats",
    "alert_json",
    "fetch_retained",
    "format_alert",
    "stats_json",
    "verify_key_from_evidence",
]
