"""Daemon config: the example validates; mistakes are reported with file, line and key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from config.files import check_files, load_data_key_from_config
from config.schema import (
    REPO_ROOT,
    CameraConfig,
    load_config,
    parse_config,
)
from enclave_bridge.shared.keys import generate_data_key
from pipeline.app.cli import main
from pipeline.errors import ConfigError

EXAMPLE = REPO_ROOT / "config" / "veilcam.example.yaml"

MINIMAL = textwrap.dedent(
    """\
    data_key_path: keys/data.key
    cameras:
      door:
        source: clips/door.mp4
    """
)


def test_example_config_validates() -> None:
    cfg = parse_config(EXAMPLE.read_text(), str(EXAMPLE))
    assert set(cfg.cameras) == {"lobby", "archive-test"}
    lobby = cfg.cameras["lobby"]
    assert lobby.source_kind == "stream" and lobby.is_live
    assert cfg.cameras["archive-test"].source_kind == "file"
    assert not cfg.cameras["archive-test"].is_live


def test_defaults_and_source_kinds() -> None:
    cfg = parse_config(MINIMAL)
    cam = cfg.cameras["door"]
    assert cam.pose.backend == "auto"
    assert cam.window.persons is None and cam.window.length_frames is None
    assert cfg.rules.labels == ["*"]
    assert CameraConfig(source=0).source_kind == "webcam"
    assert CameraConfig(source=0).is_live
    assert CameraConfig(source="rtsp://u:p@h/s").is_live
    assert not CameraConfig(source="/x/y.avi").is_live
    assert CameraConfig(source="/x/y.avi", live=True).is_live


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "cam.yaml")
    return str(ei.value)


def test_unknown_key_names_line_and_path() -> None:
    text = MINIMAL + "    fsp: 10\n"
    msg = _error(text)
    assert "cam.yaml:5: cameras.door.fsp: unknown key" in msg


def test_wrong_type_and_range_name_line_and_path() -> None:
    text = MINIMAL + "    fps: -3\n    window:\n      persons: many\n"
    msg = _error(text)
    assert "cam.yaml:5: cameras.door.fps:" in msg and "greater than 0" in msg
    assert "cam.yaml:7: cameras.door.window.persons:" in msg


def test_missing_required_key() -> None:
    msg = _error("cameras:\n  door:\n    source: a.mp4\n")
    assert "data_key_path: required key is missing" in msg
    msg = _error("data_key_path: k\ncameras:\n  door:\n    fps: 10\n")
    assert "cam.yaml:3: cameras.door.source: required key is missing" in msg


def test_bad_yaml_syntax_has_line() -> None:
    msg = _error("data_key_path: k\ncameras:\n  door: [unclosed\n")
    assert msg.startswith("cam.yaml:") and "not valid YAML" in msg


def test_crop_device_and_passphrase_rules() -> None:
    assert "crop" in _error(MINIMAL + "    crop: [0, 0, 0, 10]\n")
    assert "device_id" in _error(MINIMAL + "    device_id: 'has space'\n")
    assert "camera name" in _error("data_key_path: k\ncameras:\n  'bad/name':\n    source: a.mp4\n")
    msg = _error("passphrase_file: p\npassphrase_env: X\n" + MINIMAL)
    assert "not both" in msg
    assert "at least one camera" in _error("data_key_path: k\ncameras: {}\n")
    assert "top level" in _error("- a\n- b\n")


def test_load_config_resolves_relative_paths(tmp_path: Path) -> None:
    p = tmp_path / "etc" / "veilcam.yaml"
    p.parent.mkdir()
    p.write_text(MINIMAL)
    cfg = load_config(p)
    assert cfg.data_key_path == p.parent / "keys" / "data.key"
    assert cfg.cameras["door"].source == str(p.parent / "clips" / "door.mp4")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_data_key_errors_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_data_key()
    key.save(tmp_path / "data.key", passphrase="right horse")
    (tmp_path / "pass").write_text("wrong horse\n")
    base = f"data_key_path: {tmp_path / 'data.key'}\ncameras:\n  door:\n    source: a.mp4\n"
    cfg = parse_config(base + f"passphrase_file: {tmp_path / 'pass'}\n")
    with pytest.raises(ConfigError, match="data_key_path"):
        load_data_key_from_config(cfg)
    monkeypatch.setenv("VC_TEST_PASS", "right horse")
    cfg = parse_config(base + "passphrase_env: VC_TEST_PASS\n")
    assert load_data_key_from_config(cfg).kid == key.kid
    cfg = parse_config(base + "passphrase_env: VC_TEST_UNSET_VAR\n")
    with pytest.raises(ConfigError, match="VC_TEST_UNSET_VAR"):
        load_data_key_from_config(cfg)
    cfg = parse_config(f"data_key_path: {tmp_path / 'nope.key'}\ncameras:\n  door:\n    source: a.mp4\n")
    with pytest.raises(ConfigError, match="data_key_path"):
        load_data_key_from_config(cfg)


def test_check_files_lists_missing_files(tmp_path: Path) -> None:
    broker = "broker:\n  username: cam\n  password_file: mqtt.pass\n  tls:\n    ca_file: ca.pem\n"
    cfg = load_config(_write(tmp_path, MINIMAL + broker))
    assert cfg.broker is not None and cfg.broker.password_file == tmp_path / "mqtt.pass"
    problems = "\n".join(check_files(cfg))
    assert "data_key_path" in problems
    assert "cameras.door.source" in problems
    assert "enclave.recipients" in problems
    assert "broker.password_file" in problems
    assert f"broker.tls.ca_file: {tmp_path / 'ca.pem'} not found" in problems


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "veilcam.yaml"
    p.write_text(text)
    return p


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write(tmp_path, MINIMAL + "    fps: fast\n")
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:5: cameras.door.fps:" in err

    key = generate_data_key()
    key.save(tmp_path / "data.key")
    clip = tmp_path / "door.mp4"
    clip.write_bytes(b"not checked here")
    from enclave_bridge.shared.keys import PartyKey

    PartyKey.generate("consumer", "ops").public.save(tmp_path / "ops.pub")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.pt").write_bytes(b"x")
    (model / "labels.txt").write_text("a\n")
    good = _write(
        tmp_path,
        f"state_dir: {tmp_path / 'state'}\ndata_key_path: data.key\n"
        f"enclave:\n  model_dir: model\n  recipients: [ops.pub]\n"
        "cameras:\n  door:\n    source: door.mp4\n",
    )
    assert main(["check-config", str(good)]) == 0
    assert "ok — 1 camera(s): door (replay file)" in capsys.readouterr().out
