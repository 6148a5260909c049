"""Enclave measurement for the simulated backend (docs/ARCHITECTURE.md §6): what an MRENCLAVE would cover.

The measured file set is exactly the enclave's code: every `*.py` module under
`enclave_bridge/measured/` (runtime, secure evaluation, ST-GCN, alert building, sealing) and
`enclave_bridge/shared/` (the formats and ring arithmetic it imports), plus the package's
`__init__.py`. Party-side code (`enclave_bridge/host/`), the untrusted GPU worker
(`enclave_bridge/gpu/`), the import aliases at the package top level, `training/`, `stages/` and
`pipeline/` are outside. The enclave config is part of the measurement, so pinned
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

from enclave_bridge.shared.errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the `enclave_bridge` directory
MEASURED_DIRS = ("measured", "shared")
_DOMAIN = b"veilcam-measurement-v1\n"


def enclave_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """(relative path, absolute path) of every measured file, sorted by relative path."""
    base = (root or PACKAGE_ROOT).resolve()
    out = [("__init__.py", base / "__init__.py")] if (base / "__init__.py").is_file() else []
    for d in MEASURED_DIRS:
        out.extend(
            (p.relative_to(base).as_posix(), p)
            for p in (base / d).rglob("*.py")
            if "__pycache__" not in p.parts
        )
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
    "MEASURED_DIRS",
    "PACKAGE_ROOT",
    "canonical_config",
    "compute_measurement",
    "enclave_files",
    "file_digests",
]
