"""MQTT publishing of encrypted alerts from the durable outbox (docs/ARCHITECTURE.md §7), paho-mqtt 2.x.

Delivery contract: at least once, in order, per device. The daemon commits every alert to the
SQLite outbox first (`pipeline.outbox`); this publisher sends outbox rows with QoS 1 and deletes a
row only when its PUBACK arrives. paho keeps in-flight QoS 1 messages in memory and re-sends them
itself after a reconnect (same client, same order); after a restart of the daemon (or a protocol
downgrade, which needs a new client) nothing is in memory, so every row still in the outbox is sent
again from the start, in order. Consumers drop the resulting duplicates by `(device, seq)`.

Topics (`<prefix>` = `veilcam` by default):
- `<prefix>/<device>/available` retained `online`/`offline` (LWT `offline` when the link dies);
- `<prefix>/<device>/alerts` QoS 1, the enclave's msgpack envelope, opaque here;
- `<prefix>/<device>/enclave` retained msgpack attestation evidence of the alert-signing key;
- `<prefix>/<device>/stats` QoS 0 JSON health numbers.

Threads: paho's network thread only runs callbacks that set flags / enqueue acks; one feeder
thread owns the mid→outbox-row map, talks to SQLite and feeds new rows while `max_inflight` allows.
(paho calls `on_publish` while holding its own lock, so doing outbox work there could deadlock
with a `publish()` from another thread.)

Why one module of ~540 lines: `AlertPublisher` is one MQTT session state machine (connect, LWT,
evidence, in-order publish from the outbox, PUBACK bookkeeping, reconnect); its parts share the
session lock.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from config.broker import BrokerConfig
from enclave_bridge.shared.errors import ConfigError, StageError, TransportError
from pipeline.outbox import Outbox

log = logging.getLogger(__name__)

# CONNACK reason "Unsupported protocol version" (MQTT 5: 0x84; MQTT 3.1.1 return code 1).
_UNSUPPORTED_PROTOCOL = (0x84, 1)
EvidenceProvider = Callable[[str], Mapping[str, Any] | bytes | None]


class _PahoNoise(logging.Filter):
    """paho 2.2 logs "Client is not connected" at ERROR once after every clean disconnect."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_paho_log = logging.getLogger(f"{__name__}.paho")
_paho_log.addFilter(_PahoNoise())


@dataclass(frozen=True, slots=True)
class _Ack:
    gen: int
    mid: int
    ok: bool
    reason: str


class AlertPublisher:
    """Publishes outbox rows for `devices` to one broker; `start()` / `stop()` around the daemon.

    A broker that is down (at start or later) is not an error: the outbox grows (see
    `outbox_depth` in /metrics), paho reconnects with exponential backoff between
    `reconnect_min_delay_s` and `reconnect_max_delay_s`, and the backlog is sent in order when the
    broker is back. Bad credentials or TLS errors are logged on every attempt and keep retrying
    too: alerts are never discarded here.
    """

    def __init__(
        self,
        cfg: BrokerConfig,
        outbox: Outbox,
        devices: Sequence[str],
        *,
        evidence_provider: EvidenceProvider | None = None,
        evidence_refresh_s: float = 60.0,
    ) -> None:
        if not devices:
            raise ConfigError("broker: the alert publisher needs at least one device")
        self.cfg = cfg
        self.outbox = outbox
        self.devices = list(dict.fromkeys(devices))
        self.client_id = cfg.client_id or f"veilcam-{self.devices[0]}"
        self._password = cfg.password()
        self._evidence_provider = evidence_provider
        self._evidence_refresh_s = evidence_refresh_s
        self._evidence: dict[str, bytes] = {}
        self.protocol = "3.1.1" if cfg.protocol == "3.1.1" else "5"
        self._gen = 0
        self._clients: list[tuple[mqtt.Client, str]] = []  # (client, device of its LWT)
        self._connected: dict[str, threading.Event] = {d: threading.Event() for d in self.devices}
        self._acks: queue.SimpleQueue[_Ack] = queue.SimpleQueue()
        self._inflight: dict[int, int] = {}  # mid -> outbox oid; feeder thread only
        self._last_fed = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._idle = threading.Event()
        self._downgrade = threading.Event()
        self._republish = threading.Event()
        self._evidence_due = threading.Event()
        self._evidence_thread: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._attempt_at: float | None = None  # CONNECT sent, no CONNACK/failure yet
        self._lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "published",
                "acked",
                "refused",
                "connects",
                "disconnects",
                "connect_failures",
                "stats_published",
                "stats_skipped",
                "evidence_published",
                "ack_errors",
            ),
            0,
        )

    # -- public API --------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """The alert connection is up (the broker accepted our CONNECT)."""
        return self._connected[self.devices[0]].is_set()

    def start(self) -> None:
        """Connect in the background and start feeding the outbox; returns immediately."""
        if self._thread is not None:
            return
        pending = self.outbox.depth()
        if pending:
            log.info("alert publisher: %d alert(s) from the outbox will be re-sent in order", pending)
        self._build_clients()
        self.outbox.add_listener(self._wake.set)
        self._thread = threading.Thread(target=self._feeder, name="mqtt-alerts", daemon=True)
        self._thread.start()
        if self._evidence_provider is not None:
            self._evidence_thread = threading.Thread(
                target=self._evidence_loop, name="mqtt-evidence", daemon=True
            )
            self._evidence_thread.start()

    def stop(self, flush_timeout_s: float | None = None) -> None:
        """Flush what the broker will still take (bounded by `flush_timeout_s`, default
        `cfg.flush_timeout_s`; a connection still being set up may complete meanwhile), publish
        `offline`, disconnect. Rows not acknowledged in time stay in the outbox for the next start.
        """
        if self._thread is None:
            return
        timeout_s = self.cfg.flush_timeout_s if flush_timeout_s is None else flush_timeout_s
        self.outbox.remove_listener(self._wake.set)
        if self.outbox.depth() > 0 and timeout_s > 0:
            self._idle.clear()
            self._draining.set()
            self._wake.set()
            if not self._idle.wait(timeout_s):
                log.warning(
                    "alert publisher: %d alert(s) not acknowledged within %.1f s (%s); kept in the outbox",
                    self.outbox.depth(),
                    timeout_s,
                    "connected" if self.connected else "broker unreachable",
                )
        self._stop.set()
        self._wake.set()
        self._evidence_due.set()
        self._thread.join(timeout=10)
        self._thread = None
        if self._evidence_thread is not None:
            self._evidence_thread.join(timeout=10)
            self._evidence_thread = None
        infos = []
        for client, device in self._clients:
            if self._connected[device].is_set():
                infos.append(
                    client.publish(
                        self.cfg.topic(device, "available"), b"offline", qos=self.cfg.qos, retain=True
                    )
                )
        deadline = time.monotonic() + 2.0
        for info in infos:
            try:
                info.wait_for_publish(max(0.01, deadline - time.monotonic()))
            except (RuntimeError, ValueError) as e:
                log.debug("offline message not confirmed: %s", e)
        self._close_clients()
        log.info("alert publisher stopped (%s)", self._counter_summary())

    def publish_stats(self, device: str, stats: str | Mapping[str, Any]) -> bool:
        """Send health JSON on `<prefix>/<device>/stats` (QoS 0); skipped (counted) while offline."""
        client = self._client_for(device)
        if client is None or not self._connected[device].is_set():
            self._count("stats_skipped")
            return False
        body = stats if isinstance(stats, str) else json.dumps(stats, sort_keys=True, separators=(",", ":"))
        info = client.publish(self.cfg.topic(device, "stats"), body.encode(), qos=0, retain=False)
        ok = info.rc == mqtt.MQTT_ERR_SUCCESS
        self._count("stats_published" if ok else "stats_skipped")
        return ok

    def publish_evidence(self, device: str, evidence: Mapping[str, Any] | bytes) -> None:
        """Retain the enclave's attestation evidence on `<prefix>/<device>/enclave` (again after
        every reconnect, since a broker restart without persistence forgets retained messages)."""
        blob = evidence if isinstance(evidence, bytes) else msgpack.packb(dict(evidence), use_bin_type=True)
        with self._lock:
            self._evidence[device] = blob
        self._republish.set()
        self._wake.set()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once the outbox is empty and nothing is in flight (tests, demo, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.outbox.depth() == 0:
                return True
            time.sleep(0.05)
        return self.outbox.depth() == 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self.counters)
        out.update(connected=self.connected, protocol=self.protocol, outbox_depth=self.outbox.depth())
        return out

    # -- clients -------------------------------------------------------------------------------------
    def _build_clients(self) -> None:
        """One client carries the alerts (and the first device's LWT); every further device gets a
        small availability-only client, because MQTT allows one will message per connection."""
        self._gen += 1
        gen = self._gen
        self._inflight.clear()
        self._last_fed = 0
        for ev in self._connected.values():
            ev.clear()
        self._clients = []
        for i, device in enumerate(self.devices):
            cid = self.client_id if i == 0 else f"{self.client_id}-{device}"
            client = self._new_client(cid, device, gen, carries_alerts=i == 0)
            self._clients.append((client, device))
        for client, _device in self._clients:
            client.connect_async(
                self.cfg.host,
                self.cfg.port,
                keepalive=self.cfg.keepalive_s,
                clean_start=True if self.protocol == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            )
            client.loop_start()
        log.info(
            "alert publisher: connecting to %s:%d (MQTT %s, client id %s)",
            self.cfg.host,
            self.cfg.port,
            self.protocol,
            self.client_id,
        )

    def _new_client(self, client_id: str, device: str, gen: int, carries_alerts: bool) -> mqtt.Client:
        v5 = self.protocol == "5"
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        client.enable_logger(_paho_log)
        client.max_inflight_messages_set(self.cfg.max_inflight + 8)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(self.cfg.reconnect_min_delay_s, self.cfg.reconnect_max_delay_s)  # type: ignore[arg-type]
        client.connect_timeout = self.cfg.connect_timeout_s
        client.will_set(self.cfg.topic(device, "available"), b"offline", qos=self.cfg.qos, retain=True)
        if self.cfg.username is not None:
            pw = self._password.get_secret_value() if self._password is not None else None
            client.username_pw_set(self.cfg.username, pw)
        if self.cfg.tls is not None:
            tls = self.cfg.tls
            try:
                client.tls_set(
                    ca_certs=str(tls.ca_file) if tls.ca_file else None,
                    certfile=str(tls.cert_file) if tls.cert_file else None,
                    keyfile=str(tls.key_file) if tls.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError, ValueError) as e:
                raise ConfigError(f"broker.tls: {e}") from e
            client.tls_insecure_set(tls.insecure)

        def on_connect(c: mqtt.Client, _u: Any, _flags: Any, rc: ReasonCode, _props: Any) -> None:
            if gen != self._gen:
                return
            if carries_alerts:
                self._attempt_at = None
            if rc.is_failure:
                self._count("connect_failures")
                if rc.value in _UNSUPPORTED_PROTOCOL and self.cfg.protocol == "auto" and self.protocol == "5":
                    log.warning(
                        "broker %s:%d refuses MQTT 5; falling back to 3.1.1", self.cfg.host, self.cfg.port
                    )
                    self._downgrade.set()
                    self._wake.set()
                else:
                    log.warning("broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, rc)
                return
            self._count("connects")
            self._connected[device].set()
            c.publish(self.cfg.topic(device, "available"), b"online", qos=self.cfg.qos, retain=True)
            log.info(
                "broker %s:%d connected (MQTT %s) for %s", self.cfg.host, self.cfg.port, self.protocol, device
            )
            if carries_alerts:
                self._republish.set()  # cached evidence again (a restarted broker may have lost it)
                self._evidence_due.set()  # and fresh evidence soon after
                self._wake.set()

        def on_disconnect(_c: mqtt.Client, _u: Any, _flags: Any, rc: ReasonCode, _props: Any) -> None:
            if gen != self._gen:
                return
            if carries_alerts:
                self._attempt_at = None
            if self._connected[device].is_set() and not self._closing:
                self._count("disconnects")
                log.warning(
                    "broker %s:%d connection lost (%s); reconnecting", self.cfg.host, self.cfg.port, rc
                )
            self._connected[device].clear()

        def on_pre_connect(_c: mqtt.Client, _u: Any) -> None:
            if gen == self._gen and carries_alerts:
                self._attempt_at = time.monotonic()

        def on_connect_fail(_c: mqtt.Client, _u: Any) -> None:
            if gen == self._gen:
                if carries_alerts:
                    self._attempt_at = None
                self._count("connect_failures")
                log.debug("broker %s:%d unreachable; retrying with backoff", self.cfg.host, self.cfg.port)

        client.on_pre_connect = on_pre_connect
        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_connect_fail = on_connect_fail
        if carries_alerts:

            def on_publish(_c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _props: Any) -> None:
                self._acks.put(_Ack(gen, mid, not rc.is_failure, str(rc)))
                self._wake.set()

            client.on_publish = on_publish
        return client

    def _close_clients(self) -> None:
        self._closing = True
        for client, _device in self._clients:
            try:
                if client.is_connected():
                    client.disconnect()
            except (OSError, ValueError) as e:
                log.debug("disconnect: %s", e)
            client.loop_stop()
        for ev in self._connected.values():
            ev.clear()
        self._closing = False

    def _client_for(self, device: str) -> mqtt.Client | None:
        for client, dev in self._clients:
            if dev == device:
                return client
        return self._clients[0][0] if self._clients and device in self.devices else None

    # -- feeder thread -------------------------------------------------------------------------------
    def _feeder(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                if self._downgrade.is_set():
                    self._downgrade.clear()
                    self._close_clients()
                    self.protocol = "3.1.1"
                    self._build_clients()
                    continue
                self._drain_acks()
                if not self.connected:
                    self._check_stalled_connect()
                    continue
                self._maybe_publish_evidence()
                self._feed()
                if self._draining.is_set() and not self._inflight and not self._pending_after_fed():
                    self._idle.set()
            except StageError as e:
                # The outbox could not be read/written (disk, corruption): keep the rows, retry later.
                log.error("alert publisher: %s", e)
                self._stop.wait(1.0)
            except (OSError, ValueError, RuntimeError, TransportError) as e:
                log.error("alert publisher: %s: %s", type(e).__name__, e)
                self._stop.wait(1.0)
        self._drain_acks()

    def _check_stalled_connect(self) -> None:
        """A broker that accepts TCP but never answers CONNECT (some MQTT 3.1.1-only brokers do
        that to an MQTT 5 CONNECT) would leave paho waiting forever: downgrade in `auto` mode,
        else start a fresh connection."""
        started = self._attempt_at
        if started is None or time.monotonic() - started < self.cfg.connect_timeout_s + 1.0:
            return
        self._attempt_at = None
        if self.cfg.protocol == "auto" and self.protocol == "5":
            log.warning(
                "broker %s:%d did not answer an MQTT 5 CONNECT within %.0f s; falling back to 3.1.1",
                self.cfg.host,
                self.cfg.port,
                self.cfg.connect_timeout_s,
            )
            self.protocol = "3.1.1"
        else:
            log.warning("broker %s:%d did not answer CONNECT; reconnecting", self.cfg.host, self.cfg.port)
        self._count("connect_failures")
        self._close_clients()
        self._build_clients()

    def _drain_acks(self) -> None:
        done: list[int] = []
        while True:
            try:
                ack = self._acks.get_nowait()
            except queue.Empty:
                break
            if ack.gen != self._gen:
                continue
            oid = self._inflight.pop(ack.mid, None)
            if oid is None:
                continue  # availability, evidence: not outbox rows
            if not ack.ok:
                # The broker refused this alert (MQTT 5 PUBACK reason, e.g. not authorized). Keep
                # it in the outbox; it goes out again after the next restart.
                self._count("refused")
                log.error("broker refused alert (outbox row %d): %s", oid, ack.reason)
                continue
            done.append(oid)
        if not done:
            return
        try:
            self.outbox.ack_many(done)
            self._count("acked", len(done))
        except StageError as e:
            self._count("ack_errors", len(done))
            log.error("alert publisher: %d acknowledged alert(s) stay in the outbox: %s", len(done), e)

    def _pending_after_fed(self) -> bool:
        return bool(self.outbox.pending(limit=1, after_oid=self._last_fed))

    def _feed(self) -> None:
        room = self.cfg.max_inflight - len(self._inflight)
        if room <= 0:
            return
        client = self._clients[0][0]
        for item in self.outbox.pending(limit=room, after_oid=self._last_fed):
            env = item.envelope
            if env.camera_id not in self._connected:
                log.warning("outbox row %d is for unknown device %r; sending anyway", item.oid, env.camera_id)
            info = client.publish(self.cfg.topic(env.camera_id, "alerts"), env.payload, qos=self.cfg.qos)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                log.warning(
                    "publish of alert %s/%d failed: %s", env.camera_id, env.seq, mqtt.error_string(info.rc)
                )
                return
            # NO_CONN: paho keeps QoS>0 messages and sends them after reconnecting.
            self._inflight[info.mid] = item.oid
            self._last_fed = item.oid
            self._count("published")

    def _evidence_loop(self) -> None:
        """Own thread: asking the enclave for evidence can take as long as a window evaluation, and
        must not hold up alerts. Runs at every (re)connect and every `evidence_refresh_s`."""
        provider = self._evidence_provider
        if provider is None:
            return
        while not self._stop.is_set():
            self._evidence_due.wait(self._evidence_refresh_s)
            self._evidence_due.clear()
            if self._stop.is_set():
                return
            for device in self.devices:
                try:
                    ev = provider(device)
                except Exception as e:  # the provider talks to the enclave: never kill this thread
                    log.warning("enclave evidence for %s unavailable: %s: %s", device, type(e).__name__, e)
                    continue
                if ev is not None:
                    blob = ev if isinstance(ev, bytes) else msgpack.packb(dict(ev), use_bin_type=True)
                    with self._lock:
                        self._evidence[device] = blob
            self._republish.set()
            self._wake.set()

    def _maybe_publish_evidence(self) -> None:
        if not self._republish.is_set():
            return
        self._republish.clear()
        with self._lock:
            items = list(self._evidence.items())
        client = self._clients[0][0]
        for device, blob in items:
            client.publish(self.cfg.topic(device, "enclave"), blob, qos=self.cfg.qos, retain=True)
            self._count("evidence_published")

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def _counter_summary(self) -> str:
        with self._lock:
            return ", ".join(f"{k}={v}" for k, v in self.counters.items() if v)


def enclave_evidence_provider(address: str, timeout_s: float = 10.0) -> EvidenceProvider:
    """An `evidence_provider` that asks the `veilcam enclave` at `address` for fresh evidence (new
    nonce each time), for `AlertPublisher(..., evidence_provider=...)`: consumers then find the
    alert-signing key's evidence retained on `<prefix>/<device>/enclave`, at most
    `evidence_refresh_s` old, and verify it without a nonce (freshness by its timestamp)."""

    def provide(_device: str) -> Mapping[str, Any]:
        import os

        from enclave_bridge.host.client import EnclaveClient

        with EnclaveClient(address, timeout_s=timeout_s) as client:
            return client.evidence(os.urandom(32))

    return provide


__all__ = ["AlertPublisher", "EvidenceProvider", "enclave_evidence_provider"]
