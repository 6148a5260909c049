"""Sending sealed windows to the enclave and collecting its encrypted, signed alerts (ARCHITECTURE.md §2, §7).

`EnclaveLink` is the seam: the daemon only needs `hello`, `submit`, `stats` and `close`.
- `RemoteEnclave` talks to a `veilcam enclave` process through `enclave_bridge.host.client.EnclaveClient`
  (the deployment path: attested, separate process, secure evaluation).
- `LocalEnclave` (`stages.local_enclave`) is the in-process, insecure, labelled stand-in used when
  no enclave address is configured; `EnclavePool` (`stages.enclave_pool`) spreads cameras over
  several enclaves.

`EnclaveStage` is the thread between the windows queue and the outbox. Rejections are counted and
logged by reason without payload; transport errors are retried with backoff for up to
`retry_timeout_s`, then the window is dropped (counted; the daemon exits non-zero). With the
outbox as its journal, a window is on disk before the enclave sees it and its alerts are stored in
the transaction that removes it — alerts, once numbered, are never dropped, even by a crash.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import msgpack

from enclave_bridge.shared.rpc import SubmitResult
from pipeline.errors import ConfigError, EnclaveError, IntegrityError, TransportError
from pipeline.messages import AlertEnvelope, EndOfStream, SealedWindow
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats
from stages.local_enclave import LocalEnclave, load_model_dir

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
        sink: Callable[[AlertEnvelope], object],  # its result (an outbox row id) is ignored
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
