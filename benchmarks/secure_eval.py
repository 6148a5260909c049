"""Benchmark: secure ST-GCN evaluation in every mode, with the paper-style per-part breakdown.

    python benchmarks/secure_eval.py [--quick] [--reps N] [--fidelity N] [--out PATH]
    veilcam bench [--quick]

Measures, for windows (1,3,300,18,2) and (1,3,128,18,1):
- median wall latency and *enclave-side CPU time* (thread CPU of the enclave thread; the worker is a
  separate `veilcam gpu-worker` process, both pinned to one torch thread) for plaintext (float32 ST-GCN),
  `enclave`, `slalom` and `paper`;
- the breakdown: linear on the worker, nonlinear in the enclave, mask/unmask (incl. u3), Freivalds,
  transport, window decryption (AES-GCM), on-line precompute misses; ms and %;
- off-line precompute per window (pool generation) → total enclave CPU per window in steady state;
- ratios vs plaintext, ring MACs, bytes crossing the enclave boundary;
- exact u3 = x̂·R2 mod p variants (float64 BLAS, float32 limbs, int8 `torch._int_mm` limbs);
- fidelity: top-1 / top-5 agreement with the float model over many windows.
Writes `benchmarks/results/secure_eval.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from enclave_bridge.keys import generate_data_key  # noqa: E402
from enclave_bridge.model_inputs import apply_input_transform, input_transform_of  # noqa: E402
from enclave_bridge.protocol import SecureEvaluator  # noqa: E402
from enclave_bridge.quant import ACT_LIMBS, BX, limb_bound  # noqa: E402
from enclave_bridge.ring import HALF, MaskRNG, P, centred, pow2_mod, reduce  # noqa: E402
from enclave_bridge.stgcn import STGCN  # noqa: E402
from enclave_bridge.windows import ReplayGuard, open_window, seal_window  # noqa: E402
from enclave_bridge.worker_client import wait_for_worker  # noqa: E402

PARTS = [
    ("worker", "linear on worker (GEMM)"),
    ("transport", "transport (socket + msgpack)"),
    ("mask", "mask x̄ = x̂ + r1"),
    ("unmask", "unmask (ȳ − u, lift)"),
    ("u3", "u3 = x̂·R2 (on-line)"),
    ("freivalds", "Freivalds verification"),
    ("nonlinear", "nonlinear in enclave (ReLU, bias, requant, pool)"),
    ("enclave_linear", "linear in enclave (enclave mode / fallback)"),
    ("precompute", "on-line mask generation (pool miss)"),
    ("decrypt", "window decryption (AES-256-GCM)"),
]


def load_model(path: str | None) -> tuple[STGCN, str]:
    """The trained default model when present, else a calibrated random model."""
    default = REPO / "samples" / "default_model" / "model.pt"
    p = Path(path) if path else default
    if p.exists():
        return STGCN.from_checkpoint(p).eval(), str(p.relative_to(REPO) if p.is_relative_to(REPO) else p)
    sys.path.insert(0, str(REPO))
    from tests.enclave_bridge.secure_helpers import calibrated_model

    return calibrated_model(10, seed=0, t=64, m=2), "calibrated random weights (no samples/default_model)"


def windows_for(n: int, t: int, m: int, seed: int, transform: str = "reference") -> np.ndarray:
    """Skeleton-like windows as the model sees them (after its `input_transform`): the project's
    synthetic generator if available, else random walks."""
    try:
        from training.dataset import SplitSpec, make_arrays
        from training.synth import SynthConfig

        x, _ = make_arrays(SplitSpec(seed, "test", n), SynthConfig(T=t, M=m))
    except Exception:
        from tests.enclave_bridge.secure_helpers import skeleton_windows

        x = skeleton_windows(n, t, m, seed)
    return apply_input_transform(x.astype(np.float32), transform)


def start_worker() -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "gpu-worker",
        "--listen",
        addr,
        "--device",
        "auto",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    wait_for_worker(addr, 60)
    return proc, addr


def time_plaintext(model: STGCN, x: np.ndarray, reps: int) -> dict[str, float]:
    xt = torch.from_numpy(x)
    walls, cpus = [], []
    with torch.no_grad():
        model(xt)
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.thread_time()
            model(xt)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.thread_time() - c0)
    return {"wall_ms": 1e3 * statistics.median(walls), "cpu_ms": 1e3 * statistics.median(cpus)}


def time_plaintext_gpu(model: STGCN, x: np.ndarray, reps: int) -> dict[str, float]:
    import copy

    gm = copy.deepcopy(model).cuda()
    xt = torch.from_numpy(x).cuda()
    walls = []
    with torch.no_grad():
        gm(xt)
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            gm(xt)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
    return {"wall_ms": 1e3 * statistics.median(walls)}


def time_mode(
    model: STGCN, mode: str, x: np.ndarray, reps: int, addr: str | None, limbs: int = ACT_LIMBS
) -> dict[str, Any]:
    n, _, t, _, m = x.shape
    ev = SecureEvaluator(
        model,
        mode,
        addr if mode in ("paper", "slalom") else None,
        act_limbs=limbs,
        pool_window=(n, t, m),
        pool_capacity=reps + 1,
        background_pool=False,
        allow_plaintext=True,
    )
    res: dict[str, Any] = {"mode": mode}
    if ev.pool is not None:
        c0, t0 = time.thread_time(), time.perf_counter()
        ev.pool.fill()
        res["precompute_ms_per_window"] = 1e3 * (time.thread_time() - c0) / (reps + 1)
        res["precompute_wall_ms_per_window"] = 1e3 * (time.perf_counter() - t0) / (reps + 1)
    key = generate_data_key()
    guard = ReplayGuard()
    walls, cpus, parts = [], [], []
    for i in range(reps + 1):
        blob = seal_window(key, "bench", i, 0.0, 10.0, x[0])
        t0, c0 = time.perf_counter(), time.thread_time()
        td = time.perf_counter()
        opened = open_window(blob, {key.kid: key}, guard)
        dec = time.perf_counter() - td
        ev.evaluate(opened.data[None])
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        if i == 0:
            continue  # warm-up
        last = dict(ev.stats.last)
        last["decrypt"] = dec
        last["total"] = wall
        walls.append(wall)
        cpus.append(cpu)
        parts.append(last)
    res["wall_ms"] = 1e3 * statistics.median(walls)
    res["enclave_cpu_ms"] = 1e3 * statistics.median(cpus)
    keys = {k for p in parts for k in p}
    res["breakdown_ms"] = {k: 1e3 * statistics.median([p.get(k, 0.0) for p in parts]) for k in sorted(keys)}
    res["bytes_to_worker"] = ev.stats.bytes_to_worker // (reps + 1)
    res["bytes_from_worker"] = ev.stats.bytes_from_worker // (reps + 1)
    res["freivalds_checks_per_window"] = ev.stats.freivalds_checks // (reps + 1)
    res["freivalds_failures"] = ev.stats.freivalds_failures
    res["transport_errors"] = ev.stats.transport_errors
    res["pool_hits"], res["pool_misses"] = ev.stats.pool_hits, ev.stats.pool_misses
    if mode in ("paper", "slalom"):
        online = res["enclave_cpu_ms"] - res["breakdown_ms"].get("precompute", 0.0)
        res["enclave_online_cpu_ms"] = online
        res["enclave_total_cpu_ms"] = online + res["precompute_ms_per_window"]
    res["model_macs"] = ev.qm.macs(n, t, m)
    # delegated work: every activation digit goes through the ring
    res["ring_macs"] = ev.qm.macs(n, t, m, ev.qm.act_limbs if mode in ("paper", "slalom") else 1)
    ev.close()
    return res


def bench_u3(reps: int) -> dict[str, Any]:
    """Exact x̂·R2 mod p on the largest temporal conv (block 8, T'=75, M=2) as a GEMM (2700×2304×256)."""
    torch.manual_seed(0)
    m_, k_, n_ = 2700, 2304, 256
    xq = torch.randint(-BX, BX + 1, (m_, k_), dtype=torch.int64)
    r2 = MaskRNG().uniform((k_, n_))
    r2c = centred(r2)
    out: dict[str, Any] = {"shape": [m_, k_, n_]}
    xf, rf = xq.double(), r2c.double()

    def fp64() -> torch.Tensor:
        return reduce((xf @ rf).to(torch.int64))

    ref = fp64()

    # float32: x̂ in 2 limbs of 5 bits (+sign), R2 in 4 limbs of 8 bits, D chunked so each
    # partial product stays < 2^24 (|x| < 2^5, |r| < 2^8, chunk 2^10 → 2^23): 8 limb pairs × chunks.
    def fp32_limbs() -> torch.Tensor:
        xs = [(xq + 1024) & 31, ((xq + 1024) >> 5) & 63]  # x̂ + 1024 ≥ 0, 11 bits
        rs = [((r2 >> (8 * i)) & 255).float() for i in range(4)]
        acc = torch.zeros((m_, n_), dtype=torch.int64)
        for a, xl in enumerate(xs):
            xl32 = xl.float()
            for b, rl in enumerate(rs):
                part = torch.zeros((m_, n_), dtype=torch.int64)
                for c0 in range(0, k_, 256):
                    part += (xl32[:, c0 : c0 + 256] @ rl[c0 : c0 + 256]).to(torch.int64)
                acc = reduce(acc + reduce(part) * pow2_mod(5 * a + 8 * b))
        # remove the +1024 offset: 1024 · column sums of R2
        return reduce(acc - reduce(1024 * r2.sum(dim=0)))

    # int8 via torch._int_mm: x̂ = 32·xh + xl (xl ∈ [0,32), |xh| ≤ 32), R2 = Σ 2^(7i)·ri, ri ∈ [0,128)
    # → signed int8 operands, int32 accumulation exact (127·127·2304 < 2^31).
    def int8_limbs() -> torch.Tensor:
        xl = (xq & 31).to(torch.int8)
        xh = (xq >> 5).to(torch.int8)
        rs = [((r2 >> (7 * i)) & 127).to(torch.int8) for i in range(5)]
        acc = torch.zeros((m_, n_), dtype=torch.int64)
        for a, xlimb in enumerate((xl, xh)):
            for b, rl in enumerate(rs):
                part = torch._int_mm(xlimb, rl).to(torch.int64)
                acc = reduce(acc + reduce(part) * pow2_mod(5 * a + 7 * b))
        return acc

    variants = {"fp64_blas_1_gemm": fp64, "fp32_limbs_8_pairs_chunked": fp32_limbs}
    try:
        torch._int_mm(torch.ones((32, 32), dtype=torch.int8), torch.ones((32, 32), dtype=torch.int8))
        variants["int8_int_mm_10_gemms"] = int8_limbs
    except (RuntimeError, AttributeError) as e:
        out["int8_int_mm_error"] = str(e)
    for name, fn in variants.items():
        got = fn()
        exact = bool(torch.equal(got, ref))
        ts = []
        for _ in range(reps):
            t0 = time.thread_time()
            fn()
            ts.append(time.thread_time() - t0)
        out[name] = {"ms": 1e3 * statistics.median(ts), "exact": exact}
    return out


def fidelity(
    model: STGCN,
    n: int,
    t: int,
    m: int,
    batch: int = 25,
    limbs: int = ACT_LIMBS,
    transform: str = "reference",
) -> dict[str, Any]:
    """Secure (exact ring, = every masked mode) vs float ST-GCN over n windows."""
    ev = SecureEvaluator(model, "enclave", act_limbs=limbs)
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # accuracy only, not timed
    top1 = top5 = 0
    max_rel = max_abs = 0.0
    near_ties: list[float] = []
    gaps: list[float] = []
    flips: list[dict[str, float]] = []
    for start in range(0, n, batch):
        x = windows_for(min(batch, n - start), t, m, seed=10_000 + start, transform=transform)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).double().numpy()
        got = ev.evaluate(x)
        for g, r in zip(got, ref, strict=True):
            err = float(np.abs(g - r).max())
            s = np.sort(r)[::-1]
            same1 = bool(g.argmax() == r.argmax())
            top1 += int(same1)
            top5 += int(set(np.argsort(-g)[:5]) == set(np.argsort(-r)[:5]))
            max_abs = max(max_abs, err)
            max_rel = max(max_rel, err / float(np.abs(r).max()))
            gaps.append(float(s[0] - s[1]))
            near_ties.append(err)
            if not same1:
                flips.append({"float_gap_top1_top2": float(s[0] - s[1]), "max_abs_error": err})
    torch.set_num_threads(1)
    # a window is "at risk" when its float top-1/top-2 gap is below twice the worst observed error
    at_risk = int(sum(g < 2 * max_abs for g in gaps))
    return {
        "windows": n,
        "T": t,
        "M": m,
        "top1_agreement": top1 / n,
        "top5_set_agreement": top5 / n,
        "max_abs_logit_error": max_abs,
        "max_rel_logit_error": max_rel,
        "min_top1_top2_gap": min(gaps),
        "windows_gap_below_2x_max_error": at_risk,
        "top1_disagreements": flips,
        "disagreements_with_gap_below_2x_max_error": sum(
            f["float_gap_top1_top2"] < 2 * max_abs for f in flips
        ),
    }


def gpu_projection(res: dict[str, Any], macs: int, bytes_tx: int) -> dict[str, Any]:
    """Projected per-window latency with a datacenter GPU worker (assumptions stated in README)."""
    pcie_bps = 25e9  # PCIe 4.0 x16, effective
    fp64_tc_macs = 9.7e12  # A100 FP64 tensor cores: 19.5 TFLOP/s
    out = {}
    for mode, limbs in (("slalom", 1), ("paper", 4)):
        r = res.get(mode)
        if r is None:
            continue
        worker_ms = 1e3 * limbs * macs / fp64_tc_macs
        pcie_ms = 1e3 * bytes_tx / pcie_bps
        enclave_ms = r["enclave_cpu_ms"] - r["breakdown_ms"].get("decrypt", 0.0)
        out[mode] = {
            "worker_gemm_ms": worker_ms,
            "pcie_ms": pcie_ms,
            "enclave_ms_measured": enclave_ms,
            "projected_latency_ms": worker_ms + pcie_ms + enclave_ms,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--fidelity", type=int, default=None, help="windows for the fidelity check (0: skip)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "secure_eval.json"))
    ap.add_argument("--model", default=None)
    ap.add_argument(
        "--act-limbs", type=int, default=ACT_LIMBS, help="activation digits (1: fast, ~1 %% error)"
    )
    ap.add_argument("--fidelity-t", type=int, default=None, help="window length T for the fidelity check")
    ap.add_argument(
        "--sections", default="timing,u3,fidelity", help="comma-separated subset of timing, u3, fidelity"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    reps = args.reps or (2 if args.quick else 5)
    shapes = [(1, 128, 1)] if args.quick else [(1, 300, 2), (1, 128, 1)]
    model, model_desc = load_model(args.model)
    load0 = os.getloadavg()
    proc, addr = start_worker()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: stop our worker
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "loadavg_start": load0,
            "enclave_threads": 1,
            "worker_threads": 1,
        },
        "model": model_desc,
        "ring": {
            "modulus": P,
            "digit_bits": BX.bit_length(),
            "act_limbs": args.act_limbs,
            "act_bound": limb_bound(args.act_limbs),
            "bound": f"BX·max‖Ŵ_o‖₁ ≤ {HALF} per digit",
        },
        "windows": {},
    }
    sections = set(args.sections.split(","))
    # calibrated random weights take windows as they come; a package may declare its own transform
    transform = input_transform_of(_model_meta(args.model)) if model_desc.endswith(".pt") else "reference"
    try:
        for n, t, m in shapes if "timing" in sections else ():
            x = windows_for(n, t, m, seed=1, transform=transform)
            key = f"({n},3,{t},18,{m})"
            print(f"\n== window {key} ==", flush=True)
            res: dict[str, Any] = {"plaintext_fp32": time_plaintext(model, x, reps)}
            if torch.cuda.is_available():
                res["plaintext_gpu"] = time_plaintext_gpu(model, x, reps)
            for mode in ("enclave", "slalom", "paper"):
                print(f"  {mode} …", flush=True)
                res[mode] = time_mode(model, mode, x, reps, addr, args.act_limbs)
            plain = res["plaintext_fp32"]["cpu_ms"]
            macs = res["paper"]["ring_macs"]
            bytes_tx = res["paper"]["bytes_to_worker"] + res["paper"]["bytes_from_worker"]
            res["gpu_projection"] = gpu_projection(res, macs, bytes_tx)
            print_table(key, res, plain, macs)
            results["windows"][key] = res
            _save(results, args.out)
        if "u3" in sections:
            print("\n== exact u3 variants (largest temporal conv as GEMM 2700×2304×256, 1 thread) ==")
            results["u3_variants"] = bench_u3(3 if args.quick else 5)
            for k, v in results["u3_variants"].items():
                if isinstance(v, dict):
                    print(f"  {k:32s} {v['ms']:8.1f} ms  exact={v['exact']}")
            _save(results, args.out)
        nf = args.fidelity if args.fidelity is not None else (50 if args.quick else 1000)
        nf = nf if "fidelity" in sections else 0
        if nf > 0:
            ft = args.fidelity_t or _model_t(args.model) or 64
            print(f"\n== fidelity over {nf} windows (T={ft}, M=2, {args.act_limbs} digit(s)) ==", flush=True)
            results["fidelity"] = fidelity(model, nf, ft, 2, limbs=args.act_limbs, transform=transform)
            for k, v in results["fidelity"].items():
                print(f"  {k:34s} {v}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    results["machine"]["loadavg_end"] = os.getloadavg()
    out = _save(results, args.out)
    print(f"\nwrote {out}  (load average start {load0}, end {os.getloadavg()})")
    return 0


def _model_meta(path: str | None) -> dict[str, Any]:
    """The model's model.json (window length, input transform), or {} when it has none."""
    meta = (Path(path).parent if path else REPO / "samples" / "default_model") / "model.json"
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _model_t(path: str | None) -> int | None:
    """The window length the model was trained for (its model.json), if known."""
    try:
        return int(_model_meta(path)["T"])
    except (KeyError, TypeError, ValueError):
        return None


def _save(results: dict[str, Any], path: str) -> Path:
    """Write the JSON now (also after each section, so a long run keeps partial results)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float))
    return out


def print_table(key: str, res: dict[str, Any], plain_ms: float, macs: int) -> None:
    print(f"\nwindow {key}: ring MACs {macs / 1e9:.2f} G; plaintext fp32 (1 thread) {plain_ms:.0f} ms")
    modes = ("enclave", "slalom", "paper")
    print(f"{'part (ms, % of enclave wall)':52s}" + "".join(f"{m:>18s}" for m in modes))
    for part, label in PARTS:
        row = f"{label:52s}"
        for m in modes:
            b = res[m]["breakdown_ms"]
            v, tot = b.get(part, 0.0), b.get("total", 1.0)
            row += f"{v:10.1f} {100 * v / tot:5.1f}% "
        print(row)
    for label, f in (
        ("total wall (median)", lambda r: r["wall_ms"]),
        ("enclave thread CPU, on-line", lambda r: r.get("enclave_online_cpu_ms", r["enclave_cpu_ms"])),
        ("off-line precompute CPU / window", lambda r: r.get("precompute_ms_per_window", 0.0)),
        ("enclave CPU incl. precompute", lambda r: r.get("enclave_total_cpu_ms", r["enclave_cpu_ms"])),
    ):
        print(f"{label:52s}" + "".join(f"{f(res[m]):17.1f} " for m in modes))
    print(
        f"{'ratio enclave CPU on-line / plaintext':52s}"
        + "".join(
            f"{res[m].get('enclave_online_cpu_ms', res[m]['enclave_cpu_ms']) / plain_ms:17.2f}x"
            for m in modes
        )
    )
    print(
        f"{'bytes to / from worker (MB)':52s}"
        + "".join(
            f"{res[m]['bytes_to_worker'] / 1e6:8.1f}/{res[m]['bytes_from_worker'] / 1e6:<8.1f} "
            for m in modes
        )
    )
    for m, p in res["gpu_projection"].items():
        print(
            f"projected with an A100 worker, {m}: GEMM {p['worker_gemm_ms']:.1f} ms"
            f" + PCIe {p['pcie_ms']:.1f} ms + enclave {p['enclave_ms_measured']:.0f} ms"
            f" = {p['projected_latency_ms']:.0f} ms"
        )


if __name__ == "__main__":
    sys.exit(main())
