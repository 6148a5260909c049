"""Masks: what the worker receives is uniform (chi-square), masks are never reused, pool is sealed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from enclave_bridge.errors import IntegrityError
from enclave_bridge.gpu_worker import LocalWorker
from enclave_bridge.pool import MaskReuseError, StageMasks, WindowMasks
from enclave_bridge.protocol import SecureEvaluator
from enclave_bridge.ring import P
from tests.enclave_bridge.secure_helpers import calibrated_model

# chi-square critical value, 63 degrees of freedom, α = 1e-6 (scipy.stats.chi2.ppf(1 - 1e-6, 63))
CHI2_63_CRIT = 131.37
W16 = (1, 8, 1)  # (N, T, M) of the small test windows


class RecordingWorker(LocalWorker):
    """An in-process worker that keeps everything it is sent (what a curious worker sees)."""

    def __init__(self) -> None:
        super().__init__(device="cpu")
        self.seen: list[np.ndarray] = []
        self.weights: list[np.ndarray] = []

    def load(self, model_id, ops):
        self.weights += [o["weight"].copy() for o in ops]
        super().load(model_id, ops)

    def compute(self, model_id, x, names):
        self.seen.append(x.copy())
        return super().compute(model_id, x, names)


@pytest.fixture(scope="module")
def model():
    return calibrated_model(5, seed=1, t=8, m=1)


def _chi2(values: np.ndarray, bins: int = 64) -> float:
    counts = np.bincount((values.astype(np.uint64) * bins // P).astype(np.int64), minlength=bins)
    expected = values.size / bins
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("mode", ["paper", "slalom"])
def test_worker_inputs_are_uniform_even_for_a_constant_window(model, mode):
    worker = RecordingWorker()
    ev = SecureEvaluator(model, mode, worker, pool_capacity=0)
    x = np.full((1, 3, 8, 18, 1), 0.25, dtype=np.float32)  # worst case: one repeated value
    ev.evaluate(x)
    seen = np.concatenate([a.reshape(-1) for a in worker.seen])
    assert seen.dtype == np.uint32 and int(seen.max()) < P
    assert seen.size > 10_000
    assert _chi2(seen) < CHI2_63_CRIT
    # the quantised input itself is far from uniform: the test has teeth
    from enclave_bridge.quant import quantise_act

    xq, _ = quantise_act(torch.from_numpy(x).double())
    assert _chi2(np.mod(xq.numpy().reshape(-1).astype(np.int64), P)) > 10 * CHI2_63_CRIT
    ev.close()


def test_paper_mode_weights_uniform_slalom_weights_not(model):
    seen = {}
    for mode in ("paper", "slalom"):
        w = RecordingWorker()
        SecureEvaluator(model, mode, w, pool_capacity=0).close()
        seen[mode] = np.concatenate([a.reshape(-1) for a in w.weights])
    assert _chi2(seen["paper"]) < CHI2_63_CRIT
    assert _chi2(seen["slalom"]) > 10 * CHI2_63_CRIT  # Ŵ visible in slalom mode, by design


def test_same_window_twice_gets_fresh_masks(model):
    worker = RecordingWorker()
    ev = SecureEvaluator(model, "paper", worker, pool_window=W16, pool_capacity=2, background_pool=False)
    ev.pool.fill()
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (1, 3, 8, 18, 1)).astype(np.float32)
    a = ev.evaluate(x)
    n = len(worker.seen)
    b = ev.evaluate(x)
    assert np.array_equal(a, b)
    first, second = worker.seen[:n], worker.seen[n:]
    digests = {hashlib.sha256(s.tobytes()).hexdigest() for s in worker.seen}
    assert len(digests) == len(worker.seen)  # no stage input ever repeats
    for s1, s2 in zip(first, second, strict=True):
        assert np.mean(s1 == s2) < 1e-3
    assert ev.stats.pool_hits == 2
    ev.close()


def test_stage_masks_are_single_use():
    st = StageMasks((2,), ("a",), torch.zeros(2, dtype=torch.int32), {"a": torch.zeros(2, dtype=torch.int32)})
    st.consume()
    with pytest.raises(MaskReuseError):
        st.consume()
    wm = WindowMasks((1, 1, 1))
    with pytest.raises(MaskReuseError):
        wm.next_stage((2,), ("a",))


def test_pool_entries_leave_once_and_are_all_distinct(model):
    ev = SecureEvaluator(model, "slalom", None, pool_window=W16, pool_capacity=3, background_pool=False)
    assert ev.pool.fill() == 3 and ev.pool.depth == 3
    taken = [ev.pool.take(W16) for _ in range(4)]
    assert taken[3] is None and ev.pool.stats.misses == 1 and ev.pool.depth == 0
    r1s = [st.r1.numpy().tobytes() for wm in taken[:3] for st in wm.stages]
    assert len(set(r1s)) == len(r1s)
    ev.close()


def test_background_pool_fills_and_counts(model):
    ev = SecureEvaluator(model, "slalom", None, pool_window=W16, pool_capacity=1, background_pool=True)
    import time

    deadline = time.monotonic() + 60
    while ev.pool.depth < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ev.pool.depth == 1
    ev.evaluate(np.zeros((1, 3, 8, 18, 1), np.float32))
    assert ev.stats.pool_hits == 1
    ev.evaluate(np.zeros((1, 3, 10, 18, 1), np.float32))  # another shape: miss, computed on-line
    assert ev.stats.pool_misses >= 1
    ev.close()


def test_sealed_persistence_moves_entries_and_deletes_file(model, tmp_path):
    ev = SecureEvaluator(model, "slalom", None, pool_window=W16, pool_capacity=2, background_pool=False)
    ev.pool.fill()
    key = bytes(range(32))
    path = tmp_path / "pool.sealed"
    assert ev.pool.persist(path, key) == 2
    assert ev.pool.depth == 0
    blob = path.read_bytes()
    assert b"b0.gcn" not in blob  # sealed, not plaintext msgpack
    with pytest.raises(IntegrityError):
        ev.pool.restore(path, bytes(32))
    assert not path.exists()  # consumed even when it failed: never loadable twice
    path.write_bytes(blob)
    assert ev.pool.restore(path, key) == 2
    assert not path.exists()
    x = np.zeros((1, 3, 8, 18, 1), np.float32)
    ref = SecureEvaluator(model, "enclave").evaluate(x)
    assert np.array_equal(ev.evaluate(x), ref)
    ev.close()


def test_pool_keys_itself_to_the_window_shape_in_use(model):
    ev = SecureEvaluator(model, "slalom", None, pool_capacity=1, background_pool=False)
    assert ev.pool is None
    x = np.zeros((1, 3, 8, 18, 1), np.float32)
    ev.evaluate(x)  # first window: masks made on-line, then the pool is keyed to this shape
    assert ev.stats.pool_misses == 1 and ev.pool is not None and ev.pool.key == (1, 8, 1)
    ev.pool.fill()
    ev.evaluate(x)
    assert ev.stats.pool_hits == 1
    ev.evaluate(np.zeros((1, 3, 10, 18, 1), np.float32))
    assert ev.stats.pool_misses == 2 and ev.pool.key == (1, 10, 1)
    ev.close()
