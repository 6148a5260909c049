"""The enclave's own configuration (measured: part of what an attestation proves) and its TEE backend."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from enclave_bridge.shared.attest import EnclaveBackend, PlatformKey, SimulatedBackend
from enclave_bridge.shared.errors import ConfigError
from enclave_bridge.shared.keys import b64d
from enclave_bridge.shared.measurement import compute_measurement

EVALUATOR_MODES = ("paper", "slalom", "split2", "split3", "enclave", "plaintext")


def load_enclave_config(path: str | os.PathLike[str], role: str) -> dict[str, Any]:
    """Read and validate an enclave config (YAML or JSON). The returned dict is what is measured."""
    p = Path(path)
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: enclave config not found") from e
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: cannot parse enclave config: {e}") from e
    return validate_enclave_config(cfg, role, str(p))


def validate_enclave_config(cfg: Any, role: str, where: str = "enclave config") -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a mapping")
    allowed = {
        "eval": {"role", "backend", "data_owner_pub", "model_owner_pub", "key_enclave", "evaluator", "topk"},
        "key": {"role", "backend", "data_owner_pub"},
    }[role]
    unknown = set(cfg) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    if cfg.get("role") != role:
        raise ConfigError(f"{where}.role: must be {role!r} for this enclave")
    if cfg.get("backend", "simulated") not in ("simulated", "gramine-sgx"):
        raise ConfigError(f"{where}.backend: 'simulated' or 'gramine-sgx'")
    owners = ("data_owner_pub", "model_owner_pub") if role == "eval" else ("data_owner_pub",)
    for k in owners:
        try:
            if len(b64d(cfg.get(k), f"{where}.{k}")) != 32:
                raise ConfigError(f"{where}.{k}: must be a 32-byte Ed25519 public key (base64)")
        except ConfigError as e:
            raise ConfigError(f"{e} — copy `sign_pub` from the owner's .pub file") from None
    if role == "eval":
        ke = cfg.get("key_enclave")
        if not isinstance(ke, dict) or not isinstance(ke.get("address"), str):
            raise ConfigError(f"{where}.key_enclave.address: required (e.g. unix:/run/veilcam/key.sock)")
        meas = ke.get("measurements", [])
        if not isinstance(meas, list) or not all(isinstance(m, str) and len(m) == 64 for m in meas):
            raise ConfigError(f"{where}.key_enclave.measurements: a list of 64-hex measurements")
        ev = cfg.get("evaluator", {"mode": "enclave"})
        if not isinstance(ev, dict) or ev.get("mode") not in EVALUATOR_MODES:
            raise ConfigError(f"{where}.evaluator.mode: one of {EVALUATOR_MODES}")
        if ev.get("worker") is not None and not isinstance(ev.get("worker"), str):
            raise ConfigError(f"{where}.evaluator.worker: an address string or null")
        wl = ev.get("workers")
        need = {"split2": 2, "split3": 3}.get(str(ev.get("mode")), 0)
        if wl is not None and (
            not isinstance(wl, list) or not all(isinstance(a, str) for a in wl) or len(set(wl)) != len(wl)
        ):
            raise ConfigError(f"{where}.evaluator.workers: a list of distinct worker addresses")
        if need and wl is not None and len(wl) != need:
            raise ConfigError(f"{where}.evaluator.workers: mode {ev.get('mode')} needs {need} workers")
        t = ev.get("timeout_s")
        if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t <= 3600):
            raise ConfigError(f"{where}.evaluator.timeout_s: seconds in (0, 3600] (GPU worker replies)")
        bm = ev.get("batch_max")
        if bm is not None and (isinstance(bm, bool) or not isinstance(bm, int) or not 1 <= bm <= 64):
            raise ConfigError(f"{where}.evaluator.batch_max: windows evaluated in one pass, 1..64")
        limbs = ev.get("act_limbs")
        if limbs is not None and (isinstance(limbs, bool) or limbs not in (1, 2, 3)):
            raise ConfigError(f"{where}.evaluator.act_limbs: 1, 2 or 3 activation digits")
        topk = cfg.get("topk", 5)
        if not isinstance(topk, int) or not 1 <= topk <= 100:
            raise ConfigError(f"{where}.topk: an integer in 1..100")
    return cfg


def make_backend(cfg: Mapping[str, Any], platform_key_path: str | None, role: str) -> EnclaveBackend:
    """The configured TEE backend; its measurement covers this package's code and `cfg`."""
    backend = cfg.get("backend", "simulated")
    if backend == "gramine-sgx":
        from enclave_bridge.measured.gramine_backend import GramineBackend

        return GramineBackend()
    if not platform_key_path:
        raise ConfigError("simulated backend needs --platform-key (created by `veilcam platform init`)")
    return SimulatedBackend(PlatformKey.load(platform_key_path), compute_measurement(cfg), role)


__all__ = ["EVALUATOR_MODES", "load_enclave_config", "make_backend", "validate_enclave_config"]
