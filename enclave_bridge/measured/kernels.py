"""Fused element-wise passes of the enclave's on-line work (numba, compiled once, cached on disk).

Between two worker calls the enclave touches every activation element a few times: quantise,
mask, unmask/combine the replies, range-check, Freivalds projections, dequantise. Each torch
element-wise op is a full pass over memory with a temporary; these kernels do the work of one
side of a worker call in a single pass over the data, with no temporaries.

Freivalds check (`FreivaldsCheck`): for a reply claimed to be Y = X·Ŵ (X the op's GEMM rows,
exact integers) the enclave draws fresh secret vectors t (one entry per GEMM row) and s (one per
output column), uniform in [0, 2^T_BITS), and accepts iff  tᵀ·Y·s ≡ (tᵀ·X)·(Ŵ·s)  (mod p).
If Y ≠ XŴ, the error E = Y − XŴ is a non-zero integer matrix with |E| < 2^53 < p (replies are
range-checked first), so tᵀEs is a non-zero polynomial of degree 2 over F_p and vanishes with
probability ≤ 2/2^T_BITS (Schwartz–Zippel); REPS independent repetitions give ≤ 2^(-REPS·(T_BITS−1)).
tᵀY costs one multiply-add per output element (fused into the unmasking pass), tᵀX one per input
element and tap, Ŵs is |Ŵ| — nothing touches the large masked operands, and no GEMM is done.

Integer bounds used below (all int64, no overflow): |y| ≤ 2^52 split as y = hi·2^26 + lo with
|hi| ≤ 2^26, 0 ≤ lo < 2^26; t < 2^23: each product < 2^49.1, at most MAX_T_ROWS = 2^13 of them per
accumulator (< 2^62.1). |x̂| < 2^20: x̂·t < 2^43, at most 2^19 terms per accumulator (< 2^62).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from enclave_bridge.shared.ring import P
from enclave_bridge.shared.ring_kernels import JIT_OPTIONS  # one set of numba options for every kernel

T_BITS = 23  # Freivalds vectors are uniform in [0, 2^T_BITS)
REPS = 2  # soundness error ≤ (2/2^23)^2 = 2^-44 per check
MAX_T_ROWS = 1 << 13  # B·T' per call of `finish` (the evaluator chunks larger batches)
Y_BOUND = 1 << 52  # |y| of every exact result (quant.WEIGHT_BUDGET)
_CHUNK = 1 << 13  # elements per partial Freivalds sum in `finish_flat` (|Σ| < 2^62)
_P = np.int64(P)
_M26 = np.int64((1 << 26) - 1)
_M31 = np.int64((1 << 31) - 1)
_M30 = np.int64((1 << 30) - 1)


@nb.njit(**JIT_OPTIONS)
def _red(x: np.int64) -> np.int64:  # pragma: no cover - compiled
    """0 ≤ x < 2^63 → x mod p (two Mersenne folds)."""
    x = (x & _P) + (x >> 61)
    x = (x & _P) + (x >> 61)
    return x - _P if x >= _P else x


@nb.njit(**JIT_OPTIONS)
def mulmod(a: np.int64, b: np.int64) -> np.int64:  # pragma: no cover - compiled
    """a·b mod p for a, b in [0, p), with 31-bit halves (no 128-bit type needed)."""
    a1, a0 = a >> 31, a & _M31
    b1, b0 = b >> 31, b & _M31
    mid = a1 * b0 + a0 * b1  # < 2^62
    m1, m0 = mid >> 30, mid & _M30  # mid·2^31 = m1·2^61 + m0·2^31 ≡ m1 + m0·2^31
    return _red(_red(2 * (a1 * b1) + m1 + (m0 << 31)) + _red(a0 * b0))


@nb.njit(**JIT_OPTIONS)
def _signed_mod(x: np.int64) -> np.int64:  # pragma: no cover - compiled
    return _red(x) if x >= 0 else (_P - _red(-x)) % _P


@nb.njit(**JIT_OPTIONS)
def quant_mask(h, scale, r, sign, xq, bar):  # pragma: no cover - compiled
    """x̂ = rint(h·scale) → xq (int32); bar = (x̂ + sign·r) mod p (int64), all flat arrays.

    `r` is a ring element or a raw 64-bit keystream word: its low 61 bits are used, p ↦ 0 (the
    rule of `ring.prg_uniform`). Ignored when sign == 0: then only xq is written.
    """
    n = h.size
    for i in range(n):
        q = np.int64(np.rint(h[i] * scale))
        xq[i] = q
        if sign != 0:
            m = r[i] & _P
            if m == _P:
                m = 0
            v = q + m if sign > 0 else q + (_P - m)  # both in (−2^20, p + 2^20)  # in (−p, p + 2^20)
            if v < 0:
                v += _P
            elif v >= _P:
                v -= _P
            bar[i] = v


@nb.njit(**JIT_OPTIONS)
def mask_from(xq, r, sign, bar):  # pragma: no cover - compiled
    """bar = (x̂ + sign·r) mod p from an already quantised x̂ (second share of `split3`)."""
    for i in range(xq.size):
        m = r[i] & _P
        if m == _P:
            m = 0
        v = np.int64(xq[i]) + m if sign > 0 else np.int64(xq[i]) + (_P - m)
        if v < 0:
            v += _P
        elif v >= _P:
            v -= _P
        bar[i] = v


@nb.njit(**JIT_OPTIONS)
def finish(a, b, c, sb, sc, scale, tv, out, zhi, zlo):  # pragma: no cover - compiled
    """Combine replies, centre, range-check, project for Freivalds and dequantise, in one pass.

    a, b, c: (B, C, T, V) int64 ring elements; y = a + sb·b + sc·c (mod p), sb ∈ {−1, 1}, sc ∈ {−1, 0, 1}.
    scale: (C, V) float64 dequantisation factors; out (B, C, T, V) float32 = y·scale.
    tv: (R, B, T, V) Freivalds row vector; zhi, zlo: (R, C, V) int64 accumulators of tᵀ·y.
    Returns the number of elements with |y| > Y_BOUND (a reply that cannot be right).

    Loop order keeps the innermost loop over joints contiguous with per-(b, c) accumulators in
    registers/L1, so the compiler vectorises it.
    """
    nb_, nc, nt, nv = a.shape
    nr = tv.shape[0]
    bad = 0
    half = _P >> 1
    # b is always a real term; an unused c (sc == 0) may be any (1, 1, 1, 1) array: index 0 only
    kc = 1 if sc != 0 else 0
    acc_hi = np.zeros((nr, nv), dtype=np.int64)
    acc_lo = np.zeros((nr, nv), dtype=np.int64)
    for bi in range(nb_):
        for ci in range(nc):
            acc_hi[:] = 0
            acc_lo[:] = 0
            for ti in range(nt):
                for vi in range(nv):
                    # branch-free: (−p, 2p) → [0, p) → centred; sb, sc ∈ {−1, 0, 1} multiply
                    v = a[bi, ci, ti, vi] + sb * b[bi, ci, ti, vi]
                    v += (v >> 63) & _P
                    v -= _P & ((_P - 1 - v) >> 63)
                    v += sc * c[bi * kc, ci * kc, ti * kc, vi * kc]
                    v += (v >> 63) & _P
                    v -= _P & ((_P - 1 - v) >> 63)
                    v -= _P & ((half - v) >> 63)
                    bad -= ((Y_BOUND - v) >> 63) | ((v + Y_BOUND) >> 63)
                    out[bi, ci, ti, vi] = np.float32(np.float64(v) * scale[ci, vi])
                    hi = v >> 26
                    lo = v & _M26
                    for ri in range(nr):
                        t = tv[ri, bi, ti, vi]
                        acc_hi[ri, vi] += hi * t
                        acc_lo[ri, vi] += lo * t
            for ri in range(nr):
                for vi in range(nv):
                    zhi[ri, ci, vi] += acc_hi[ri, vi]
                    zlo[ri, ci, vi] += acc_lo[ri, vi]
    return bad


@nb.njit(**JIT_OPTIONS)
def _run2(ar, br, sb, sf, t0, t1, orow, lo_, hi_):  # pragma: no cover - compiled
    """One contiguous run, y = a + sb·b: returns (bad, Σhi·t0, Σhi·t1, Σlo·t0, Σlo·t1)."""
    bad = np.int64(0)
    h0 = np.int64(0)
    g0 = np.int64(0)
    h1 = np.int64(0)
    g1 = np.int64(0)
    half = _P >> 1
    for li in range(lo_, hi_):
        v = ar[li] + sb * br[li]
        v += (v >> 63) & _P
        v -= _P & ((_P - 1 - v) >> 63)
        v -= _P & ((half - v) >> 63)
        bad -= ((Y_BOUND - v) >> 63) | ((v + Y_BOUND) >> 63)
        orow[li] = np.float32(np.float64(v) * sf)
        hi = v >> 26
        lo = v & _M26
        h0 += hi * t0[li]
        g0 += lo * t0[li]
        h1 += hi * t1[li]
        g1 += lo * t1[li]
    return bad, h0, h1, g0, g1


@nb.njit(**JIT_OPTIONS)
def _run3(ar, br, cr, sb, sc, sf, t0, t1, orow, lo_, hi_):  # pragma: no cover - compiled
    """`_run2` with a third term: y = a + sb·b + sc·c."""
    bad = np.int64(0)
    h0 = np.int64(0)
    g0 = np.int64(0)
    h1 = np.int64(0)
    g1 = np.int64(0)
    half = _P >> 1
    for li in range(lo_, hi_):
        v = ar[li] + sb * br[li]
        v += (v >> 63) & _P
        v -= _P & ((_P - 1 - v) >> 63)
        v += sc * cr[li]
        v += (v >> 63) & _P
        v -= _P & ((_P - 1 - v) >> 63)
        v -= _P & ((half - v) >> 63)
        bad -= ((Y_BOUND - v) >> 63) | ((v + Y_BOUND) >> 63)
        orow[li] = np.float32(np.float64(v) * sf)
        hi = v >> 26
        lo = v & _M26
        h0 += hi * t0[li]
        g0 += lo * t0[li]
        h1 += hi * t1[li]
        g1 += lo * t1[li]
    return bad, h0, h1, g0, g1


@nb.njit(**JIT_OPTIONS)
def finish_flat(a, b, c, sb, sc, scale_c, tv, out, zc):  # pragma: no cover - compiled
    """`finish` for ops whose Freivalds vector s depends on the channel only (convs, dense).

    a, b, c, out: (B, C, L) with L = T·V flattened (c unused when sc == 0: pass a); scale_c (C,);
    tv (R, B, L) holds the R Freivalds row vectors (two per pass); zc (2R, C) int64 receives, folded mod p,
    Σ_l t·hi in zc[r] and Σ_l t·lo in zc[R + r] (y = hi·2^26 + lo). The innermost loop is a flat,
    contiguous run of at most _CHUNK elements: the form the compiler vectorises, and each partial
    sum stays below 2^49·2^13.
    """
    nb_, nc, nl = a.shape
    nr = tv.shape[0]
    bad = 0
    for bi in range(nb_):
        for ci in range(nc):
            sf = scale_c[ci]
            ar = a[bi, ci]
            br = b[bi, ci]
            cr = c[bi, ci] if sc != 0 else ar
            orow = out[bi, ci]
            for l0_ in range(0, nl, _CHUNK):
                l1_ = min(nl, l0_ + _CHUNK)
                for rp in range(0, nr, 2):
                    pair = rp + 1 < nr  # an odd last repetition runs alone (its twin discarded)
                    t0 = tv[rp, bi]
                    t1 = tv[rp + 1, bi] if pair else t0
                    if sc == 0:
                        bd, h0, h1, g0, g1 = _run2(ar, br, sb, sf, t0, t1, orow, l0_, l1_)
                    else:
                        bd, h0, h1, g0, g1 = _run3(ar, br, cr, sb, sc, sf, t0, t1, orow, l0_, l1_)
                    if rp == 0:
                        bad += bd
                    zc[rp, ci] = _red(zc[rp, ci] + _signed_mod(h0))
                    zc[nr + rp, ci] = _red(zc[nr + rp, ci] + _signed_mod(g0))
                    if pair:
                        zc[rp + 1, ci] = _red(zc[rp + 1, ci] + _signed_mod(h1))
                        zc[nr + rp + 1, ci] = _red(zc[nr + rp + 1, ci] + _signed_mod(g1))
    return bad


@nb.njit(**JIT_OPTIONS)
def x_project_flat(xq, tv, taps, pad, nv, u):  # pragma: no cover - compiled
    """`x_project` for stride-1 convs: u[r, c, k] += Σ_{b, l} t[r, b, l]·x̂[b, c, l + (k − pad)·V].

    xq (B, C, T·V) int32, tv (R, B, T·V) int64, u (R, C, taps) int64: for a stride-1 temporal conv
    every tap is a flat dot product of two contiguous runs (shifted by whole frames).
    """
    nb_, nc, nl = xq.shape
    nr = tv.shape[0]
    for bi in range(nb_):
        for ci in range(nc):
            xr = xq[bi, ci]
            for k in range(taps):
                off = (k - pad) * nv
                lo = max(0, -off)
                hi = min(nl, nl - off)
                for rp in range(0, nr - 1, 2):  # two repetitions per pass over the row
                    a0, a1 = _dot2(xr, tv[rp, bi], tv[rp + 1, bi], off, lo, hi)
                    u[rp, ci, k] += a0
                    u[rp + 1, ci, k] += a1
                if nr % 2:
                    a0, _ = _dot2(xr, tv[nr - 1, bi], tv[nr - 1, bi], off, lo, hi)
                    u[nr - 1, ci, k] += a0


@nb.njit(**JIT_OPTIONS)
def _dot2(xr, t0, t1, off, lo, hi):  # pragma: no cover - compiled
    a0 = np.int64(0)
    a1 = np.int64(0)
    for li in range(lo, hi):
        xv = np.int64(xr[li + off])
        a0 += xv * t0[li]
        a1 += xv * t1[li]
    return a0, a1


@nb.njit(**JIT_OPTIONS)
def y_projection(zhi, zlo, s):  # pragma: no cover - compiled
    """Σ_{c,v} s[r,c,v]·(zhi·2^26 + zlo)[r,c,v] mod p → (R,) int64."""
    nr, nc, nv = zhi.shape
    res = np.zeros(nr, dtype=np.int64)
    for ri in range(nr):
        acc = np.int64(0)
        for ci in range(nc):
            for vi in range(nv):
                z = _signed_mod(zhi[ri, ci, vi])
                z = mulmod(z, np.int64(1 << 26))
                z = z + _signed_mod(zlo[ri, ci, vi])
                if z >= _P:
                    z -= _P
                acc += mulmod(z, s[ri, ci, vi])
                if acc >= _P:
                    acc -= _P
        res[ri] = acc
    return res


@nb.njit(**JIT_OPTIONS)
def y_projection_c(zc, s):  # pragma: no cover - compiled
    """Σ_c s[r, c]·(zc[r, c]·2^26 + zc[R + r, c]) mod p → (R,) int64 (after `finish_flat`)."""
    nr = s.shape[0]
    nc = s.shape[1]
    res = np.zeros(nr, dtype=np.int64)
    for ri in range(nr):
        acc = np.int64(0)
        for ci in range(nc):
            z = mulmod(_signed_mod(zc[ri, ci]), np.int64(1 << 26)) + _signed_mod(zc[nr + ri, ci])
            if z >= _P:
                z -= _P
            acc += mulmod(z, s[ri, ci])
            if acc >= _P:
                acc -= _P
        res[ri] = acc
    return res


@nb.njit(**JIT_OPTIONS)
def x_project(xq, tv, stride, taps, pad, keep_v, u):  # pragma: no cover - compiled
    """tᵀ·X for the GEMM rows of a temporal conv, accumulated into u (R, C, taps, V or 1).

    u[r,c,k,·] += Σ_{b,t'} t[r,b,t',v]·x̂[b,c,t'·stride+k−pad,v], summed over v unless keep_v.
    xq (B, C, T, V) int32; tv (R, B, T', V) int64. A 1×1 conv is taps=1, pad=0; the per-joint
    op keeps v (its GEMM columns are (c, v)); the dense op is T = V = 1.
    """
    nb_, nc, nt, nv = xq.shape
    nr, _, ntp, _ = tv.shape
    for bi in range(nb_):
        for ci in range(nc):
            for tp in range(ntp):
                base = tp * stride - pad
                for k in range(taps):
                    ti = base + k
                    if ti < 0 or ti >= nt:
                        continue
                    for ri in range(nr):
                        if keep_v:
                            for vi in range(nv):
                                u[ri, ci, k, vi] += np.int64(xq[bi, ci, ti, vi]) * tv[ri, bi, tp, vi]
                        else:
                            acc = np.int64(0)
                            for vi in range(nv):
                                acc += np.int64(xq[bi, ci, ti, vi]) * tv[ri, bi, tp, vi]
                            u[ri, ci, k, 0] += acc


@nb.njit(**JIT_OPTIONS)
def dot_mod(u, ws):  # pragma: no cover - compiled
    """Σ_d u[r,d]·ws[r,d] mod p for signed u (|u| < 2^63) and ws in [0, p) → (R,) int64."""
    nr, nd = u.shape
    res = np.zeros(nr, dtype=np.int64)
    for ri in range(nr):
        acc = np.int64(0)
        for di in range(nd):
            acc += mulmod(_signed_mod(u[ri, di]), ws[ri, di])
            if acc >= _P:
                acc -= _P
        res[ri] = acc
    return res


__all__ = [
    "MAX_T_ROWS",
    "REPS",
    "T_BITS",
    "Y_BOUND",
    "dot_mod",
    "finish",
    "finish_flat",
    "mask_from",
    "mulmod",
    "quant_mask",
    "x_project",
    "x_project_flat",
    "y_projection",
    "y_projection_c",
]
