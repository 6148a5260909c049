"""What a valid config names on disk: the data key it loads and the files it needs.

Why apart from `config.schema`: the schema only validates text (no secrets, no I/O), so it can be
imported anywhere — by tools that never see a key; reading the data key and checking files is
what the camera host does at start, here in one place.
"""

from __future__ import annotations

import os
from pathlib import Path

from config.schema import DEFAULT_MODEL_DIR, VeilcamConfig
from enclave_bridge.shared.errors import ConfigError, VeilcamError
from enclave_bridge.shared.keys import DataKey, load_data_key

__all__ = ["check_files", "load_data_key_from_config"]


def check_files(cfg: VeilcamConfig) -> list[str]:
    """Problems with the files a valid config names (`key.path: message` lines; empty = fine)."""
    problems: list[str] = []
    try:
        load_data_key_from_config(cfg)
    except ConfigError as e:
        problems.append(str(e))
    if cfg.enclave.address is None:
        model_dir = cfg.enclave.model_dir or DEFAULT_MODEL_DIR
        problems.extend(
            f"enclave.model_dir: {model_dir / name} not found"
            for name in ("model.pt", "labels.txt")
            if not (model_dir / name).is_file()
        )
        problems.extend(
            f"enclave.recipients.{i}: {path} not found"
            for i, path in enumerate(cfg.enclave.recipients)
            if not path.is_file()
        )
        if not cfg.enclave.recipients:
            problems.append("enclave.recipients: the local evaluator needs at least one consumer public key")
    for name, cam in cfg.cameras.items():
        if cam.source_kind == "file" and not Path(str(cam.source).removeprefix("file://")).is_file():
            problems.append(f"cameras.{name}.source: video file {cam.source} not found")
    if cfg.broker is not None:
        try:
            cfg.broker.password()
        except ConfigError as e:
            problems.append(str(e))
        tls = cfg.broker.tls
        if tls is not None:
            problems.extend(
                f"broker.tls.{name}: {path} not found"
                for name, path in (
                    ("ca_file", tls.ca_file),
                    ("cert_file", tls.cert_file),
                    ("key_file", tls.key_file),
                )
                if path is not None and not path.is_file()
            )
    parent = cfg.state_dir if cfg.state_dir.exists() else cfg.state_dir.parent
    if not os.access(parent, os.W_OK):
        problems.append(f"state_dir: {cfg.state_dir} is not writable")
    return problems


def load_data_key_from_config(cfg: VeilcamConfig) -> DataKey:
    """Load the camera data key named by `data_key_path`; errors name the config key."""
    try:
        return load_data_key(cfg.data_key_path, passphrase=cfg.passphrase())
    except VeilcamError as e:
        raise ConfigError(f"data_key_path: {e}") from e
    except OSError as e:
        raise ConfigError(f"data_key_path: cannot read {cfg.data_key_path}: {e.strerror}") from e
