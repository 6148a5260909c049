"""Request terms and errors of the worker protocol, shared by the enclave's client and the worker.

Kept apart from `gpu_worker` so the enclave's code never imports the (unmeasured) worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import TransportError
from enclave_bridge.shared.ring import SEED_BYTES, prg_uniform
from enclave_bridge.shared.wire import pack_tensor, unpack_tensor


class WorkerError(Exception):
    """A request the worker refuses (reported to the client as `{ok: false}`)."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Term:
    """One term of a compute request: sign·(input or PRG(seed))·W[slot]."""

    slot: int
    sign: int
    x: npt.NDArray[np.int64] | None = None  # int64 ring elements
    seed: bytes | None = None
    shape: tuple[int, ...] | None = None

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"slot": self.slot, "sign": self.sign}
        if self.x is not None:
            d["input"] = pack_tensor(self.x)
        else:
            d["seed"], d["shape"] = self.seed, list(self.shape or ())
        return d

    @staticmethod
    def from_wire(d: Any, arena: Any = None, raw: list[npt.NDArray[Any]] | None = None) -> Term:
        """Decode a term; `{shm: offset, shape}` inputs are views into the connection's arena,
        `{raw: i}` inputs the i-th raw segment that followed the request frame."""
        if not isinstance(d, dict):
            raise WorkerError("term must be a map")
        slot, sign = d.get("slot"), d.get("sign")
        if not isinstance(slot, int) or not 0 <= slot < 8 or sign not in (1, -1):
            raise WorkerError("bad term slot/sign")
        if "shm" in d:
            off, shape = d.get("shm"), d.get("shape")
            if arena is None or not isinstance(off, int) or not _good_shape(shape):
                raise WorkerError("bad shared-memory term (attach first)")
            try:
                return Term(slot, int(sign), x=arena.view(off, tuple(shape), np.int64))
            except TransportError as e:
                raise WorkerError(str(e)) from e
        if "raw" in d:
            i = d.get("raw")
            if raw is None or not isinstance(i, int) or not 0 <= i < len(raw):
                raise WorkerError("bad raw term")
            x = raw[i]
            if x.dtype != np.int64 or not _good_shape(list(x.shape)):
                raise WorkerError("raw input must be int64 ring elements")
            return Term(slot, int(sign), x=x)
        if "input" in d:
            try:
                return Term(slot, int(sign), x=unpack_tensor(d["input"]))
            except TransportError as e:
                raise WorkerError(str(e)) from e
        seed, shape = d.get("seed"), d.get("shape")
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES or not _good_shape(shape):
            raise WorkerError("bad seed term")
        return Term(slot, int(sign), seed=seed, shape=tuple(shape))

    def tensor(self) -> npt.NDArray[np.int64]:
        if self.x is not None:
            return self.x
        assert self.seed is not None and self.shape is not None
        return prg_uniform(self.seed, int(np.prod(self.shape))).reshape(self.shape)


def _good_shape(shape: object) -> TypeGuard[list[int]]:
    return (
        isinstance(shape, list)
        and 0 < len(shape) <= 4
        and all(isinstance(s, int) and 0 < s < 1 << 24 for s in shape)
        and int(np.prod(shape)) <= 1 << 28
    )


__all__ = ["Term", "WorkerError"]
