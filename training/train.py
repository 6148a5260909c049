"""Train the reference ST-GCN on synthetic windows; checkpoints every epoch, resumable.

Outputs in `out_dir`:
- `checkpoint.pt` — model + optimiser + scheduler + epoch + history (resume point, not shipped);
- `model.pt` (best-so-far state_dict, reference keys), `labels.txt`, `model.json` — the model
  package the daemon loads, rewritten whenever validation accuracy improves, so an interrupted
  run still leaves a usable model.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from enclave_bridge.measured.model_inputs import INPUT_TRANSFORMS, apply_input_transform
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.errors import CheckpointError, ConfigError
from training.dataset import (
    SplitSpec,
    augment_real,
    batches,
    epoch_spec,
    load_real_windows,
    make_arrays,
    real_clip_names,
)
from training.synth import CLASSES, SynthConfig

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PRECISIONS = ("fp32", "bf16")


@dataclass(slots=True)
class TrainConfig:
    """Everything that determines a training run (recorded in `model.json`)."""

    seed: int = 1
    epochs: int = 10
    train_per_epoch: int = 2700
    val_size: int = 450
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    T: int = 30
    fps: float = 10.0
    M: int = 2
    stride: int = 10
    threads: int = 2
    device: str = "auto"
    precision: str = "fp32"  # "bf16": autocast matmuls/convs to bfloat16 (≈2× on AVX512-BF16 CPUs)
    label_smoothing: float = 0.0
    input_transform: str = "reference"  # what the enclave applies before ST-GCN (model.json)
    ema_decay: float = 0.0  # > 0: validate and ship an exponential moving average of the weights
    init_from: str = ""  # start from these weights (a package dir or model.pt): fine-tuning
    real_windows: str = ""  # npz of annotated real windows (`training.realcheck.export_windows`)
    real_fraction: float = 0.0  # per epoch: this many real windows (augmented) per synthetic one
    classes: tuple[str, ...] = field(default=CLASSES)

    def validate(self) -> None:
        if self.epochs < 1 or self.train_per_epoch < 1 or self.batch_size < 1 or self.val_size < 1:
            raise ConfigError("epochs, train_per_epoch, val_size and batch_size must be ≥ 1")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.input_transform not in INPUT_TRANSFORMS:
            raise ConfigError(
                f"input_transform must be one of {', '.join(INPUT_TRANSFORMS)}, got {self.input_transform!r}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.real_fraction <= 1.0 or (self.real_fraction > 0 and not self.real_windows):
            raise ConfigError("real_fraction must be in [0, 1] and needs real_windows")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.lr <= 0 or self.stride < 1 or self.T < 4 or self.fps <= 0 or self.M < 1:
            raise ConfigError("lr > 0, stride ≥ 1, T ≥ 4, fps > 0, M ≥ 1 are required")

    @property
    def synth(self) -> SynthConfig:
        return SynthConfig(T=self.T, fps=self.fps, M=self.M)


def pick_device(name: str) -> torch.device:
    """`auto` → CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"bad device {name!r}: {e}") from e


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 1 % of the base rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def predict(
    model: STGCN, x: npt.NDArray[np.float32], device: torch.device, batch_size: int = 64
) -> npt.NDArray[np.float32]:
    """Logits (n, num_class) for windows x (n, 3, T, 18, M)."""
    model.eval()
    outs = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[i : i + batch_size]).to(device)
        outs.append(model(xb).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, model.num_class), np.float32)


def write_package(out: Path, model: STGCN, cfg: TrainConfig, extra: dict[str, Any]) -> None:
    """`model.pt` + `labels.txt` + `model.json` (window parameters, provenance, metrics)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, out / "model.pt.tmp")
    (out / "model.pt.tmp").replace(out / "model.pt")
    (out / "labels.txt").write_text("".join(f"{c}\n" for c in cfg.classes), encoding="utf-8")
    meta = {
        "num_class": len(cfg.classes),
        "layout": "openpose",
        "strategy": "spatial",
        "T": cfg.T,
        "stride": cfg.stride,
        "fps": cfg.fps,
        "M": cfg.M,
        "seed": cfg.seed,
        "normalisation": "x/W-0.5, y/H-0.5, score; zeros where a joint is missing",
        "input_transform": cfg.input_transform,
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "classes"},
        **extra,
    }
    (out / "model.json.tmp").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (out / "model.json.tmp").replace(out / "model.json")


def _load_initial_weights(model: STGCN, cfg: TrainConfig) -> None:
    """Fine-tuning: strict load of an earlier model of the same classes (package dir or model.pt)."""
    src = Path(cfg.init_from)
    path = src / "model.pt" if src.is_dir() else src
    try:
        init = STGCN.from_checkpoint(path, num_class=len(cfg.classes))
    except (OSError, CheckpointError) as e:
        raise CheckpointError(f"--init-from {src}: {e}") from e
    model.load_state_dict(init.state_dict())
    log.info("initial weights from %s", path)


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    package_dir: str | Path | None = None,
    command: str | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    max_steps: int | None = None,
    keep_epochs: bool = False,
) -> dict[str, Any]:
    """Run (or resume) training; returns the history dict. `max_steps` caps steps (tests).

    `keep_epochs`: also write every epoch's package to OUT/epoch_N (fine-tunes: the best
    synthetic validation epoch is not always the one that carries over best to real footage)."""
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pkg = Path(package_dir) if package_dir else out
    device = pick_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = STGCN(len(cfg.classes), layout="openpose", strategy="spatial").to(device)
    if cfg.init_from and not resume:
        _load_initial_weights(model, cfg)
    opt: torch.optim.Optimizer
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # weight averaging: one epoch's weights vary a lot in how they carry over to real footage; an
    # average over the last few hundred steps (BatchNorm statistics included) is steadier
    ema = (
        # torch leaves get_ema_multi_avg_fn unannotated
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)  # type: ignore[no-untyped-call]
        if cfg.ema_decay > 0
        else None
    )
    shipped = cast(STGCN, ema.module) if ema is not None else model
    steps_per_epoch = math.ceil(cfg.train_per_epoch / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    history: dict[str, Any] = {"epochs": [], "best_val_acc": -1.0, "best_epoch": -1, "train_s": 0.0}
    start_epoch, step = 0, 0
    ck_path = out / CHECKPOINT
    if resume:
        if not ck_path.exists():
            raise CheckpointError(f"--resume given but {ck_path} does not exist")
        try:
            ck = torch.load(ck_path, map_location=device, weights_only=False)  # own file
            saved = ck["config"]
        except Exception as e:
            raise CheckpointError(f"cannot read {ck_path}: {type(e).__name__}: {e}") from e
        # how fast a run goes (device, threads, precision) may change between resumes; what it learns may not
        ignore = {"classes", "device", "threads", "epochs", "precision"}
        defaults = asdict(TrainConfig())
        if {k: saved.get(k, defaults[k]) for k in defaults if k not in ignore} != {
            k: v for k, v in asdict(cfg).items() if k not in ignore
        }:
            raise CheckpointError(f"{ck_path} was written with a different training configuration")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        start_epoch, step, history = ck["epoch"] + 1, ck["step"], ck["history"]
        log.info("resumed from %s at epoch %d (step %d)", ck_path, start_epoch, step)
    vx, vy = make_arrays(SplitSpec(cfg.seed, "val", cfg.val_size), cfg.synth)
    vx = apply_input_transform(vx, cfg.input_transform)
    cmd = command or " ".join(shlex.quote(a) for a in sys.argv)
    # every invocation that contributed (the first run, then each --resume), in order
    history.setdefault("commands", [])
    history["commands"].append(cmd)
    real = load_real_windows(cfg.real_windows, cfg) if cfg.real_windows and cfg.real_fraction > 0 else None
    # which real clips the model saw: realcheck reports the others as held out
    real_clips = real_clip_names(cfg.real_windows) if real is not None else []
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.monotonic()
        x, y = make_arrays(epoch_spec(cfg.seed, epoch, cfg.train_per_epoch), cfg.synth)
        if real is not None:
            rx, ry = augment_real(
                *real, int(cfg.real_fraction * len(y)), np.random.default_rng([cfg.seed, 11, epoch])
            )
            x, y = np.concatenate([x, rx]), np.concatenate([y, ry])
        x = apply_input_transform(x, cfg.input_transform)
        gen_s = time.monotonic() - t0
        model.train()
        rng = np.random.default_rng([cfg.seed, 7, epoch])
        bl = batches(x, y, cfg.batch_size, rng)
        losses, correct, seen = [], 0, 0
        bar = tqdm(
            bl, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, mininterval=2.0, file=sys.stderr
        )
        for xb, yb in bar:
            if max_steps is not None and step >= max_steps:
                break
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total_steps, cfg)
            xb, yb = xb.to(device), yb.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(yb)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", acc=f"{correct / max(1, seen):.3f}")
        bar.close()
        train_s = time.monotonic() - t0
        pred = predict(shipped, vx, device).argmax(1)
        val_acc = float((pred == vy).mean())
        rec = {
            "epoch": epoch,
            "step": step,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"),
            "train_acc": correct / max(1, seen),
            "val_acc": val_acc,
            "seconds": time.monotonic() - t0,
            "gen_seconds": gen_s,
            "samples_per_s": seen / max(1e-9, train_s - gen_s),
        }
        history["epochs"].append(rec)
        history["train_s"] += rec["seconds"]
        log.info(
            "epoch %d/%d: loss %.4f train acc %.3f val acc %.3f (%.0f s, %.1f samples/s)",
            epoch + 1,
            cfg.epochs,
            rec["loss"],
            rec["train_acc"],
            val_acc,
            rec["seconds"],
            rec["samples_per_s"],
        )
        provenance = {
            "command": history["commands"][0],
            "commands": history["commands"],
            "best_epoch": epoch,
            "val_acc": val_acc,
            "epochs_done": epoch + 1,
            "train_seconds": history["train_s"],
            "device": str(device),
            **({"real_clips": real_clips} if real_clips else {}),
        }
        if keep_epochs:
            write_package(out / f"epoch_{epoch + 1}", shipped, cfg, provenance)
        if val_acc > history["best_val_acc"]:
            history["best_val_acc"], history["best_epoch"] = val_acc, epoch
            write_package(pkg, shipped, cfg, provenance)
        ck = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            **({"ema": ema.state_dict()} if ema is not None else {}),
            "epoch": epoch,
            "step": step,
            "history": history,
            "config": asdict(cfg),
        }
        torch.save(ck, out / (CHECKPOINT + ".tmp"))
        (out / (CHECKPOINT + ".tmp")).replace(ck_path)
        if on_epoch is not None:
            on_epoch(rec)
        if max_steps is not None and step >= max_steps:
            break
    return history


__all__ = [
    "CHECKPOINT",
    "PRECISIONS",
    "TrainConfig",
    "lr_at",
    "pick_device",
    "predict",
    "train",
    "write_package",
]
