"""Ring arithmetic: exact against Python big integers, uniform CSPRNG masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave_bridge.quant import BX
from enclave_bridge.ring import (
    HALF,
    MaskRNG,
    P,
    add_mod,
    centred,
    centred32,
    exact_linear,
    limb_bits,
    mask32,
    ring_matmul,
    sub_mod,
    to_ring,
    unmask32,
)
from enclave_bridge.secure_layers import OpMeta, apply_linear, out_shape, x_rows, y_from_rows


def _ref_linear(meta: OpMeta, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Python-int reference: object arrays never overflow."""
    rows = x_rows(meta, x.to(torch.float64)).numpy().round().astype(np.int64).astype(object)
    wo = w.numpy().astype(np.int64).astype(object)
    out = (rows.dot(wo)) % P
    shape = out_shape(meta, tuple(x.shape), w.shape[1])
    return y_from_rows(meta, torch.from_numpy(out.astype(np.int64)), shape)


def test_modulus_is_the_mersenne_prime():
    assert P == 2**31 - 1
    assert all(P % q for q in range(2, 46341))  # trial division up to √p


def test_rng_uniform_range_and_fresh():
    rng = MaskRNG()
    a, b = rng.uniform((1000,)), rng.uniform((1000,))
    assert a.dtype == torch.int64 and int(a.min()) >= 0 and int(a.max()) < P
    assert not torch.equal(a, b)
    # two generators (fresh os.urandom keys) never produce the same stream
    assert not torch.equal(MaskRNG().uniform((64,)), MaskRNG().uniform((64,)))


def test_rng_is_deterministic_under_a_fixed_key_only_through_its_nonce():
    key = bytes(32)
    assert not torch.equal(MaskRNG(key).uniform((16,)), MaskRNG(key).uniform((16,)))  # random nonce
    with pytest.raises(ValueError):
        MaskRNG(b"short")


@given(st.lists(st.integers(0, P - 1), min_size=2, max_size=40).filter(lambda v: len(v) % 2 == 0))
def test_add_sub_mod_match_python(vals):
    half = len(vals) // 2
    a = torch.tensor(vals[:half], dtype=torch.int64)
    b = torch.tensor(vals[half:], dtype=torch.int64)
    assert add_mod(a, b).tolist() == [(x + y) % P for x, y in zip(vals[:half], vals[half:], strict=True)]
    assert sub_mod(a, b).tolist() == [(x - y) % P for x, y in zip(vals[:half], vals[half:], strict=True)]


@given(
    st.lists(st.integers(-BX, BX), min_size=1, max_size=30),
    st.lists(st.integers(0, P - 1), min_size=30, max_size=30),
)
def test_int32_mask_unmask_roundtrip(xs, rs):
    xq = torch.tensor(xs, dtype=torch.int32)
    r1 = torch.tensor(rs[: len(xs)], dtype=torch.int64)
    x_bar = mask32(xq, centred(r1).to(torch.int32))
    assert x_bar.tolist() == [(x + r) % P for x, r in zip(xs, rs, strict=False)]
    back = centred32(unmask32(x_bar, r1.to(torch.int32)))
    assert back.tolist() == xs


def test_centred_edges():
    v = torch.tensor([0, 1, HALF, HALF + 1, P - 1], dtype=torch.int64)
    assert centred(v).tolist() == [0, 1, HALF, -HALF, -1]
    assert to_ring(centred(v)).tolist() == v.tolist()
    assert centred32(v.to(torch.int32)).tolist() == [0, 1, HALF, -HALF, -1]


def test_limb_bits_keeps_products_below_2_53():
    for l1 in (1, 1000, 2**20, 4608 * HALF):
        b = limb_bits(l1)
        assert ((1 << b) - 1) * l1 < 2**53
        assert b == 31 or ((1 << (b + 1)) - 1) * l1 >= 2**53


@pytest.mark.parametrize(
    ("meta", "in_shape", "d_out"),
    [
        (OpMeta("dense"), (3, 40), 7),
        (OpMeta("joint", 1, 4, 3), (2, 3, 5, 4), 8 * 4),
        (OpMeta("agg", 1, 4, 3), (2, 5, 6, 4), 12),
        (OpMeta("conv1x1", 1), (2, 6, 7, 3), 5),
        (OpMeta("conv1x1", 2), (1, 6, 7, 3), 5),
        (OpMeta("tconv", 1), (2, 4, 11, 3), 6),
        (OpMeta("tconv", 2), (1, 4, 12, 3), 6),
    ],
)
def test_exact_linear_ring_by_ring_matches_big_integers(meta, in_shape, d_out):
    """Full ring elements on both sides (the worker's x̄·W̄): limb products, exact mod p."""
    rng = MaskRNG()
    x = rng.uniform(in_shape)
    d_in = x_rows(meta, x.to(torch.float64)).shape[1]
    w = rng.uniform((d_in, d_out))
    wc = centred(w).to(torch.float64)
    l1 = int(wc.abs().sum(dim=0).max())
    got = exact_linear(lambda t: apply_linear(meta, t, wc), x, P - 1, l1)
    want = _ref_linear(meta, x, centred(w))
    assert torch.equal(got, want)


def test_exact_linear_small_signed_input_single_product():
    """Small signed x̂ with full ring weights (u3 = x̂·R2): one float64 product, exact."""
    rng = MaskRNG()
    meta = OpMeta("tconv", 1)
    xq = torch.randint(-BX, BX + 1, (2, 8, 10, 3))
    w = centred(rng.uniform((8 * 9, 4)))
    l1 = int(w.abs().sum(dim=0).max())
    got = exact_linear(lambda t: apply_linear(meta, t, w.to(torch.float64)), xq, BX, l1)
    assert torch.equal(got, _ref_linear(meta, xq, w))


def test_exact_linear_splits_signed_input_when_needed():
    rng = MaskRNG()
    xq = torch.randint(-(2**29), 2**29, (5, 30))
    w = centred(rng.uniform((30, 3)))
    got = exact_linear(lambda t: t @ w.to(torch.float64), xq, 2**29, int(w.abs().sum(0).max()))
    assert torch.equal(got, _ref_linear(OpMeta("dense"), xq, w))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 50), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_ring_matmul_property(n, d, c, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, P, (n, d), generator=g)
    b = torch.randint(0, P, (d, c), generator=g)
    want = (a.numpy().astype(object).dot(b.numpy().astype(object))) % P
    assert ring_matmul(a, b).tolist() == want.tolist()
