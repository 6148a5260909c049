"""Held-out evaluation of a model package: confusion matrix PNG + per-class precision/recall.

The test set is the synthetic `test` split (never seen in training: different RNG stream), with
the window geometry (T, fps, M) the package declares in `model.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from enclave_bridge.measured.model_inputs import apply_input_transform, input_transform_of
from enclave_bridge.measured.stgcn import STGCN, load_label_map
from enclave_bridge.shared.errors import CheckpointError, ConfigError
from training.dataset import SplitSpec, make_arrays
from training.synth import CLASSES, SynthConfig
from training.train import predict

log = logging.getLogger(__name__)


def load_package(path: str | Path) -> tuple[STGCN, list[str], dict[str, Any]]:
    """Load `model.pt` + `labels.txt` + `model.json` from a package directory (eval mode)."""
    d = Path(path)
    meta_path = d / "model.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"cannot read {meta_path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from e
    labels = load_label_map(d / "labels.txt")
    for key in ("num_class", "T", "fps", "stride"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} lacks {key!r}")
    try:
        input_transform_of(meta)
    except ConfigError as e:
        raise CheckpointError(f"{meta_path}: {e}") from e
    if int(meta["num_class"]) != len(labels):
        raise CheckpointError(f"{meta_path}: num_class {meta['num_class']} but {len(labels)} labels")
    model = STGCN.from_checkpoint(
        d / "model.pt",
        num_class=len(labels),
        layout=meta.get("layout", "openpose"),
        strategy=meta.get("strategy", "spatial"),
    )
    return model.eval(), labels, meta


def confusion(
    y_true: npt.NDArray[np.integer[Any]], y_pred: npt.NDArray[np.integer[Any]], k: int
) -> npt.NDArray[np.int64]:
    """(k, k) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_class(cm: npt.NDArray[np.int64], labels: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class from a confusion matrix."""
    out = {}
    for i, lab in enumerate(labels):
        tp = float(cm[i, i])
        pred, true = float(cm[:, i].sum()), float(cm[i].sum())
        p = tp / pred if pred else 0.0
        r = tp / true if true else 0.0
        out[lab] = {
            "precision": p,
            "recall": r,
            "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "support": int(true),
        }
    return out


def plot_confusion(cm: npt.NDArray[np.int64], labels: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix with counts, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(1, cm.sum(1, keepdims=True))
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    color="white" if norm[i, j] > 0.5 else "black",
                    fontsize=8,
                )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def metrics_markdown(res: dict[str, Any]) -> str:
    """The per-class table as Markdown (pasted into the README model card)."""
    lines = [
        f"Held-out synthetic test set: {res['n']} windows (seed {res['seed']}, split `test`), "
        f"accuracy **{res['accuracy']:.3f}**, macro F1 {res['macro_f1']:.3f}.",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for lab, m in res["per_class"].items():
        lines.append(f"| {lab} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |")
    return "\n".join(lines) + "\n"


def evaluate_package(
    model_dir: str | Path,
    n: int = 900,
    seed: int = 1,
    report_dir: str | Path = "runs/eval",
    update_model_json: bool = False,
    threads: int = 2,
) -> dict[str, Any]:
    """Evaluate a package on `n` held-out windows; writes confusion.png, metrics.json, metrics.md."""
    torch.set_num_threads(threads)
    model, labels, meta = load_package(model_dir)
    unknown = [lab for lab in labels if lab not in CLASSES]
    if unknown:
        raise CheckpointError(f"labels {unknown} have no synthetic generator; cannot evaluate this package")
    cfg = SynthConfig(T=int(meta["T"]), fps=float(meta["fps"]), M=int(meta.get("M", 2)))
    x, y_gen = make_arrays(SplitSpec(seed, "test", n), cfg)
    x = apply_input_transform(x, input_transform_of(meta))
    # the generator numbers classes in CLASSES order; map them to the package's label order
    y = np.array([labels.index(CLASSES[i]) for i in y_gen], dtype=np.int64)
    logits = predict(model, x, torch.device("cpu"))
    pred = logits.argmax(1)
    cm = confusion(y, pred, len(labels))
    pc = per_class(cm, labels)
    res: dict[str, Any] = {
        "n": int(n),
        "seed": int(seed),
        "split": "test",
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(np.mean([m["f1"] for m in pc.values()])),
        "per_class": pc,
        "confusion": cm.tolist(),
        "labels": labels,
    }
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion(
        cm, labels, out / "confusion.png", f"held-out synthetic test (n={n}), accuracy {res['accuracy']:.3f}"
    )
    (out / "metrics.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    (out / "metrics.md").write_text(metrics_markdown(res), encoding="utf-8")
    if update_model_json:
        meta["metrics"] = {k: res[k] for k in ("n", "seed", "split", "accuracy", "macro_f1", "per_class")}
        meta["evaluate_command"] = f"veilcam evaluate --model {model_dir} --n {n} --seed {seed}"
        (Path(model_dir) / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info("evaluated %s on %d held-out windows: accuracy %.3f", model_dir, n, res["accuracy"])
    return res


__all__ = ["confusion", "evaluate_package", "load_package", "metrics_markdown", "per_class", "plot_confusion"]
