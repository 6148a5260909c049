"""Model packages: the directory the daemon and `veilcam model package` load.

A package is `model.pt` (reference-format ST-GCN state_dict), `labels.txt` (one label a line, in
classifier order) and `model.json` (num_class, layout, strategy, window T/stride/fps/M and
provenance). `import_checkpoint` turns a released reference checkpoint (Kinetics-400 with the
OpenPose layout, NTU-RGB+D with its 25-joint layout) plus its label map into such a package,
after checking that the file really is that architecture and that the label count matches.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from enclave_bridge.measured.stgcn import STGCN, load_label_map
from enclave_bridge.shared.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def import_checkpoint(
    checkpoint: str | Path,
    labels: str | Path,
    out: str | Path,
    *,
    T: int = 300,
    stride: int = 30,
    fps: float = 30.0,
    M: int = 2,
    strategy: str = "spatial",
) -> dict[str, Any]:
    """Validate `checkpoint` against the reference architecture and write a package to `out`.

    Defaults are the reference demo's window (300 frames at 30 fps). Returns the `model.json` dict.
    """
    if T < 1 or stride < 1 or fps <= 0 or M < 1:
        raise ConfigError("T, stride, M must be ≥ 1 and fps > 0")
    names = load_label_map(labels)
    model = STGCN.from_checkpoint(checkpoint, strategy=strategy)
    if model.num_class != len(names):
        raise CheckpointError(
            f"{checkpoint} has {model.num_class} classes but {labels} lists {len(names)} labels"
        )
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, d / "model.pt")
    (d / "labels.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    meta: dict[str, Any] = {
        "num_class": model.num_class,
        "layout": model.layout,
        "strategy": model.strategy,
        "T": T,
        "stride": stride,
        "fps": fps,
        "M": M,
        "source": str(checkpoint),
        "normalisation": "x/W-0.5, y/H-0.5, score; zeros where a joint is missing",
    }
    (d / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info("imported %s (%d classes, %s layout) into %s", checkpoint, model.num_class, model.layout, d)
    return meta


__all__ = ["import_checkpoint"]
