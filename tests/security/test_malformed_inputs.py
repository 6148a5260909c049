"""Malformed configs and video files: a clear typed error (or a counted end of stream), never a
crash with an unrelated exception. Configs are fuzzed from the shipped example; videos are real
files corrupted in the ways disks and uploads corrupt them."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.schema import REPO_ROOT, CameraConfig, parse_config
from enclave_bridge.measured.enclave import validate_enclave_config
from enclave_bridge.shared.errors import ConfigError, StageError
from pipeline.messages import EndOfStream, Frame
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats
from stages.capture import CaptureStage

EXAMPLE = (REPO_ROOT / "config" / "veilcam.example.yaml").read_text()
LINES = EXAMPLE.splitlines()
VTEST = REPO_ROOT / "samples" / "vtest.avi"

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(
        ["-1", "1e400", ".nan", "[]", "{}", "~", "'", '"', "&a", "*a", "!!python/object:os.system", "- x"]
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(LINES) - 1), st.sampled_from(["drop", "value", "indent", "dup"]), _scalar
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_daemon_config_is_valid_or_a_config_error(edits: list) -> None:
    lines = list(LINES)
    for i, kind, val in edits:
        i %= len(lines)
        if kind == "drop":
            del lines[i]
        elif kind == "indent":
            lines[i] = " " + lines[i]
        elif kind == "dup":
            lines.insert(i, lines[i])
        elif ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {val}"
        if not lines:
            lines = [""]
    try:
        parse_config("\n".join(lines), "veilcam.yaml")
    except ConfigError as e:
        assert str(e).startswith("veilcam.yaml")  # says where


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.text(max_size=12), ch, max_size=3),
    max_leaves=8,
)
_ENCLAVE_GOOD = {
    "role": "eval",
    "backend": "simulated",
    "data_owner_pub": "A" * 43 + "=",
    "model_owner_pub": "A" * 43 + "=",
    "key_enclave": {"address": "unix:/tmp/k.sock", "measurements": []},
    "evaluator": {"mode": "enclave", "worker": None},
    "topk": 3,
}


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.dictionaries(st.sampled_from([*_ENCLAVE_GOOD, "unknown"]), _values, max_size=4),
    st.sets(st.sampled_from(list(_ENCLAVE_GOOD)), max_size=3),
    st.sampled_from(["eval", "key"]),
)
def test_mutated_enclave_config_is_valid_or_a_config_error(changes: dict, drop: set, role: str) -> None:
    cfg = {k: v for k, v in {**_ENCLAVE_GOOD, **changes}.items() if k not in drop}
    if role == "key":
        cfg = {k: cfg[k] for k in ("role", "backend", "data_owner_pub") if k in cfg}
    with contextlib.suppress(ConfigError):
        validate_enclave_config(yaml.safe_load(yaml.safe_dump(cfg)), role)


def _capture(path: Path) -> tuple[list[Frame], EndOfStream | None, BaseException | None]:
    """Run the real capture stage on `path`; returns frames, the end message and the error."""
    q: BoundedQueue = BoundedQueue(10_000, "block")
    stage = CaptureStage("cam", CameraConfig(source=str(path)), q, CameraStats("cam"))
    err: list[BaseException] = []

    def run() -> None:
        try:
            stage.run(threading.Event())
        except BaseException as e:  # the supervisor's view: whatever escapes the stage
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert not t.is_alive(), "capture hung on a malformed file"
    items = []
    while len(q):
        items.append(q.get(timeout_s=1))
    frames = [i for i in items if isinstance(i, Frame)]
    ends = [i for i in items if isinstance(i, EndOfStream)]
    return frames, (ends[0] if ends else None), (err[0] if err else None)


def _corrupt(tmp: Path, name: str) -> Path:
    data = bytearray(VTEST.read_bytes())
    rng = np.random.default_rng(7)
    out = tmp / f"{name}.avi"
    if name == "empty":
        data = bytearray()
    elif name == "header-only":
        data = data[:4096]
    elif name == "random-bytes":
        data = bytearray(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    elif name == "zeroed-middle":
        n = len(data)
        data[n // 3 : n // 3 + n // 10] = bytes(n // 10)
    elif name == "sprayed":
        for i in rng.integers(8192, len(data), 400):
            data[int(i)] ^= 0xFF
    elif name == "text-named-avi":
        data = bytearray(b"this is not a video\n" * 100)
    out.write_bytes(bytes(data))
    return out


@pytest.mark.parametrize(
    "name", ["empty", "header-only", "random-bytes", "zeroed-middle", "sprayed", "text-named-avi"]
)
def test_malformed_video_files(tmp_path: Path, name: str) -> None:
    path = _corrupt(tmp_path, name)
    frames, end, err = _capture(path)
    if err is not None:
        assert isinstance(err, StageError), repr(err)
        assert "cannot decode" in str(err) or "video" in str(err)
        assert not frames
    else:
        assert end is not None and end.reason in {"eof", "truncated"}
        assert all(f.image.ndim == 3 and f.image.size > 0 for f in frames)
        assert [f.seq for f in frames] == list(range(len(frames)))


def test_evaluator_act_limbs_is_validated_and_obsolete(caplog: pytest.LogCaptureFixture) -> None:
    """`act_limbs` is obsolete (one 20-bit ring element per activation): old configs with 1, 2 or
    3 still validate, 2/3 are logged and ignored; anything else is a config error."""
    from enclave_bridge.measured.enclave import make_evaluator
    from enclave_bridge.protocol import SecureEvaluator
    from tests.enclave_bridge.secure_helpers import calibrated_model

    ok = {**_ENCLAVE_GOOD, "evaluator": {"mode": "enclave", "worker": None, "act_limbs": 1}}
    validate_enclave_config(ok, "eval")
    for bad in (0, 4, "2", True, 1.5, None):
        cfg = {**_ENCLAVE_GOOD, "evaluator": {"mode": "enclave", "worker": None, "act_limbs": bad}}
        if bad is None:
            validate_enclave_config(cfg, "eval")  # absent/null: the default
            continue
        with pytest.raises(ConfigError, match="act_limbs"):
            validate_enclave_config(cfg, "eval")
    for old in (2, 3):
        legacy = {**_ENCLAVE_GOOD, "evaluator": {"mode": "enclave", "worker": None, "act_limbs": old}}
        validate_enclave_config(legacy, "eval")
    model = calibrated_model(4, seed=1, t=8, m=1)
    x = np.zeros((1, 3, 8, 18, 1), np.float32)
    x[0, :, :, :, 0] = 0.1
    ref = SecureEvaluator(model, "slalom").exact_reference(x)
    with caplog.at_level(logging.WARNING, logger="enclave_bridge.measured.enclave"):
        assert np.array_equal(make_evaluator(model, "slalom", None, None, 1).evaluate(x), ref)
        assert "obsolete" not in caplog.text
        assert np.array_equal(make_evaluator(model, "slalom", None, None, 2).evaluate(x), ref)
        assert "act_limbs is obsolete" in caplog.text
    with pytest.raises(ValueError, match="act_limbs"):
        SecureEvaluator(model, "enclave", act_limbs=2)
