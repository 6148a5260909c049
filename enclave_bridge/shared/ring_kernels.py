"""The two numba passes of the CPU ring GEMM (`ring.RingWeight`), used by the enclave and the worker.

Kept apart from the enclave's own fused passes (`measured.kernels`) because the untrusted worker
runs them too: the worker must not import the enclave's package.
"""

from __future__ import annotations

from typing import Literal, TypedDict

import numba as nb
import numpy as np

from enclave_bridge.shared.ring import P

_P = np.int64(P)


class JitOptions(TypedDict):
    """`nb.njit` keywords shared by every kernel (typed, so the decorator's overloads resolve)."""

    cache: bool
    nogil: bool
    boundscheck: bool
    error_model: Literal["python", "numpy"]


JIT_OPTIONS: JitOptions = {"cache": True, "nogil": True, "boundscheck": False, "error_model": "numpy"}


@nb.njit(**JIT_OPTIONS)
def limb_f64(x, shift, mask, out):  # pragma: no cover - compiled
    """out = float64((x >> shift) & mask): one unsigned limb of ring elements, in one pass."""
    for i in range(x.size):
        out[i] = np.float64((x[i] >> shift) & mask)


@nb.njit(**JIT_OPTIONS)
def acc_part(acc, y, k, first):  # pragma: no cover - compiled
    """acc = (acc +) y·2^k mod p for an exact float64 partial product y (|y| < 2^53), in one pass.

    2^61 ≡ 1 (mod p), so multiplying by 2^k is a 61-bit rotation.
    """
    k = k % 61
    for i in range(y.size):
        v = np.int64(y[i])
        v += (v >> 63) & _P  # (−2^53, 2^53) → [0, p)
        if k:
            v = ((v << k) & _P) + (v >> (61 - k))
            v -= _P & ((_P - 1 - v) >> 63)
        if not first:
            v += acc[i]
            v -= _P & ((_P - 1 - v) >> 63)
        acc[i] = v
