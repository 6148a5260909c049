"""Exact arithmetic in the prime field F_p, p = 2^61 − 1, on top of float64 BLAS and int64.

Why this ring: p is a Mersenne prime, so a ring element is one int64 (8 bytes on the wire) and
reduction is a shift and an add. It is wide enough that a quantised activation (|x̂| < 2^20) times
a quantised weight column (‖Ŵ_o‖₁ ≤ 2^32) never wraps: |x̂·Ŵ| < 2^52 < p/2 (proven per model at
load, `quant`). So activations travel as *one* ring element (no digit split) and weights keep
≥ 20 significant bits per output column.

Products in the ring are computed exactly with float64 GEMMs: an operand that is a full ring
element is split into unsigned limbs of b bits so that every partial GEMM stays below 2^53
(`exact_linear`), and the limb results are recombined modulo p in int64. Only the untrusted
worker (and the off-line precompute of `slalom`/`paper`) multiplies full ring elements; the
enclave's on-line work is element-wise (`kernels`).

Masks come from `MaskRNG`, an AES-256-CTR keystream (`cryptography`), keyed from `os.urandom`;
61-bit values are mapped to [0, p) with p ↦ 0 (statistical distance 2^-61 per element).
`prg_uniform(seed, n)` expands a 32-byte seed the same way: it is how `split2`/`split3` send a
mask to a worker as 32 bytes instead of a tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

P = 2**61 - 1  # Mersenne prime modulus of the ring
HALF = P // 2  # centred representatives lie in [−HALF, HALF]
BITS = 61
EXACT = 2**53  # float64 represents every integer of magnitude < 2^53 exactly
SEED_BYTES = 32
_ZERO_NONCE = bytes(16)


def _keystream_uniform(n: int, draw: Callable[[int], bytes]) -> npt.NDArray[np.int64]:
    """n elements of F_p from a keystream `draw(nbytes)`: the low 61 bits of each 8 bytes.

    The single value 2^61 − 1 = p (probability 2^-61) maps to 0, so the distribution is within
    statistical distance n·2^-61 of uniform (< 2^-25 for 2^36 elements, a year of windows); the
    same rule runs in the enclave's fused kernels and in the worker, so both expand a seed alike.
    """
    raw = np.frombuffer(draw(8 * n), dtype=np.int64) & np.int64(P)
    raw[raw == P] = 0
    return raw


class MaskRNG:
    """AES-256-CTR keystream → uniform elements of F_p, small uniform integers and seeds.

    One instance per thread; the key never leaves the enclave process.
    """

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(32) if key is None else key
        if len(key) != 32:
            raise ValueError("MaskRNG needs a 32-byte key")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(os.urandom(16))).encryptor()
        self.bytes_drawn = 0

    def random_bytes(self, n: int) -> bytes:
        """`n` keystream bytes (AES-CTR of zeros)."""
        self.bytes_drawn += n
        return self._enc.update(bytes(n))

    def uniform(self, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
        """Uniform elements of F_p as an int64 tensor of `shape`."""
        n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        return torch.from_numpy(_keystream_uniform(n, self.random_bytes)).reshape(tuple(shape))

    def small(self, shape: tuple[int, ...] | list[int], bits: int) -> torch.Tensor:
        """Uniform integers in [0, 2^bits) as int64 (Freivalds vectors)."""
        n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
        raw = np.frombuffer(self.random_bytes(8 * n), dtype=np.uint64) >> np.uint64(64 - bits)
        return torch.from_numpy(raw.astype(np.int64)).reshape(tuple(shape))

    def seed(self) -> bytes:
        """A fresh 32-byte PRG seed (a mask sent to a worker as a seed, see `prg_uniform`)."""
        return self.random_bytes(SEED_BYTES)


def prg_uniform(seed: bytes, n: int) -> npt.NDArray[np.int64]:
    """Expand `seed` into n uniform elements of F_p (int64), deterministically.

    AES-256-CTR keyed by the seed with a zero nonce: each seed is used for exactly one mask, so
    the (key, nonce) pair never repeats. The enclave and the worker that holds the seed get the
    same values.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes")
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    return _keystream_uniform(n, lambda k: enc.update(bytes(k)))


def prg_raw(seed: bytes, n: int) -> npt.NDArray[np.int64]:
    """The raw 64-bit keystream words behind `prg_uniform(seed, n)` (int64, not yet in F_p).

    The enclave's fused kernels (`kernels.quant_mask`, `mask_from`) apply the same low-61-bit,
    p ↦ 0 rule while they mask, which saves two passes over the mask.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"PRG seed must be {SEED_BYTES} bytes")
    enc = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_NONCE)).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)), dtype=np.int64)


def reduce(x: torch.Tensor) -> torch.Tensor:
    """Any int64 tensor → its representative in [0, p)."""
    return torch.remainder(x, P)


def add_mod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a + b) mod p for a, b in [0, p) (a + b < 2^62: no overflow)."""
    z = a + b
    z -= P * (z >= P).to(torch.int64)
    return z


def sub_mod(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a − b) mod p for a, b in [0, p)."""
    z = a - b
    z += P * (z < 0).to(torch.int64)
    return z


def centred(x: torch.Tensor) -> torch.Tensor:
    """[0, p) → [−HALF, HALF]: the integer a ring element stands for when |value| < p/2."""
    return x - P * (x > HALF).to(torch.int64)


def to_ring(x: torch.Tensor) -> torch.Tensor:
    """Signed integers with |x| < p (int64) → [0, p)."""
    return x + P * (x < 0).to(torch.int64)


def mul_pow2(x: torch.Tensor, k: int) -> torch.Tensor:
    """x·2^k mod p for x in [0, p): a 61-bit rotation, since 2^61 ≡ 1 (mod p)."""
    k %= BITS
    if k == 0:
        return x
    lo = torch.bitwise_left_shift(x, k).bitwise_and_(P)  # bits that stay below 2^61
    hi = torch.bitwise_right_shift(x, BITS - k)  # bits that wrap around
    return add_mod(lo, hi)


def limb_bits(w_l1: int) -> int:
    """Largest b with (2^b − 1)·w_l1 < 2^53: limb width for an exact float64 product."""
    if w_l1 <= 0:
        return BITS
    b = 0
    while b < BITS and ((1 << (b + 1)) - 1) * w_l1 < EXACT:
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

    `fn` applies the map to a float64 tensor of integers; `w_l1` bounds the L1 norm of the weights
    feeding any one output (|fn(x)| ≤ max|x|·w_l1). `x` is int64, small and signed
    (|x| ≤ x_abs_max) or a ring element in [0, p). Result int64 in [0, p).
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
        limb = torch.bitwise_right_shift(x, shift).bitwise_and_(mask)
        part = reduce(fn(limb.to(torch.float64)).to(torch.int64))
        part = mul_pow2(part, shift)
        acc = part if acc is None else add_mod(acc, part)
    assert acc is not None
    return acc


class RingWeight:
    """A ring weight matrix (D, C_out) prepared for exact products with full ring elements.

    Small centred weights (‖W_o‖₁ small, e.g. `slalom`'s Ŵ) stay one signed float64 matrix; full
    ring elements (masked W̄, additive shares) are split into unsigned limbs of c bits, chosen so
    that (input limbs) × (weight limbs) × D GEMMs are exact in float64 with the fewest products.
    """

    def __init__(self, w_ring: torch.Tensor, device: torch.device | str = "cpu") -> None:
        if w_ring.ndim != 2:
            raise ValueError("ring weight must be (D, C_out)")
        wc = centred(w_ring.to(torch.int64))
        d = int(w_ring.shape[0])
        # decide in float64 first: Σ|centred| of a full ring column (≈ 2^60 per entry) overflows int64
        approx = float(wc.abs().to(torch.float64).sum(dim=0).max().item()) if wc.numel() else 0.0
        self.shape = tuple(w_ring.shape)
        self.parts: list[tuple[int, torch.Tensor, int]] = []  # (shift, float64 limb, l1 bound)
        if approx < 2**40:  # small: one signed matrix, inputs split into ≥ 13-bit limbs
            l1 = int(wc.abs().sum(dim=0).max().item()) if wc.numel() else 0  # exact: no overflow here
            self.parts.append((0, wc.to(torch.float64).to(device), max(l1, 1)))
            return
        best: tuple[int, int] | None = None
        for c in range(8, 31):
            in_bits = limb_bits(max(d * ((1 << c) - 1), 1))
            cost = -(-BITS // c) * -(-BITS // in_bits)
            if best is None or cost < best[0]:
                best = (cost, c)
        assert best is not None
        c = best[1]
        wu = w_ring.to(torch.int64)
        for shift in range(0, BITS, c):
            limb = torch.bitwise_right_shift(wu, shift).bitwise_and_((1 << c) - 1)
            self.parts.append((shift, limb.to(torch.float64).to(device), max(d * ((1 << c) - 1), 1)))

    def apply(
        self,
        fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        x_abs_max: int = P - 1,
    ) -> torch.Tensor:
        """Exact fn(x, W) mod p for x int64 in [0, p), or signed with |x| ≤ x_abs_max."""
        if x.device.type == "cpu":
            return self._apply_cpu(fn, x, x_abs_max)
        acc: torch.Tensor | None = None
        for shift, w, l1 in self.parts:

            def fn_w(t: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
                return fn(t, w)

            part = exact_linear(fn_w, x, x_abs_max, l1)
            part = mul_pow2(part, shift)
            acc = part if acc is None else add_mod(acc, part)
        assert acc is not None
        return acc

    def _apply_cpu(
        self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, x_abs_max: int
    ) -> torch.Tensor:
        """CPU path: each input limb is extracted once and every partial product is reduced,
        rotated and accumulated in one fused pass (`kernels.limb_f64`, `kernels.acc_part`)."""
        from enclave_bridge.shared import ring_kernels as kernels

        if bool((x < 0).any()):
            pos = self._apply_cpu(fn, x.clamp(min=0), x_abs_max)
            neg = self._apply_cpu(fn, (-x).clamp(min=0), x_abs_max)
            return sub_mod(pos, neg)
        xn = np.ascontiguousarray(x.numpy()).reshape(-1)
        nbits = max(int(x_abs_max).bit_length(), 1)
        limbs: dict[int, list[tuple[int, torch.Tensor]]] = {}
        acc: npt.NDArray[np.int64] | None = None
        shape: tuple[int, ...] = ()
        for w_shift, w, l1 in self.parts:
            b = nbits if x_abs_max * l1 < EXACT else limb_bits(l1)
            if b not in limbs:
                parts = []
                for sx in range(0, nbits, b):
                    buf = np.empty(xn.size, np.float64)
                    kernels.limb_f64(xn, sx, (1 << b) - 1 if b < 63 else -1, buf)
                    parts.append((sx, torch.from_numpy(buf).view(x.shape)))
                limbs[b] = parts
            for sx, xl in limbs[b]:
                yt = fn(xl, w)
                y = np.ascontiguousarray(yt.numpy()).reshape(-1)
                if acc is None:
                    shape = tuple(yt.shape)
                    acc = np.empty(y.size, np.int64)
                    kernels.acc_part(acc, y, sx + w_shift, True)
                else:
                    kernels.acc_part(acc, y, sx + w_shift, False)
        assert acc is not None
        return torch.from_numpy(acc).view(shape)


def ring_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact (a @ b) mod p for a, b with entries in [0, p)."""
    return RingWeight(b).apply(lambda t, w: t @ w, a)


__all__ = [
    "BITS",
    "EXACT",
    "HALF",
    "SEED_BYTES",
    "MaskRNG",
    "P",
    "RingWeight",
    "add_mod",
    "centred",
    "exact_linear",
    "limb_bits",
    "mul_pow2",
    "prg_raw",
    "prg_uniform",
    "reduce",
    "ring_matmul",
    "sub_mod",
    "to_ring",
]
