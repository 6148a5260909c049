"""Model-side input transforms: what a model package expects on top of the docs/ARCHITECTURE.md §3 window.

Windows always travel in the reference demo's normalisation (x/W−0.5, y/H−0.5, score; zeros
where a joint is missing), so released checkpoints (Kinetics, NTU) work unchanged. A model may
declare in its `model.json` an `input_transform` that the enclave applies after decrypting the
window and before ST-GCN — inside the trust boundary, so the capture host and the wire format do
not change:

- `reference` (default): the window as is.
- `person-centred`: translate so the people in the window are centred on 0 and scale by the
  size of the largest person (median over frames of its skeleton's bounding-box diagonal). The
  reference normalisation ties coordinates to the image, so a 40-px pedestrian moves by a few
  thousandths and a close-up by tenths; centring and scaling make the same action look the same
  at every distance, which is what a model trained on synthetic CCTV views needs to generalise.
  Relative positions of the two persons (fighting) and motion within the window (a fall's drop)
  are kept: one translation and one scale per window.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import ConfigError

INPUT_TRANSFORMS = ("reference", "person-centred")
MIN_SCALE = 1e-3  # a window whose people are smaller than this (in frame units) is not magnified further


def input_transform_of(meta: Mapping[str, Any]) -> str:
    """The transform a model's metadata declares (`reference` when it declares none)."""
    kind = meta.get("input_transform", "reference")
    if kind not in INPUT_TRANSFORMS:
        raise ConfigError(
            f"model metadata: input_transform must be one of {', '.join(INPUT_TRANSFORMS)}, got {kind!r}"
        )
    return str(kind)


def _person_centred(x: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """(N, 3, T, V, M) reference-normalised windows → person-centred, float32."""
    xy, score = x[:, :2].astype(np.float64), x[:, 2]
    present = score > 0  # (N, T, V, M)
    out = np.zeros(x.shape, dtype=np.float32)
    out[:, 2] = score
    big = np.float64(1e9)
    # per person and frame: bounding-box diagonal of the present joints (NaN with < 2 joints)
    lo = np.where(present[:, None], xy, big).min(axis=3)  # (N, 2, T, M)
    hi = np.where(present[:, None], xy, -big).max(axis=3)
    enough = present.sum(axis=2) >= 2  # (N, T, M)
    diag = np.where(enough, np.hypot(*(hi - lo).transpose(1, 0, 2, 3)), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: a person or window empty
        size = np.nanmedian(diag, axis=1)  # (N, M): NaN for a person never seen with 2 joints
        scale = np.nanmax(size, axis=1)  # (N,)
    scale = np.where(np.isfinite(scale), np.maximum(scale, MIN_SCALE), 1.0)
    count = present.sum(axis=(1, 2, 3))  # (N,)
    total = np.where(present[:, None], xy, 0.0).sum(axis=(2, 3, 4))  # (N, 2)
    centre = total / np.maximum(count, 1)[:, None]
    moved = (xy - centre[:, :, None, None, None]) / scale[:, None, None, None, None]
    out[:, :2] = np.where(present[:, None], moved, 0.0)
    return out


def apply_input_transform(x: npt.ArrayLike, kind: str) -> npt.NDArray[np.float32]:
    """Apply `kind` to windows (N, 3, T, V, M) or one window (3, T, V, M); float32 out."""
    if kind not in INPUT_TRANSFORMS:
        raise ConfigError(f"unknown input transform {kind!r}; known: {', '.join(INPUT_TRANSFORMS)}")
    arr = np.asarray(x)
    if arr.ndim not in (4, 5) or arr.shape[-4 if arr.ndim == 4 else 1] != 3:
        raise ConfigError(f"windows must be (N, 3, T, V, M) or (3, T, V, M), got shape {arr.shape}")
    if kind == "reference":
        return arr.astype(np.float32, copy=False)
    single = arr.ndim == 4
    out = _person_centred(arr[None] if single else arr)
    return out[0] if single else out


__all__ = ["INPUT_TRANSFORMS", "MIN_SCALE", "apply_input_transform", "input_transform_of"]
