"""Model packages: importing reference checkpoints with label maps, the CLI, and the shipped default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.errors import CheckpointError
from pipeline.app.cli import main
from training.evaluate import load_package
from training.package import import_checkpoint
from training.synth import CLASSES

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "samples" / "default_model"


def _reference_file(path: Path, num_class: int, layout: str = "openpose") -> None:
    """Save a state_dict the way released reference checkpoints are (no num_batches_tracked)."""
    state = {
        k: v
        for k, v in STGCN(num_class, layout=layout).state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    torch.save(state, path)


def test_import_kinetics_style_and_ntu_checkpoints(tmp_path: Path) -> None:
    _reference_file(tmp_path / "kin.pt", 400)
    (tmp_path / "kin.txt").write_text("".join(f"action {i}\n" for i in range(400)))
    meta = import_checkpoint(tmp_path / "kin.pt", tmp_path / "kin.txt", tmp_path / "kin")
    assert (meta["num_class"], meta["layout"], meta["T"], meta["stride"], meta["fps"]) == (
        400,
        "openpose",
        300,
        30,
        30.0,
    )
    model, labels, _ = load_package(tmp_path / "kin")
    assert len(labels) == 400 and model(torch.zeros(1, 3, 20, 18, 1)).shape == (1, 400)

    _reference_file(tmp_path / "ntu.pt", 60, layout="ntu-rgb+d")
    (tmp_path / "ntu.txt").write_text("".join(f"A{i:03d}\n" for i in range(1, 61)))
    meta = import_checkpoint(
        tmp_path / "ntu.pt", tmp_path / "ntu.txt", tmp_path / "ntu", T=64, stride=16, fps=15
    )
    assert meta["layout"] == "ntu-rgb+d" and meta["num_class"] == 60
    model, _, _ = load_package(tmp_path / "ntu")
    assert model(torch.zeros(1, 3, 20, 25, 2)).shape == (1, 60)


def test_import_refuses_label_count_mismatch_and_foreign_files(tmp_path: Path) -> None:
    _reference_file(tmp_path / "m.pt", 10)
    (tmp_path / "l.txt").write_text("a\nb\n")
    with pytest.raises(CheckpointError, match="10 classes"):
        import_checkpoint(tmp_path / "m.pt", tmp_path / "l.txt", tmp_path / "out")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError):
        import_checkpoint(tmp_path / "other.pt", tmp_path / "l.txt", tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()


def test_cli_train_evaluate_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--out",
            str(run),
            "--epochs",
            "1",
            "--train-per-epoch",
            "9",
            "--val-size",
            "9",
            "--test-size",
            "9",
            "--T",
            "8",
            "--batch-size",
            "9",
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out
    meta = json.loads((run / "model.json").read_text())
    assert meta["command"].startswith("veilcam ") and "metrics" in meta
    assert (
        main(["evaluate", "--model", str(run), "--n", "9", "--out", str(tmp_path / "ev"), "--threads", "1"])
        == 0
    )
    assert (tmp_path / "ev" / "confusion.png").exists()
    _reference_file(tmp_path / "k.pt", 3)
    (tmp_path / "k.txt").write_text("a\nb\nc\n")
    assert (
        main(
            [
                "import-model",
                str(tmp_path / "k.pt"),
                "--labels",
                str(tmp_path / "k.txt"),
                "--out",
                str(tmp_path / "pkg"),
                "--T",
                "64",
            ]
        )
        == 0
    )
    # errors surface as a clean exit code, not a traceback
    assert main(["evaluate", "--model", str(tmp_path / "missing")]) == 1


def test_shipped_default_model() -> None:
    if not (DEFAULT_MODEL / "model.pt").exists():
        pytest.skip("samples/default_model not trained yet in this checkout")
    assert (DEFAULT_MODEL / "model.pt").stat().st_size <= 15 * 1024 * 1024
    model, labels, meta = load_package(DEFAULT_MODEL)
    assert labels == list(CLASSES) and meta["num_class"] == len(CLASSES)
    assert meta["layout"] == "openpose" and meta["strategy"] == "spatial"
    for key in ("T", "stride", "fps", "seed", "command"):
        assert key in meta, key
    x = torch.zeros(1, 3, int(meta["T"]), 18, int(meta.get("M", 2)))
    assert model(x).shape == (1, len(CLASSES))


def test_shipped_default_model_recognises_fresh_synthetic_windows() -> None:
    """Through its declared input transform, the shipped model is far above chance (1/9) on windows
    it has never seen — a model shipped without its transform (or with the wrong one) is not."""
    if not (DEFAULT_MODEL / "model.pt").exists():
        pytest.skip("samples/default_model not trained yet in this checkout")
    from enclave_bridge.measured.model_inputs import apply_input_transform, input_transform_of
    from training.dataset import SplitSpec, make_arrays
    from training.synth import SynthConfig

    model, _labels, meta = load_package(DEFAULT_MODEL)
    cfg = SynthConfig(T=int(meta["T"]), fps=float(meta["fps"]), M=int(meta.get("M", 2)))
    x, y = make_arrays(SplitSpec(99, "test", 90), cfg)  # another seed than the model card's test set
    with torch.no_grad():
        pred = model(torch.from_numpy(apply_input_transform(x, input_transform_of(meta)))).argmax(1).numpy()
    assert (pred == y).mean() >= 0.6


def test_cli_default_model_is_the_shipped_one() -> None:
    """`veilcam train/evaluate/realcheck` without --model use samples/default_model of the checkout
    (a module move once pointed it at pipeline/samples/…, and every default run failed)."""
    from pipeline.app.cli_train import DEFAULT_MODEL as CLI_DEFAULT

    assert Path(CLI_DEFAULT).resolve() == DEFAULT_MODEL.resolve()
    if (DEFAULT_MODEL / "model.json").exists():
        meta = json.loads((DEFAULT_MODEL / "model.json").read_text())
        # a fine-tuned default names the real clips it saw, so realcheck can report the others apart
        if meta["train_config"].get("real_windows"):
            assert meta.get("real_clips"), "fine-tuned on real windows but model.json lacks real_clips"
