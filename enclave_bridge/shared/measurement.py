"""Enclave measurement for the simulated backend (DESIGN §6): what an MRENCLAVE would cover.

The measured file set is every `*.py` module of the `enclave_bridge` package (ST-GCN, ring
arithmetic, masking protocol, runtime, attestation, keys, the Gramine backend) except the GPU worker
server (`gpu_worker.py`, which runs on the untrusted host and never sees secrets). `worker_client.py`
— the enclave's side of the worker protocol — is measured because the enclave runs it. `training/`,
`stages/` and `pipeline/` are outside. The enclave config is part of the measurement, so pinned
owner keys, evaluator mode and the key-enclave pin cannot be changed without changing it.

measurement = SHA-256( "veilcam-measurement-v1\\n"
                       + for each file in sorted relative path order: "<relpath>\\0<sha256 hex>\\n"
                       + "config\\0" + canonical JSON of the config )
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from enclave_bridge.errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parent
EXCLUDED_FILES = frozenset({"gpu_worker.py"})
_DOMAIN = b"veilcam-measurement-v1\n"


def enclave_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, absolute path) of every measured file, sorted by relative path."""
    base = (root or PACKAGE_ROOT).resolve()
    out = []
    for p in base.rglob("*.py"):
        rel = p.relative_to(base).as_posix()
        if "__pycache__" in p.parts or rel in EXCLUDED_FILES:
            continue
        out.append((rel, p))
    out.sort(key=lambda t: t[0])
    if not out:
        raise ConfigError(f"no enclave files under {base}")
    return out


def file_digests(root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, sha256 hex) of every measured file."""
    return [(rel, hashlib.sha256(p.read_bytes()).hexdigest()) for rel, p in enclave_files(root)]


def canonical_config(config: Mapping[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no whitespace) — the form that is hashed and signed."""
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"enclave config is not JSON-serialisable: {e}") from e


def compute_measurement(config: Mapping[str, Any], root: Path | None = None) -> str:
    """Hex SHA-256 measurement of the code under `root` (default: this package) plus `config`."""
    h = hashlib.sha256(_DOMAIN)
    for rel, digest in file_digests(root):
        h.update(f"{rel}\0{digest}\n".encode())
    h.update(b"config\0" + canonical_config(config))
    return h.hexdigest()


__all__ = [
    "EXCLUDED_FILES",
    "PACKAGE_ROOT",
    "canonical_config",
    "compute_measurement",
    "enclave_files",
    "file_digests",
]
