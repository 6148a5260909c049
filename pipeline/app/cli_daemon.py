"""`veilcam run`, `veilcam replay`, `veilcam check-config` (the camera daemon's commands)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.app.cli_overrides import add_replay_overrides, replay_overrides
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "/etc/veilcam/veilcam.yaml"


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this area's subcommands to the `veilcam` parser."""
    p = sub.add_parser("run", help="run the camera daemon (all cameras of a config)")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("replay", help="replay a clip through the pipeline and print a summary")
    p.add_argument("clip", help="video file (avi, mp4, …)")
    p.add_argument("--config", "-c", help="YAML config (default: throw-away key, shipped model, defaults)")
    p.add_argument("--camera", help="which camera of the config provides the settings (default: first)")
    p.add_argument(
        "--plot",
        metavar="PNG",
        help="write every window's score per label over time, the alert threshold and the alerts",
    )
    add_replay_overrides(p)
    p.add_argument("--state-dir", type=Path, help="where window counters live (default: config or temp dir)")
    p.add_argument("--consumer-key", type=Path, help="consumer key file used to open alerts for the summary")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("check-config", help="validate a config file and the files it names")
    p.add_argument(
        "config", nargs="?", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})"
    )
    p.set_defaults(func=cmd_check_config)


def cmd_run(args: argparse.Namespace) -> int:
    from config.schema import load_config
    from pipeline.app.daemon import build_daemon, camera_error

    cfg = load_config(args.config)
    daemon = build_daemon(cfg)
    daemon.install_signal_handlers()
    daemon.start()
    code = daemon.run_until_done()
    for cam in daemon.cameras.values():
        err = camera_error(cam)
        if err is not None:
            print(f"veilcam: error: {err}", file=sys.stderr)
    problems = [p for cam in daemon.cameras.values() if (p := unproductive_camera(cam)) is not None]
    for problem in problems:
        print(f"veilcam: error: {problem}", file=sys.stderr)
    return code or (1 if problems else 0)


def unproductive_camera(cam: Any) -> str | None:
    """Why a camera did no useful work, or None: every window it submitted was rejected (e.g. a data
    key the enclave was never given), or its source ended without one window evaluated. A daemon
    that exits 0 then would hide a misconfigured camera from systemd, scripts and CI.

    A camera stopped by a signal before its first window is not flagged (a live camera stopped early).
    """
    submitted = cam.stats.get("windows_submitted")
    rejected = cam.stats.get("windows_rejected")
    if rejected and rejected >= submitted:
        return (
            f"camera {cam.device}: the enclave rejected all {rejected} window(s) "
            "(reason logged above; unknown_kid = a data key the enclave was never given)"
        )
    ended = cam.end is not None and cam.end.reason in ("eof", "max_frames", "truncated")
    # windows a killed previous run already evaluated (a resumed replay skips them) count as done
    if ended and submitted + cam.stats.get("windows_skipped_done") == 0:
        return (
            f"camera {cam.device}: no window was evaluated ({cam.stats.get('frames_captured')} frame(s) "
            f"captured, {cam.stats.get('windows_sealed')} window(s) sealed, "
            f"{cam.stats.get('windows_dropped')} dropped: nobody in view, a source shorter than one "
            "window, or the enclave unreachable)"
        )
    return None


def cmd_replay(args: argparse.Namespace) -> int:
    from config.schema import load_config
    from pipeline.app.replay import format_summary, plot_timeline, replay_config, run_replay

    base = load_config(args.config) if args.config else None
    overrides = replay_overrides(args)
    with contextlib.ExitStack() as stack:
        state_dir = args.state_dir
        if state_dir is None and base is None:  # throw-away key: throw-away counters too
            state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="veilcam-replay-")))
        try:
            cfg = replay_config(args.clip, base, camera=args.camera, state_dir=state_dir, overrides=overrides)
        except ValueError as e:  # pydantic ValidationError from an override
            raise ConfigError(f"replay options: {e}") from e
        consumer = None
        if args.consumer_key:
            from enclave_bridge.shared.keys import PartyKey

            consumer = PartyKey.load(args.consumer_key)
        report = run_replay(
            args.clip,
            cfg,
            progress=not args.no_progress,
            consumer_key=consumer,
            score_windows=bool(args.plot),
        )
    if args.json:
        print(json.dumps(_report_json(report), indent=2, sort_keys=True))
    else:
        print(format_summary(report))
    if args.plot:
        out = plot_timeline(report, args.plot)
        print(f"timeline written to {out}", file=sys.stderr)
    if report.error:
        print(f"veilcam: error: {report.error}", file=sys.stderr)
    return report.exit_code


def _report_json(r: Any) -> dict[str, Any]:
    return {
        "clip": r.clip,
        "device": r.device,
        "frames": r.frames,
        "windows": r.windows,
        "windows_rejected": r.windows_rejected,
        "alert_envelopes": r.alert_envelopes,
        "alerts": r.alerts,
        "wall_s": r.wall_s,
        "window": {
            "length_frames": r.window_length_frames,
            "stride_frames": r.window_stride_frames,
            "fps": r.fps,
        },
        "stages": {
            n: {
                "count": s.count,
                "p50_s": s.latency_p50_s,
                "p95_s": s.latency_p95_s,
                "max_s": s.latency_max_s,
                "mean_s": (s.latency_sum_s / s.count) if s.count else None,
            }
            for n, s in r.stages.items()
        },
        "counters": r.counters,
        "error": r.error,
    }


def cmd_check_config(args: argparse.Namespace) -> int:
    from config.files import check_files
    from config.schema import load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"{args.config}: invalid\n{e}", file=sys.stderr)
        return 1
    problems = check_files(cfg)
    if problems:
        print(f"{args.config}: valid YAML, but:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    cams = ", ".join(
        f"{name} ({'live' if c.is_live else 'replay'} {c.source_kind})" for name, c in cfg.cameras.items()
    )
    print(f"{args.config}: ok — {len(cfg.cameras)} camera(s): {cams}")
    return 0


__all__ = ["register"]
