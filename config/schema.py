"""The daemon's YAML configuration (docs/ARCHITECTURE.md §8), validated with pydantic v2.

Every model forbids unknown keys (a typo is an error, not a silently ignored setting), units are in
the names (`timeout_s`, `fps`, `length_frames`), and secrets are never inline: the data key is a
file, its passphrase a file or an environment variable. `load_config` reports every problem as
`file:line: key.path: message`, which `veilcam check-config` prints.

Why one module of ~570 lines: the configuration is one YAML document; its pydantic models are
validated together and reference each other.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from config.broker import BrokerConfig
from enclave_bridge.shared.errors import ConfigError
from enclave_bridge.shared.rules import AlertRules

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "samples" / "default_model"
_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReconnectConfig(_Model):
    """How a live source is re-opened after it drops (exponential backoff)."""

    initial_backoff_s: float = Field(0.5, gt=0, description="first wait before re-opening a lost stream")
    max_backoff_s: float = Field(30.0, gt=0, description="ceiling of the exponential backoff")
    max_attempts: int | None = Field(
        None,
        ge=1,
        description="give up (StageError → supervisor) after this many failed re-opens; null=never",
    )
    open_timeout_s: float = Field(10.0, gt=0, description="OpenCV/FFmpeg open timeout for network streams")
    read_timeout_s: float = Field(10.0, gt=0, description="OpenCV/FFmpeg read timeout for network streams")


class PoseConfig(_Model):
    """Which pose backend turns frames into 18-joint skeletons (`stages.pose.create_backend`)."""

    backend: Literal[
        "auto", "openvino-openpose", "opencv-openpose", "openpose", "mediapipe", "openpose-json"
    ] = Field(
        "auto", description="auto = openvino-openpose where openvino is installed, else opencv-openpose"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="backend keyword options")
    person_height_px: float | None = Field(
        None,
        gt=0,
        description="expected height of a standing person in frame pixels; sizes the OpenPose input "
        "so such a person is ~96 px tall there (null: fixed 432x368 or options.input_width/height)",
    )
    in_process: bool = Field(
        False, description="run pose in the daemon process instead of a child process (debugging only)"
    )
    shared: bool = Field(
        False,
        description="one pose process serves every camera with equal pose settings (frames batched) "
        "instead of one process per camera",
    )

    def backend_options(self) -> dict[str, Any]:
        """`options` plus `person_height_px` when set: the keyword options `create_backend` gets."""
        if self.person_height_px is None:
            return dict(self.options)
        return {**self.options, "person_height_px": self.person_height_px}


class TrackerConfig(_Model):
    """norfair keypoint tracker settings (distances relative to the frame diagonal)."""

    keypoint_distance_frac: float = Field(
        0.04, gt=0, le=1, description="a joint matches when closer than this fraction of the frame diagonal"
    )
    min_joint_score: float = Field(0.1, ge=0, le=1, description="joints below this score are not matched")
    max_missed_frames: int = Field(15, ge=1, description="frames a track survives without a detection")
    initialization_delay_frames: int = Field(
        1, ge=0, description="detections needed before a track is confirmed"
    )


class WindowConfig(_Model):
    """Sliding windows (ARCHITECTURE.md §3). `null` lengths come from `model.json` (else 300/30)."""

    length_frames: int | None = Field(None, ge=1, le=10_000, description="T: frames per window")
    stride_frames: int | None = Field(None, ge=1, le=10_000, description="frames between window starts")
    persons: int | None = Field(
        None,
        ge=1,
        le=16,
        description="M: the most confident tracks kept per window (null: model.json M, else 2)",
    )
    flush_partial: bool = Field(
        True, description="at end of stream, a stream shorter than T still yields one zero-padded window"
    )
    min_frames: int | None = Field(
        None,
        ge=0,
        le=10_000,
        description="windows with fewer frames showing a person are not evaluated (null: T/5)",
    )
    min_joints: int = Field(4, ge=0, le=18, description="joints a person needs to count in a frame")
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)


class QueuesConfig(_Model):
    """Capacities of the bounded queues between stages (policies follow the source kind)."""

    frames: int = Field(4, ge=1, le=1024, description="capture → pose")
    poses: int = Field(64, ge=1, le=100_000, description="pose → windowing")
    windows: int = Field(2, ge=1, le=1024, description="windowing → enclave (latest_wins when live)")
    put_timeout_s: float | None = Field(
        None, gt=0, description="replay: fail instead of waiting forever on a stuck consumer"
    )


class RulesConfig(_Model):
    """Alert rules sent to the enclave at hello and evaluated there (labels never leave it)."""

    labels: list[str] = Field(
        default_factory=lambda: ["*"], min_length=1, description="labels that raise alerts; ['*'] = any"
    )
    min_score: float = Field(0.5, ge=0, le=1, description="softmax score needed for an alert")
    debounce_s: float = Field(10.0, ge=0, description="per track and label: quiet time between alerts")
    label_min_score: dict[str, float] = Field(
        default_factory=dict, description="per-label min_score (overrides min_score for that label)"
    )
    min_windows: dict[str, int] = Field(
        default_factory=dict,
        description="per label: consecutive matching windows before the first alert (default 1)",
    )

    def as_dict(self) -> dict[str, Any]:
        """The rules as the enclave reads them (its own `AlertRules.to_dict`: one wire format)."""
        return AlertRules(
            tuple(self.labels),
            self.min_score,
            self.debounce_s,
            tuple(self.label_min_score.items()),
            tuple(self.min_windows.items()),
        ).to_dict()


class CameraConfig(_Model):
    """One camera: a source (file path, rtsp/http URL or webcam index) and its pipeline settings."""

    source: str | int = Field(description="video file path, rtsp://… URL or webcam index (int)")
    device_id: str | None = Field(None, description="id used on MQTT topics and in windows; default: name")
    live: bool | None = Field(
        None, description="live (drop oldest, counted) or replay (block, never drop); null = by source kind"
    )
    realtime: bool | None = Field(
        None, description="pace a file at its own frame rate (file as a live camera); default = live"
    )
    loop: bool = Field(False, description="restart a file source at its end (file as an endless camera)")
    fps: float | None = Field(
        None, gt=0, le=240, description="target fps; surplus frames dropped by timestamp"
    )
    crop: tuple[int, int, int, int] | None = Field(
        None, description="ROI [x, y, w, h] in pixels, applied before pose (e.g. half of a split-screen clip)"
    )
    max_frames: int | None = Field(None, ge=1, description="stop after this many frames (tests, previews)")
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    pose: PoseConfig = Field(default_factory=PoseConfig)
    window: WindowConfig = Field(default_factory=WindowConfig)
    queues: QueuesConfig = Field(default_factory=QueuesConfig)
    rules: RulesConfig | None = Field(None, description="per-camera alert rules; default: top-level rules")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str | int) -> str | int:
        if isinstance(v, int):
            if v < 0:
                raise ValueError("webcam index must be >= 0")
            return v
        if not v.strip():
            raise ValueError("source must not be empty")
        return v

    @field_validator("crop")
    @classmethod
    def _crop(cls, v: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if v is not None:
            x, y, w, h = v
            if x < 0 or y < 0 or w <= 0 or h <= 0:
                raise ValueError("crop is [x, y, w, h] with x, y >= 0 and w, h > 0")
        return v

    @field_validator("device_id")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is not None and not _DEVICE_RE.match(v):
            raise ValueError("device_id: 1-64 chars of letters, digits, '_', '.', '-' (used in MQTT topics)")
        return v

    @property
    def source_kind(self) -> Literal["file", "stream", "webcam"]:
        if isinstance(self.source, int):
            return "webcam"
        if re.match(r"^[a-z][a-z0-9+.-]*://", self.source) and not self.source.startswith("file://"):
            return "stream"
        return "file"

    @property
    def is_live(self) -> bool:
        return self.live if self.live is not None else self.source_kind != "file"


class EnclaveConfig(_Model):
    """Where windows are evaluated: a `veilcam enclave` process, or the in-process stand-in."""

    address: str | None = Field(
        None, description="host:port or unix:/path of `veilcam enclave`; null = in-process local evaluator"
    )
    addresses: list[str] = Field(
        default_factory=list,
        description="an enclave pool: several `veilcam enclave` addresses (with `address`, if set, first); "
        "each device is pinned to one, a failing one is skipped with backoff (docs/SCALE_OUT.md)",
    )
    timeout_s: float = Field(30.0, gt=0, description="per-request socket timeout")
    retry_backoff_s: float = Field(
        1.0, gt=0, description="first wait before retrying a window after a transport error (doubles, ≤ 5 s)"
    )
    retry_timeout_s: float = Field(
        60.0,
        gt=0,
        description="keep retrying a window this long (outlasts an enclave restart); then it is dropped, "
        "counted in windows_dropped, and the daemon exits non-zero",
    )
    max_retries: int | None = Field(
        None, ge=0, description="optional cap on retries per window as well (null: bounded by time only)"
    )
    model_dir: Path | None = Field(
        None,
        description="local evaluator: dir with model.pt, labels.txt, model.json (default: shipped model)",
    )
    recipients: list[Path] = Field(
        default_factory=list, description="local evaluator: party public-key files alerts are encrypted to"
    )
    signing_key_path: Path | None = Field(
        None, description="local evaluator: Ed25519 party key that signs alerts (generated if absent)"
    )


class MetricsConfig(_Model):
    enabled: bool = Field(True, description="serve Prometheus /metrics and /healthz")
    listen: str = Field("127.0.0.1:9108", description="host:port of the HTTP endpoint (port 0 = any free)")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("listen must be host:port")
        return v


class SupervisorConfig(_Model):
    """Frigate-style restart budget: a stage that fails more often than this is given up."""

    max_restarts: int = Field(5, ge=0, description="restarts allowed per stage within window_s")
    window_s: float = Field(60.0, gt=0, description="sliding window of the restart budget")
    backoff_s: float = Field(1.0, ge=0, description="first wait before a restart (doubles each time)")
    stats_interval_s: float = Field(10.0, gt=0, description="period of the MQTT stats message")
    shutdown_timeout_s: float = Field(15.0, gt=0, description="graceful flush budget on SIGTERM")


class VeilcamConfig(_Model):
    """Top level of `veilcam.yaml`."""

    state_dir: Path = Field(Path("/var/lib/veilcam"), description="window counters, outbox database")
    data_key_path: Path = Field(description="the data owner's AES key file (`veilcam keygen data`)")
    passphrase_file: Path | None = Field(None, description="file holding the data-key passphrase")
    passphrase_env: str | None = Field(
        None, description="environment variable holding the data-key passphrase"
    )
    enclave: EnclaveConfig = Field(default_factory=EnclaveConfig)
    rules: RulesConfig = Field(default_factory=RulesConfig)
    broker: BrokerConfig | None = Field(None, description="MQTT broker; null = alerts stay in the outbox")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    cameras: dict[str, CameraConfig] = Field(description="camera name → camera settings")

    @field_validator("cameras")
    @classmethod
    def _cameras(cls, v: dict[str, CameraConfig]) -> dict[str, CameraConfig]:
        if not v:
            raise ValueError("at least one camera is required")
        for name in v:
            if not _DEVICE_RE.match(str(name)):
                raise ValueError(
                    f"camera name {name!r}: 1-64 chars of letters, digits, '_', '.', '-' "
                    "(used in MQTT topics)"
                )
        return v

    @model_validator(mode="after")
    def _unique_devices(self) -> VeilcamConfig:
        seen: dict[str, str] = {}
        for name, cam in self.cameras.items():
            dev = cam.device_id or name
            if dev in seen:
                raise ValueError(f"cameras {seen[dev]!r} and {name!r} share device_id {dev!r}")
            seen[dev] = name
        if self.passphrase_file is not None and self.passphrase_env is not None:
            raise ValueError("set passphrase_file or passphrase_env, not both")
        return self

    def device_of(self, name: str) -> str:
        return self.cameras[name].device_id or name

    def rules_of(self, name: str) -> RulesConfig:
        return self.cameras[name].rules or self.rules

    def passphrase(self) -> str | None:
        """The data-key passphrase from its file or environment variable (never from the YAML)."""
        if self.passphrase_file is not None:
            try:
                return self.passphrase_file.read_text().strip()
            except OSError as e:
                raise ConfigError(f"passphrase_file: cannot read {self.passphrase_file}: {e.strerror}") from e
        if self.passphrase_env is not None:
            value = os.environ.get(self.passphrase_env)
            if value is None:
                raise ConfigError(f"passphrase_env: environment variable {self.passphrase_env} is not set")
            return value
        return None


# -- model.json defaults ---------------------------------------------------------------------------
def model_window_defaults(model_dir: Path | None) -> dict[str, float]:
    """`T`, `stride`, `fps`, `M` from `<model_dir>/model.json` when present (the model fixes the window)."""
    path = (model_dir or DEFAULT_MODEL_DIR) / "model.json"
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable model.json: {e}") from e
    return {k: doc[k] for k in ("T", "stride", "fps", "M") if isinstance(doc.get(k), int | float)}


# -- loading with YAML line numbers ----------------------------------------------------------------
def _line_map(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path (as strings) to its 1-based line in the YAML text."""
    lines: dict[tuple[str, ...], int] = {}
    node = yaml.compose(text, Loader=yaml.SafeLoader)

    def walk(n: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = (*path, str(k.value))
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                key = (*path, str(i))
                lines[key] = item.start_mark.line + 1
                walk(item, key)

    if node is not None:
        walk(node, ())
    return lines


def _locate(loc: tuple[int | str, ...], lines: dict[tuple[str, ...], int]) -> tuple[str, int | None]:
    """Turn a pydantic `loc` into a dotted YAML path and its line (skipping union-member tags)."""
    path: tuple[str, ...] = ()
    for part in loc:
        cand = (*path, str(part))
        if cand in lines:
            path = cand
        elif isinstance(part, str) and _is_union_tag(part):
            continue
        else:
            path = cand  # a key missing from the file (e.g. a required field)
    line = None
    probe = path
    while probe:
        if probe in lines:
            line = lines[probe]
            break
        probe = probe[:-1]
    return ".".join(path) or "(top level)", line


_UNION_TAGS = ("str", "int", "float", "bool", "none", "list[", "dict[", "tuple[", "function-", "literal[")


def _is_union_tag(part: str) -> bool:
    return part in _UNION_TAGS or part.startswith(_UNION_TAGS)


def format_validation_error(e: ValidationError, text: str, source: str) -> str:
    lines = _line_map(text)
    out = []
    for err in e.errors():
        path, line = _locate(tuple(err["loc"]), lines)
        where = f"{source}:{line}" if line is not None else source
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a setting; check the spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        out.append(f"{where}: {path}: {msg}")
    return "\n".join(out)


def parse_config(text: str, source: str = "<config>") -> VeilcamConfig:
    """Validate YAML text; raises `ConfigError` listing `source:line: key.path: message` lines."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings")
    try:
        return VeilcamConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, text, source)) from e


def load_config(path: str | os.PathLike[str]) -> VeilcamConfig:
    """Read and validate a config file; relative paths inside it are relative to the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror}") from e
    cfg = parse_config(text, str(p))
    return _resolve_paths(cfg, p.parent)


def _resolve_paths(cfg: VeilcamConfig, base: Path) -> VeilcamConfig:
    def fix(x: Path | None) -> Path | None:
        if x is None:
            return None
        x = x.expanduser()
        return x if x.is_absolute() else (base / x)

    enclave = cfg.enclave.model_copy(
        update={
            "model_dir": fix(cfg.enclave.model_dir),
            "recipients": [fix(r) for r in cfg.enclave.recipients],
            "signing_key_path": fix(cfg.enclave.signing_key_path),
        }
    )
    cams = {}
    for name, cam in cfg.cameras.items():
        src = cam.source
        if cam.source_kind == "file" and isinstance(src, str):
            sp = Path(src.removeprefix("file://")).expanduser()
            src = str(sp if sp.is_absolute() else base / sp)
        cams[name] = cam.model_copy(update={"source": src})
    broker = cfg.broker
    if broker is not None:
        tls = broker.tls
        if tls is not None:
            tls = tls.model_copy(
                update={
                    "ca_file": fix(tls.ca_file),
                    "cert_file": fix(tls.cert_file),
                    "key_file": fix(tls.key_file),
                }
            )
        broker = broker.model_copy(update={"password_file": fix(broker.password_file), "tls": tls})
    return cfg.model_copy(
        update={
            "broker": broker,
            "state_dir": fix(cfg.state_dir),
            "data_key_path": fix(cfg.data_key_path),
            "passphrase_file": fix(cfg.passphrase_file),
            "enclave": enclave,
            "cameras": cams,
        }
    )


__all__ = [
    "DEFAULT_MODEL_DIR",
    "CameraConfig",
    "EnclaveConfig",
    "MetricsConfig",
    "PoseConfig",
    "QueuesConfig",
    "ReconnectConfig",
    "RulesConfig",
    "SupervisorConfig",
    "TrackerConfig",
    "VeilcamConfig",
    "WindowConfig",
    "format_validation_error",
    "load_config",
    "model_window_defaults",
    "parse_config",
]
