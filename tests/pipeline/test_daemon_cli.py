"""`veilcam replay` and `veilcam check-config` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from config.schema import REPO_ROOT
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.keys import generate_data_key
from pipeline.app.cli import main

VTEST = REPO_ROOT / "samples" / "vtest.avi"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    torch.manual_seed(2)
    torch.save(STGCN(2).state_dict(), model / "model.pt")
    (model / "labels.txt").write_text("idle\nactive\n")
    (model / "model.json").write_text(json.dumps({"T": 6, "stride": 3, "fps": 10}))
    generate_data_key().save(tmp_path / "data.key", passphrase="pw")
    (tmp_path / "pw.txt").write_text("pw\n")
    cfg = tmp_path / "veilcam.yaml"
    cfg.write_text(
        "state_dir: state\n"
        "data_key_path: data.key\n"
        "passphrase_file: pw.txt\n"
        "enclave:\n  model_dir: model\n"
        "rules:\n  min_score: 0.0\n  debounce_s: 0\n"
        "cameras:\n"
        "  hall:\n"
        f"    source: {VTEST}\n"
        "    crop: [0, 0, 384, 576]\n"
    )
    return cfg


def test_replay_cli_json_plot_and_progress(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "timeline.png"
    code = main(
        [
            "replay",
            str(VTEST),
            "--config",
            str(config_file),
            "--max-frames",
            "9",
            "--json",
            "--plot",
            str(png),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["device"] == "hall" and report["frames"] == 9
    assert report["window"] == {"length_frames": 6, "stride_frames": 3, "fps": 10.0}
    assert report["windows"] == 2 and len(report["alerts"]) == 2
    assert {a["label"] for a in report["alerts"]} <= {"idle", "active"}
    assert report["stages"]["pose"]["count"] == 9
    assert "frame" in err  # tqdm progress bar on stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    # the window counter lives in the config's state_dir (relative to the config file)
    assert (config_file.parent / "state" / "windows" / "hall.seq").is_file()


def test_replay_cli_table_and_errors(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["replay", str(VTEST), "--config", str(config_file), "--max-frames", "6", "--no-progress"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "stage" in out and "p95 ms" in out and "pose" in out and "enclave" in out
    assert main(["replay", str(tmp_path / "missing.avi"), "--config", str(config_file), "--no-progress"]) == 1
    assert "video file not found" in capsys.readouterr().err
    assert main(["replay", str(VTEST), "--config", str(config_file), "--camera", "nope"]) == 1
    assert "--camera" in capsys.readouterr().err
    assert main(["replay", str(VTEST), "--config", str(config_file), "--fps", "-1"]) == 1
    assert "fps" in capsys.readouterr().err


def test_replay_cli_without_config_uses_the_shipped_model(capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = REPO_ROOT / "samples" / "default_model"
    if not (model_dir / "model.pt").is_file():
        pytest.skip("samples/default_model not present")
    code = main(["replay", str(VTEST), "--max-frames", "12", "--no-progress", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    meta = json.loads((model_dir / "model.json").read_text())
    assert report["window"]["length_frames"] == meta["T"]
    # 12 frames < T: one zero-padded window at the end of the clip, evaluated by the shipped model
    assert report["frames"] == 12 and report["windows"] == 1 and report["windows_rejected"] == 0
    labels = (model_dir / "labels.txt").read_text().split()
    assert all(a["label"] in labels for a in report["alerts"])
