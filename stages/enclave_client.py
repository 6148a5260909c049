"""Sending sealed windows to the enclave and collecting its encrypted, signed alerts (DESIGN §2, §7).

`EnclaveLink` is the seam: the daemon only needs `hello`, `submit`, `stats` and `close`.
- `RemoteEnclave` talks to a `veilcam enclave` process through `enclave_bridge.host.client.EnclaveClient`
  (the deployment path: attested, separate process, secure evaluation).
- `LocalEnclave` is the in-process stand-in used when no enclave address is configured (replays,
  development): it opens windows with the data key, evaluates an ST-GCN from
  `enclave_bridge.measured.stgcn`, applies the same alert rules and seals alerts with
  `enclave_bridge.measured.alerts` — so the rest of the pipeline, the outbox and MQTT see exactly the same
  bytes. It is *not* an enclave: the model and the data key live in the daemon's memory.

`EnclaveStage` is the thread between the windows queue and the outbox. Rejections are counted and
logged by reason without payload; transport errors are retried with backoff for up to
`retry_timeout_s`, then the window is dropped (counted; the daemon exits non-zero). With the
outbox as its journal, a window is on disk before the enclave sees it and its alerts are stored in
the transaction that removes it — alerts, once numbered, are never dropped, even by a crash.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import msgpack

from enclave_bridge.shared.rpc import SubmitResult
from pipeline.errors import ConfigError, EnclaveError, IntegrityError, TransportError
from pipeline.messages import AlertEnvelope, EndOfStream, SealedWindow
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats

log = logging.getLogger(__name__)


@runtime_checkable
class EnclaveLink(Protocol):
    """What the daemon needs from an enclave, local or remote."""

    def hello(self, device: str, rules: dict[str, Any]) -> dict[str, Any]: ...

    def submit(self, blob: bytes) -> Any: ...  # links that can also take `resend=True` (a lost reply)

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


# -- remote ----------------------------------------------------------------------------------------
class RemoteEnclave:
    """`EnclaveLink` over `enclave_bridge.host.client.EnclaveClient` (a `veilcam enclave` process)."""

    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        try:
            client_mod = importlib.import_module("enclave_bridge.host.client")
        except ImportError as e:  # pragma: no cover - the module ships with the package
            raise ConfigError(f"enclave.address: no enclave client available ({e})") from e
        self.address = address
        self._client = client_mod.EnclaveClient(address, timeout_s=timeout_s)

    def hello(self, device: str, rules: dict[str, Any]) -> dict[str, Any]:
        return dict(self._client.hello(device, rules))

    def submit(self, blob: bytes, resend: bool = False) -> Any:
        """`resend=True`: the window may have been answered before (a reply or its outbox commit
        was lost); the enclave then returns that very answer instead of a `replay` rejection."""
        return self._client.submit(blob, retry=True if resend else None)

    def stats(self) -> dict[str, Any]:
        return dict(self._client.stats())

    def evidence(self, nonce: bytes) -> dict[str, Any]:
        return dict(self._client.evidence(nonce))

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()


# -- local stand-in --------------------------------------------------------------------------------
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


# -- the stage -------------------------------------------------------------------------------------
def alert_header(payload: bytes) -> tuple[int, str | None]:
    """(seq, device) from an alert envelope's cleartext header (no decryption)."""
    try:
        env = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.exceptions.UnpackException) as e:
        raise IntegrityError(f"malformed alert envelope from the enclave: {type(e).__name__}") from e
    if not isinstance(env, dict) or not isinstance(env.get("seq"), int):
        raise IntegrityError("malformed alert envelope from the enclave: no seq")
    dev = env.get("device")
    return int(env["seq"]), dev if isinstance(dev, str) else None


class WindowJournal(Protocol):
    """Durable record of windows in flight (the outbox database, `pipeline.outbox.Outbox`)."""

    def put_window(self, w: SealedWindow) -> None: ...

    def commit_window(
        self, w: SealedWindow, envelopes: list[AlertEnvelope], source: str | None = None
    ) -> list[int]: ...

    def forget_window(self, w: SealedWindow) -> None: ...

    def pending_windows(self, camera_id: str) -> list[SealedWindow]: ...

    def progress(self, camera_id: str, source: str) -> float | None: ...

    def clear_progress(self, camera_id: str) -> None: ...


class EnclaveStage:
    """The thread feeding sealed windows to an `EnclaveLink` and alerts to the outbox `sink`.

    With a `journal` (the daemon's outbox) every window is committed to disk before it is
    submitted and its alerts are stored in the transaction that removes it, so a crash at any
    instant leaves either the window (resubmitted flagged `resend` at the next start; the enclave
    answers with the same alerts) or its alerts — never neither, never both twice. `source_key`
    (file cameras) lets a restarted replay of the same file skip media times already evaluated.

    Transport errors are retried with backoff for up to `retry_timeout_s` seconds (long enough for
    an enclave restart); a window still unanswered then is dropped, counted in `windows_dropped`,
    which makes the daemon exit non-zero.
    """

    def __init__(
        self,
        device: str,
        link: EnclaveLink,
        rules: dict[str, Any],
        inq: BoundedQueue[SealedWindow | EndOfStream],
        sink: Callable[[AlertEnvelope], None],
        stats: CameraStats,
        *,
        max_retries: int | None = None,
        retry_backoff_s: float = 1.0,
        retry_timeout_s: float = 60.0,
        on_result: Callable[[SealedWindow, Any, float], None] | None = None,
        on_end: Callable[[EndOfStream], None] | None = None,
        journal: WindowJournal | None = None,
        source_key: str | None = None,
    ) -> None:
        self.device = device
        self.link = link
        self.rules = rules
        self.inq = inq
        self.sink = sink
        self.stats = stats
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.retry_timeout_s = retry_timeout_s
        self.on_result = on_result
        self.on_end = on_end
        self.journal = journal
        self.source_key = source_key
        self._timing = stats.stage("enclave")
        self._e2e = stats.stage("end_to_end")
        self._said_hello = False
        self._recovered = journal is None
        self._done_until: float | None = None
        self._seen_reasons: set[str] = set()
        self.finished = False

    def hello(self) -> dict[str, Any]:
        info = self.link.hello(self.device, self.rules)
        self._said_hello = True
        log.info("camera %s: registered with the enclave (%s)", self.device, info.get("backend", "remote"))
        return info

    def _hello_until_deadline(self, stop: threading.Event) -> None:
        """Say hello, retrying transport errors for `retry_timeout_s` (an enclave still starting)."""
        deadline = time.monotonic() + self.retry_timeout_s
        delay = self.retry_backoff_s
        while True:
            try:
                self.hello()
                return
            except TransportError as e:
                if time.monotonic() >= deadline or stop.is_set():
                    raise
                wait = max(0.0, min(delay, deadline - time.monotonic()))
                log.warning(
                    "camera %s: enclave unreachable (%s); hello again in %.1f s", self.device, e, wait
                )
                if stop.wait(wait):
                    raise
                delay = min(delay * 2, 5.0)

    def run(self, stop: threading.Event) -> None:
        if not self._said_hello:
            self._hello_until_deadline(stop)
        if not self._recovered:
            self._recover(stop)
        if self.finished:
            return
        for item in self.inq.drain(stop):
            if isinstance(item, EndOfStream):
                self.finished = True
                if self.journal is not None and self.source_key is not None and item.reason != "shutdown":
                    self.journal.clear_progress(self.device)  # evaluated to its end: a new run starts over
                if self.on_end is not None:
                    self.on_end(item)
                return
            if self._already_done(item):
                continue
            self._submit(item, stop)

    def _recover(self, stop: threading.Event) -> None:
        """Resubmit what a previous run left in flight (its reply or its outbox commit was lost)."""
        assert self.journal is not None
        for w in self.journal.pending_windows(self.device):
            log.info(
                "camera %s: resubmitting window seq %d left in flight by a previous run", self.device, w.seq
            )
            self.stats.inc("windows_resubmitted")
            self._submit(w, stop, resend=True, journalled=True)
            if stop.is_set():
                return
        if self.source_key is not None:  # read after the resubmissions: they advance it
            self._done_until = self.journal.progress(self.device, self.source_key)
            if self._done_until is not None:
                log.info(
                    "camera %s: resuming the replay after media time %.2f s (evaluated by a previous run)",
                    self.device,
                    self._done_until,
                )
        self._recovered = True

    def _already_done(self, w: SealedWindow) -> bool:
        if self._done_until is None or w.t1 > self._done_until + 1e-6:
            return False
        self.stats.inc("windows_skipped_done")
        return True

    def _call(self, w: SealedWindow, resend: bool) -> Any:
        if resend:
            return self.link.submit(w.blob, resend=True)  # type: ignore[call-arg]
        return self.link.submit(w.blob)

    def _submit(
        self, w: SealedWindow, stop: threading.Event, *, resend: bool = False, journalled: bool = False
    ) -> None:
        if self.journal is not None and not journalled:
            self.journal.put_window(w)  # durable before the enclave can number an alert for it
        delay = self.retry_backoff_s
        t = time.monotonic()
        deadline = t + self.retry_timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                result = self._call(w, resend)
                break
            except TransportError as e:
                self.stats.inc("enclave_errors")
                out_of_time = time.monotonic() >= deadline
                out_of_tries = self.max_retries is not None and attempt > self.max_retries
                if out_of_time or out_of_tries:
                    log.error(
                        "camera %s: window seq %d dropped: enclave unreachable for %.1f s (%d attempts): %s",
                        self.device,
                        w.seq,
                        time.monotonic() - t,
                        attempt,
                        e,
                    )
                    self.stats.inc("windows_dropped")
                    if self.journal is not None:
                        self.journal.forget_window(w)
                    return
                wait = max(0.0, min(delay, deadline - time.monotonic()))
                log.warning("camera %s: enclave unreachable (%s); retry in %.1f s", self.device, e, wait)
                if stop.wait(wait):
                    return  # shutting down: a journalled window is resubmitted at the next start
                delay = min(delay * 2, 5.0)
                # The enclave may have restarted and forgotten us.
                try:
                    self.hello()
                except (TransportError, EnclaveError) as he:
                    log.warning("camera %s: hello after reconnect failed: %s", self.device, he)
        latency = time.monotonic() - t
        self._timing.observe(latency)
        self.stats.inc("windows_submitted")
        envelopes: list[AlertEnvelope] = []
        if result.status != "ok":
            self.stats.inc("windows_rejected")
            self._log_rejection(w, result.reason or "unspecified")
        else:
            for payload in result.alerts:
                seq, _ = alert_header(payload)
                envelopes.append(
                    AlertEnvelope(
                        camera_id=self.device,
                        seq=seq,
                        capture_ts=w.capture_ts,
                        payload=payload,
                        window_seq=w.seq,
                    )
                )
        if self.journal is not None:
            self.journal.commit_window(w, envelopes, self.source_key)
        else:
            for env in envelopes:
                self.sink(env)
        self.stats.inc("alerts", len(envelopes))
        if result.status == "ok":
            self._e2e.observe(max(0.0, time.time() - w.capture_ts))
        if self.on_result is not None:
            self.on_result(w, result, latency)

    def _log_rejection(self, w: SealedWindow, reason: str) -> None:
        kind = reason.split(":", 1)[0][:60]
        hint = ""
        if "kid" in reason or reason.startswith("auth"):
            hint = (
                " — the camera's data key (data_key_path) is not a key the enclave holds; "
                "provision it with `veilcam provision data-key` or fix data_key_path"
            )
        if kind not in self._seen_reasons:
            self._seen_reasons.add(kind)
            log.error("camera %s: enclave rejected window seq %d: %s%s", self.device, w.seq, reason, hint)
        else:
            log.debug("camera %s: enclave rejected window seq %d: %s", self.device, w.seq, reason)


__all__ = [
    "EnclaveLink",
    "EnclaveStage",
    "LocalEnclave",
    "RemoteEnclave",
    "SubmitResult",
    "WindowJournal",
    "alert_header",
    "load_model_dir",
]
