"""Test helpers for the MQTT tests: an independent raw paho collector (not the code under test)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt


class Collector:
    """Subscribes with QoS 1 and records (topic, payload, retain) in arrival order.

    `persistent=True` uses a fixed client id with a non-clean session (MQTT 3.1.1), so a broker
    with persistence keeps queueing for it while it is disconnected.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topics: list[str],
        client_id: str = "",
        persistent: bool = False,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=not persistent,
        )
        self.client.reconnect_delay_set(0.05, 0.2)
        if username is not None:
            self.client.username_pw_set(username, password)
        if ca_file is not None:
            self.client.tls_set(ca_certs=ca_file)

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                c.subscribe([(t, 1) for t in topics])

        def on_subscribe(*_a: Any) -> None:
            self.subscribed.set()

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            with self.cond:
                self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
                self.cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(10), "collector did not subscribe"

    def wait_for(self, pred: Callable[[list[tuple[str, bytes, bool]]], bool], timeout_s: float = 20) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not pred(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def payloads(self, suffix: str) -> list[bytes]:
        with self.cond:
            return [p for t, p, _r in self.messages if t.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
