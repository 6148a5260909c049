"""Ring F_p, p = 2^61 − 1: exact against Python big integers, uniform CSPRNG masks and PRG seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_bridge.measured import kernels
from enclave_bridge.measured.quant import BX
from enclave_bridge.measured.secure_layers import OpMeta, apply_linear, out_shape
from enclave_bridge.measured.stgcn.model import TEMPORAL_KERNEL
from enclave_bridge.shared.ring import (
    BITS,
    HALF,
    SEED_BYTES,
    MaskRNG,
    P,
    RingWeight,
    add_mod,
    centred,
    exact_linear,
    limb_bits,
    mul_pow2,
    prg_raw,
    prg_uniform,
    reduce,
    ring_matmul,
    sub_mod,
    to_ring,
)


def _ref_linear(meta: OpMeta, x: torch.Tensor, w: torch.Tensor) -> np.ndarray:
    """Python-int reference (object arrays never overflow), written from the op table of
    `secure_layers`, independently of `apply_linear`: explicit GEMM rows per kind, mod p."""
    xo = x.numpy().astype(np.int64).astype(object)
    wo = w.numpy().astype(np.int64).astype(object)
    kind = meta.kind
    if kind == "dense":
        return (xo.dot(wo) % P).astype(np.int64)
    b, c, t, v = x.shape
    c_out = w.shape[1]
    shape = out_shape(meta, tuple(x.shape), c_out)
    out = np.zeros(shape, dtype=object)
    if kind == "joint":
        for bi in range(b):
            for ti in range(t):
                row = xo[bi, :, ti, :].reshape(-1)  # (C·V), index c·V + v
                y = row.dot(wo).reshape(-1, v)  # column o·V + w
                out[bi, :, ti, :] = y
    elif kind == "conv1x1":
        for bi in range(b):
            for to in range(shape[2]):
                for vi in range(v):
                    out[bi, :, to, vi] = xo[bi, :, to * meta.stride, vi].dot(wo)
    elif kind == "tconv":
        pad = (TEMPORAL_KERNEL - 1) // 2
        for bi in range(b):
            for to in range(shape[2]):
                for vi in range(v):
                    row = np.zeros(c * TEMPORAL_KERNEL, dtype=object)  # index c·9 + k
                    for k in range(TEMPORAL_KERNEL):
                        ti = to * meta.stride + k - pad
                        if 0 <= ti < t:
                            row[k::TEMPORAL_KERNEL] = xo[bi, :, ti, vi]
                    out[bi, :, to, vi] = row.dot(wo)
    else:
        raise AssertionError(kind)
    return (out % P).astype(np.int64)


def test_modulus_is_the_mersenne_prime_2_61():
    assert P == 2**61 - 1 and BITS == 61 and HALF == P // 2
    # Mersenne exponent 61 is prime, and 2^61 − 1 is prime (Miller–Rabin, deterministic bases for 2^64)
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        d, s = P - 1, 0
        while d % 2 == 0:
            d, s = d // 2, s + 1
        x = pow(a, d, P)
        assert x in (1, P - 1) or any(pow(x, 2**r, P) == P - 1 for r in range(1, s))
    # the design's premise: a 20-bit activation times a 2^32 weight column stays below p/2
    assert BX * 2**32 < 2**52 < HALF


def test_rng_uniform_range_dtype_and_fresh():
    rng = MaskRNG()
    a, b = rng.uniform((4000,)), rng.uniform((4000,))
    assert a.dtype == torch.int64 and int(a.min()) >= 0 and int(a.max()) < P
    assert not torch.equal(a, b)
    assert int(a.max()) > 2**60  # the full 61-bit range is used
    # two generators (fresh os.urandom keys) never produce the same stream
    assert not torch.equal(MaskRNG().uniform((64,)), MaskRNG().uniform((64,)))
    # every one of the 61 bits is balanced (a uint32-era mask would leave bits 31..60 at zero)
    bits = ((a.numpy()[:, None] >> np.arange(61)) & 1).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 0.05), bits


def test_rng_small_and_seed():
    rng = MaskRNG()
    s = rng.small((3, 1000), kernels.T_BITS)
    assert s.dtype == torch.int64 and int(s.min()) >= 0 and int(s.max()) < 2**kernels.T_BITS
    assert int(s.max()) > 2 ** (kernels.T_BITS - 1)
    seeds = {rng.seed() for _ in range(50)}
    assert len(seeds) == 50 and all(len(x) == SEED_BYTES for x in seeds)


def test_rng_is_not_deterministic_under_a_fixed_key_thanks_to_its_nonce():
    key = bytes(32)
    assert not torch.equal(MaskRNG(key).uniform((16,)), MaskRNG(key).uniform((16,)))  # random nonce
    with pytest.raises(ValueError):
        MaskRNG(b"short")


def test_prg_expansion_is_deterministic_uniform_and_matches_the_raw_keystream_rule():
    seed = MaskRNG().seed()
    a = prg_uniform(seed, 5000)
    assert np.array_equal(a, prg_uniform(seed, 5000))  # the worker expands the same mask
    assert np.array_equal(a[:100], prg_uniform(seed, 100))  # a prefix of the stream
    assert not np.array_equal(a, prg_uniform(MaskRNG().seed(), 5000))
    assert a.dtype == np.int64 and a.min() >= 0 and a.max() < P
    raw = prg_raw(seed, 5000)
    low = raw & np.int64(P)
    assert np.array_equal(np.where(low == P, 0, low), a)  # the fused kernels' rule
    # the fused masking kernel applied to x̂ = 0 with this raw keystream yields the same mask
    bar = np.empty(5000, np.int64)
    kernels.mask_from(np.zeros(5000, np.int32), raw, 1, bar)
    assert np.array_equal(bar, a)
    with pytest.raises(ValueError):
        prg_uniform(b"x" * 31, 4)
    with pytest.raises(ValueError):
        prg_raw(b"x" * 33, 4)


@given(st.lists(st.integers(0, P - 1), min_size=2, max_size=40).filter(lambda v: len(v) % 2 == 0))
def test_add_sub_mod_match_python(vals):
    half = len(vals) // 2
    a = torch.tensor(vals[:half], dtype=torch.int64)
    b = torch.tensor(vals[half:], dtype=torch.int64)
    assert add_mod(a, b).tolist() == [(x + y) % P for x, y in zip(vals[:half], vals[half:], strict=True)]
    assert sub_mod(a, b).tolist() == [(x - y) % P for x, y in zip(vals[:half], vals[half:], strict=True)]


@given(st.lists(st.integers(0, P - 1), min_size=1, max_size=20), st.integers(0, 200))
def test_mul_pow2_is_a_rotation_mod_p(vals, k):
    x = torch.tensor(vals, dtype=torch.int64)
    assert mul_pow2(x, k).tolist() == [(v * pow(2, k, P)) % P for v in vals]


@given(st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=20))
def test_reduce_any_int64(vals):
    assert reduce(torch.tensor(vals, dtype=torch.int64)).tolist() == [v % P for v in vals]


_EDGE_X = [-BX, -(2**19), -2, -1, 0, 1, 2, BX]
_EDGE_R = [0, 1, 2**20, P - 2**21, P - BX - 1, P - 2, P - 1]


def _mask_cases() -> tuple[np.ndarray, np.ndarray]:
    """Every (x̂, r) pair of the edge values plus random ones: x̂ in [−BX, BX], r in [0, p)."""
    xs, rs = np.meshgrid(np.asarray(_EDGE_X, np.int64), np.asarray(_EDGE_R, np.int64))
    rng = np.random.default_rng(5)
    x = np.concatenate([xs.reshape(-1), rng.integers(-BX, BX + 1, 2000)])
    r = np.concatenate([rs.reshape(-1), MaskRNG().uniform((2000,)).numpy()])
    return x, r


@pytest.mark.parametrize("sign", [1, -1])
def test_quant_mask_kernel_masks_exactly_at_the_edges(sign):
    """x̄ = (x̂ ± r) mod p from the fused kernels, in [0, p), for every x̂ and every ring r.

    split2 masks with sign −1 (A gets x̂ − r): x̂ − r reaches below −p when r > p − |x̂|
    (probability ~2^-41 per element), which one conditional +p does not bring back into [0, p).
    """
    x, r = _mask_cases()
    want = [(int(a) + sign * int(b)) % P for a, b in zip(x, r, strict=True)]
    xq, bar = np.empty(x.size, np.int32), np.empty(x.size, np.int64)
    kernels.quant_mask(x.astype(np.float32) * np.float32(0.5), 2.0, r, sign, xq, bar)
    assert xq.tolist() == x.tolist()
    bad = [(int(a), int(b)) for a, b, g, w in zip(x, r, bar.tolist(), want, strict=True) if g != w]
    assert not bad, f"quant_mask sign={sign}: {len(bad)} wrong, e.g. x̂, r = {bad[:3]}"
    bar2 = np.empty(x.size, np.int64)
    kernels.mask_from(x.astype(np.int32), r, sign, bar2)
    bad = [(int(a), int(b)) for a, b, g, w in zip(x, r, bar2.tolist(), want, strict=True) if g != w]
    assert not bad, f"mask_from sign={sign}: {len(bad)} wrong, e.g. x̂, r = {bad[:3]}"
    # unmasking recovers x̂ exactly
    back = torch.from_numpy(bar)
    back = sub_mod(back, torch.from_numpy(r)) if sign > 0 else add_mod(back, torch.from_numpy(r))
    assert centred(back).tolist() == x.tolist()


def test_centred_edges():
    v = torch.tensor([0, 1, HALF, HALF + 1, P - 1], dtype=torch.int64)
    assert centred(v).tolist() == [0, 1, HALF, -HALF, -1]
    assert to_ring(centred(v)).tolist() == v.tolist()
    assert to_ring(torch.tensor([-(P - 1), -1, 0])).tolist() == [1, P - 1, 0]


def test_limb_bits_keeps_products_below_2_53():
    for l1 in (1, 1000, 2**20, 2**32, 4608 * (2**12 - 1)):
        b = limb_bits(l1)
        assert ((1 << b) - 1) * l1 < 2**53
        assert b == BITS or ((1 << (b + 1)) - 1) * l1 >= 2**53
    with pytest.raises(ValueError):
        limb_bits(2**53)


CASES = [
    (OpMeta("dense"), (3, 40), 7),
    (OpMeta("joint", 1, 4, 3), (2, 3, 5, 4), 8 * 4),
    (OpMeta("conv1x1", 1, 0, 3), (2, 6, 7, 3), 5),
    (OpMeta("conv1x1", 2), (1, 6, 7, 3), 5),
    (OpMeta("tconv", 1), (2, 4, 11, 3), 6),
    (OpMeta("tconv", 2), (1, 4, 12, 3), 6),
]


def _d_in(meta: OpMeta, in_shape: tuple[int, ...]) -> int:
    if meta.kind == "dense":
        return in_shape[1]
    if meta.kind == "joint":
        return in_shape[1] * in_shape[3]
    return in_shape[1] * (TEMPORAL_KERNEL if meta.kind == "tconv" else 1)


@pytest.mark.parametrize(
    ("meta", "in_shape", "d_out"), CASES, ids=[f"{m.kind}{m.stride}" for m, _, _ in CASES]
)
def test_ring_weight_full_ring_by_full_ring_matches_big_integers(meta, in_shape, d_out):
    """Full ring elements on both sides (the worker's x̄·W̄, seeds × shares): limb products, exact."""
    rng = MaskRNG()
    x = rng.uniform(in_shape)
    w = rng.uniform((_d_in(meta, in_shape), d_out))
    got = RingWeight(w).apply(lambda t, wl: apply_linear(meta, t, wl), x)
    assert np.array_equal(got.numpy(), _ref_linear(meta, x, w))


@pytest.mark.parametrize(
    ("meta", "in_shape", "d_out"), CASES, ids=[f"{m.kind}{m.stride}" for m, _, _ in CASES]
)
def test_ring_weight_small_weights_full_ring_input(meta, in_shape, d_out):
    """Quantised Ŵ (centred, ‖Ŵ_o‖₁ ≤ 2^32) times a full ring element (slalom/split2 worker)."""
    rng = MaskRNG()
    x = rng.uniform(in_shape)
    d = _d_in(meta, in_shape)
    w_int = torch.randint(-(2**32) // d, 2**32 // d, (d, d_out))
    got = RingWeight(to_ring(w_int)).apply(lambda t, wl: apply_linear(meta, t, wl), x)
    assert np.array_equal(got.numpy(), _ref_linear(meta, x, to_ring(w_int)))


def test_exact_linear_small_signed_input_with_ring_weights():
    """Small signed x̂ with full ring weights (u3 = x̂·R2 in paper mode), exact mod p."""
    rng = MaskRNG()
    meta = OpMeta("tconv", 1)
    xq = torch.randint(-BX, BX + 1, (2, 8, 10, 3))
    r2 = rng.uniform((8 * 9, 4))
    got = RingWeight(r2).apply(lambda t, w: apply_linear(meta, t, w), xq, BX)
    assert np.array_equal(got.numpy(), _ref_linear(meta, to_ring(xq), r2))


def test_exact_linear_splits_signed_input_when_needed():
    rng = MaskRNG()
    xq = torch.randint(-(2**40), 2**40, (5, 30))
    w = centred(rng.uniform((30, 3))) >> 40  # |w| < 2^20: ‖w_o‖₁ < 2^25, x̂ needs two limbs
    got = exact_linear(lambda t: t @ w.to(torch.float64), xq, 2**40, int(w.abs().sum(0).max()))
    assert np.array_equal(got.numpy(), _ref_linear(OpMeta("dense"), to_ring(xq), to_ring(w)))




def test_ring_weight_single_full_ring_column_of_many_rows():
    """A full-ring column with D ≥ 8 rows: Σ_d |centred(w_d)| exceeds 2^63 (paper's W̄ and split3's
    shares are such columns; the fc of a 5-class model has 5 of them, all wrapping with p ≈ 2^-5)."""
    w = torch.full((16, 1), P - 2**59 - 12345, dtype=torch.int64)  # |centred| > 2^59: Σ > 2^63
    x = torch.arange(P - 16, P, dtype=torch.int64).reshape(1, 16)
    want = sum(int(a) * (P - 2**59 - 12345) for a in x[0].tolist()) % P
    assert ring_matmul(x, w).tolist() == [[want]]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 50), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_ring_matmul_property(n, d, c, seed):
    """Random full-ring products, d up to 50 rows: Σ|centred w| of a column overflows int64 from
    d ≈ 14 (the RingWeight bug hypothesis found with d ≥ 14, c = 1; fixed)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, P, (n, d), generator=g)
    b = torch.randint(0, P, (d, c), generator=g)
    want = (a.numpy().astype(object).dot(b.numpy().astype(object))) % P
    assert ring_matmul(a, b).tolist() == want.tolist()


def test_mulmod_kernel_matches_python():
    rng = MaskRNG()
    a, b = rng.uniform((200,)).tolist(), rng.uniform((200,)).tolist()
    a += [0, 1, P - 1, P - 1]
    b += [P - 1, P - 1, P - 1, 1]
    for x, y in zip(a, b, strict=True):
        assert int(kernels.mulmod(np.int64(x), np.int64(y))) == (x * y) % P
