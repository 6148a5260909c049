"""The enclave link a config asks for: remote enclave(s), or the in-process local evaluator."""

from __future__ import annotations

import logging
import logging.handlers
import threading
from typing import Any

from config.schema import (
    DEFAULT_MODEL_DIR,
    VeilcamConfig,
)
from enclave_bridge.shared.keys import DataKey
from pipeline.errors import ConfigError, VeilcamError
from stages.enclave_client import (
    EnclaveLink,
    LocalEnclave,
    RemoteEnclave,
    load_model_dir,
)
from stages.windowing import SeqCounter

log = logging.getLogger(__name__)


def build_link(cfg: VeilcamConfig, key: DataKey, recipients_extra: list[Any] | None = None) -> EnclaveLink:
    """The enclave link the config asks for: remote `veilcam enclave` (several: an `EnclavePool`,
    `enclave.addresses`), else the local stand-in."""
    addresses = [a for a in [cfg.enclave.address, *cfg.enclave.addresses] if a]
    if len(addresses) > 1:
        from stages.enclave_pool import EnclavePool

        return EnclavePool(addresses, timeout_s=cfg.enclave.timeout_s, backoff_s=cfg.enclave.retry_backoff_s)
    if addresses:
        return RemoteEnclave(addresses[0], timeout_s=cfg.enclave.timeout_s)
    log.warning(
        "enclave.address is not set: windows are evaluated by the in-process local evaluator "
        "(development/replay only — no enclave isolation)"
    )
    return make_local_enclave(cfg, key, recipients_extra or [])


def make_local_enclave(cfg: VeilcamConfig, key: DataKey, extra_recipients: list[Any]) -> LocalEnclave:
    """The in-process evaluator: model from `enclave.model_dir`, a persisted signing key, the
    configured recipients (+ `extra_recipients`, e.g. a replay's throw-away consumer)."""
    from enclave_bridge.shared.keys import PartyKey, PartyPublic
    from enclave_bridge.shared.policy import ALERT_FIELDS, Recipient

    model_dir = cfg.enclave.model_dir or DEFAULT_MODEL_DIR
    model, labels, meta = load_model_dir(model_dir)
    sk_path = cfg.enclave.signing_key_path or cfg.state_dir / "local-evaluator.key"
    if sk_path.exists():
        try:
            signer = PartyKey.load(sk_path)
        except VeilcamError as e:
            raise ConfigError(f"enclave.signing_key_path: {e}") from e
    else:
        signer = PartyKey.generate("data-owner", "local-evaluator")
        signer.save(sk_path)
        log.info("local evaluator: new alert-signing key %s", sk_path)
    pubs = []
    for i, path in enumerate(cfg.enclave.recipients):
        try:
            pubs.append(PartyPublic.load(path))
        except VeilcamError as e:
            raise ConfigError(f"enclave.recipients.{i}: {e}") from e
    pubs.extend(extra_recipients)
    recipients = [Recipient(p.name, p.rid, p.kx_pub, tuple(ALERT_FIELDS)) for p in pubs]
    counters: dict[str, SeqCounter] = {}
    lock = threading.Lock()

    def next_seq(device: str) -> int:
        with lock:
            if device not in counters:
                counters[device] = SeqCounter(cfg.state_dir / "alerts" / f"{device}.seq")
            return counters[device].next()

    from enclave_bridge.measured.model_inputs import input_transform_of

    return LocalEnclave(
        {key.kid: key},
        model,
        labels,
        signer,
        recipients,
        next_seq,
        input_transform=input_transform_of(meta),
        last_results_path=cfg.state_dir / "alerts" / "last-results.json",
    )


__all__ = ["build_link", "make_local_enclave"]
