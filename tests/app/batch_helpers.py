"""Shared pieces of the `veilcam batch` tests (no tests here): a config whose rules alert on every
window (so every window is visible in the report), the replay reference, Ray worker lookup."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from config.schema import CameraConfig, EnclaveConfig, MetricsConfig, RulesConfig, VeilcamConfig
from enclave_bridge.shared.keys import generate_data_key
from tests.conftest import REPO_ROOT, SHARED_SAMPLES

VTEST = REPO_ROOT / "samples" / "vtest.avi"
EXERCISE = SHARED_SAMPLES / "exercise.avi"
SMALL = {"max_frames": 16, "length_frames": 8, "stride_frames": 4}


def base_config(
    tmp: Path, *, enclave: EnclaveConfig | None = None, model_dir: Path | None = None
) -> VeilcamConfig:
    """One camera `cam`, a saved data key, rules that alert on every window of any label."""
    key_path = tmp / "data.key"
    if not key_path.exists():
        generate_data_key("dk-batch-test").save(key_path)
    enc = enclave or EnclaveConfig()
    if model_dir is not None:
        enc = enc.model_copy(update={"model_dir": model_dir})
    return VeilcamConfig(
        state_dir=tmp / "state",
        data_key_path=key_path,
        enclave=enc,
        metrics=MetricsConfig(enabled=False),
        rules=RulesConfig(labels=["*"], min_score=0.0, debounce_s=0.0),
        cameras={"cam": CameraConfig(source=str(VTEST))},
    )


def replay_alerts(clip: Path, base: VeilcamConfig, state: Path, overrides: dict[str, Any]) -> list[tuple]:
    """The alerts `veilcam replay` gives for `clip` (the reference a batch must match)."""
    from pipeline.app.replay import replay_config, run_replay

    cfg = replay_config(clip, base, state_dir=state, overrides=overrides)
    report = run_replay(clip, cfg, progress=False)
    assert report.error is None, report.error
    return sorted(alert_tuple(a["t0"], a["t1"], a["label"], a["score"], a["track_id"]) for a in report.alerts)


def alert_tuple(t0: float, t1: float, label: str, score: float, track: int) -> tuple:
    return (round(float(t0), 4), round(float(t1), 4), str(label), round(float(score), 5), int(track))


def report_alerts(lines: list[dict[str, Any]], clip: Path) -> list[tuple]:
    return sorted(
        alert_tuple(d["t0"], d["t1"], d["label"], d["score"], d["track"])
        for d in lines
        if d["clip"] == str(clip.resolve())
    )


def segment_workers() -> list[int]:
    """PIDs of Ray worker processes currently running a `veilcam batch` segment task (Ray names a
    busy worker's process `ray::<task name>`)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::") and "segment" in cmd:
            pids.append(int(d))
    return pids
