"""Freivalds: accepts correct results, rejects every tampered one (≥ 1000 trials), fresh vectors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from enclave_bridge import freivalds
from enclave_bridge.errors import TransportError
from enclave_bridge.gpu_worker import LocalWorker
from enclave_bridge.masking import MaskingEngine
from enclave_bridge.quant import BX
from enclave_bridge.ring import HALF, MaskRNG, P, centred, centred32, exact_linear, mask32, unmask32
from enclave_bridge.secure_layers import LinearOp, OpMeta, linear_fn


def _op(kind: str, d: int, c_out: int, seed: int, **meta) -> LinearOp:
    g = torch.Generator().manual_seed(seed)
    return LinearOp(
        f"t.{kind}", OpMeta(kind, **meta), torch.randn(d, c_out, generator=g, dtype=torch.float64)
    )


OPS = [
    (_op("tconv", 4 * 9, 5, 1, stride=1), (1, 4, 12, 3)),
    (_op("tconv", 4 * 9, 5, 2, stride=2), (1, 4, 12, 3)),
    (_op("conv1x1", 6, 4, 3, stride=2), (2, 6, 8, 3)),
    (_op("agg", 3, 9, 4, v=3, k=3), (1, 4, 5, 3)),
    (_op("joint", 2 * 3, 4 * 3, 5, v=3), (1, 2, 5, 3)),
    (_op("dense", 16, 7, 6), (3, 16)),
]


def _true(op: LinearOp, xq: torch.Tensor) -> torch.Tensor:
    return centred(exact_linear(linear_fn(op.meta, op.q.w_int.double()), xq, BX, op.q.col_l1))


def test_soundness_meets_2_to_minus_40():
    assert freivalds.soundness_bits() >= 40
    assert freivalds.soundness_bits(1) < 40  # one repetition would not be enough


@pytest.mark.parametrize(("op", "shape"), OPS, ids=[o.meta.kind + str(o.meta.stride) for o, _ in OPS])
def test_accepts_correct_and_rejects_single_element_changes(op, shape):
    rng = MaskRNG()
    xq = torch.randint(-BX, BX + 1, shape)
    y = _true(op, xq)
    assert freivalds.check(op, xq, y, rng)
    flat_rng = random.Random(0)
    for _ in range(20):
        bad = y.clone().reshape(-1)
        i = flat_rng.randrange(bad.numel())
        bad[i] = ((int(bad[i]) + flat_rng.randrange(1, P)) % P + HALF) % P - HALF
        assert not freivalds.check(op, xq, bad.reshape(y.shape), rng)


def test_fresh_vectors_every_check():
    op, shape = OPS[0]
    rng = MaskRNG()
    xq = torch.randint(-BX, BX + 1, shape)
    y = _true(op, xq)
    before = rng.bytes_drawn
    freivalds.check(op, xq, y, rng)
    used = rng.bytes_drawn - before
    assert used >= 4 * op.c_out * freivalds.REPS
    freivalds.check(op, xq, y, rng)
    assert rng.bytes_drawn - before >= 2 * used


@pytest.mark.parametrize("mode", ["flip", "scale", "replace"])
def test_tampered_worker_replies_detected_in_1000_trials(mode):
    """Client level: a worker tampering every reply on a small layer; all 1000 caught."""
    op = _op("tconv", 3 * 9, 4, 7, stride=1)
    from enclave_bridge.secure_layers import QuantModel

    class One(QuantModel):  # a "model" with just this op, for the masking engine
        def __init__(self) -> None:
            self.ops = {op.name: op}

    enc_rng = MaskRNG()
    engine = MaskingEngine(One(), "paper", enc_rng)
    worker = LocalWorker(device="cpu", tamper=mode, tamper_rate=1.0)
    worker.load("m", engine.worker_payload())
    detected = 0
    trials = 1000
    shape = (1, 3, 6, 2)
    for _ in range(trials):
        xq = torch.randint(-BX, BX + 1, shape, dtype=torch.int32)
        r1 = enc_rng.uniform(shape)
        u = engine.precompute_u(op.name, r1).to(torch.int32)
        x_bar = mask32(xq, centred(r1).to(torch.int32)).numpy().view(np.uint32)
        (y_bar,), _ = worker.compute("m", x_bar, [op.name])
        y = unmask32(torch.from_numpy(y_bar.view(np.int32)), u)
        y = centred32(unmask32(y, engine.u3(op.name, xq).to(torch.int32)))
        if not freivalds.check(op, xq, y, enc_rng):
            detected += 1
    assert worker.core.tampered == trials
    assert detected == trials


def test_untampered_worker_always_accepted():
    op = _op("conv1x1", 5, 3, 8, stride=1)

    class One:
        def __init__(self) -> None:
            self.ops = {op.name: op}

    enc_rng = MaskRNG()
    engine = MaskingEngine(One(), "slalom", enc_rng)  # type: ignore[arg-type]
    worker = LocalWorker(device="cpu")
    worker.load("m", engine.worker_payload())
    for _ in range(50):
        xq = torch.randint(-BX, BX + 1, (1, 5, 4, 3), dtype=torch.int32)
        r1 = enc_rng.uniform(xq.shape)
        u = engine.precompute_u(op.name, r1).to(torch.int32)
        (y_bar,), _ = worker.compute(
            "m", mask32(xq, centred(r1).to(torch.int32)).numpy().view(np.uint32), [op.name]
        )
        y = centred32(unmask32(torch.from_numpy(y_bar.view(np.int32)), u))
        assert torch.equal(y.to(torch.int64), _true(op, xq))
        assert freivalds.check(op, xq, y, enc_rng)
    with pytest.raises(TransportError):
        worker.compute("nope", np.zeros(3, np.uint32), [op.name])
