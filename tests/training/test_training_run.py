"""Training: the loss decreases on generator data, checkpoints resume exactly, packages load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.errors import CheckpointError, ConfigError
from training.dataset import SplitSpec, batches, epoch_spec, make_arrays
from training.evaluate import confusion, evaluate_package, load_package, per_class
from training.synth import CLASSES, SynthConfig
from training.train import CHECKPOINT, TrainConfig, lr_at, train

TINY = {
    "T": 12,
    "train_per_epoch": 18,
    "val_size": 9,
    "batch_size": 9,
    "threads": 1,
    "device": "cpu",
    "warmup_steps": 1,
}


def test_loss_decreases_on_generated_windows() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, y = make_arrays(SplitSpec(3, "train", 18), SynthConfig(T=12))
    model = STGCN(len(CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    xb, yb = torch.from_numpy(x), torch.from_numpy(y)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0], losses


def test_epochs_draw_fresh_disjoint_samples() -> None:
    a = epoch_spec(1, 0, 18)
    b = epoch_spec(1, 1, 18)
    assert (a.start, b.start) == (0, 18)
    xa, _ = make_arrays(a, SynthConfig(T=8))
    xb, _ = make_arrays(b, SynthConfig(T=8))
    assert not np.array_equal(xa, xb)
    bl = batches(xa, np.arange(18), 8, np.random.default_rng(0))
    assert [len(t[1]) for t in bl] == [8, 8, 2]
    assert sorted(torch.cat([t[1] for t in bl]).tolist()) == list(range(18))


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = TrainConfig(lr=1.0, warmup_steps=10)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(99, 100, cfg) < 0.05
    with pytest.raises(ConfigError):
        TrainConfig(optimizer="lbfgs").validate()


def test_resume_continues_exactly_and_package_loads(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train(TrainConfig(epochs=2, **TINY), straight, progress=False, command="test")
    split = tmp_path / "split"
    train(TrainConfig(epochs=1, **TINY), split, progress=False, command="test")
    hist = train(TrainConfig(epochs=2, **TINY), split, resume=True, progress=False, command="test")
    assert [e["epoch"] for e in hist["epochs"]] == [0, 1]
    a = torch.load(straight / CHECKPOINT, weights_only=False)["model"]
    b = torch.load(split / CHECKPOINT, weights_only=False)["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    # the package (best epoch so far) is a reference-format state_dict + labels + window parameters
    model, labels, meta = load_package(split)
    assert labels == list(CLASSES) and meta["T"] == 12 and meta["stride"] >= 1 and meta["fps"] == 10.0
    assert meta["command"] == "test" and meta["seed"] == 1
    assert model(torch.zeros(1, 3, 12, 18, 2)).shape == (1, len(CLASSES))
    # resuming with another data/optimiser configuration is refused, as is a missing checkpoint
    with pytest.raises(CheckpointError):
        train(TrainConfig(epochs=3, **{**TINY, "T": 16}), split, resume=True, progress=False)
    with pytest.raises(CheckpointError):
        train(TrainConfig(epochs=1, **TINY), tmp_path / "none", resume=True, progress=False)


def test_evaluate_writes_report_and_updates_model_json(tmp_path: Path) -> None:
    train(TrainConfig(epochs=1, **TINY), tmp_path / "run", progress=False, command="test")
    res = evaluate_package(
        tmp_path / "run", n=18, seed=1, report_dir=tmp_path / "eval", update_model_json=True, threads=1
    )
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 1000
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["n"] == 18 and set(on_disk["per_class"]) == set(CLASSES)
    assert np.array(on_disk["confusion"]).sum() == 18
    assert "| falling |" in (tmp_path / "eval" / "metrics.md").read_text()
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["metrics"]["accuracy"] == pytest.approx(res["accuracy"])


def test_confusion_and_per_class_metrics() -> None:
    cm = confusion(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    pc = per_class(cm, ["a", "b", "c"])
    assert pc["a"]["precision"] == pytest.approx(0.5) and pc["a"]["recall"] == pytest.approx(0.5)
    assert pc["b"]["precision"] == pytest.approx(2 / 3) and pc["b"]["recall"] == 1.0
    assert pc["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_bad_package_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        load_package(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        load_package(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"num_class": 3, "T": 4, "fps": 10, "stride": 2}))
    (tmp_path / "labels.txt").write_text("a\nb\n")
    with pytest.raises(CheckpointError, match="num_class"):
        load_package(tmp_path)


def test_init_from_fine_tunes_an_earlier_package(tmp_path: Path) -> None:
    base = tmp_path / "base"
    train(TrainConfig(epochs=1, **TINY), base, progress=False, command="base")
    start = STGCN.from_checkpoint(base / "model.pt").state_dict()
    tuned = tmp_path / "tuned"
    cfg = TrainConfig(epochs=1, init_from=str(base), **{**TINY, "lr": 1e-9})
    train(cfg, tuned, progress=False, command="tuned", max_steps=1)
    after = STGCN.from_checkpoint(tuned / "model.pt").state_dict()
    # with a vanishing learning rate the fine-tuned weights stay at the initial ones (not a fresh init)
    for k, v in start.items():
        if v.is_floating_point() and "running" not in k:
            assert torch.allclose(v, after[k], atol=1e-6), k
    assert json.loads((tuned / "model.json").read_text())["train_config"]["init_from"] == str(base)
    with pytest.raises(CheckpointError, match="init-from"):
        train(TrainConfig(epochs=1, init_from=str(tmp_path / "nope"), **TINY), tmp_path / "x", progress=False)


def test_input_transform_and_bf16_are_recorded_and_used(tmp_path: Path) -> None:
    cfg = TrainConfig(
        epochs=1,
        input_transform="person-centred",
        precision="bf16",
        label_smoothing=0.1,
        ema_decay=0.9,
        **TINY,
    )
    hist = train(cfg, tmp_path / "run", progress=False, command="test")
    assert np.isfinite(hist["epochs"][0]["loss"])
    _model, _labels, meta = load_package(tmp_path / "run")
    assert meta["input_transform"] == "person-centred"
    assert meta["train_config"]["precision"] == "bf16"
    res = evaluate_package(tmp_path / "run", n=18, seed=1, report_dir=tmp_path / "eval")
    assert 0.0 <= res["accuracy"] <= 1.0
    # speed settings may change on resume; what the model learns from may not
    ck0 = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    shipped = torch.load(tmp_path / "run" / "model.pt")
    # the package holds the averaged weights, not the last step's
    assert all(torch.equal(shipped[k], ck0["ema"]["module." + k]) for k in shipped)
    assert any(not torch.equal(shipped[k], ck0["model"][k]) for k in shipped if k.endswith("weight"))
    train(
        TrainConfig(
            epochs=2,
            **{**TINY, "input_transform": "person-centred", "label_smoothing": 0.1, "ema_decay": 0.9},
        ),
        tmp_path / "run",
        resume=True,
        progress=False,
    )
    with pytest.raises(CheckpointError):
        train(TrainConfig(epochs=3, **TINY), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(ConfigError):
        TrainConfig(input_transform="mirror").validate()
    with pytest.raises(ConfigError):
        TrainConfig(precision="fp8").validate()


def test_real_clips_and_epoch_packages_are_recorded(tmp_path: Path) -> None:
    """A fine-tune on real windows names the clips it saw in model.json (realcheck reports the
    others as held out); --keep-epochs leaves one loadable package per epoch."""
    x, _ = make_arrays(SplitSpec(5, "val", 4), SynthConfig(T=12))
    real = tmp_path / "real.npz"
    np.savez(real, x=x, y=np.array([5, 5, 6, 0]), clip=np.array(["b.mp4", "a.mp4", "a.mp4", "c.avi"]))
    cfg = TrainConfig(epochs=2, real_windows=str(real), real_fraction=0.5, **TINY)
    train(cfg, tmp_path / "run", progress=False, command="test", keep_epochs=True)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["real_clips"] == ["a.mp4", "b.mp4", "c.avi"]
    for e in (1, 2):
        _m, _l, em = load_package(tmp_path / "run" / f"epoch_{e}")
        assert em["epochs_done"] == e and em["real_clips"] == meta["real_clips"]
    train(TrainConfig(epochs=1, **TINY), tmp_path / "synthetic", progress=False, command="test")
    assert "real_clips" not in json.loads((tmp_path / "synthetic" / "model.json").read_text())
    assert not (tmp_path / "synthetic" / "epoch_1").exists()
