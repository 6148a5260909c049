"""`veilcam gpu-worker` (the untrusted GPU worker process) and `veilcam bench` (secure-eval benchmark)."""

from __future__ import annotations

import argparse
import logging
import runpy
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this area's subcommands to the `veilcam` parser."""
    p = sub.add_parser(
        "gpu-worker",
        help="run the untrusted GPU worker (exact ring GEMMs on masked data)",
        description="Serve masked linear-layer requests from enclaves. Sees only ring elements; every "
        "reply is verified by the enclave (Freivalds).",
    )
    p.add_argument("--listen", required=True, metavar="ADDR", help="host:port or unix:/path")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="torch device")
    p.add_argument(
        "--tamper",
        choices=["flip", "scale", "replace", "garbage", "stall"],
        default=None,
        help="fault injection: corrupt replies (to demonstrate detection)",
    )
    p.add_argument("--tamper-rate", type=float, default=1.0, help="fraction of replies to corrupt")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.set_defaults(func=_run_worker)

    b = sub.add_parser("bench", help="benchmark secure ST-GCN evaluation (all modes, breakdown table)")
    b.add_argument("--quick", action="store_true", help="small windows and few repetitions")
    b.add_argument("--reps", type=int, default=None, help="timed windows per mode")
    b.add_argument("--out", default=None, help="JSON output path")
    b.add_argument("--model", default=None, help="checkpoint (default: samples/default_model/model.pt)")
    b.set_defaults(func=_run_bench)


def _run_worker(args: argparse.Namespace) -> int:
    import torch

    from enclave_bridge.gpu.worker import WorkerCore, serve

    if not 0.0 <= args.tamper_rate <= 1.0:
        raise ConfigError("--tamper-rate must be in [0, 1]")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    core = WorkerCore(args.device, args.tamper, args.tamper_rate if args.tamper else 0.0)
    if args.tamper:
        log.warning("FAULT INJECTION ON: %s replies at rate %.3f", args.tamper, args.tamper_rate)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping gpu worker", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    def _ready(addr: str) -> None:
        print(f"gpu-worker listening on {addr} device={core.device}", flush=True)

    serve(args.listen, core, ready=_ready, stop=stop)
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "secure_eval.py"
    if not script.exists():
        raise ConfigError(f"benchmark script {script} not found (run from a source checkout)")
    argv = [str(script)]
    if args.quick:
        argv.append("--quick")
    if args.reps is not None:
        argv += ["--reps", str(args.reps)]
    if args.out:
        argv += ["--out", args.out]
    if args.model:
        argv += ["--model", args.model]
    old = sys.argv
    sys.argv = argv
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = old
    return 0
