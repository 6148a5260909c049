"""Several attested enclaves behind one `EnclaveLink`, for camera fleets and batch runs (issue 18).

Windows are spread **per device**: a device is pinned to one enclave (the healthy one with the
fewest devices) and all its windows go there, in order, because each enclave keeps its own
per-device replay guard, rule state (debounce) and alert `seq`. Pinning keeps those per device.

An enclave that fails in transit (refused, reset, timed out) is marked down with exponential
backoff (`backoff_s` doubling up to `max_backoff_s`); the device moves to the next healthy
enclave, says `hello` there with the same rules, and the window whose reply was lost is sent there.
The new enclave has never seen the device's window numbers, so nothing is rejected as a replay;
the old enclave's reply (and any alert in it) was lost with the connection, so no alert is
doubled. Two consequences of moving a device, documented in docs/SCALE_OUT.md: its debounce state
starts over, and its alert `seq` continues from the *new* enclave's counter for the device —
consumers must trust every pool enclave's signing key (one verified evidence per enclave).
A rejection (bad key, replay) is a result, not a failure: it never moves a device.

When every enclave is down, `TransportError` goes to the caller (`EnclaveStage` retries with its
own backoff and calls `hello` again, which re-pins the device once an enclave is back).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError, IntegrityError, TransportError

log = logging.getLogger(__name__)


def _remote(address: str, timeout_s: float) -> Any:
    from stages.enclave_client import RemoteEnclave

    return RemoteEnclave(address, timeout_s=timeout_s)


@dataclass(slots=True)
class _Member:
    address: str
    link: Any
    lock: threading.Lock
    down_until: float = 0.0
    failures: int = 0  # consecutive
    windows: int = 0
    failovers_from: int = 0

    def healthy(self, now: float) -> bool:
        return now >= self.down_until


class EnclavePool:
    """`EnclaveLink` over N enclave addresses; windows of one device always go to one enclave.

    `connect(address, timeout_s)` makes the per-address link (default: `RemoteEnclave`). Thread-safe:
    calls for different devices may run concurrently (one in flight per enclave connection).
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout_s: float = 30.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        connect: Callable[[str, float], Any] | None = None,
    ) -> None:
        addrs = list(dict.fromkeys(a.strip() for a in addresses if a and a.strip()))
        if not addrs:
            raise ConfigError("enclave.addresses: the enclave pool needs at least one address")
        make = connect or _remote
        self.members = [_Member(a, make(a, timeout_s), threading.Lock()) for a in addrs]
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._rules: dict[str, dict[str, Any]] = {}
        self._pinned: dict[str, _Member] = {}
        self._lock = threading.Lock()
        self.failovers = 0

    # -- assignment --------------------------------------------------------------------------------
    @property
    def assignment(self) -> dict[str, str]:
        """device → enclave address (for logs, stats and tests)."""
        with self._lock:
            return {d: m.address for d, m in self._pinned.items()}

    def _choose(self, device: str, exclude: set[str]) -> _Member | None:
        now = time.monotonic()
        load: dict[str, int] = {m.address: 0 for m in self.members}
        for m in self._pinned.values():
            load[m.address] += 1
        candidates = [m for m in self.members if m.address not in exclude and m.healthy(now)]
        if not candidates:
            return None
        return min(candidates, key=lambda m: (load[m.address], self.members.index(m)))

    def _mark_down(self, m: _Member, err: BaseException) -> None:
        with self._lock:
            m.failures += 1
            wait = min(self.backoff_s * 2 ** (m.failures - 1), self.max_backoff_s)
            m.down_until = time.monotonic() + wait
        log.warning("enclave %s failed (%s); skipped for %.1f s", m.address, err, wait)

    def _mark_up(self, m: _Member) -> None:
        if m.failures:
            with self._lock:
                m.failures = 0
                m.down_until = 0.0

    def _pin(self, device: str, exclude: set[str]) -> _Member:
        """Pin `device` to a healthy enclave (not in `exclude`) and say hello there."""
        while True:
            with self._lock:
                m = self._choose(device, exclude)
                if m is None:
                    self._pinned.pop(device, None)
                    raise TransportError(
                        f"enclave pool: no enclave reachable for device {device} "
                        f"({len(self.members)} configured, all failing)"
                    )
                self._pinned[device] = m
            try:
                with m.lock:
                    m.link.hello(device, self._rules.get(device, {}))
            except TransportError as e:
                self._mark_down(m, e)
                exclude = exclude | {m.address}
                continue
            self._mark_up(m)
            log.info("enclave pool: device %s → %s", device, m.address)
            return m

    # -- EnclaveLink -------------------------------------------------------------------------------
    def hello(self, device: str, rules: dict[str, Any]) -> dict[str, Any]:
        """Remember the rules (a moved device says hello again with them) and register the device
        with its enclave — a new pin when it has none or its enclave is in backoff."""
        with self._lock:
            self._rules[device] = dict(rules)
            m = self._pinned.get(device)
        if m is not None and m.healthy(time.monotonic()):
            try:
                with m.lock:
                    info = dict(m.link.hello(device, rules))
                self._mark_up(m)
                return {**info, "enclave": m.address}
            except TransportError as e:
                self._mark_down(m, e)
        m = self._pin(device, set())
        return {"device": device, "enclave": m.address, "backend": "pool"}

    def _device_of(self, blob: bytes) -> str:
        from enclave_bridge.shared.windows import parse_header

        return str(parse_header(blob)[0].device)

    def submit(self, blob: bytes, resend: bool = False) -> Any:
        """Send to the device's enclave; on a transport failure, fail over and send it there."""
        try:
            device = self._device_of(blob)
        except IntegrityError:  # a malformed window: any enclave rejects it, with the reason
            with self.members[0].lock:
                return self.members[0].link.submit(blob, resend=resend)
        with self._lock:
            m = self._pinned.get(device)
        if m is None or not m.healthy(time.monotonic()):
            m = self._pin(device, set())
        tried: set[str] = set()
        first = True
        while True:
            try:
                with m.lock:
                    # `resend` only makes sense where the window may have been answered before
                    result = m.link.submit(blob, resend=resend and first)
                self._mark_up(m)
                with self._lock:
                    m.windows += 1
                return result
            except TransportError as e:
                self._mark_down(m, e)
                tried.add(m.address)
                with self._lock:
                    m.failovers_from += 1
                    self.failovers += 1
                first = False
                m = self._pin(device, tried)  # raises TransportError when nothing is left
                log.warning("enclave pool: device %s failed over to %s; window resent", device, m.address)

    def evidence(self, nonce: bytes) -> dict[str, Any]:
        """Evidence of the first reachable enclave (`evidences` gives every enclave's)."""
        for addr, ev in self.evidences(nonce).items():
            if isinstance(ev, dict):
                return {**ev, "enclave": addr}
        raise TransportError("enclave pool: no enclave answered the evidence request")

    def evidences(self, nonce: bytes) -> dict[str, dict[str, Any] | str]:
        """address → attestation evidence (or the error text): consumers verify every enclave."""
        out: dict[str, dict[str, Any] | str] = {}
        for m in self.members:
            try:
                with m.lock:
                    out[m.address] = dict(m.link.evidence(nonce))
            except TransportError as e:
                out[m.address] = str(e)
        return out

    def evidence_provider(self, timeout_s: float = 10.0) -> Callable[[str], dict[str, Any]]:
        """For `AlertPublisher(evidence_provider=…)`: the evidence retained on
        `<prefix>/<device>/enclave` is that of the enclave the device is pinned to (fresh nonce,
        own connection, so evidence requests never queue behind windows)."""

        def provide(device: str) -> dict[str, Any]:
            import os

            with self._lock:
                m = self._pinned.get(device)
            address = m.address if m is not None else self.members[0].address
            link = _remote(address, timeout_s)
            try:
                return dict(link.evidence(os.urandom(32)))
            finally:
                link.close()

        return provide

    def stats(self) -> dict[str, Any]:
        """Per-enclave stats (or `down`), pool counters, and the summed Freivalds failures."""
        per: dict[str, Any] = {}
        freivalds = 0
        now = time.monotonic()
        for m in self.members:
            entry: dict[str, Any] = {
                "healthy": m.healthy(now),
                "windows": m.windows,
                "failovers_from": m.failovers_from,
            }
            if m.healthy(now):
                try:
                    with m.lock:
                        st = dict(m.link.stats())
                    entry["stats"] = st
                    ev = st.get("evaluator")
                    inner = ev.get("freivalds_failures") if isinstance(ev, dict) else 0
                    f = st.get("freivalds_failures", inner)
                    freivalds += int(f or 0)
                except TransportError as e:  # found down by the probe: skipped like a failed submit
                    self._mark_down(m, e)
                    entry["healthy"] = False
                    entry["error"] = str(e)
            per[m.address] = entry
        with self._lock:
            devices = len(self._pinned)
        return {
            "backend": "pool",
            "enclaves": per,
            "devices": devices,
            "failovers": self.failovers,
            "freivalds_failures": freivalds,
        }

    def close(self) -> None:
        for m in self.members:
            try:
                m.link.close()
            except TransportError as e:
                log.debug("enclave %s close: %s", m.address, e)


__all__ = ["EnclavePool"]
