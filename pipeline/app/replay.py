"""`veilcam replay CLIP`: run one clip through the whole pipeline, deterministically, and report.

A replay is a camera whose source is a file and whose queues all `block` (nothing dropped). It
prints a summary table of per-stage latency and the alerts; `--plot` writes a PNG of every
window's score per label over media time, with the alert threshold and the alerts. With the
in-process local evaluator the replay adds a throw-away consumer key as an alert recipient, so
it can open (verify + decrypt) the alerts it shows — exactly what a subscriber would see. With a
remote enclave only alert counts are shown unless `consumer_key`/`enclave_verify_key` are given.

Why one module of ~460 lines: `veilcam replay` is one command: config overlay, local or remote
enclave, progress bar, summary and plot.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.schema import CameraConfig, EnclaveConfig, MetricsConfig, VeilcamConfig
from enclave_bridge.shared.keys import DataKey, PartyKey, generate_data_key
from pipeline.app.daemon import Daemon, ListSink, TeeSink, camera_error, make_local_enclave, window_params
from pipeline.errors import ConfigError, IntegrityError, VeilcamError
from pipeline.messages import PoseFrame, SealedWindow
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats, StageSnapshot
from stages.capture import CaptureStage
from stages.enclave_client import EnclaveLink, LocalEnclave

log = logging.getLogger(__name__)

_STAGE_ORDER = ("capture", "pose", "windowing", "enclave", "end_to_end")


@dataclass
class ReplayReport:
    """What a replay produced. `alerts` holds opened alerts when the replay could open them."""

    clip: str
    device: str
    frames: int
    windows: int
    windows_rejected: int
    alert_envelopes: int
    alerts: list[dict[str, Any]]
    stages: dict[str, StageSnapshot]
    counters: dict[str, int]
    wall_s: float
    window_length_frames: int
    window_stride_frames: int
    fps: float | None
    windows_timeline: list[tuple[int, float, float, str]] = field(default_factory=list)
    error: str | None = None
    rejection_reasons: list[str] = field(default_factory=list)
    # window seq -> the model's top-k [(label, score)] for *every* evaluated window, alerting or not
    # (filled with `score_windows=True` and the in-process evaluator only; see `_ScoringLink`).
    window_scores: dict[int, list[tuple[str, float]]] = field(default_factory=dict)
    min_score: float | None = None  # the rules' alert threshold, for the plot

    @property
    def exit_code(self) -> int:
        return 1 if self.error else 0


def replay_config(
    clip: str | Path,
    base: VeilcamConfig | None = None,
    *,
    camera: str | None = None,
    state_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> VeilcamConfig:
    """A one-camera config replaying `clip`: the named (or first) camera of `base`, or defaults."""
    clip_path = Path(clip).expanduser().resolve()
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    window_over: dict[str, Any] = {
        k: overrides.pop(k) for k in ("length_frames", "stride_frames", "persons") if k in overrides
    }
    pose_over: dict[str, Any] = {k: overrides.pop(k) for k in ("backend", "options") if k in overrides}
    if base is None:
        cam = CameraConfig(source=str(clip_path))
        name = "replay"
        base = VeilcamConfig(
            state_dir=state_dir or Path(tempfile.mkdtemp(prefix="veilcam-replay-")),
            data_key_path=Path("(throw-away)"),
            enclave=EnclaveConfig(),
            metrics=MetricsConfig(enabled=False),
            cameras={name: cam},
        )
    else:
        if camera is not None and camera not in base.cameras:
            raise ConfigError(f"--camera: no camera {camera!r} in the config ({', '.join(base.cameras)})")
        name = camera or next(iter(base.cameras))
        cam = base.cameras[name]
    window = cam.window.model_copy(update=window_over)
    pose = cam.pose.model_copy(update=pose_over)
    cam = cam.model_copy(
        update={
            "source": str(clip_path),
            "live": False,
            "realtime": False,
            "loop": False,
            "window": window,
            "pose": pose,
            "device_id": cam.device_id or name,
            **overrides,
        }
    )
    # Re-validate so overrides get the same checks as YAML.
    cam = CameraConfig.model_validate(cam.model_dump())
    update: dict[str, Any] = {
        "cameras": {name: cam},
        "metrics": base.metrics.model_copy(update={"enabled": False}),
    }
    if state_dir is not None:
        update["state_dir"] = state_dir
    return base.model_copy(update=update)


def run_replay(
    clip: str | Path,
    cfg: VeilcamConfig | None = None,
    *,
    key: DataKey | None = None,
    link: EnclaveLink | None = None,
    progress: bool = True,
    consumer_key: PartyKey | None = None,
    enclave_verify_key: bytes | None = None,
    sink: Any = None,
    on_window: Callable[[SealedWindow, Any, float], None] | None = None,
    score_windows: bool = False,
) -> ReplayReport:
    """Replay `clip` (a config from `replay_config`, or defaults) and return the report.

    `score_windows` (for `--plot`, in-process evaluator only) records every window's top-k scores,
    not just those of windows that raised an alert.
    """
    from enclave_bridge.host.alert_opener import AlertOpener

    cfg = cfg or replay_config(clip)
    name = next(iter(cfg.cameras))
    cam_cfg = cfg.cameras[name]
    throwaway = cfg.data_key_path == Path("(throw-away)")
    if key is None:
        if throwaway:
            key = generate_data_key()
        else:
            from config.files import load_data_key_from_config

            key = load_data_key_from_config(cfg)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    opener = None
    if link is None and not cfg.enclave.address:
        if consumer_key is None:
            consumer_key = PartyKey.generate("consumer", "replay")
        local = make_local_enclave(cfg, key, [consumer_key.public])
        link = local
        opener = AlertOpener(consumer_key, local.verify_key)
    elif isinstance(link, LocalEnclave) and consumer_key is not None:
        opener = AlertOpener(consumer_key, link.verify_key)
    elif consumer_key is not None and enclave_verify_key is not None:
        opener = AlertOpener(consumer_key, enclave_verify_key)
    scoring: _ScoringLink | None = None
    if score_windows and isinstance(link, LocalEnclave):
        scoring = _ScoringLink(link, _shadow_evaluator(cfg, key))
        link = scoring

    # Progress bar total: frames after the fps throttle.
    params = window_params(cfg, cam_cfg)
    probe_q: BoundedQueue[Any] = BoundedQueue(1, "block", name="probe")
    info = CaptureStage(cfg.device_of(name), cam_cfg, probe_q, CameraStats(cfg.device_of(name))).probe()
    total = info.frame_count or None
    if total and cam_cfg.max_frames:
        total = min(total, cam_cfg.max_frames)
    target_fps = cam_cfg.fps or params.fps
    if total and target_fps and info.fps and target_fps < info.fps and not cam_cfg.max_frames:
        total = int(total * target_fps / info.fps + 0.999)

    bar = _progress(total, progress, Path(clip).name)
    timeline: list[tuple[int, float, float, str]] = []
    reasons: list[str] = []

    def on_pose(_pf: PoseFrame) -> None:
        bar.update(1)

    def on_result(w: SealedWindow, result: Any, latency: float) -> None:
        timeline.append((w.seq, w.t0, w.t1, str(result.status)))
        if result.status != "ok" and result.reason and len(reasons) < 5:
            reasons.append(str(result.reason))
        if on_window is not None:
            on_window(w, result, latency)

    list_sink = ListSink()
    daemon_sink = list_sink if sink is None else TeeSink(sink, list_sink)
    t0 = time.monotonic()
    daemon = Daemon(
        cfg, link=link, sink=daemon_sink, key=key, metrics=False, on_pose=on_pose, on_result=on_result
    )
    pipeline = daemon.cameras[name]
    try:
        daemon.start()
        daemon.run_until_done(tick_s=0.2)
    finally:
        bar.close()
    wall = time.monotonic() - t0
    alerts: list[dict[str, Any]] = []
    if opener is not None:
        for env in list_sink.items:
            try:
                alerts.append(opener.open(env.payload))
            except IntegrityError as e:
                log.error("replay: alert seq %d did not open: %s", env.seq, e)
    err = camera_error(pipeline)
    stats = pipeline.stats
    rejected = stats.get("windows_rejected")
    error = str(err) if err is not None else None
    if error is None and rejected:
        error = f"the enclave rejected {rejected} of {stats.get('windows_submitted')} windows" + (
            f": {reasons[0]}" if reasons else ""
        )
    return ReplayReport(
        clip=str(clip),
        device=pipeline.device,
        frames=stats.get("frames_captured"),
        windows=stats.get("windows_sealed"),
        windows_rejected=rejected,
        alert_envelopes=len(list_sink.items),
        alerts=alerts,
        stages={s.name: s.snapshot() for s in stats.stages.values()},
        counters={k: stats.get(k) for k in stats.COUNTERS},
        wall_s=wall,
        window_length_frames=params.length_frames,
        window_stride_frames=params.stride_frames,
        fps=cam_cfg.fps or params.fps,
        windows_timeline=timeline,
        error=error,
        rejection_reasons=reasons,
        window_scores=dict(scoring.scores) if scoring is not None else {},
        min_score=float(cfg.rules.min_score),
    )


def _shadow_evaluator(cfg: VeilcamConfig, key: DataKey) -> tuple[LocalEnclave, Any]:
    """A second in-process evaluator of the same model that alerts on every window (its own
    throw-away signer and recipient, alert numbers in memory only), and the opener for it."""
    import itertools

    from config.schema import DEFAULT_MODEL_DIR
    from enclave_bridge.host.alert_opener import AlertOpener
    from enclave_bridge.measured.model_inputs import input_transform_of
    from enclave_bridge.shared.policy import ALERT_FIELDS, Recipient
    from stages.enclave_client import load_model_dir

    model, labels, meta = load_model_dir(cfg.enclave.model_dir or DEFAULT_MODEL_DIR)
    signer = PartyKey.generate("data-owner", "plot-scores")
    reader = PartyKey.generate("consumer", "plot-scores")
    seqs = itertools.count(1)
    shadow = LocalEnclave(
        {key.kid: key},
        model,
        labels,
        signer,
        [Recipient("plot", reader.public.rid, reader.public.kx_pub, tuple(ALERT_FIELDS))],
        lambda _device: next(seqs),
        topk=len(labels),
        input_transform=input_transform_of(meta),
    )
    return shadow, AlertOpener(reader, shadow.verify_key)


class _ScoringLink:
    """`EnclaveLink` that forwards every window to the real (local) evaluator and also to a shadow
    one whose rules alert on everything, keeping each window's scores for the plot.

    Only for the in-process evaluator, which is a development stand-in anyway: a real enclave never
    reveals the scores of windows that raise no alert. Costs one more ST-GCN pass per window.
    """

    def __init__(self, inner: LocalEnclave, shadow: tuple[LocalEnclave, Any]) -> None:
        self.inner = inner
        self.shadow, self._opener = shadow
        self.scores: dict[int, list[tuple[str, float]]] = {}

    def hello(self, device: str, rules: dict[str, Any]) -> dict[str, Any]:
        self.shadow.hello(device, {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0})
        return self.inner.hello(device, rules)

    def submit(self, blob: bytes) -> Any:
        result = self.inner.submit(blob)
        if result.status == "ok":
            for payload in self.shadow.submit(blob).alerts:
                try:
                    a = self._opener.open(payload)
                except IntegrityError as e:  # cannot happen with our own keys; never fatal for a plot
                    log.warning("replay plot: window %d scores unreadable: %s", result.window_seq, e)
                    continue
                self.scores[int(a["window_seq"])] = [(str(k[0]), float(k[1])) for k in a["topk"]]
        return result

    def evidence(self, nonce: bytes) -> dict[str, Any]:
        return self.inner.evidence(nonce)

    @property
    def verify_key(self) -> bytes:
        return self.inner.verify_key

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def close(self) -> None:
        return None


def _progress(total: int | None, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", dynamic_ncols=True)


# -- output -----------------------------------------------------------------------------------------
def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def format_summary(r: ReplayReport) -> str:
    """The plain-text table `veilcam replay` prints."""
    lines = [
        f"replay {r.clip}  (device {r.device})",
        f"  frames {r.frames}  windows {r.windows} "
        f"(T={r.window_length_frames}, stride={r.window_stride_frames}"
        + (f", {r.fps:g} fps" if r.fps else "")
        + f")  alerts {r.alert_envelopes}  wall {r.wall_s:.1f} s"
        + (f"  ({r.frames / r.wall_s:.1f} frames/s)" if r.wall_s > 0 else ""),
        "",
        f"  {'stage':<11} {'items':>7} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9} {'mean ms':>9}",
    ]
    names = [n for n in _STAGE_ORDER if n in r.stages] + sorted(set(r.stages) - set(_STAGE_ORDER))
    for n in names:
        s = r.stages[n]
        mean = s.latency_sum_s / s.count if s.count else None
        lines.append(
            f"  {n:<11} {s.count:>7} {_ms(s.latency_p50_s):>9} {_ms(s.latency_p95_s):>9} "
            f"{_ms(s.latency_max_s):>9} {_ms(mean):>9}"
        )
    noteworthy = {k: v for k, v in r.counters.items() if v and k not in ("frames_captured", "windows_sealed")}
    if noteworthy:
        lines.append("")
        lines.append("  " + "  ".join(f"{k}={v}" for k, v in noteworthy.items()))
    lines.append("")
    if r.alerts:
        lines.append(f"  {'seq':>6} {'t0 s':>8} {'t1 s':>8} {'track':>6}  {'label':<24} {'score':>6}")
        lines.extend(
            f"  {a.get('seq', -1):>6} {a.get('t0', 0.0):>8.2f} {a.get('t1', 0.0):>8.2f} "
            f"{a.get('track_id', -1):>6}  {a.get('label', '?')!s:<24} {a.get('score', 0.0):>6.3f}"
            for a in r.alerts
        )
    elif r.alert_envelopes:
        lines.append(f"  {r.alert_envelopes} encrypted alerts (no consumer key to open them)")
    else:
        lines.append("  no alerts")
    if r.error:
        lines.append("")
        lines.append(f"  error: {r.error}")
    return "\n".join(lines)


def timeline_series(r: ReplayReport) -> tuple[list[float], dict[str, list[float]]]:
    """What `--plot` draws: one time per window (its end, media seconds, in window order) and, per
    label, that window's score (NaN when unknown: a rejected window, a label outside the top-k, or
    a remote enclave, which only reveals the scores of windows that alerted).

    Every window of `windows_timeline` has a point in time, so a gap in a series is visible as such.
    """
    nan = float("nan")
    windows = sorted(r.windows_timeline, key=lambda w: w[0])
    times = [float(t1) for _seq, _t0, t1, _status in windows]
    by_seq: dict[int, list[tuple[str, float]]] = dict(r.window_scores)
    for a in r.alerts:  # a remote enclave: alerts carry the top-k of the windows that alerted
        seq = a.get("window_seq")
        if isinstance(seq, int) and seq not in by_seq and isinstance(a.get("topk"), list):
            by_seq[seq] = [(str(k[0]), float(k[1])) for k in a["topk"]]
    labels = sorted({lab for topk in by_seq.values() for lab, _ in topk})
    series: dict[str, list[float]] = {lab: [nan] * len(windows) for lab in labels}
    for i, (seq, _t0, _t1, status) in enumerate(windows):
        if status != "ok":
            continue
        for lab, score in by_seq.get(seq, []):
            series[lab][i] = score
    return times, series


def plot_timeline(r: ReplayReport, path: str | Path) -> Path:
    """PNG: every window's score per label over media time (one line per label, the labels that
    ever reach the threshold first), the rules' threshold, alerts as stars, rejected windows in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    times, series = timeline_series(r)
    fig, ax = plt.subplots(figsize=(11, 4.5), dpi=100)
    cmap = plt.get_cmap("tab10")
    # Most relevant first (highest peak), so colours and legend order are stable and useful.
    order = sorted(series, key=lambda lab: -max((v for v in series[lab] if not math.isnan(v)), default=0.0))
    for i, label in enumerate(order):
        ax.plot(times, series[label], marker=".", linewidth=1.2, color=cmap(i % 10), label=label)
    if r.alerts:
        ax.scatter(
            [float(a.get("t1", 0.0)) for a in r.alerts],
            [float(a.get("score", 0.0)) for a in r.alerts],
            marker="*",
            s=160,
            color="black",
            zorder=4,
            label=f"alert ({len(r.alerts)})",
        )
    if r.min_score is not None:
        ax.axhline(
            r.min_score, color="tab:red", linestyle="--", linewidth=1, label=f"threshold {r.min_score:g}"
        )
    for _seq, t0, t1, status in r.windows_timeline:
        if status != "ok":
            ax.axvspan(t0, t1, color="tab:red", alpha=0.12)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("media time (s), window end")
    ax.set_ylabel("score")
    note = "" if r.window_scores else " (scores of alerting windows only)"
    ax.set_title(
        f"{Path(r.clip).name}: {r.windows} windows, {len(r.alerts) or r.alert_envelopes} alerts{note}",
        fontsize="medium",
    )
    if order or r.alerts or r.min_score is not None:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(out, format="png")
    except OSError as e:
        raise VeilcamError(f"--plot: cannot write {out}: {e.strerror}") from e
    finally:
        plt.close(fig)
    return out


__all__ = [
    "ReplayReport",
    "format_summary",
    "plot_timeline",
    "replay_config",
    "run_replay",
    "timeline_series",
]
