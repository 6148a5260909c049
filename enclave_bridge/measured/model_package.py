"""Encrypted model packages (ARCHITECTURE.md §6): the model owner's ST-GCN weights + label map + metadata.

`veilcam model package` validates the checkpoint against the architecture, then writes
msgpack `{type, v, kid, created, nonce, ct}` where `ct` = AES-256-GCM(model key, msgpack
`{tensors: {name: tensor}, labels: [...], meta: {...}}`, AAD = `veilcam-model-v1|<kid>`).
Weights travel as raw tensors (no pickle), so the enclave never unpickles owner-supplied data.
Only an attested enclave receives the model key (`veilcam provision model`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from enclave_bridge.measured.model_inputs import input_transform_of
from enclave_bridge.shared.errors import CheckpointError, ConfigError, IntegrityError, TransportError
from enclave_bridge.shared.keys import ModelKey
from enclave_bridge.shared.wire import unpack_tensor

log = logging.getLogger(__name__)

PACKAGE_TYPE = "veilcam-model-package"
MAX_PACKAGE_BYTES = 512 * 1024 * 1024


def package_aad(kid: str) -> bytes:
    return f"veilcam-model-v1|{kid}".encode()


@dataclass(slots=True)
class ModelBundle:
    """Decrypted package contents (inside the enclave only). `repr` hides the weights."""

    tensors: dict[str, npt.NDArray[Any]]
    labels: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ModelBundle({len(self.tensors)} tensors, {len(self.labels)} labels)"

    def build_model(self) -> Any:
        """An eval-mode `STGCN` with these weights (strict reference key/shape check)."""
        import torch

        from enclave_bridge.measured.stgcn import STGCN

        kw = {k: self.meta[k] for k in ("layout", "strategy") if k in self.meta}
        model = STGCN(int(self.meta["num_class"]), **kw)
        state = {k: torch.from_numpy(np.array(v)) for k, v in self.tensors.items()}
        model.load_reference_state_dict(state, source="model package")
        return model.eval()


def validate_meta(meta: Mapping[str, Any], num_labels: int) -> dict[str, Any]:
    m = dict(meta)
    if not isinstance(m.get("num_class"), int) or m["num_class"] <= 0:
        raise ConfigError("model metadata: num_class must be a positive integer")
    if m["num_class"] != num_labels:
        raise ConfigError(f"model metadata: num_class {m['num_class']} but label map has {num_labels} labels")
    input_transform_of(m)  # an unknown transform is refused when packaging, not at the first window
    return m


def package_kid(blob: bytes) -> str:
    """The kid a package is encrypted under (public header)."""
    kid: str = _parse(blob)["kid"]  # _parse checked it is a str
    return kid


def _parse(blob: bytes) -> dict[str, Any]:
    if len(blob) > MAX_PACKAGE_BYTES:
        raise IntegrityError("model package too large")
    try:
        doc = msgpack.unpackb(blob, raw=False, max_bin_len=MAX_PACKAGE_BYTES)
    except (ValueError, TypeError, msgpack.exceptions.UnpackException, msgpack.exceptions.ExtraData) as e:
        raise IntegrityError(f"malformed model package ({type(e).__name__})") from e
    if not isinstance(doc, dict) or doc.get("type") != PACKAGE_TYPE or doc.get("v") != 1:
        raise IntegrityError("not a veilcam model package")
    if (
        not isinstance(doc.get("kid"), str)
        or not isinstance(doc.get("nonce"), bytes)
        or not isinstance(doc.get("ct"), bytes)
    ):
        raise IntegrityError("malformed model package header")
    return doc


def open_package(blob: bytes, key: ModelKey) -> ModelBundle:
    """Decrypt and validate a package (inside the enclave)."""
    doc = _parse(blob)
    if doc["kid"] != key.kid:
        raise IntegrityError(f"package is for model key {doc['kid']!r}, not {key.kid!r}")
    plaintext = key.decrypt(doc["nonce"], doc["ct"], package_aad(key.kid))
    try:
        body = msgpack.unpackb(plaintext, raw=False, max_bin_len=MAX_PACKAGE_BYTES)
        tensors = {str(k): unpack_tensor(v) for k, v in body["tensors"].items()}
        labels = [str(x) for x in body["labels"]]
        meta = validate_meta(body["meta"], len(labels))
    except (KeyError, TypeError, ValueError, AttributeError, TransportError, ConfigError) as e:
        raise IntegrityError(f"malformed model package content ({type(e).__name__})") from e
    return ModelBundle(tensors, labels, meta)


def build_model_checked(bundle: ModelBundle) -> Any:
    try:
        return bundle.build_model()
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"model package does not fit the ST-GCN architecture: {e}") from e


__all__ = [
    "ModelBundle",
    "build_model_checked",
    "open_package",
    "package_aad",
    "package_kid",
    "validate_meta",
]
