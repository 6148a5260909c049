"""Load benchmark: how many live cameras one host sustains, with every stage real.

    python benchmarks/load.py [--cameras 1,2,3] [--minutes 1 | --duration-s 60] [--warmup-s 20]
                              [--mode enclave|slalom|paper] [--pose-backend auto] [--shared-pose]
                              [--pose-options '{"threads": 1}'] [--clip samples/vtest.avi] [--fps 10]
    python benchmarks/load.py --cameras 1 --minutes 10        # the 10-minute one-camera run
    python benchmarks/load.py --stack enclave [--cameras 1,2,4,8] [--T 32] [--soak-s 600]

`--stack full` (default): a real Mosquitto, a key enclave and an evaluation enclave (`veilcam
key-enclave` / `veilcam enclave` processes, simulated backend, provisioned over attestation with
the shipped model), and the camera daemon (the wiring of `veilcam run`: capture → pose process →
tracking/windowing → sealing → enclave → durable outbox → MQTT publisher) in this process, with N
cameras each looping `--clip` as a live camera at `--fps` (paced at the file's own rate, frames
dropped oldest-first when pose lags, as with RTSP). A control-room subscriber verifies and decrypts
the alerts; rules raise an alert for every window (worst case). After `--warmup-s` and each
camera's first alert, each N is measured for the duration: frames captured/posed/dropped per
camera, windows lost, the alert latency from the moment a window closed (its last frame was read)
to its first alert at the subscriber (p50/p95/max, target p95 <= 1 s), per-stage latencies, CPU
seconds per second of the pose processes, the daemon, the enclaves and Mosquitto, the CPU other
jobs took (machine busy minus ours) and the load average. N is sustained when nothing was dropped
or lost and p95 <= 1 s; N grows until it is not. Writes `benchmarks/results/load_full.json`.

`--stack enclave`: N simulated cameras against one evaluation enclave (+ one GPU worker): each
replays a recorded skeleton stream (smooth synthetic trajectories, pre-sealed with the data
owner's real AES-GCM key) at `--window-rate` windows/s; a camera keeps at most 2 windows waiting
and drops the oldest when the enclave lags. Per N it reports sustained windows/s, p50/p99 latency
from the moment a window was due to its reply, queue depth and drops; N grows until the enclave
saturates. `--soak-s` then runs the saturating N for that long and samples the RSS of the enclave
and worker processes every 10 s (memory must stay bounded). Writes `benchmarks/results/load.json`.

Why one module of ~870 lines: a benchmark is run and read as one script; both stacks share the
deployment, meters and report format, and a reader checks what was measured in one file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from enclave_bridge.host.client import EnclaveClient, _Rpc, provision_data_key, provision_model  # noqa: E402
from enclave_bridge.host.packaging import package_model  # noqa: E402
from enclave_bridge.measured.stgcn import STGCN  # noqa: E402
from enclave_bridge.measured.worker_client import wait_for_worker  # noqa: E402
from enclave_bridge.shared.attest import PlatformKey, Verifier, new_nonce  # noqa: E402
from enclave_bridge.shared.errors import TransportError  # noqa: E402
from enclave_bridge.shared.keys import PartyKey, b64e, generate_data_key, generate_model_key  # noqa: E402
from enclave_bridge.shared.measurement import compute_measurement  # noqa: E402
from enclave_bridge.shared.policy import create_policy, sign_policy  # noqa: E402
from enclave_bridge.shared.windows import seal_window  # noqa: E402

LABELS = ["walk", "stand", "sit", "fall", "fight"]
RULES = {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0}  # an alert per window: worst case


# -- deployment -------------------------------------------------------------------------------------
class Deployment:
    """Throw-away keys, a provisioned key enclave + evaluation enclave, optionally a GPU worker."""

    def __init__(self, root: Path, mode: str, threads: int, model_dir: Path | None = None) -> None:
        """`model_dir` (model.pt, labels.txt, model.json): package that model (the full-stack run uses
        the shipped one, so windows have its T/M/input transform); None: a random 5-class ST-GCN."""
        self.root, self.mode = root, mode
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.platform = PlatformKey.generate()
        self.platform.save(root / "platform")
        self.do, self.mo = PartyKey.generate("data-owner", "city"), PartyKey.generate("model-owner", "vendor")
        self.consumer = PartyKey.generate("consumer", "ops")
        self.dk, self.mk = generate_data_key("dk-1"), generate_model_key("mk-1")
        self.sign_pub: bytes | None = None
        if model_dir is None:
            torch.manual_seed(0)
            torch.save(STGCN(len(LABELS)).state_dict(), root / "model.pt")
            (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
            meta = {"num_class": len(LABELS), "layout": "openpose", "strategy": "spatial"}
            ckpt, labels = root / "model.pt", root / "labels.txt"
        else:
            meta = json.loads((model_dir / "model.json").read_text())
            ckpt, labels = model_dir / "model.pt", model_dir / "labels.txt"
        self.package = package_model(ckpt, labels, meta, self.mk, root / "m.vcpkg")
        self.ke_addr, self.ev_addr = f"unix:{root / 'ke.sock'}", f"unix:{root / 'ev.sock'}"
        self.worker_addr = f"unix:{root / 'worker.sock'}"
        self.threads = threads
        self.key_cfg = {
            "role": "key",
            "backend": "simulated",
            "data_owner_pub": b64e(self.do.public.sign_pub),
        }
        self.eval_cfg = {
            "role": "eval",
            "backend": "simulated",
            "data_owner_pub": b64e(self.do.public.sign_pub),
            "model_owner_pub": b64e(self.mo.public.sign_pub),
            "key_enclave": {"address": self.ke_addr, "measurements": [compute_measurement(self.key_cfg)]},
            "evaluator": {"mode": mode, "worker": None if mode == "enclave" else self.worker_addr},
            "topk": 3,
        }
        (root / "key.yaml").write_text(yaml.safe_dump(self.key_cfg))
        (root / "eval.yaml").write_text(yaml.safe_dump(self.eval_cfg))

    def _spawn(self, name: str, args: list[str], ready_addr: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        log = (self.root / f"{name}.log").open("ab")
        cmd = [sys.executable, "-m", "pipeline", *args]
        self.procs[name] = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {(self.root / f'{name}.log').read_text()[-2000:]}")
            rpc = _Rpc(ready_addr, 5.0)
            try:
                rpc.call("status")
                return
            except TransportError:
                time.sleep(0.2)
            finally:
                rpc.close()
        raise RuntimeError(f"{name} not ready")

    def start(self) -> None:
        common = ["--platform-key", str(self.root / "platform" / "platform.key")]
        self._spawn(
            "key-enclave",
            [
                "key-enclave",
                "--listen",
                self.ke_addr,
                "--state-dir",
                str(self.root / "ks"),
                "--config",
                str(self.root / "key.yaml"),
                *common,
            ],
            self.ke_addr,
        )
        provision_data_key(
            self.ke_addr,
            self.dk,
            self.do,
            Verifier(self.platform.public, [compute_measurement(self.key_cfg)], role="key"),
            [compute_measurement(self.eval_cfg)],
        )
        if self.mode != "enclave":
            log = (self.root / "worker.log").open("ab")
            cmd = [
                sys.executable,
                "-m",
                "pipeline",
                "gpu-worker",
                "--listen",
                self.worker_addr,
                "--device",
                "auto",
                "--threads",
                str(self.threads),
            ]
            self.procs["worker"] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            wait_for_worker(self.worker_addr, timeout_s=120)
        self._spawn(
            "enclave",
            [
                "enclave",
                "--listen",
                self.ev_addr,
                "--state-dir",
                str(self.root / "es"),
                "--config",
                str(self.root / "eval.yaml"),
                *common,
            ],
            self.ev_addr,
        )
        verifier = Verifier(self.platform.public, [compute_measurement(self.eval_cfg)], role="eval")
        provision_model(self.ev_addr, self.package.read_bytes(), self.mk, self.mo, verifier)
        fields = ["window_seq", "label", "score", "t0", "t1", "track_id"]
        doc = create_policy([(self.consumer.public, fields)], version=1)
        with EnclaveClient(self.ev_addr) as c:
            c.set_policy(sign_policy(sign_policy(doc, self.do), self.mo))
            nonce = new_nonce()
            self.sign_pub = verifier.verify(c.evidence(nonce), nonce).sign_pub  # the consumer's check

    def rss_mb(self) -> dict[str, float]:
        out = {}
        for name in ("enclave", "worker"):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[name] = int(line.split()[1]) / 1024
        return out

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# -- cameras ----------------------------------------------------------------------------------------
def skeleton_stream(seed: int, n: int, t: int, m: int) -> list[np.ndarray]:
    """`n` consecutive (3, T, 18, M) windows of smooth trajectories (a 'recorded' camera)."""
    rng = np.random.default_rng(seed)
    frames = n * t
    base = rng.uniform(-0.2, 0.2, size=(1, 1, 18, m))
    xy = np.clip(base + rng.normal(0, 0.01, size=(2, frames, 18, m)).cumsum(axis=1), -0.5, 0.5)
    score = rng.uniform(0.3, 1.0, size=(1, frames, 18, m))
    data = np.concatenate([xy, score]).astype(np.float32)
    return [np.ascontiguousarray(data[:, i * t : (i + 1) * t]) for i in range(n)]


@dataclass
class CameraResult:
    latencies: list[float] = field(default_factory=list)
    done: int = 0
    dropped: int = 0
    rejected: int = 0
    alerts: int = 0
    errors: int = 0
    depth_samples: list[int] = field(default_factory=list)


class Camera:
    """Emits a due window every 1/rate s into a 2-slot queue; one thread submits them in order."""

    def __init__(self, dep: Deployment, idx: int, windows: list[bytes], rate: float) -> None:
        self.dep, self.device, self.rate = dep, f"cam{idx:03d}", rate
        self.blobs = windows
        self.q: deque[tuple[float, bytes]] = deque()
        self.cv = threading.Condition()
        self.res = CameraResult()
        self.stop = threading.Event()

    def produce(self, t_end: float) -> None:
        t_next = time.monotonic()
        i = 0
        while not self.stop.is_set() and t_next < t_end and i < len(self.blobs):
            delay = t_next - time.monotonic()
            if delay > 0 and self.stop.wait(delay):
                break
            with self.cv:
                if len(self.q) >= 2:
                    self.q.popleft()
                    self.res.dropped += 1
                self.q.append((t_next, self.blobs[i]))
                self.res.depth_samples.append(len(self.q))
                self.cv.notify()
            i += 1
            t_next += 1.0 / self.rate
        self.stop.set()
        with self.cv:
            self.cv.notify()

    def consume(self) -> None:
        with EnclaveClient(self.dep.ev_addr, timeout_s=600) as c:
            c.hello(self.device, RULES)
            while True:
                with self.cv:
                    while not self.q and not self.stop.is_set():
                        self.cv.wait(0.5)
                    if not self.q:
                        return
                    due, blob = self.q.popleft()
                try:
                    r = c.submit(blob)
                except TransportError:
                    self.res.errors += 1
                    continue
                if r.status == "ok":
                    self.res.done += 1
                    self.res.alerts += len(r.alerts)
                    self.res.latencies.append(time.monotonic() - due)
                else:
                    self.res.rejected += 1


def run_level(dep: Deployment, n: int, args: argparse.Namespace, seq_base: int) -> dict[str, Any]:
    count = int(args.duration_s * args.window_rate) + 2
    cams = []
    for i in range(n):
        stream = skeleton_stream(1000 * seq_base + i, count, args.T, args.persons)
        dev = f"cam{i:03d}"
        blobs = [
            seal_window(dep.dk, dev, seq_base + k, k / args.window_rate, (k + 1) / args.window_rate, w, (i,))
            for k, w in enumerate(stream)
        ]
        cams.append(Camera(dep, i, blobs, args.window_rate))
    before = enclave_stats(dep)
    t0 = time.monotonic()
    t_end = t0 + args.duration_s
    threads = [threading.Thread(target=c.consume) for c in cams]
    threads += [threading.Thread(target=c.produce, args=(t_end,)) for c in cams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    after = enclave_stats(dep)
    lat = sorted(x for c in cams for x in c.res.latencies)
    done = sum(c.res.done for c in cams)
    offered = sum(len(c.res.depth_samples) for c in cams)
    depths = [d for c in cams for d in c.res.depth_samples]

    def pct(p: float) -> float | None:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None

    return {
        "cameras": n,
        "offered_windows_s": round(offered / wall, 3),
        "windows_s": round(done / wall, 3),
        "latency_p50_s": pct(0.50),
        "latency_p99_s": pct(0.99),
        "queue_depth_mean": round(statistics.fmean(depths), 2) if depths else 0,
        "queue_depth_max": max(depths, default=0),
        "dropped": sum(c.res.dropped for c in cams),
        "rejected": sum(c.res.rejected for c in cams),
        "transport_errors": sum(c.res.errors for c in cams),
        "alerts": sum(c.res.alerts for c in cams),
        "windows_done": done,
        "wall_s": round(wall, 2),
        "enclave_eval_s_mean": _eval_mean(before, after),
        "freivalds_failures": _ev(after, "freivalds_failures") - _ev(before, "freivalds_failures"),
        "rss_mb": dep.rss_mb(),
    }


def enclave_stats(dep: Deployment) -> dict[str, Any]:
    with EnclaveClient(dep.ev_addr) as c:
        return c.stats()


def _ev(s: dict[str, Any], k: str) -> int:
    return int((s.get("evaluator") or {}).get(k, 0))


def _eval_mean(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    n = b["windows_ok"] - a["windows_ok"]
    return round((b["eval_s_total"] - a["eval_s_total"]) / n, 4) if n else None


def soak(dep: Deployment, n: int, args: argparse.Namespace, seq_base: int) -> dict[str, Any]:
    samples: list[tuple[float, dict[str, float]]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(10.0):
            samples.append((round(time.monotonic() - t0, 1), dep.rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    level_args = argparse.Namespace(**{**vars(args), "duration_s": args.soak_s})
    level = run_level(dep, n, level_args, seq_base)
    stop.set()
    out: dict[str, Any] = {"cameras": n, "seconds": args.soak_s, "level": level, "rss_samples": samples}
    for name in ("enclave", "worker"):
        series = [s[name] for _, s in samples if name in s]
        if len(series) >= 4:
            q = max(1, len(series) // 4)
            first, last = statistics.fmean(series[:q]), statistics.fmean(series[-q:])
            out[f"{name}_rss_first_quarter_mb"] = round(first, 1)
            out[f"{name}_rss_last_quarter_mb"] = round(last, 1)
            out[f"{name}_rss_growth_pct"] = round(100 * (last - first) / first, 1)
            out[f"{name}_bounded"] = last <= first * 1.10 + 20
    return out


# -- full stack: real cameras through every stage ---------------------------------------------------
VTEST = REPO / "samples" / "vtest.avi"
DEFAULT_MODEL = REPO / "samples" / "default_model"
LATENCY_TARGET_S = 1.0


class AlertClock:
    """When each window closed (its last frame was read) and when its first alert reached the MQTT
    subscriber; both on the wall clock of this host, so their difference is the alert latency."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed: dict[tuple[str, int], float] = {}
        self.expected: dict[tuple[str, int], int] = {}
        self.first_alert: dict[tuple[str, int], float] = {}
        self.alerts = 0

    def on_result(self, window: Any, result: Any, _latency_s: float) -> None:
        with self.lock:
            key = (window.camera_id, int(getattr(result, "window_seq", -1)))
            if key[1] < 0:
                key = (window.camera_id, int(window.seq))
            self.closed[key] = float(window.capture_ts)
            self.expected[key] = len(getattr(result, "alerts", []) or [])

    def on_alert(self, alert: dict[str, Any]) -> None:
        now = time.time()
        with self.lock:
            self.alerts += 1
            self.first_alert.setdefault((str(alert["device"]), int(alert["window_seq"])), now)

    def latencies(self, t0: float, t1: float) -> tuple[list[float], int]:
        """Latencies of windows that closed in [t0, t1) and raised alerts; and how many of those
        windows' alerts never arrived."""
        with self.lock:
            keys = [k for k, ts in self.closed.items() if t0 <= ts < t1 and self.expected.get(k, 0) > 0]
            lat = sorted(self.first_alert[k] - self.closed[k] for k in keys if k in self.first_alert)
            return lat, sum(1 for k in keys if k not in self.first_alert)


class CpuMeter:
    """CPU seconds of named process groups between `start()` and `stop()` (psutil, children included
    as they come and go: a restarted pose process is picked up at the next sample)."""

    def __init__(self, groups: dict[str, Any]) -> None:
        self.groups = groups  # name -> callable returning the current pids of that group
        self.acc: dict[str, dict[int, tuple[float, float]]] = {g: {} for g in groups}

    def sample(self) -> None:
        import psutil

        for g, pids in self.groups.items():
            for pid in pids():
                try:
                    t = psutil.Process(pid).cpu_times()
                except psutil.Error:
                    continue
                first = self.acc[g].get(pid, (t.user + t.system, 0.0))[0]
                self.acc[g][pid] = (first, t.user + t.system)

    def seconds(self) -> dict[str, float]:
        return {g: round(sum(max(0.0, b - a) for a, b in d.values()), 2) for g, d in self.acc.items()}


def _pose_pids(own: set[int]) -> list[int]:
    import psutil

    me = psutil.Process()
    return [c.pid for c in me.children(recursive=True) if c.pid not in own]


def full_config(
    root: Path, dep: Deployment, broker: Any, n: int, args: argparse.Namespace, tag: str
) -> dict[str, Any]:
    """The daemon config of N live cameras (a looping file paced at its own rate is a live camera)."""
    pose: dict[str, Any] = {"backend": args.pose_backend, "shared": bool(args.shared_pose)}
    if args.pose_options:
        pose["options"] = json.loads(args.pose_options)
    cameras = {
        f"cam{i:02d}": {
            "source": str(args.clip),
            "live": True,
            "realtime": True,
            "loop": True,
            "fps": args.fps,
            "pose": pose,
            **({"queues": {"frames": args.frame_queue}} if args.frame_queue else {}),
        }
        for i in range(n)
    }
    return {
        "state_dir": str(root / f"state-{tag}"),
        "data_key_path": str(root / "data.key"),
        "enclave": {"address": dep.ev_addr, "timeout_s": 30, "model_dir": str(args.model_dir)},
        "rules": {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0},  # an alert per window
        "broker": {
            "host": broker.host,
            "port": broker.port,
            "client_id": f"veilcam-load-{tag}",
            "keepalive_s": 10,
            "reconnect_min_delay_s": 0.2,
            "reconnect_max_delay_s": 2.0,
        },
        "metrics": {"enabled": False},
        "supervisor": {"stats_interval_s": 10, "shutdown_timeout_s": 30},
        "cameras": cameras,
    }


def _stage(snap: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(snap["stages"].get(name) or {})


def _delta(a: dict[str, Any], b: dict[str, Any], counter: str) -> int:
    return int(b["counters"].get(counter, 0)) - int(a["counters"].get(counter, 0))


def run_full_level(dep: Deployment, broker: Any, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """N cameras through the real daemon for `warmup_s` + `duration_s`; numbers over the latter."""
    from config.broker import BrokerConfig
    from config.schema import VeilcamConfig
    from enclave_bridge.host.alert_opener import AlertOpener
    from pipeline.app.daemon import Daemon, build_link
    from pipeline.app.subscriber import AlertSubscriber
    from pipeline.outbox import Outbox
    from stages.alerts import AlertPublisher, enclave_evidence_provider

    tag = f"n{n}-{int(time.time())}"
    cfg = VeilcamConfig.model_validate(full_config(dep.root, dep, broker, n, args, tag))
    clock = AlertClock()
    assert dep.sign_pub is not None
    sub = AlertSubscriber(
        BrokerConfig(host=broker.host, port=broker.port),
        AlertOpener(dep.consumer, dep.sign_pub),
        clock.on_alert,
    )
    sub.start()
    if not sub.subscribed.wait(15):
        raise RuntimeError("subscriber did not subscribe")
    outbox = Outbox(cfg.state_dir / "outbox.sqlite")
    devices = [cfg.device_of(c) for c in cfg.cameras]
    assert cfg.broker is not None  # the benchmark's config always names its broker
    publisher = AlertPublisher(
        cfg.broker, outbox, devices=devices, evidence_provider=enclave_evidence_provider(dep.ev_addr)
    )
    # the wiring of `veilcam run` (pipeline.app.daemon.build_daemon) plus the window-close hook
    daemon = Daemon(
        cfg,
        key=dep.dk,
        link=build_link(cfg, dep.dk),
        sink=outbox,
        publisher=publisher,
        outbox=outbox,
        on_result=clock.on_result,
    )
    own = {p.pid for p in dep.procs.values()} | ({broker.proc.pid} if broker.proc else set())
    meter = CpuMeter(
        {
            "pose": lambda: _pose_pids(own),
            "daemon": lambda: [os.getpid()],
            "enclave": lambda: [dep.procs["enclave"].pid],
            "key_enclave": lambda: [dep.procs["key-enclave"].pid],
            "mosquitto": lambda: [broker.proc.pid] if broker.proc else [],
        }
    )
    import psutil

    loads: list[float] = []
    busy: list[float] = []
    daemon.start()
    runner = threading.Thread(target=daemon.run_until_done, daemon=True)
    runner.start()
    try:
        time.sleep(args.warmup_s)
        # and until every camera's first alert arrived (pose runtime compiled, first window full)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with clock.lock:
                seen = {d for d, _ in clock.first_alert}
            if seen >= set(devices):
                break
            time.sleep(0.5)
        before = {c.device: c.stats.to_dict() for c in daemon.cameras.values()}
        psutil.cpu_percent()
        meter.sample()
        t0 = time.time()
        t_end = time.monotonic() + args.duration_s
        next_report = time.monotonic() + 60
        while time.monotonic() < t_end:
            time.sleep(min(5.0, max(0.0, t_end - time.monotonic())))
            meter.sample()
            loads.append(os.getloadavg()[0])
            busy.append(psutil.cpu_percent())
            if time.monotonic() >= next_report:
                next_report += 60
                lat, _ = clock.latencies(t0, time.time())
                drops = sum(
                    c.stats.get("skipped_frames") - before[c.device]["counters"].get("skipped_frames", 0)
                    for c in daemon.cameras.values()
                )
                print(
                    f"  {time.time() - t0:5.0f} s: alerts {len(lat)}, p95 {_f(_pct(lat, 0.95))} s, "
                    f"frames dropped {drops}, load {loads[-1]:.1f}",
                    flush=True,
                )
        t1 = time.time()
        after = {c.device: c.stats.to_dict() for c in daemon.cameras.values()}
        meter.sample()
    finally:
        daemon.request_shutdown()
        runner.join(120)
    # alerts of windows that closed before t1 are still on their way: wait for them
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and clock.latencies(t0, t1)[1]:
        time.sleep(0.2)
    sub.stop()
    lat, missing = clock.latencies(t0, t1)
    wall = t1 - t0
    cams: list[dict[str, Any]] = []
    for dev in before:
        a, b = before[dev], after[dev]
        pose_a, pose_b = _stage(a, "pose"), _stage(b, "pose")
        frames = _delta(a, b, "frames_captured")
        posed = int(pose_b.get("count", 0)) - int(pose_a.get("count", 0))
        cams.append(
            {
                "device": dev,
                "frames_captured": frames,
                "frames_posed": posed,
                "pose_fps": round(posed / wall, 2),
                "frames_dropped": _delta(a, b, "skipped_frames"),
                "poses_dropped": _delta(a, b, "skipped_poses"),
                "windows_sealed": _delta(a, b, "windows_sealed"),
                "windows_submitted": _delta(a, b, "windows_submitted"),
                "windows_coalesced": _delta(a, b, "windows_coalesced"),
                "windows_dropped": _delta(a, b, "windows_dropped"),
                "pose_errors": _delta(a, b, "pose_errors"),
                "stage_restarts": _delta(a, b, "stage_restarts"),
                "warmup_frames_dropped": int(a["counters"].get("skipped_frames", 0)),
                "stages_p50_p95_s": {
                    s: (_stage(b, s).get("latency_p50_s"), _stage(b, s).get("latency_p95_s"))
                    for s in ("capture", "pose", "windowing", "enclave", "end_to_end")
                },
            }
        )
    cpu = meter.seconds()
    total_cpu = sum(cpu.values())
    machine_busy = statistics.fmean(busy) / 100 * (os.cpu_count() or 1) if busy else None
    dropped = sum(c["frames_dropped"] + c["poses_dropped"] for c in cams)
    lost_windows = sum(c["windows_coalesced"] + c["windows_dropped"] for c in cams)
    p95 = _pct(lat, 0.95)
    # What one camera at the target rate costs, from the CPU the processes actually used: pose per
    # posed frame x fps, plus the rest per camera. On a contended host spinning runtime threads
    # inflate it, so the estimate of how many cameras an idle host of this size holds is a floor.
    posed = sum(c["frames_posed"] for c in cams)
    pose_cpu_frame = cpu["pose"] / posed if posed else None
    rest = (total_cpu - cpu["pose"]) / wall / n
    per_cam = pose_cpu_frame * args.fps + rest if pose_cpu_frame is not None else None
    return {
        "cameras": n,
        "seconds": round(wall, 1),
        "sustained": bool(dropped == 0 and lost_windows == 0 and missing == 0)
        and p95 is not None
        and p95 <= LATENCY_TARGET_S,
        "frames_dropped": dropped,
        "windows_lost": lost_windows,
        "min_pose_fps": min(c["pose_fps"] for c in cams),
        "alerts_windows": len(lat),
        "alerts_missing": missing,
        "alert_latency_p50_s": _pct(lat, 0.50),
        "alert_latency_p95_s": p95,
        "alert_latency_max_s": round(lat[-1], 3) if lat else None,
        "cpu_s_per_s": {k: round(v / wall, 3) for k, v in cpu.items()},
        "cpu_share": {k: round(v / total_cpu, 3) for k, v in cpu.items()} if total_cpu else {},
        "pose_cpu_s_per_frame": round(pose_cpu_frame, 4) if pose_cpu_frame is not None else None,
        "cpu_s_per_s_per_camera_at_fps": round(per_cam, 3) if per_cam is not None else None,
        "cameras_idle_host_estimate": round((os.cpu_count() or 1) / per_cam, 2) if per_cam else None,
        "machine_busy_cores": round(machine_busy, 2) if machine_busy is not None else None,
        "others_cores": round(machine_busy - total_cpu / wall, 2) if machine_busy is not None else None,
        "loadavg_1m_mean": round(statistics.fmean(loads), 2) if loads else None,
        "loadavg_1m_max": round(max(loads), 2) if loads else None,
        "cameras_detail": cams,
    }


def _pct(lat: list[float], p: float) -> float | None:
    return round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None


def full_main(args: argparse.Namespace) -> int:
    from pipeline.broker import start_broker

    levels_n = [int(x) for x in args.cameras.split(",")]
    if args.minutes is not None:
        args.duration_s = 60.0 * args.minutes
    root = Path(tempfile.mkdtemp(prefix="vcload-", dir="/tmp"))
    dep = Deployment(root, args.mode, args.threads, model_dir=args.model_dir)
    dep.dk.save(root / "data.key")
    results: dict[str, Any] = {
        "stack": "full",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
            "nice": os.nice(0),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "levels": [],
    }
    broker = None
    try:
        broker = start_broker("mosquitto", workdir=root / "broker")
        t = time.monotonic()
        dep.start()
        results["startup_s"] = round(time.monotonic() - t, 1)
        print(
            f"mosquitto on {broker.address}; enclaves ready in {results['startup_s']} s (mode {args.mode}); "
            f"{args.clip.name} at {args.fps:g} fps per camera, pose {args.pose_backend}"
            f"{' shared' if args.shared_pose else ''}; {args.warmup_s:.0f} s warm-up + "
            f"{args.duration_s:.0f} s measured"
        )
        print(
            f"{'N':>3} {'ok':>3} {'pose fps':>8} {'f drop':>6} {'w lost':>6} {'alerts':>6} {'p50 s':>7} "
            f"{'p95 s':>7} {'max s':>7} {'cpu pose':>8} {'daemon':>6} {'enclave':>7} {'mqtt':>5} "
            f"{'others':>6} {'load':>5}"
        )
        for n in levels_n:
            r = run_full_level(dep, broker, n, args)
            results["levels"].append(r)
            c = r["cpu_s_per_s"]
            print(
                f"{n:>3} {'yes' if r['sustained'] else 'no':>3} {r['min_pose_fps']:>8.2f} "
                f"{r['frames_dropped']:>6} {r['windows_lost']:>6} {r['alerts_windows']:>6} "
                f"{_f(r['alert_latency_p50_s'])} {_f(r['alert_latency_p95_s'])} "
                f"{_f(r['alert_latency_max_s'])} "
                f"{c['pose']:>8.2f} {c['daemon']:>6.2f} {c['enclave']:>7.2f} {c['mosquitto']:>5.2f} "
                f"{_f2(r['others_cores'])} {_f2(r['loadavg_1m_mean'])}",
                flush=True,
            )
            if r["cpu_s_per_s_per_camera_at_fps"] is not None:
                print(
                    f"      pose {1e3 * r['pose_cpu_s_per_frame']:.0f} ms CPU/frame; one camera at "
                    f"{args.fps:g} fps = {r['cpu_s_per_s_per_camera_at_fps']:.2f} CPU-s/s -> an idle "
                    f"{os.cpu_count()}-core host ~ {r['cameras_idle_host_estimate']:.1f} cameras",
                    flush=True,
                )
            if not r["sustained"] and not args.keep_going:
                break
        ok = [r["cameras"] for r in results["levels"] if r["sustained"]]
        results["max_cameras_sustained"] = max(ok, default=0)
        print(
            f"cameras sustained (no drops, alert p95 <= {LATENCY_TARGET_S:g} s): "
            f"{results['max_cameras_sustained']}"
        )
    finally:
        dep.stop()
        if broker is not None:
            broker.stop()
        results["machine"]["loadavg_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _f2(v: float | None) -> str:
    return f"{v:>6.2f}" if v is not None else f"{'-':>6}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--stack",
        default="full",
        choices=["full", "enclave"],
        help="full: cameras through every real stage; enclave: synthetic sealed windows to the enclave only",
    )
    ap.add_argument("--cameras", default=None, help="comma-separated camera counts, ascending")
    ap.add_argument("--duration-s", type=float, default=None, help="seconds measured per camera count")
    ap.add_argument("--minutes", type=float, default=None, help="full: minutes measured per camera count")
    ap.add_argument("--mode", default=None, choices=["paper", "slalom", "enclave"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per enclave/worker process")
    ap.add_argument("--out", type=Path, default=None)
    full = ap.add_argument_group("full stack")
    full.add_argument("--clip", type=Path, default=VTEST, help="video every camera loops at its own rate")
    full.add_argument("--fps", type=float, default=10.0, help="frames/s per camera")
    full.add_argument(
        "--warmup-s", type=float, default=20.0, help="not measured; then until each camera's first alert"
    )
    full.add_argument("--pose-backend", default="auto")
    full.add_argument("--pose-options", default=None, help="JSON pose.options, e.g. '{\"threads\": 1}'")
    full.add_argument("--shared-pose", action="store_true", help="one pose process for every camera")
    full.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    full.add_argument("--frame-queue", type=int, default=None, help="queues.frames (default: the config's)")
    full.add_argument("--keep-going", action="store_true", help="measure every N even after one failed")
    syn = ap.add_argument_group("enclave only")
    syn.add_argument("--T", type=int, default=32, help="window length (frames)")
    syn.add_argument("--persons", type=int, default=1, help="M")
    syn.add_argument("--window-rate", type=float, default=1.0, help="windows/s per camera")
    syn.add_argument("--soak-s", type=float, default=0.0, help="then run the saturating N this long")
    args = ap.parse_args(argv)
    results_dir = REPO / "benchmarks" / "results"
    if args.stack == "full":
        args.cameras = args.cameras or "1,2,3"
        args.duration_s = args.duration_s or 60.0
        args.mode = args.mode or "enclave"
        args.out = args.out or results_dir / "load_full.json"
        return full_main(args)
    args.cameras = args.cameras or "1,2,4,8"
    args.duration_s = args.duration_s or 20.0
    args.mode = args.mode or "paper"
    args.out = args.out or results_dir / "load.json"
    return enclave_main(args)


def enclave_main(args: argparse.Namespace) -> int:
    """The enclave-only load run (synthetic pre-sealed windows, no pose, no MQTT)."""
    levels_n = [int(x) for x in args.cameras.split(",")]
    root = Path(tempfile.mkdtemp(prefix="vcload-", dir="/tmp"))
    dep = Deployment(root, args.mode, args.threads)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
            "cuda": torch.cuda.is_available(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "levels": [],
    }
    try:
        t = time.monotonic()
        dep.start()
        results["startup_s"] = round(time.monotonic() - t, 1)
        print(
            f"deployment ready in {results['startup_s']} s (mode {args.mode}, T={args.T}, M={args.persons})"
        )
        print(
            f"{'N':>4} {'offered/s':>9} {'done/s':>7} {'p50 s':>7} {'p99 s':>7} {'q mean':>6} "
            f"{'q max':>5} {'drops':>5} {'eval s':>7} {'RSS enclave MB':>14}"
        )
        best = 0.0
        saturated_n = levels_n[-1]
        for i, n in enumerate(levels_n):
            r = run_level(dep, n, args, seq_base=1 + i * 1_000_000)
            results["levels"].append(r)
            print(
                f"{n:>4} {r['offered_windows_s']:>9.2f} {r['windows_s']:>7.2f} {_f(r['latency_p50_s'])} "
                f"{_f(r['latency_p99_s'])} {r['queue_depth_mean']:>6.2f} {r['queue_depth_max']:>5} "
                f"{r['dropped']:>5} {_f(r['enclave_eval_s_mean'])} {r['rss_mb'].get('enclave', 0):>14.0f}",
                flush=True,
            )
            if r["dropped"] > 0 or r["windows_s"] < 1.05 * best:
                saturated_n = n
                results["saturation"] = {"cameras": n, "windows_s": r["windows_s"], "max_windows_s": best}
                break
            best = max(best, r["windows_s"])
        if args.soak_s > 0:
            print(f"soak: {saturated_n} cameras for {args.soak_s:.0f} s ...", flush=True)
            results["soak"] = soak(dep, saturated_n, args, seq_base=50_000_000)
            s = results["soak"]
            print({k: v for k, v in s.items() if k not in ("level", "rss_samples")})
    finally:
        dep.stop()
        results["machine"]["loadavg_end"] = os.getloadavg()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _f(v: float | None) -> str:
    return f"{v:>7.3f}" if v is not None else f"{'-':>7}"


if __name__ == "__main__":
    sys.exit(main())
