"""Exact arithmetic in the prime field F_p, p = 2^31 − 1, on top of float64 BLAS.

Why this ring: p is a Mersenne prime, so ring elements fit in 31 bits (4 bytes on the wire) and
every product of a *small* operand (a quantised activation, |x̂| ≤ 2^10) with a *full* ring element
summed over an inner dimension D ≤ 4608 stays below 2^53 — one float64 GEMM computes it exactly.
When an operand is a full ring element on both sides (the worker's x̄·W̄, the pool's r1·W̄) the
left operand is split into unsigned limbs of b bits, each limb product is exact in float64, and
the limbs are recombined modulo p in int64. `exact_linear` picks the limb count from the proven
bound `max|x| · max‖W_o‖₁ < 2^53` of the linear map.

Masks come from `MaskRNG`, an AES-256-CTR keystream (a real CSPRNG, `cryptography`), keyed from
`os.urandom` inside the enclave; values are mapped to [0, p) by rejection sampling, so they are
exactly uniform.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

P = 2**31 - 1  # Mersenne prime modulus of the ring
HALF = P // 2  # centred representatives lie in [−HALF, HALF]
EXACT = 2**53  # float64 represents every integer of magnitude < 2^53 exactly
_MASK31 = np.uint32(0x7FFFFFFF)


class MaskRNG:
    """AES-256-CTR keystream → uniform elements of F_p (and of other small ranges).

    One instance per enclave; the key never leaves the process. Not thread-safe: the pool filler
    and the evaluator each own one.
    """

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError("MaskRNG needs a 32-byte key")
        nonce = os.urandom(16)
        self._enc = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
        self.bytes_drawn = 0

    def random_bytes(self, n: int) -> bytes:
        """`n` keystream bytes (AES-CTR of zeros)."""
        self.bytes_drawn += n
        return self._enc.update(bytes(n))

    def uniform(self, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
        """Uniform elements of F_p as an int64 tensor (31 random bits, rejecting the value p)."""
        n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        raw = np.frombuffer(self.random_bytes(4 * n), dtype=np.uint32) & _MASK31
        bad = np.flatnonzero(raw == P)
        while bad.size:  # probability 2^-31 per element
            raw = raw.copy()
            fresh = np.frombuffer(self.random_bytes(4 * bad.size), dtype=np.uint32) & _MASK31
            raw[bad] = fresh
            bad = bad[fresh == P]
        return torch.from_numpy(raw.astype(np.int64)).reshape(tuple(shape))


def reduce(x: torch.Tensor) -> torch.Tensor:
    """Any int64 tensor → its representative in [0, p)."""
    return torch.remainder(x, P)


def add_mod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a + b) mod p for a, b already in [0, p) (one conditional subtraction, no division)."""
    z = a + b
    z -= P * (z >= P).to(torch.int64)
    return z


def sub_mod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a − b) mod p for a, b already in [0, p)."""
    z = a - b
    z += P * (z < 0).to(torch.int64)
    return z


def centred(x: torch.Tensor) -> torch.Tensor:
    """[0, p) → [−HALF, HALF]: the integer a ring element stands for when |value| < p/2."""
    return x - P * (x > HALF).to(torch.int64)


def to_ring(x: torch.Tensor) -> torch.Tensor:
    """Signed small integers (int64) → [0, p)."""
    return x + P * (x < 0).to(torch.int64)


def mask32(xq: torch.Tensor, r1c: torch.Tensor) -> torch.Tensor:
    """x̄ = (x̂ + r1) mod p in int32: x̂ small (|x̂| < 2^30), r1 stored centred (|r1c| ≤ HALF).

    x̂ + r1c never overflows int32; one branch-free fix-up (add p where negative) makes it canonical.
    """
    v = xq + r1c
    v += v.bitwise_right_shift(31).bitwise_and_(P)
    return v


def unmask32(y_bar: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(ȳ − u) mod p in int32 for ȳ, u canonical (the difference lies in (−p, p): no overflow)."""
    v = y_bar - u
    v += v.bitwise_right_shift(31).bitwise_and_(P)
    return v


def centred32(v: torch.Tensor) -> torch.Tensor:
    """Canonical int32 → centred representative, in place (subtract p where v > HALF)."""
    v -= torch.rsub(v, HALF).bitwise_right_shift_(31).bitwise_and_(P)
    return v


def pow2_mod(k: int) -> int:
    """2^k mod p, cheap because p is a Mersenne prime."""
    return 1 << (k % 31)


def limb_bits(w_l1: int) -> int:
    """Largest b with (2^b − 1)·w_l1 < 2^53: limb width for an exact float64 product."""
    if w_l1 <= 0:
        return 31
    b = 0
    while b < 31 and ((1 << (b + 1)) - 1) * w_l1 < EXACT:
        b += 1
    if b == 0:
        raise ValueError(f"weight L1 bound {w_l1} too large for exact float64 products")
    return b


def exact_linear(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    x_abs_max: int,
    w_l1: int,
) -> torch.Tensor:
    """Exact `fn(x) mod p` for a linear map `fn` with integer float64 weights.

    `fn` takes a float64 tensor of integers and applies the linear map in float64; `w_l1` bounds
    the L1 norm of the weights feeding any one output (so |fn(x)| ≤ max|x|·w_l1). `x` is int64,
    either small and signed (|x| ≤ x_abs_max) or a ring element in [0, p). Result int64 in [0, p).
    """
    if x_abs_max * w_l1 < EXACT:
        return reduce(fn(x.to(torch.float64)).to(torch.int64))
    if bool((x < 0).any()):
        pos = exact_linear(fn, x.clamp(min=0), x_abs_max, w_l1)
        neg = exact_linear(fn, (-x).clamp(min=0), x_abs_max, w_l1)
        return sub_mod(pos, neg)
    b = limb_bits(w_l1)
    nbits = max(int(x_abs_max).bit_length(), 1)
    mask = (1 << b) - 1
    acc: torch.Tensor | None = None
    for shift in range(0, nbits, b):
        limb = (x >> shift) & mask
        part = reduce(fn(limb.to(torch.float64)).to(torch.int64))
        if shift:
            part = reduce(part * pow2_mod(shift))
        acc = part if acc is None else add_mod(acc, part)
    assert acc is not None
    return acc


def ring_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact (a @ b) mod p for a, b with entries in [0, p) (used for Freivalds and weight masks)."""
    bc = centred(b).to(torch.float64)
    w_l1 = int(bc.abs().sum(dim=0).max().item()) if bc.numel() else 0
    return exact_linear(lambda t: t @ bc, a, P - 1, max(w_l1, 1))


__all__ = [
    "EXACT",
    "HALF",
    "MaskRNG",
    "P",
    "add_mod",
    "centred",
    "centred32",
    "exact_linear",
    "limb_bits",
    "mask32",
    "pow2_mod",
    "reduce",
    "ring_matmul",
    "sub_mod",
    "to_ring",
    "unmask32",
]
