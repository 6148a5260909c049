"""Benchmark: enclave-process CPU per window in every secure mode, as ratios to the plain model.

    python benchmarks/secure_eval.py [--t 300] [--m 2] [--classes 400] [--reps 2] [--modes …]
    veilcam bench [--quick]

The enclave is this process; every worker is its own `veilcam gpu-worker` process on a Unix
socket (torch and numba on one thread each here). Measured per (1, 3, T, 18, M) window:
- `process_time` of this process (all its threads: masking, fused kernels, keystreams, socket I/O)
  for the float32 folded model on one thread (the 1× line), `enclave`, `slalom`, `paper`,
  `split2`, `split3`;
- `slalom`/`paper`: on-line (pool full) and total = on-line + the off-line precompute of one
  window's masks (u = r1·W), i.e. the steady state of a camera that never stops;
- the per-part breakdown (`SecureStats.last`), bytes each way per worker, worker float64 GEMM MACs
  per worker (limb products counted), and a projection with one datacenter GPU per worker.
Writes `benchmarks/results/secure_eval.json`. Ratios are taken within one run, so a loaded
machine shifts them less than absolute times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from enclave_bridge.measured.masking import WORKERS_NEEDED  # noqa: E402
from enclave_bridge.measured.stgcn import STGCN  # noqa: E402
from enclave_bridge.measured.stgcn.fold import fold_batchnorm  # noqa: E402
from enclave_bridge.measured.worker_client import wait_for_worker  # noqa: E402
from enclave_bridge.protocol import SecureEvaluator  # noqa: E402
from enclave_bridge.shared.ring import BITS, limb_bits  # noqa: E402

ALL_MODES = ("enclave", "slalom", "paper", "split2", "split3")
FP64_MACS_PER_S = 9.7e12  # A100 FP64 tensor cores (19.5 TFLOP/s)
LINK_BYTES_PER_S = 12e9  # enclave host ↔ GPU worker: PCIe 4.0 x16 effective, or a 100 GbE link


def start_workers(n: int, tmp: Path) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    procs, addrs = [], []
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    for i in range(n):
        addr = f"unix:{tmp / f'w{i}.sock'}"
        cmd = [sys.executable, "-m", "pipeline", "gpu-worker", "--listen", addr, "--threads", "1"]
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        addrs.append(addr)
    for a in addrs:
        wait_for_worker(a, 120)
    return procs, addrs


def windows(t: int, m: int, seed: int = 0, n: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 0.5, (n, 3, t, 18, m)).astype(np.float32)


def time_plain(model: STGCN, x: np.ndarray, reps: int) -> dict[str, float]:
    folded = fold_batchnorm(model, torch.float32)
    xt = torch.from_numpy(x)
    cpus, walls = [], []
    with torch.no_grad():
        folded(xt)
        for _ in range(reps):
            c0, t0 = time.process_time(), time.perf_counter()
            folded(xt)
            cpus.append(time.process_time() - c0)
            walls.append(time.perf_counter() - t0)
    return {"cpu_ms": 1e3 * statistics.median(cpus), "wall_ms": 1e3 * statistics.median(walls)}


def worker_gemm_macs(ev: SecureEvaluator, n: int, t: int, m: int) -> list[int]:
    """Float64 MACs each worker performs per window (limb products of its request terms)."""
    terms_per_worker = {
        "slalom": [[0]],
        "paper": [[0]],
        "split2": [[0], [0]],
        "split3": [[0], [1, 0], [0, 1]],
    }[ev.mode]
    out = []
    for k, slots in enumerate(terms_per_worker):
        total = 0
        for shape, names in ev.qm.stage_plan(n, t, m):
            for name in names:
                op = ev.qm.ops[name]
                rows = op.rows(shape)
                for slot in slots:
                    rw = ev.engine.ops[name].ring(k, slot)
                    gemms = sum(math.ceil(BITS / limb_bits(l1)) for _, _, l1 in rw.parts)
                    total += gemms * rows * op.macs_per_row
        out.append(total)
    return out


def time_mode(model: STGCN, mode: str, x: np.ndarray, reps: int, addrs: list[str]) -> dict[str, Any]:
    n, _, t, _, m = x.shape
    need = WORKERS_NEEDED.get(mode, 0)
    kw: dict[str, Any] = {"workers": addrs[:need]} if need else {}
    masked = mode in ("slalom", "paper")
    ev = SecureEvaluator(
        model, mode, pool_window=(n, t, m) if masked else None,
        pool_capacity=reps + 1 if masked else 0, background_pool=False, **kw,
    )  # fmt: skip
    res: dict[str, Any] = {"mode": mode, "workers": need}
    if ev.pool is not None:
        c0 = time.process_time()
        ev.pool.fill()
        res["precompute_cpu_ms_per_window"] = 1e3 * (time.process_time() - c0) / (reps + 1)
    cpus, walls, parts = [], [], []
    sent0 = recv0 = 0
    for i in range(reps + 1):
        if i == 1:
            sent0, recv0 = ev.stats.bytes_to_worker, ev.stats.bytes_from_worker
        c0, t0 = time.process_time(), time.perf_counter()
        ev.evaluate(x)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        if i == 0:
            continue  # warm-up (numba kernels load from cache, sockets connect)
        cpus.append(cpu)
        walls.append(wall)
        parts.append(dict(ev.stats.last))
    res["enclave_cpu_ms"] = 1e3 * statistics.median(cpus)
    res["wall_ms"] = 1e3 * statistics.median(walls)
    keys = sorted({k for p in parts for k in p})
    res["breakdown_ms"] = {k: 1e3 * statistics.median([p.get(k, 0.0) for p in parts]) for k in keys}
    res["bytes_to_workers"] = (ev.stats.bytes_to_worker - sent0) // reps
    res["bytes_from_workers"] = (ev.stats.bytes_from_worker - recv0) // reps
    res["freivalds_checks_per_window"] = ev.stats.freivalds_checks // (reps + 1)
    res["freivalds_failures"] = ev.stats.freivalds_failures
    res["transport_errors"] = ev.stats.transport_errors
    if masked:
        res["enclave_total_cpu_ms"] = res["enclave_cpu_ms"] + res["precompute_cpu_ms_per_window"]
    elif mode != "enclave":
        res["enclave_total_cpu_ms"] = res["enclave_cpu_ms"]
    else:
        res["enclave_total_cpu_ms"] = res["enclave_cpu_ms"]
    if need:
        macs = worker_gemm_macs(ev, n, t, m)
        res["worker_fp64_macs"] = macs
        per_worker_bytes = (res["bytes_to_workers"] + res["bytes_from_workers"]) / need
        res["projected_gpu_ms"] = {
            "worker_gemm_ms": 1e3 * max(macs) / FP64_MACS_PER_S,
            "link_ms": 1e3 * per_worker_bytes / LINK_BYTES_PER_S,
            "enclave_cpu_ms": res["enclave_cpu_ms"],
        }
        p = res["projected_gpu_ms"]
        p["latency_ms"] = p["worker_gemm_ms"] + p["link_ms"] + p["enclave_cpu_ms"]
    if n > 1:  # a batch of n windows (the enclave service's cross-camera batching): per window
        for k in ("enclave_cpu_ms", "wall_ms", "enclave_total_cpu_ms"):
            res[k] /= n
        res["breakdown_ms"] = {k: v / n for k, v in res["breakdown_ms"].items()}
        res["bytes_to_workers"] //= n
        res["bytes_from_workers"] //= n
        if "projected_gpu_ms" in res:
            res["projected_gpu_ms"] = {k: v / n for k, v in res["projected_gpu_ms"].items()}
            res["worker_fp64_macs"] = [v // n for v in res["worker_fp64_macs"]]
        res["batch"] = n
    res["model_macs"] = ev.qm.macs(n, t, m)
    res["weight_elements"] = ev.qm.weight_elements()
    ev.close()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--t", type=int, default=300)
    ap.add_argument("--m", type=int, default=2)
    ap.add_argument("--classes", type=int, default=400)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(ALL_MODES), choices=ALL_MODES)
    ap.add_argument("--quick", action="store_true", help="T=32, one rep (a smoke run)")
    ap.add_argument(
        "--batch", type=int, default=1, help="windows per evaluate() call (figures are per window)"
    )
    ap.add_argument("--model", default=None, help="checkpoint (default: random init, --classes)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "secure_eval.json"))
    args = ap.parse_args()
    if args.quick:
        args.t, args.reps = 32, 1
    torch.set_num_threads(1)
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    torch.manual_seed(0)
    model = STGCN(args.classes).eval()
    if args.model:
        model = STGCN.from_checkpoint(args.model)
    x = windows(args.t, args.m, n=args.batch)
    results: dict[str, Any] = {
        "window": [1, 3, args.t, 18, args.m],
        "batch": args.batch,
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    plain = time_plain(model, x[:1], max(args.reps, 3))
    results["plain_float32_1thread"] = plain
    print(f"plain float32 folded model, 1 thread: {plain['cpu_ms']:.0f} ms CPU per window {tuple(x.shape)}")
    with tempfile.TemporaryDirectory() as tmp:
        procs, addrs = start_workers(3, Path(tmp))
        try:
            for mode in args.modes:
                r = time_mode(model, mode, x, args.reps, addrs)
                r["ratio_online"] = r["enclave_cpu_ms"] / plain["cpu_ms"]
                r["ratio_total"] = r["enclave_total_cpu_ms"] / plain["cpu_ms"]
                results[mode] = r
                print_mode(r)
        finally:
            for p in procs:
                p.terminate()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


def print_mode(r: dict[str, Any]) -> None:
    mib = 1 << 20
    print(
        f"{r['mode']:>8}: enclave CPU on-line {r['enclave_cpu_ms']:8.1f} ms ({r['ratio_online']:5.2f}×)"
        f"  total {r['enclave_total_cpu_ms']:8.1f} ms ({r['ratio_total']:5.2f}×)  wall {r['wall_ms']:8.0f} ms"
        f"  to/from workers {r['bytes_to_workers'] / mib:6.1f}/{r['bytes_from_workers'] / mib:6.1f} MiB"
    )
    parts = {k: v for k, v in r["breakdown_ms"].items() if k != "total" and v >= 0.05}
    print("          parts (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    if "worker_fp64_macs" in r:
        g = r["projected_gpu_ms"]
        print(
            "          worker fp64 GMACs: "
            + ", ".join(f"{v / 1e9:.1f}" for v in r["worker_fp64_macs"])
            + f"; projected with a GPU per worker: {g['latency_ms']:.0f} ms"
            f" (GEMM {g['worker_gemm_ms']:.0f} + link {g['link_ms']:.0f} + enclave {g['enclave_cpu_ms']:.0f})"
        )


if __name__ == "__main__":
    raise SystemExit(main())
