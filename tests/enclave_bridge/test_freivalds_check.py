"""Bilinear Freivalds tᵀYs ≡ (tᵀX̂)(Ŵs) mod p: accepts exact results, rejects every single changed
element in every op kind, rejects out-of-bound replies, fresh vectors per check, and catches
every tampered worker reply (1000 trials per tamper mode, masked end to end at client level)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from enclave_bridge.gpu.worker import LocalWorker
from enclave_bridge.measured import freivalds, kernels
from enclave_bridge.measured.masking import MaskingEngine
from enclave_bridge.measured.quant import BX, WEIGHT_BUDGET
from enclave_bridge.measured.secure_layers import LinearOp, OpMeta, apply_linear, out_shape
from enclave_bridge.shared.errors import TransportError
from enclave_bridge.shared.ring import MaskRNG, P, prg_uniform
from enclave_bridge.shared.worker_proto import Term


def _op(kind: str, d: int, c_out: int, seed: int, **meta) -> LinearOp:
    g = torch.Generator().manual_seed(seed)
    return LinearOp(
        f"t.{kind}", OpMeta(kind, **meta), torch.randn(d, c_out, generator=g, dtype=torch.float64)
    )


OPS = [
    (_op("tconv", 4 * 9, 5, 1, stride=1), (1, 4, 12, 3)),
    (_op("tconv", 4 * 9, 5, 2, stride=2), (2, 4, 12, 3)),
    (_op("conv1x1", 6, 4, 3, stride=2), (2, 6, 8, 3)),
    (_op("conv1x1", 6, 3 * 4, 4, stride=1, k=3), (1, 6, 5, 3)),
    (_op("joint", 2 * 3, 4 * 3, 5, v=3), (2, 2, 5, 3)),
    (_op("dense", 16, 7, 6), (3, 16)),
]
IDS = [f"{o.meta.kind}{o.meta.stride}" for o, _ in OPS]


def _true(op: LinearOp, xq: np.ndarray) -> np.ndarray:
    """Exact integer x̂·Ŵ (|y| ≤ 2^52: exact in one float64 GEMM)."""
    y = apply_linear(op.meta, torch.from_numpy(xq).to(torch.float64), op.w_f64)
    return y.to(torch.int64).numpy()


def _verify(op: LinearOp, xq: np.ndarray, y: np.ndarray, rng: MaskRNG, reps: int = freivalds.REPS) -> bool:
    """The evaluator's acceptance rule for a combined (unmasked) result y (signed integers)."""
    y4 = y.reshape(y.shape[0], y.shape[1], 1, 1) if y.ndim == 2 else y
    ring = np.where(y4 < 0, y4 + P, y4).astype(np.int64)
    check = freivalds.Check.draw(op, y4.shape, rng, reps)
    scale = np.ascontiguousarray(np.broadcast_to(op.scale2, (y4.shape[1], y4.shape[3])))
    out = np.empty(y4.shape, np.float32)
    bad = check.finish([ring, np.zeros_like(ring), np.zeros((1, 1, 1, 1), np.int64)], (1, 0), scale, out)
    if bad:
        return False
    return bool(np.array_equal(check.y_side(), check.x_side(xq)))


def _xq(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-BX, BX + 1, shape).astype(np.int32)


def test_soundness_meets_2_to_minus_40():
    assert kernels.T_BITS == 23 and freivalds.REPS == kernels.REPS == 2
    assert freivalds.soundness_bits() == 44
    assert freivalds.soundness_bits(1) == 22 < 40  # one repetition would not be enough


@pytest.mark.parametrize(("op", "shape"), OPS, ids=IDS)
def test_accepts_exact_results_and_rejects_every_single_element_change(op, shape):
    rng = MaskRNG()
    xq = _xq(shape, 1)
    y = _true(op, xq)
    assert y.shape == out_shape(op.meta, shape, op.c_out)
    assert int(np.abs(y).max()) <= op.q.bound
    for _ in range(3):
        assert _verify(op, xq, y, rng)
    pick = random.Random(0)
    for trial in range(40):
        bad = y.copy().reshape(-1)
        i = pick.randrange(bad.size)
        # small in-bound changes (±1, a flipped low bit) and large ones
        delta = [1, -1, 1 << pick.randrange(52), pick.randrange(-(2**40), 2**40) or 7][trial % 4]
        bad[i] += delta
        if abs(int(bad[i])) > WEIGHT_BUDGET:
            bad[i] -= 2 * delta
        assert not _verify(op, xq, bad.reshape(y.shape), rng), (trial, i, delta)


@pytest.mark.parametrize(("op", "shape"), OPS, ids=IDS)
def test_reply_outside_the_proven_bound_is_rejected_by_the_range_check(op, shape):
    """A value in (2^52, p/2] cannot be x̂·Ŵ: counted by the fused pass before Freivalds runs."""
    rng = MaskRNG()
    xq = _xq(shape, 2)
    y = _true(op, xq)
    for v in (WEIGHT_BUDGET + 1, -(WEIGHT_BUDGET + 1), P // 2, -(P // 2)):
        bad = y.copy().reshape(-1)
        bad[bad.size // 2] = v
        bad = bad.reshape(y.shape)
        y4 = bad.reshape(bad.shape[0], bad.shape[1], 1, 1) if bad.ndim == 2 else bad
        ring = np.where(y4 < 0, y4 + P, y4).astype(np.int64)
        check = freivalds.Check.draw(op, y4.shape, rng)
        scale = np.ascontiguousarray(np.broadcast_to(op.scale2, (y4.shape[1], y4.shape[3])))
        n_bad = check.finish(
            [ring, np.zeros_like(ring), np.zeros((1, 1, 1, 1), np.int64)],
            (1, 0),
            scale,
            np.empty(y4.shape, np.float32),
        )
        assert n_bad == 1, v
        assert not _verify(op, xq, bad, rng)
    # exactly at the bound is accepted by the range check (and by Freivalds when it is right)
    edge = np.full(y.shape, WEIGHT_BUDGET, np.int64)
    e4 = edge.reshape(edge.shape[0], edge.shape[1], 1, 1) if edge.ndim == 2 else edge
    check = freivalds.Check.draw(op, e4.shape, rng)
    scale = np.ascontiguousarray(np.broadcast_to(op.scale2, (e4.shape[1], e4.shape[3])))
    zeros = np.zeros_like(e4)
    assert (
        check.finish([e4, zeros, zeros[:1, :1, :1, :1]], (1, 0), scale, np.empty(e4.shape, np.float32)) == 0
    )


def test_fresh_vectors_every_check():
    op, shape = OPS[0]
    rng = MaskRNG()
    xq = _xq(shape, 3)
    y = _true(op, xq)
    out4 = y.shape
    before = rng.bytes_drawn
    a = freivalds.Check.draw(op, out4, rng)
    used = rng.bytes_drawn - before
    assert used >= 8 * op.c_out * freivalds.REPS  # s alone: one 64-bit draw per column and rep
    b = freivalds.Check.draw(op, out4, rng)
    assert rng.bytes_drawn - before >= 2 * used
    assert not torch.equal(a.s, b.s) and not np.array_equal(a.tv, b.tv)
    assert int(a.s.max()) < 2**kernels.T_BITS


class _One:
    """A "model" with just one op, for the masking engine."""

    def __init__(self, op: LinearOp) -> None:
        self.ops = {op.name: op}


def _paper_round(
    engine: MaskingEngine, worker: LocalWorker, op: LinearOp, xq: np.ndarray, rng: MaskRNG
) -> tuple[np.ndarray, bool]:
    """One masked paper-mode call: x̄ = x̂ + r1 → worker → y = ȳ − r1·W̄ − x̂·R2, checked."""
    r1 = rng.uniform(xq.shape)
    bar = np.empty(xq.shape, np.int64)
    kernels.mask_from(xq.reshape(-1), r1.numpy().reshape(-1), 1, bar.reshape(-1))
    u = engine.precompute_u(op.name, r1).numpy()
    u3 = engine.u3(op.name, torch.from_numpy(xq)).numpy()
    (y_bar,), _ = worker.compute("m", [op.name], [Term(0, 1, x=bar)])
    check = freivalds.Check.draw(op, y_bar.shape, rng)
    scale = np.ascontiguousarray(np.broadcast_to(op.scale2, (y_bar.shape[1], y_bar.shape[3])))
    out = np.empty(y_bar.shape, np.float32)
    bad = check.finish([y_bar, u, u3], (-1, -1), scale, out)
    ok = bad == 0 and np.array_equal(check.y_side(), check.x_side(xq))
    return out, bool(ok)


@pytest.mark.parametrize("mode", ["flip", "scale", "replace", "garbage"])
def test_tampered_worker_replies_detected_in_1000_trials(mode):
    """Client level, paper mode: a worker tampering every reply on a small layer; all 1000 caught."""
    # D = 5 ≤ 7 rows: clear of the RingWeight overflow (see test_ring_field), so the honest
    # control below is accepted and the 1000 rejections are the tampering's doing
    op = _op("conv1x1", 5, 4, 7, stride=1)
    rng = MaskRNG()
    engine = MaskingEngine(_One(op), "paper", rng)  # type: ignore[arg-type]
    worker = LocalWorker(device="cpu", tamper=mode, tamper_rate=1.0)
    honest = LocalWorker(device="cpu")
    worker.load("m", engine.worker_payload(0))
    honest.load("m", engine.worker_payload(0))
    trials = 1000
    accepted = 0
    for k in range(trials):
        xq = _xq((1, 5, 4, 2), k)
        _, ok = _paper_round(engine, worker, op, xq, rng)
        accepted += ok
        if k % 100 == 0:
            assert _paper_round(engine, honest, op, xq, rng)[1]
    assert worker.core.tampered == trials
    assert accepted == 0


def test_untampered_worker_always_accepted_and_exact():
    op = _op("conv1x1", 5, 3, 8, stride=1)
    rng = MaskRNG()
    engine = MaskingEngine(_One(op), "paper", rng)  # type: ignore[arg-type]
    worker = LocalWorker(device="cpu")
    worker.load("m", engine.worker_payload(0))
    for k in range(50):
        xq = _xq((1, 5, 4, 3), 100 + k)
        out, ok = _paper_round(engine, worker, op, xq, rng)
        assert ok
        want = (_true(op, xq) * op.scale2[None, :, None, :]).astype(np.float32)
        assert np.array_equal(out, want)
    with pytest.raises(TransportError):
        worker.compute("nope", [op.name], [Term(0, 1, x=np.zeros((1, 5, 4, 3), np.int64))])


@pytest.mark.parametrize("mode", ["split2", "split3"])
def test_split_replies_combine_to_the_exact_result_and_one_bad_share_is_caught(mode):
    """The split modes' terms (seeds and masked inputs) recombine to x̂·Ŵ exactly; tampering with
    any one worker's reply fails the check."""
    op = _op("tconv", 8 * 9, 16, 9, stride=2)  # D = 72: clear of the RingWeight overflow
    rng = MaskRNG()
    engine = MaskingEngine(_One(op), mode, rng)  # type: ignore[arg-type]
    n = engine.n_workers
    xq = _xq((2, 8, 8, 2), 5)
    shape = xq.shape
    if mode == "split2":
        seed = rng.seed()
        r = prg_uniform(seed, xq.size).reshape(shape)
        bar = np.empty(shape, np.int64)
        kernels.mask_from(xq.reshape(-1), r.reshape(-1), -1, bar.reshape(-1))
        reqs = [[Term(0, 1, x=bar)], [Term(0, 1, seed=seed, shape=shape)]]
        signs = (1, 0)
    else:
        sa, sb = rng.seed(), rng.seed()
        a = prg_uniform(sa, xq.size).reshape(shape)
        b = prg_uniform(sb, xq.size).reshape(shape)
        bar_a, bar_b = np.empty(shape, np.int64), np.empty(shape, np.int64)
        kernels.mask_from(xq.reshape(-1), a.reshape(-1), 1, bar_a.reshape(-1))
        kernels.mask_from(xq.reshape(-1), b.reshape(-1), 1, bar_b.reshape(-1))
        reqs = [
            [Term(0, 1, x=bar_a)],
            [Term(1, 1, x=bar_b), Term(0, -1, seed=sa, shape=shape)],
            [Term(0, 1, seed=sa, shape=shape), Term(1, 1, seed=sb, shape=shape)],
        ]
        signs = (1, -1)
    workers = []
    for k in range(n):
        w = LocalWorker(device="cpu")
        w.load("m", engine.worker_payload(k))
        workers.append(w)
    replies = [w.compute("m", [op.name], req)[0][0] for w, req in zip(workers, reqs, strict=True)]
    want = _true(op, xq)

    def accept(ys: list[np.ndarray]) -> tuple[bool, np.ndarray]:
        c = ys[2] if n == 3 else np.zeros((1, 1, 1, 1), np.int64)
        check = freivalds.Check.draw(op, ys[0].shape, rng)
        scale = np.ascontiguousarray(np.broadcast_to(op.scale2, (ys[0].shape[1], ys[0].shape[3])))
        out = np.empty(ys[0].shape, np.float32)
        bad = check.finish([ys[0], ys[1], c], signs, scale, out)
        return bad == 0 and bool(np.array_equal(check.y_side(), check.x_side(xq))), out

    ok, out = accept(replies)
    assert ok
    assert np.array_equal(out, (want * op.scale2[None, :, None, :]).astype(np.float32))
    # each reply alone is uniform-looking, not the result
    assert all(not np.array_equal(np.where(want < 0, want + P, want), r) for r in replies)
    for k in range(n):
        for change in (1, P - 1, 12345):
            ys = [r.copy() for r in replies]
            ys[k].reshape(-1)[7] = (int(ys[k].reshape(-1)[7]) + change) % P
            assert not accept(ys)[0], (k, change)
