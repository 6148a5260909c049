"""Model owner tooling: validate a checkpoint, label map and metadata, and encrypt them into a model
package (`veilcam model package`). Runs on the owner's machine; the enclave only opens packages
(`measured.model_package`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack

from enclave_bridge.measured.model_package import PACKAGE_TYPE, package_aad, validate_meta
from enclave_bridge.shared.keys import ModelKey
from enclave_bridge.shared.wire import pack_tensor

log = logging.getLogger(__name__)


def package_model(
    checkpoint: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    meta: Mapping[str, Any],
    key: ModelKey,
    out: str | os.PathLike[str],
) -> Path:
    """Validate and encrypt a checkpoint + label map + metadata into `out`."""
    from enclave_bridge.measured.stgcn import STGCN, load_label_map

    labels = load_label_map(labels_path)
    m = validate_meta(meta, len(labels))
    kw = {k: m[k] for k in ("layout", "strategy") if k in m}
    model = STGCN.from_checkpoint(checkpoint, num_class=m["num_class"], **kw)
    tensors = {k: pack_tensor(v.detach().cpu().numpy()) for k, v in model.state_dict().items()}
    plaintext = msgpack.packb({"tensors": tensors, "labels": labels, "meta": m}, use_bin_type=True)
    nonce = os.urandom(12)
    doc = {
        "type": PACKAGE_TYPE,
        "v": 1,
        "kid": key.kid,
        "created": int(time.time()),
        "nonce": nonce,
        "ct": key.encrypt(nonce, plaintext, package_aad(key.kid)),
    }
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(msgpack.packb(doc, use_bin_type=True))
    log.info(
        "model package %s written (kid %s, %d classes, %d tensors)", p, key.kid, m["num_class"], len(tensors)
    )
    return p


__all__ = ["package_model"]
