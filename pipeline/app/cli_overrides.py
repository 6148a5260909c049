"""The replay overrides `veilcam replay` and `veilcam batch` share: same flags, same dict.

Why one place: a batch must give exactly the windows of per-clip replays, so both commands have to
read the same flags into the same `run_replay` overrides.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_replay_overrides(p: argparse.ArgumentParser, per: str = "") -> None:
    """Add the frame, crop, pose and window flags (`per`: e.g. "per clip: " in the help)."""
    p.add_argument("--max-frames", type=int, help=f"{per}stop after this many frames")
    p.add_argument("--fps", type=float, help="target fps (surplus frames dropped by timestamp)")
    p.add_argument("--crop", type=int, nargs=4, metavar=("X", "Y", "W", "H"), help="region of interest")
    p.add_argument("--pose-backend", help="pose backend (default from config or auto)")
    p.add_argument("--window-frames", type=int, help="window length T in frames")
    p.add_argument("--stride-frames", type=int, help="window stride in frames")


def replay_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags added by `add_replay_overrides` as `run_replay`/`run_batch` overrides."""
    return {
        "max_frames": args.max_frames,
        "fps": args.fps,
        "crop": tuple(args.crop) if args.crop else None,
        "backend": args.pose_backend,
        "length_frames": args.window_frames,
        "stride_frames": args.stride_frames,
    }
