"""Load benchmark: N simulated cameras against one evaluation enclave (+ one GPU worker).

    python benchmarks/load.py [--cameras 1,2,4,8] [--duration-s 20] [--mode paper|slalom|enclave]
                              [--T 32] [--persons 1] [--window-rate 1.0] [--soak-s 600] [--out PATH]

Everything is real: a key enclave and an evaluation enclave (`veilcam key-enclave` / `veilcam
enclave`, simulated backend) provisioned over attestation, a `veilcam gpu-worker` process, one
`EnclaveClient` connection per camera. Each camera replays a recorded skeleton stream (smooth
synthetic trajectories, pre-sealed with the data owner's real AES-GCM key) at `--window-rate`
windows/s, like a daemon whose windowing emits one window per stride. A camera keeps at most 2
windows waiting; when the enclave lags, the oldest waiting one is dropped and counted (the
daemon's live policy). Per N it reports sustained windows/s, p50/p99 latency from the moment a
window was due to its reply (alerts come back in the reply), queue depth and drops; N grows
until the enclave saturates. `--soak-s` then runs the saturating N for that long and samples the
RSS of the enclave and worker processes every 10 s (memory must stay bounded).
Writes `benchmarks/results/load.json`.
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

from enclave_bridge.attest import PlatformKey, Verifier  # noqa: E402
from enclave_bridge.client import EnclaveClient, _Rpc, provision_data_key, provision_model  # noqa: E402
from enclave_bridge.errors import TransportError  # noqa: E402
from enclave_bridge.keys import PartyKey, b64e, generate_data_key, generate_model_key  # noqa: E402
from enclave_bridge.measurement import compute_measurement  # noqa: E402
from enclave_bridge.model_package import package_model  # noqa: E402
from enclave_bridge.policy import create_policy, sign_policy  # noqa: E402
from enclave_bridge.stgcn import STGCN  # noqa: E402
from enclave_bridge.windows import seal_window  # noqa: E402
from enclave_bridge.worker_client import wait_for_worker  # noqa: E402

LABELS = ["walk", "stand", "sit", "fall", "fight"]
RULES = {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0}  # an alert per window: worst case


# -- deployment -------------------------------------------------------------------------------------
class Deployment:
    """Throw-away keys, a provisioned key enclave + evaluation enclave, optionally a GPU worker."""

    def __init__(self, root: Path, mode: str, threads: int) -> None:
        self.root, self.mode = root, mode
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.platform = PlatformKey.generate()
        self.platform.save(root / "platform")
        self.do, self.mo = PartyKey.generate("data-owner", "city"), PartyKey.generate("model-owner", "vendor")
        self.consumer = PartyKey.generate("consumer", "ops")
        self.dk, self.mk = generate_data_key("dk-1"), generate_model_key("mk-1")
        torch.manual_seed(0)
        torch.save(STGCN(len(LABELS)).state_dict(), root / "model.pt")
        (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
        meta = {"num_class": len(LABELS), "layout": "openpose", "strategy": "spatial"}
        self.package = package_model(root / "model.pt", root / "labels.txt", meta, self.mk, root / "m.vcpkg")
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
        doc = create_policy([(self.consumer.public, ["label", "score", "t0", "t1", "track_id"])], version=1)
        with EnclaveClient(self.ev_addr) as c:
            c.set_policy(sign_policy(sign_policy(doc, self.do), self.mo))

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cameras", default="1,2,4,8", help="comma-separated camera counts, ascending")
    ap.add_argument("--duration-s", type=float, default=20.0, help="seconds per camera count")
    ap.add_argument("--mode", default="paper", choices=["paper", "slalom", "enclave"])
    ap.add_argument("--T", type=int, default=32, help="window length (frames)")
    ap.add_argument("--persons", type=int, default=1, help="M")
    ap.add_argument("--window-rate", type=float, default=1.0, help="windows/s per camera")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--soak-s", type=float, default=0.0, help="then run the saturating N this long")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load.json")
    args = ap.parse_args(argv)
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
