"""`LocalEnclave`: the in-process stand-in for the evaluation enclave, used when no enclave address
is configured (replays, development). It opens windows with the data key and runs the enclave's
own window evaluation (`enclave_bridge.measured.window_eval`: input transform, top-k, alert rules,
alert building), so the rest of the pipeline, the outbox and MQTT see exactly the same bytes. It is
*not* an enclave: the model and the data key live in the daemon's memory, and it says so.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from enclave_bridge.shared.rpc import SubmitResult
from pipeline.errors import ConfigError, IntegrityError

log = logging.getLogger(__name__)


def load_model_dir(model_dir: Path) -> tuple[Any, list[str], dict[str, Any]]:
    """(STGCN in eval mode, labels, model.json) from a directory like `samples/default_model`."""
    from enclave_bridge.measured.model_inputs import input_transform_of
    from enclave_bridge.measured.stgcn import STGCN, load_label_map

    weights, labels_path, meta_path = (
        model_dir / "model.pt",
        model_dir / "labels.txt",
        model_dir / "model.json",
    )
    for p, what in ((weights, "weights"), (labels_path, "label map")):
        if not p.is_file():
            raise ConfigError(f"enclave.model_dir: {what} {p} not found")
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise ConfigError(f"enclave.model_dir: {meta_path} is not valid JSON: {e}") from e
    labels = load_label_map(labels_path)
    try:
        input_transform_of(meta)
    except ConfigError as e:
        raise ConfigError(f"enclave.model_dir: {meta_path}: {e}") from e
    graph_kw = {k: meta[k] for k in ("layout", "strategy") if isinstance(meta.get(k), str)}
    model = STGCN.from_checkpoint(weights, num_class=len(labels), **graph_kw)
    model.eval()
    return model, labels, meta


class LocalEnclave:
    """In-process evaluator behind `EnclaveLink` (see module docstring: a stand-in, not an enclave).

    Alerts are built exactly as the enclave builds them (`enclave_bridge.measured.alerts.build_alert`,
    rules and debounce from `enclave_bridge.shared.rules`), signed by `signer` and encrypted to
    `recipients`; `next_alert_seq(device)` hands out the persisted per-device alert numbers.
    """

    def __init__(
        self,
        keys: Mapping[str, Any],
        model: Any,
        labels: Sequence[str],
        signer: Any,
        recipients: Sequence[Any],
        next_alert_seq: Callable[[str], int],
        *,
        topk: int = 5,
        input_transform: str = "reference",
        last_results_path: Path | None = None,
    ) -> None:
        from enclave_bridge.measured.window_eval import TorchEvaluator, WindowEvaluator
        from enclave_bridge.shared.windows import ReplayGuard

        if not recipients:
            raise ConfigError("enclave.recipients: the local evaluator needs at least one alert recipient")
        self._keys = dict(keys)
        self._labels = list(labels)
        self._signer = signer
        self._recipients = list(recipients)
        self._next_seq = next_alert_seq
        # the enclave's own window evaluation (input transform, top-k, rules, alert fields)
        self._eval = WindowEvaluator(TorchEvaluator(model), labels, input_transform, topk)
        self._guard = ReplayGuard()
        # per device: the last window's (seq, digest, alerts), persisted before the reply, so a
        # `resend` after a daemon crash returns the same numbered alerts (see EnclaveStage)
        self._last_path = last_results_path
        self._last: dict[str, tuple[int, str, list[bytes]]] = self._load_last()
        self._rules: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stats: dict[str, int] = {
            "windows_ok": 0,
            "windows_rejected": 0,
            "alerts": 0,
            "freivalds_failures": 0,
        }

    @property
    def verify_key(self) -> bytes:
        """The Ed25519 public key consumers pin to check alert signatures."""
        return bytes(self._signer.public.sign_pub)

    def hello(self, device: str, rules: dict[str, Any]) -> dict[str, Any]:
        from enclave_bridge.shared.rules import ANY_LABEL, AlertRules

        parsed = AlertRules.from_dict(rules, where="rules")
        unknown = sorted(set(parsed.labels) - set(self._labels) - {ANY_LABEL})
        if unknown:
            raise ConfigError(f"rules.labels: not labels of the model: {', '.join(unknown)}")
        with self._lock:
            self._rules[device] = parsed
        return {"device": device, "labels": len(self._labels), "backend": "local-insecure"}

    def evidence(self, nonce: bytes) -> dict[str, Any]:
        """No attestation is possible in-process; says so and gives the alert verify key."""
        return {"backend": "local-insecure", "sign_pub": self.verify_key, "nonce": bytes(nonce)}

    def _load_last(self) -> dict[str, tuple[int, str, list[bytes]]]:
        if self._last_path is None or not self._last_path.is_file():
            return {}
        try:
            doc = json.loads(self._last_path.read_text())
            return {
                str(d): (int(v["seq"]), str(v["digest"]), [bytes.fromhex(a) for a in v["alerts"]])
                for d, v in doc.items()
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"state_dir: local evaluator results {self._last_path} unreadable: {e}") from e

    def _save_last(self) -> None:
        if self._last_path is None:
            return
        import os

        doc = {
            d: {"seq": q, "digest": h, "alerts": [a.hex() for a in al]}
            for d, (q, h, al) in self._last.items()
        }
        self._last_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._last_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(doc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._last_path)

    def submit(self, blob: bytes, resend: bool = False) -> SubmitResult:
        import hashlib

        from enclave_bridge.shared.keys import fingerprint
        from enclave_bridge.shared.windows import open_window, parse_header

        try:
            hdr = parse_header(blob)[0]
        except IntegrityError as e:
            return self._reject(-1, str(e))
        rules = self._rules.get(hdr.device)
        if rules is None:
            return self._reject(hdr.seq, f"device {hdr.device!r} has not said hello")
        digest = hashlib.sha256(blob).hexdigest()
        last = self._last.get(hdr.device)
        if resend and last is not None and last[:2] == (hdr.seq, digest):
            return SubmitResult("ok", None, list(last[2]), hdr.seq)
        try:
            win = open_window(blob, self._keys, self._guard)
        except IntegrityError as e:
            return self._reject(hdr.seq, str(e))
        verdict = self._eval.classify(win)
        alerts = self._eval.alerts(
            win,
            verdict,
            rules,
            self._next_seq,
            self._recipients,
            self._signer.sign,
            fingerprint(self.verify_key),
        )
        with self._lock:
            self._stats["windows_ok"] += 1
            self._stats["alerts"] += len(alerts)
            self._last[win.device] = (win.seq, digest, alerts)
            self._save_last()
        return SubmitResult("ok", None, alerts, win.seq)

    def _reject(self, seq: int, reason: str) -> SubmitResult:
        with self._lock:
            self._stats["windows_rejected"] += 1
        return SubmitResult("rejected", reason, [], seq)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        return None


__all__ = ["LocalEnclave", "load_model_dir"]
