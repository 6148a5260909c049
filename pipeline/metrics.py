"""Prometheus `/metrics` and `/healthz` over HTTP for the daemon (docs/ARCHITECTURE.md §8).

Metrics are collected at scrape time from the cameras' `CameraStats` (a custom collector on a
private registry), so stages only ever touch their own counters and there is one source of truth
for /metrics, the replay summary and the MQTT stats topic. Only operational numbers are exported:
fps, latency histograms, queue depths, drops, outbox depth, restarts, enclave-side Freivalds
failures — never labels or people counts.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.errors import ConfigError
from pipeline.stats import LATENCY_BUCKETS_S, CameraStats

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StatsSource(Protocol):
    """What the metrics server reads: the daemon (or anything with cameras and a health check)."""

    @property
    def camera_stats(self) -> list[CameraStats]: ...

    def healthy(self) -> tuple[bool, dict[str, Any]]: ...


class VeilcamCollector(Collector):
    """Turns `CameraStats` snapshots into Prometheus metric families."""

    def __init__(self, source: StatsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        cams = self.source.camera_stats
        fps = GaugeMetricFamily(
            "veilcam_stage_fps", "Items per second over the last 10 s", labels=["camera", "stage"]
        )
        items = CounterMetricFamily(
            "veilcam_stage_items", "Items processed by a stage", labels=["camera", "stage"]
        )
        errors = CounterMetricFamily(
            "veilcam_stage_errors", "Items a stage failed on", labels=["camera", "stage"]
        )
        lat = HistogramMetricFamily(
            "veilcam_stage_latency_seconds", "Per-item stage latency", labels=["camera", "stage"]
        )
        depth = GaugeMetricFamily(
            "veilcam_queue_depth", "Items waiting in a queue", labels=["camera", "queue"]
        )
        cap = GaugeMetricFamily("veilcam_queue_capacity", "Queue capacity", labels=["camera", "queue"])
        dropped = CounterMetricFamily(
            "veilcam_queue_dropped", "Items dropped by a queue's policy", labels=["camera", "queue", "policy"]
        )
        coalesced = CounterMetricFamily(
            "veilcam_queue_coalesced",
            "Items replaced by newer ones (latest_wins)",
            labels=["camera", "queue"],
        )
        events = CounterMetricFamily(
            "veilcam_events", "Per-camera event counters", labels=["camera", "event"]
        )
        up = GaugeMetricFamily(
            "veilcam_camera_up",
            "1 when the camera pipeline runs or finished cleanly",
            labels=["camera", "status"],
        )
        gauges = GaugeMetricFamily(
            "veilcam_gauge", "Per-camera gauges (e.g. outbox depth)", labels=["camera", "name"]
        )
        freivalds = CounterMetricFamily(
            "veilcam_freivalds_failures",
            "GPU replies that failed Freivalds verification (enclave stats)",
            labels=["camera"],
        )
        outbox = GaugeMetricFamily(
            "veilcam_outbox_depth", "Alerts stored but not yet acknowledged", labels=["camera"]
        )
        for c in cams:
            cam = c.camera_id
            for snap in (s.snapshot() for s in list(c.stages.values())):
                fps.add_metric([cam, snap.name], snap.fps)
                items.add_metric([cam, snap.name], snap.count)
                errors.add_metric([cam, snap.name], snap.errors)
                cumulative, buckets = 0, []
                for bound, n in zip((*LATENCY_BUCKETS_S, float("inf")), snap.bucket_counts, strict=True):
                    cumulative += n
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                lat.add_metric([cam, snap.name], buckets, snap.latency_sum_s)
            for q in c.queue_stats():
                depth.add_metric([cam, q.name], q.depth)
                cap.add_metric([cam, q.name], q.capacity)
                dropped.add_metric([cam, q.name, q.policy], q.dropped)
                coalesced.add_metric([cam, q.name], q.coalesced)
            for name in CameraStats.COUNTERS:
                if name == "freivalds_failures":
                    freivalds.add_metric([cam], c.get(name))
                else:
                    events.add_metric([cam, name], c.get(name))
            up.add_metric([cam, c.status], 1.0 if c.status in ("running", "done", "starting") else 0.0)
            for name, value in c.probe_values().items():
                if name == "outbox_depth":
                    outbox.add_metric([cam], value)
                else:
                    gauges.add_metric([cam, name], value)
        yield from (
            fps,
            items,
            errors,
            lat,
            depth,
            cap,
            dropped,
            coalesced,
            events,
            up,
            gauges,
            freivalds,
            outbox,
        )


def _handler(registry: CollectorRegistry, source: StatsSource) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "veilcam"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body = generate_latest(registry)
                self._send(200, CONTENT_TYPE, body)
            elif path == "/healthz":
                ok, info = source.healthy()
                self._send(200 if ok else 503, "application/json", json.dumps(info, sort_keys=True).encode())
            else:
                self._send(404, "text/plain", b"not found: try /metrics or /healthz\n")

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http %s " + format, self.client_address[0], *args)

    return Handler


class MetricsServer:
    """A background HTTP server; `listen` is `host:port` (port 0 picks a free port → `.port`)."""

    def __init__(self, listen: str, source: StatsSource) -> None:
        host, _, port = listen.rpartition(":")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(VeilcamCollector(source))
        try:
            self._server = ThreadingHTTPServer((host.strip("[]"), int(port)), _handler(self.registry, source))
        except OSError as e:
            raise ConfigError(f"metrics.listen: cannot listen on {listen}: {e.strerror}") from e
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        if isinstance(host, bytes):  # typed str | bytes; an AF_INET server's is a str
            host = host.decode()
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="veilcam-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics on %s/metrics, health on %s/healthz", self.url, self.url)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)


__all__ = ["MetricsServer", "StatsSource", "VeilcamCollector"]
