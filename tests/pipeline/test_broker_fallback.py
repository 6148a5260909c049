"""`auto` broker selection on a machine without a working Mosquitto: the embedded broker takes
over, whether Mosquitto is absent or present but failing to start (a real process that exits)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import pipeline.broker as broker_mod
from pipeline.broker import start_broker


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def test_auto_without_mosquitto_uses_the_embedded_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker_mod, "mosquitto_path", lambda: None)  # a machine without the package
    with start_broker("auto", workdir=tmp_path) as b:
        assert b.kind == "embedded" and not b.mqtt5
        assert _accepts(b.host, b.port)
    assert not _accepts(b.host, b.port)


def test_auto_falls_back_when_mosquitto_fails_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = tmp_path / "mosquitto"
    failing.write_text("#!/bin/sh\necho 'Error: unsupported option' >&2\nexit 3\n")
    failing.chmod(0o755)
    monkeypatch.setattr(broker_mod, "mosquitto_path", lambda: str(failing))
    with start_broker("auto", workdir=tmp_path / "b") as b:
        assert b.kind == "embedded"
        assert _accepts(b.host, b.port)
    with pytest.raises(broker_mod.TransportError, match="mosquitto broker exited with 3"):
        start_broker("mosquitto", workdir=tmp_path / "c")  # asked for explicitly: no silent fallback
