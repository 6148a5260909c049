"""`veilcam batch`: archive replay over a Ray cluster (issue 18; see `pipeline.app.batch`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pipeline.app.cli_overrides import add_replay_overrides, replay_overrides
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `batch` to the `veilcam` parser."""
    p = sub.add_parser(
        "batch",
        help="replay many clips (an archive) over a Ray cluster into a JSON-lines alert report",
        description="Every clip goes through the replay pipeline (pose, tracking, sealed windows, the "
        "enclave, alert rules); decode+pose+windowing run in Ray tasks, windows are sealed there and only "
        "ciphertext reaches the enclave(s). Rerunning the same command resumes: clips the manifest "
        "beside the report records as done are skipped.",
    )
    p.add_argument(
        "clips", nargs="*", help="video files, directories (searched recursively) or glob patterns"
    )
    p.add_argument(
        "--list", type=Path, dest="list_file", help="file with one clip path per line (# comments)"
    )
    p.add_argument("--out", "-o", required=True, type=Path, help="report file (JSON lines)")
    p.add_argument("--config", "-c", help="YAML config (default: throw-away key, shipped model, defaults)")
    p.add_argument("--camera", help="which camera of the config provides the settings (default: first)")
    p.add_argument(
        "--ray",
        default="auto",
        metavar="auto|local|ADDRESS",
        help="auto: join a running Ray cluster, else start a local one (no dashboard); local: always a "
        "private local one; ADDRESS: join that cluster (host:port or ray://host:10001)",
    )
    p.add_argument("--local-cpus", type=int, help="CPUs of a local Ray (default: all cores)")
    p.add_argument("--cpus-per-clip", type=float, default=1.0, help="CPUs per segment task (default 1)")
    p.add_argument("--gpus-per-clip", type=float, default=0.0, help="GPUs per segment task (default 0)")
    p.add_argument(
        "--segment-frames",
        type=int,
        default=3000,
        help="cut clips longer than 1.5x this many frames (after the fps throttle) into overlapping "
        "segments (default 3000 = 5 min at 10 fps; 0 = never)",
    )
    p.add_argument("--state-dir", type=Path, help="window counters, local evaluator (default: <out>.state)")
    p.add_argument("--restart", action="store_true", help="delete the report and manifest and start over")
    p.add_argument("--max-task-retries", type=int, default=3, help="Ray retries of a task whose worker died")
    add_replay_overrides(p, per="per clip: ")
    p.add_argument(
        "--consumer-key", type=Path, help="remote enclaves: your key, to open alerts for the report"
    )
    p.add_argument("--passphrase-file", help="passphrase of the consumer key")
    p.add_argument("--platform-pub", type=Path, help="remote enclaves: pinned platform public key")
    p.add_argument("--measurement", action="append", help="allowed enclave measurement (hex); repeatable")
    p.add_argument(
        "--allow-config", action="append", help="allow the measurement of this enclave config; repeatable"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_batch)


def _verified_keys(args: argparse.Namespace, addresses: list[str]) -> list[bytes]:
    """Attest every enclave of the run with a fresh nonce; their alert-signing keys."""
    from enclave_bridge.host.client import EnclaveClient
    from enclave_bridge.measured.enclave import load_enclave_config
    from enclave_bridge.shared.attest import Verifier, load_platform_pub, new_nonce
    from enclave_bridge.shared.measurement import compute_measurement

    if args.platform_pub is None:
        raise ConfigError(
            "--consumer-key with remote enclaves needs --platform-pub (the pinned platform key)"
        )
    allowed = [m.lower() for m in args.measurement or []]
    allowed += [compute_measurement(load_enclave_config(c, "eval")) for c in args.allow_config or []]
    if not allowed:
        raise ConfigError("give the allowed measurement(s): --measurement HEX or --allow-config enclave.yaml")
    verifier = Verifier(load_platform_pub(args.platform_pub), allowed, role="eval")
    keys = []
    for addr in addresses:
        nonce = new_nonce()
        with EnclaveClient(addr, timeout_s=30) as c:
            keys.append(bytes(verifier.verify(c.evidence(nonce), nonce).sign_pub))
        log.info("batch: enclave %s attested", addr)
    return keys


def cmd_batch(args: argparse.Namespace) -> int:
    from config.schema import load_config
    from pipeline.app.batch import BatchOptions, expand_clips, format_summary, run_batch

    clips = expand_clips(args.clips, args.list_file)
    if not clips:
        raise ConfigError("batch: no clips (give files, directories, patterns or --list FILE)")
    base = load_config(args.config) if args.config else None
    consumer = None
    verify_keys: list[bytes] = []
    if args.consumer_key is not None:
        from enclave_bridge.shared.keys import PartyKey, resolve_passphrase

        consumer = PartyKey.load(args.consumer_key, resolve_passphrase(args.passphrase_file))
        if base is not None:
            addresses = [a for a in [base.enclave.address, *base.enclave.addresses] if a]
            if addresses:
                verify_keys = _verified_keys(args, addresses)
    opts = BatchOptions(
        out=args.out,
        ray=args.ray,
        local_cpus=args.local_cpus,
        cpus_per_clip=args.cpus_per_clip,
        gpus_per_clip=args.gpus_per_clip,
        segment_frames=args.segment_frames,
        state_dir=args.state_dir,
        progress=not args.no_progress,
        restart=args.restart,
        max_task_retries=args.max_task_retries,
        consumer_key=consumer,
        enclave_verify_keys=verify_keys,
    )
    overrides = replay_overrides(args)
    summary = run_batch(clips, base, opts, camera=args.camera, overrides=overrides)
    print(format_summary(summary))
    if summary.clips_failed:
        print(f"veilcam: error: {summary.clips_failed} clip(s) failed (see the summary)", file=sys.stderr)
    return summary.exit_code


__all__ = ["register"]
