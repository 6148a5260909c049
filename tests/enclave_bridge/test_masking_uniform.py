"""Masks: what every worker receives is uniform (chi-square, bit balance) in every delegation
mode — single worker (paper, slalom) and each party of split2/split3 — masks and seeds are never
reused, split3's weight shares are uniform and recombine to Ŵ, and the pool is sealed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from enclave_bridge.gpu.worker import LocalWorker
from enclave_bridge.measured.pool import MaskReuseError, StageMasks, WindowMasks
from enclave_bridge.measured.quant import quantise_act
from enclave_bridge.protocol import SecureEvaluator
from enclave_bridge.shared.errors import IntegrityError
from enclave_bridge.shared.ring import SEED_BYTES, P, add_mod, to_ring
from enclave_bridge.shared.worker_proto import Term
from tests.enclave_bridge.secure_helpers import calibrated_model

# chi-square critical value, 63 degrees of freedom, α = 1e-6 (scipy.stats.chi2.ppf(1 - 1e-6, 63))
CHI2_63_CRIT = 131.37
W16 = (1, 8, 1)  # (N, T, M) of the small test windows
T4 = 4  # uniformity windows: > 5000 masked elements per party already


class RecordingWorker(LocalWorker):
    """An in-process worker that keeps everything it is sent (what a curious worker sees)."""

    def __init__(self) -> None:
        super().__init__(device="cpu")
        self.seen: list[np.ndarray] = []  # masked input tensors
        self.seeds: list[bytes] = []
        self.weights: list[list[np.ndarray]] = []  # per op: its slots

    def load(self, model_id, ops):
        self.weights += [[np.array(w, copy=True) for w in o["slots"]] for o in ops]
        super().load(model_id, ops)

    def compute(self, model_id, names, terms: list[Term]):
        for t in terms:
            if t.x is not None:
                self.seen.append(np.array(t.x, copy=True))
            else:
                assert t.seed is not None
                self.seeds.append(t.seed)
        return super().compute(model_id, names, terms)

    def reset(self) -> None:
        self.seen, self.seeds = [], []


@pytest.fixture(scope="module")
def model():
    return calibrated_model(5, seed=1, t=8, m=1)


def _chi2(values: np.ndarray, bins: int = 64) -> float:
    """Chi-square of the top 6 bits of values in [0, p) (p = 2^61 − 1: 64 near-equal bins)."""
    v = values.astype(np.int64)
    assert v.min() >= 0 and v.max() < P
    counts = np.bincount((v >> (61 - 6)).astype(np.int64), minlength=bins)
    expected = v.size / bins
    return float(((counts - expected) ** 2 / expected).sum())


def _bit_imbalance(values: np.ndarray) -> float:
    """Largest |P(bit = 1) − 1/2| over the 61 bits, in standard errors."""
    v = values.astype(np.int64)
    ones = ((v[:, None] >> np.arange(61)) & 1).mean(axis=0)
    return float(np.abs(ones - 0.5).max() / (0.5 / np.sqrt(v.size)))


def _uniform(values: np.ndarray) -> None:
    assert values.size > 5_000
    assert _chi2(values) < CHI2_63_CRIT
    assert _bit_imbalance(values) < 5.5  # 61 bits, |z| > 5.5 has probability ~2e-6 overall


def _windows() -> dict[str, np.ndarray]:
    zero = np.zeros((1, 3, T4, 18, 1), dtype=np.float32)
    structured = np.full((1, 3, T4, 18, 1), 0.25, dtype=np.float32)  # one repeated value …
    structured[0, 2] = 1.0  # … and a constant score channel
    structured[0, 0, :, :9] = -0.25
    return {"zero": zero, "structured": structured}


WORKERS = {"paper": 1, "slalom": 1, "split2": 2, "split3": 3}
# which parties get masked tensors (the others get PRG seeds only)
TENSOR_PARTIES = {"paper": (0,), "slalom": (0,), "split2": (0,), "split3": (0, 1)}
SEED_PARTIES = {"paper": (), "slalom": (), "split2": (1,), "split3": (1, 2)}


@pytest.fixture(scope="module")
def parties(model):
    """One evaluator per mode with recording workers (built once: construction dominates)."""
    made: dict[str, tuple[SecureEvaluator, list[RecordingWorker]]] = {}

    def get(mode: str) -> tuple[SecureEvaluator, list[RecordingWorker]]:
        if mode not in made:
            workers = [RecordingWorker() for _ in range(WORKERS[mode])]
            made[mode] = (SecureEvaluator(model, mode, workers=workers, pool_capacity=0), workers)
        ev, workers = made[mode]
        for w in workers:
            w.reset()  # forget the warm-up window and earlier tests
        return ev, workers

    yield get
    for ev, _ in made.values():
        ev.close()


@pytest.mark.parametrize("mode", ["paper", "slalom", "split2", "split3"])
def test_every_party_receives_uniform_values_for_zero_and_structured_windows(parties, mode):
    ev, workers = parties(mode)
    for name, x in _windows().items():
        for w in workers:
            w.reset()
        ref = ev.exact_reference(x)
        assert np.array_equal(ev.evaluate(x), ref)
        assert ev.stats.freivalds_failures == 0
        for k, w in enumerate(workers):
            if k in TENSOR_PARTIES[mode]:
                seen = np.concatenate([a.reshape(-1) for a in w.seen])
                assert seen.dtype == np.int64
                _uniform(seen)  # x̂ ± mask: nothing of x̂ shows, even when x̂ is 0 or constant
            else:
                assert w.seen == [], (mode, k, name)
            if k in SEED_PARTIES[mode]:
                assert w.seeds and all(len(sd) == SEED_BYTES for sd in w.seeds)
                assert len(set(w.seeds)) == len(w.seeds)  # one seed per mask
            else:
                assert w.seeds == [], (mode, k, name)
        if mode == "split3":
            # B's seed is A's mask a, never the seed of its own mask b; C gets both seeds
            assert len(workers[2].seeds) == 2 * len(workers[1].seeds)
            assert set(workers[1].seeds) < set(workers[2].seeds)
    # the quantised structured input itself is far from uniform: the test has teeth
    xq, _ = quantise_act(torch.from_numpy(_windows()["structured"]).double())
    assert _chi2(np.mod(xq.numpy().reshape(-1).astype(np.int64), P)) > 10 * CHI2_63_CRIT


def test_weights_each_party_holds(parties):
    """paper: W̄ uniform; slalom, split2: Ŵ visible (by design); split3: every share uniform, and
    A (W1+W2), B (W2, W3), C (W1, W3) recombine to Ŵ."""
    held = {mode: parties(mode)[1] for mode in ("paper", "slalom", "split2", "split3")}
    w_hat = [to_ring(op.q.w_int) for op in parties("split3")[0].qm.ops.values()]

    def flat(w: RecordingWorker, slot: int) -> np.ndarray:
        return np.concatenate([op[slot].reshape(-1) for op in w.weights])

    _uniform(flat(held["paper"][0], 0))
    for mode in ("slalom", "split2"):
        for w in held[mode]:
            assert _chi2(flat(w, 0)) > 10 * CHI2_63_CRIT  # Ŵ visible in these modes, by design
    a, b, c = held["split3"]
    assert [len(o) for o in a.weights[:1] + b.weights[:1] + c.weights[:1]] == [1, 2, 2]
    for w, slot in ((a, 0), (b, 0), (b, 1), (c, 0), (c, 1)):
        _uniform(flat(w, slot))
    for i, want in enumerate(w_hat):
        w12, (w2, w3), (w1, w3c) = a.weights[i][0], b.weights[i], c.weights[i]
        assert np.array_equal(w3, w3c)
        t = lambda v: torch.from_numpy(v)  # noqa: E731
        assert np.array_equal(add_mod(t(w1), t(w2)).numpy(), w12)
        assert torch.equal(add_mod(add_mod(t(w1), t(w2)), t(w3)), want)


@pytest.mark.parametrize("mode", ["paper", "split2", "split3"])
def test_same_window_twice_gets_fresh_masks(model, mode):
    workers = [RecordingWorker() for _ in range(WORKERS[mode])]
    kw = {"pool_window": W16, "pool_capacity": 2, "background_pool": False} if mode == "paper" else {}
    with SecureEvaluator(model, mode, workers=workers, **kw) as ev:
        for w in workers:
            w.reset()  # the warm-up window
        if ev.pool is not None:
            ev.pool.fill()
        x = np.random.default_rng(0).uniform(-0.5, 0.5, (1, 3, 8, 18, 1)).astype(np.float32)
        a = ev.evaluate(x)
        n = len(workers[0].seen)
        b = ev.evaluate(x)
        assert np.array_equal(a, b)
        seen = workers[0].seen
        first, second = seen[:n], seen[n:]
        assert len(first) == len(second) > 0
        digests = {hashlib.sha256(s.tobytes()).hexdigest() for w in workers for s in w.seen}
        assert len(digests) == sum(len(w.seen) for w in workers)  # no stage input ever repeats
        for s1, s2 in zip(first, second, strict=True):
            assert np.mean(s1 == s2) < 1e-3
        seeds = [sd for w in workers for sd in w.seeds]
        if mode == "split3":
            assert len(set(seeds)) == len(seeds) * 2 // 3  # a is sent to B and C, b to C only
        else:
            assert len(set(seeds)) == len(seeds)
        if mode == "paper":
            assert ev.stats.pool_hits == 2


def test_stage_masks_are_single_use():
    st = StageMasks((2,), ("a",), torch.zeros(2, dtype=torch.int64), {"a": torch.zeros(2, dtype=torch.int64)})
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
    ref = SecureEvaluator(model, "enclave").exact_reference(x)
    assert np.array_equal(ev.evaluate(x), ref)
    assert ev.stats.pool_hits == 1  # the restored masks were used, and they were right
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
