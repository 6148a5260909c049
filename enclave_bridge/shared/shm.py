"""Shared-memory arena between the enclave's worker client and a same-host GPU worker.

Per stage the enclave sends each worker an activation-sized tensor and reads back K times as
much; through a socket every byte is copied four to six times (pack, send, kernel, receive, join,
unpack). With an arena the enclave's fused masking kernel writes x̄ straight into the region the
worker reads, the worker writes its replies into the region the enclave's unmasking kernel reads,
and the socket carries only small control frames (offsets, shapes).

Layout of one request: inputs first (8-byte aligned), then outputs. Whatever the worker writes
is untrusted: the enclave reads each reply element exactly once (the same read feeds the output
and the Freivalds sums), so a worker that rewrites the arena while the enclave reads gains
nothing. Under SGX the arena must be untrusted host memory (Gramine `untrusted_shm` mount); the
enclave only ever places masked data there.
"""

from __future__ import annotations

import contextlib
import secrets
import weakref
from multiprocessing import shared_memory
from typing import Any

import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import TransportError

ALIGN = 64
MAX_ARENA_BYTES = 4 << 30


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Arena:
    """A shared-memory segment; the creator owns (unlinks) it, the other side only maps it."""

    def __init__(self, size: int, name: str | None = None) -> None:
        if not 0 < size <= MAX_ARENA_BYTES:
            raise TransportError(f"shared-memory arena of {size} bytes refused")
        self.owner = name is None
        try:
            if name is None:
                self._shm = shared_memory.SharedMemory(
                    f"veilcam-{secrets.token_hex(8)}", create=True, size=size
                )
            else:
                self._shm = _attach(name)
        except (OSError, ValueError) as e:
            raise TransportError(f"shared memory unavailable: {e}") from e
        if self._shm.size < size:
            self.close()
            raise TransportError("shared-memory segment smaller than announced")
        self.size = size
        self.name = self._shm.name
        if self.owner:  # unlinked even if the client is dropped without close() (or at exit)
            self._finalizer = weakref.finalize(self, _unlink, self._shm)

    def view(self, offset: int, shape: tuple[int, ...], dtype: npt.DTypeLike = np.int64) -> npt.NDArray[Any]:
        """An ndarray over [offset, offset + nbytes) — bounds checked (offsets come from a peer)."""
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = n * dt.itemsize
        if offset < 0 or offset % 8 or nbytes < 0 or offset + nbytes > self.size:
            raise TransportError(f"arena region [{offset}, {offset + nbytes}) outside {self.size} bytes")
        return np.ndarray(shape, dtype=dt, buffer=self._shm.buf, offset=offset)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._shm.close()
        if self.owner:
            self._finalizer()


def _unlink(shm: shared_memory.SharedMemory) -> None:
    with contextlib.suppress(Exception):
        shm.close()
    with contextlib.suppress(Exception):
        shm.unlink()


def _attach(name: str) -> shared_memory.SharedMemory:
    """Map an existing segment without registering it with this process's resource tracker."""
    if not isinstance(name, str) or not name.startswith("veilcam-") or len(name) > 64 or "/" in name:
        raise ValueError("bad shared-memory name")
    try:
        return shared_memory.SharedMemory(name, create=False, track=False)  # type: ignore[call-arg]
    except TypeError:  # Python < 3.13: no `track`; unregister so exit does not unlink the creator's
        shm = shared_memory.SharedMemory(name, create=False)
        with contextlib.suppress(Exception):
            from multiprocessing import resource_tracker

            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return shm


__all__ = ["ALIGN", "MAX_ARENA_BYTES", "Arena", "aligned"]
