"""SecureEvaluator: the four delegated modes (paper, slalom, split2, split3) agree bit for bit with
the exact ring reference, match the float ST-GCN's top-1/top-5, and survive tampering (blamed on
the right worker)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from enclave_bridge.gpu.worker import LocalWorker
from enclave_bridge.measured.stgcn import fold_batchnorm
from enclave_bridge.protocol import TIMING_PARTS, SecureEvaluator
from enclave_bridge.shared.ring import P
from tests.enclave_bridge.secure_helpers import calibrated_model, skeleton_windows


@pytest.fixture(scope="module")
def model():
    return calibrated_model(12, seed=5, t=12, m=2)


@pytest.fixture(scope="module")
def windows():
    return skeleton_windows(1, 8, 1, seed=21)


@pytest.fixture(scope="module")
def reference(model, windows):
    """The delegated modes' exact integer logits, computed in the enclave."""
    return SecureEvaluator(model, "enclave").exact_reference(windows)


N_OPS = 23  # 10 gcn + 10 tcn + 2 res + fc (blocks 1–9 aggregate in the enclave)


@pytest.mark.parametrize("mode", ["paper", "slalom", "split2", "split3"])
def test_delegated_modes_equal_the_exact_reference_bit_for_bit(model, windows, reference, mode):
    with SecureEvaluator(model, mode, pool_capacity=0) as ev:
        assert len(ev.workers) == {"split2": 2, "split3": 3}.get(mode, 1)
        assert len(set(ev.worker_names)) == len(ev.workers)  # distinct names for blame
        got = ev.evaluate(windows)
        assert np.array_equal(got, reference)
        st = ev.stats
        assert st.freivalds_checks == st.delegated_ops == N_OPS and st.freivalds_failures == 0
        assert st.enclave_recomputes == 0 and st.transport_errors == 0 and not st.worker_faults
        assert st.bytes_to_worker > 0 and st.bytes_from_worker > 0
        assert st.windows == 1  # the construction's warm-up window is not counted
        for part in ("mask", "finish", "freivalds", "worker", "total", "nonlinear"):
            assert st.last[part] > 0, part
        if mode in ("paper", "slalom"):
            assert st.pool_misses == 1  # no pool: masks made on-line
            assert st.last["precompute"] > 0
        else:
            assert st.last["precompute"] == 0  # split modes precompute nothing
        assert (st.last["u3"] > 0) == (mode == "paper")
        assert set(st.as_dict()["timings"]) <= set(TIMING_PARTS)


def test_enclave_mode_is_the_float32_model_close_to_the_exact_reference(model, windows, reference):
    got = SecureEvaluator(model, "enclave").evaluate(windows)
    with torch.no_grad():
        f32 = model(torch.from_numpy(windows)).double().numpy()  # the unfolded float32 model
    assert float(np.abs(got - f32).max() / np.abs(f32).max()) < 1e-5
    rel = float(np.abs(got - reference).max() / np.abs(reference).max())
    assert rel < 1e-4 and (got.argmax(1) == reference.argmax(1)).all()


def test_folded_model_accepted_and_identical(model, windows, reference):
    folded = fold_batchnorm(model)
    assert np.array_equal(SecureEvaluator(folded, "enclave").exact_reference(windows), reference)
    with SecureEvaluator(folded, "slalom", pool_capacity=0) as ev:
        assert np.array_equal(ev.evaluate(windows), reference)


def test_top1_top5_match_float_model(model):
    x = skeleton_windows(6, 12, 2, seed=77)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).double().numpy()
    # every delegated mode returns exactly this (bit-identical, tested above)
    got = SecureEvaluator(model, "enclave").exact_reference(x)
    assert (got.argmax(1) == ref.argmax(1)).all()
    for g, r in zip(got, ref, strict=True):
        assert set(np.argsort(-g)[:5]) == set(np.argsort(-r)[:5])
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    print(f"max relative logit error {rel:.2e}")
    assert rel < 1e-4


def test_trained_model_top1_identical_and_close_to_float():
    """The shipped model on synthetic skeleton windows: the exact ring reference (what every
    delegated mode returns, bit for bit) has the float model's top-1 and top-5 on every window."""
    from pathlib import Path

    from enclave_bridge.measured.stgcn import STGCN
    from training.synth import CLASSES, SynthConfig, generate

    pkg = Path(__file__).resolve().parents[2] / "samples" / "default_model" / "model.pt"
    if not pkg.exists():
        pytest.skip("no shipped model in samples/default_model")
    model = STGCN.from_checkpoint(pkg).eval()
    x, _ = generate(16, 123, "test", SynthConfig(T=30, fps=10.0, M=2), classes=CLASSES)
    with torch.no_grad():
        ref = model.double()(torch.from_numpy(x).double()).numpy()
    ev = SecureEvaluator(model, "enclave")
    got = np.concatenate([ev.exact_reference(x[i : i + 8]) for i in range(0, len(x), 8)])
    err = float((np.abs(got - ref).max(1) / np.abs(ref).max(1)).max())
    assert (got.argmax(1) == ref.argmax(1)).all()
    for g, r in zip(got, ref, strict=True):
        assert set(np.argsort(-g)[:5]) == set(np.argsort(-r)[:5])
    print(f"max relative logit error of the ring reference: {err:.2e}")
    assert err < 1e-4  # 20-bit activations, ≥ 19-bit weights (the old 31-bit ring: ~1e-2 / 2e-3)


def test_plaintext_needs_explicit_consent(model, windows):
    with pytest.raises(ValueError, match="allow_plaintext"):
        SecureEvaluator(model, "plaintext")
    ev = SecureEvaluator(model, "plaintext", allow_plaintext=True)
    with torch.no_grad():
        ref = model(torch.from_numpy(windows)).double().numpy()
    np.testing.assert_allclose(ev.evaluate(windows), ref, rtol=1e-4, atol=1e-5)


def test_bad_arguments_rejected(model):
    with pytest.raises(ValueError, match="mode"):
        SecureEvaluator(model, "fast")
    with pytest.raises(ValueError, match="freivalds"):
        SecureEvaluator(model, "enclave", freivalds_reps=1)  # 22 bits < 40
    with pytest.raises(ValueError, match="act_limbs"):
        SecureEvaluator(model, "enclave", act_limbs=2)
    with pytest.raises(ValueError, match="worker"):
        SecureEvaluator(model, "split3", workers=[None, None])  # three parties needed
    with pytest.raises(ValueError, match="distinct"):
        SecureEvaluator(model, "split2", workers=["127.0.0.1:1", "127.0.0.1:1"])
    with pytest.raises(ValueError, match="either"):
        SecureEvaluator(model, "split2", "127.0.0.1:1", workers=[None, None])
    ev = SecureEvaluator(model, "enclave")
    with pytest.raises(ValueError):
        ev.evaluate(np.zeros((1, 3, 10, 17, 1), np.float32))
    bad = np.zeros((1, 3, 10, 18, 1), np.float32)
    bad[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ev.evaluate(bad)


def test_tampering_worker_is_caught_and_logits_stay_correct(model, windows, reference):
    # every tamper mode is checked 1000× at client level in test_freivalds_check.py
    worker = LocalWorker(device="cpu", tamper="replace", tamper_rate=1.0)
    with SecureEvaluator(model, "paper", worker, pool_capacity=0) as ev:
        got = ev.evaluate(windows)
        assert np.array_equal(got, reference)
        assert ev.stats.freivalds_failures == ev.stats.delegated_ops == N_OPS
        assert ev.stats.enclave_recomputes == N_OPS and ev.stats.last["enclave_linear"] > 0
        assert dict(ev.stats.worker_faults) == {worker.address: N_OPS}


def test_partial_tampering_counted_exactly(model, windows, reference):
    worker = LocalWorker(device="cpu", tamper="flip", tamper_rate=0.5)
    with SecureEvaluator(model, "slalom", worker, pool_capacity=0) as ev:
        before = worker.core.tampered  # the warm-up window's
        assert np.array_equal(ev.evaluate(windows), reference)
        n = worker.core.tampered - before
        assert ev.stats.freivalds_failures == ev.stats.enclave_recomputes == n
        assert 0 < n < N_OPS  # P(none or all of 23 tampered) = 2^-22
        assert dict(ev.stats.worker_faults) == {worker.address: n}


@pytest.mark.parametrize(
    "bad_party", [pytest.param(0, marks=pytest.mark.slow), 1, pytest.param(2, marks=pytest.mark.slow)]
)
def test_split3_one_garbage_worker_of_three_is_named_and_logits_stay_exact(
    model, windows, reference, bad_party
):
    workers = [
        LocalWorker(device="cpu", tamper="garbage" if k == bad_party else None, tamper_rate=1.0)
        for k in range(3)
    ]
    with SecureEvaluator(model, "split3", workers=workers) as ev:
        assert np.array_equal(ev.evaluate(windows), reference)
        st = ev.stats
        assert st.freivalds_failures == st.enclave_recomputes == st.delegated_ops == N_OPS
        assert dict(st.worker_faults) == {workers[bad_party].address: N_OPS}  # only the culprit
        assert st.transport_errors == 0


def test_split2_garbage_worker_named(model, windows, reference):
    workers = [LocalWorker(device="cpu"), LocalWorker(device="cpu", tamper="garbage", tamper_rate=1.0)]
    with SecureEvaluator(model, "split2", workers=workers) as ev:
        assert np.array_equal(ev.evaluate(windows), reference)
        assert ev.stats.freivalds_failures == N_OPS
        assert dict(ev.stats.worker_faults) == {workers[1].address: N_OPS}


class OutOfBound(LocalWorker):
    """Adds 2^53 to one element of every reply: the combined result leaves the proven bound."""

    def compute(self, model_id, names, terms):
        outs, dt = super().compute(model_id, names, terms)
        outs = [o.copy() for o in outs]
        for o in outs:
            o.reshape(-1)[0] = (int(o.reshape(-1)[0]) + 2**53) % P
        return outs, dt


def test_reply_outside_the_proven_bound_is_rejected(model, windows, reference, caplog):
    worker = OutOfBound(device="cpu")
    with SecureEvaluator(model, "slalom", worker, pool_capacity=0) as ev:
        with caplog.at_level(logging.WARNING, logger="enclave_bridge.measured.protocol"):
            assert np.array_equal(ev.evaluate(windows), reference)
        assert ev.stats.freivalds_failures == ev.stats.delegated_ops == N_OPS
        assert dict(ev.stats.worker_faults) == {worker.address: N_OPS}
    assert "outside the proven bound" in caplog.text


@pytest.mark.slow
def test_full_window_t300_m2_top1_matches_float():
    model = calibrated_model(10, seed=9, t=64, m=2)
    x = skeleton_windows(1, 300, 2, seed=3)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).double().numpy()
    with SecureEvaluator(model, "paper", pool_capacity=0) as ev:
        got = ev.evaluate(x)
    assert got.argmax() == ref.argmax()
    assert set(np.argsort(-got[0])[:5]) == set(np.argsort(-ref[0])[:5])
    assert np.array_equal(got, SecureEvaluator(model, "enclave").exact_reference(x))
