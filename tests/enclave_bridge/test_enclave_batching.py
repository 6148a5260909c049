"""Cross-camera batching in the enclave: queued windows share one evaluation, nothing else."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.host.client import provision_data_key, provision_model
from enclave_bridge.measured.batcher import WindowBatcher
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.attest import new_nonce
from enclave_bridge.shared.windows import seal_window
from tests.enclave_bridge.test_enclave_service_support import (
    LABELS,
    deployment,  # noqa: F401  (fixture)
    window,
)


class GatedEvaluator:
    """Row sums as logits; the first call waits for `gate` so later windows queue up behind it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[int] = []

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        if not self.calls:
            self.gate.wait(10)
        self.calls.append(x.shape[0])
        if not np.isfinite(x).all():
            raise ValueError("window contains non-finite values")
        return np.stack([x.reshape(x.shape[0], -1).sum(1), -x.reshape(x.shape[0], -1).sum(1)], axis=1)


def _submit_all(
    b: WindowBatcher, xs: list[np.ndarray], first_alone: bool = True
) -> tuple[list[object], list[threading.Thread]]:
    out: list[object] = [None] * len(xs)

    def run(i: int) -> None:
        try:
            out[i] = b.evaluate_one(xs[i])
        except Exception as e:  # collected and checked by the caller
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    threads[0].start()
    if first_alone:
        time.sleep(0.2)  # the first window is being evaluated (held at the gate)
    for t in threads[1:]:
        t.start()
    time.sleep(0.2)
    return out, threads


def test_queued_windows_are_evaluated_in_one_pass_each_getting_its_own_row() -> None:
    ev = GatedEvaluator()
    b = WindowBatcher(ev.evaluate, max_batch=8)
    xs = [np.full((3, 4, 18, 1), float(i), np.float32) for i in range(5)]
    out, threads = _submit_all(b, xs)
    ev.gate.set()
    for t in threads:
        t.join(10)
    b.close()
    assert ev.calls == [1, 4]  # the first alone, the four that queued behind it together
    for i, row in enumerate(out):
        assert np.allclose(row, [xs[i].sum(), -xs[i].sum()])
    assert (b.stats.batches, b.stats.windows, b.stats.largest) == (2, 5, 4)


def test_one_bad_window_fails_alone_and_other_shapes_wait_for_their_own_batch() -> None:
    ev = GatedEvaluator()
    b = WindowBatcher(ev.evaluate, max_batch=8)
    xs = [np.ones((3, 4, 18, 1), np.float32) for _ in range(4)]
    xs[2] = xs[2].copy()
    xs[2][0, 0, 0, 0] = np.nan
    xs.append(np.ones((3, 8, 18, 1), np.float32))  # another window length: never stacked with T=4
    out, threads = _submit_all(b, xs)
    ev.gate.set()
    for t in threads:
        t.join(10)
    b.close()
    assert isinstance(out[2], ValueError)
    for i in (0, 1, 3, 4):
        assert np.allclose(out[i], [xs[i].sum(), -xs[i].sum()])
    assert all(n >= 1 for n in ev.calls) and 8 not in ev.calls


def test_batch_max_above_64_is_refused() -> None:
    with pytest.raises(ValueError):
        WindowBatcher(lambda x: x, max_batch=65)


RULES_ALL = {"labels": ["*"], "min_score": 0.0, "debounce_s": 0.0}


def test_cameras_submitting_at_once_get_their_own_alerts(deployment) -> None:  # noqa: F811
    """Four cameras submit concurrently to one enclave: every window is evaluated (through the
    batcher), every alert opens for its own camera and window, and its scores are the model's."""
    dep = deployment
    dep.start("key")
    provision_data_key(dep.ke_addr, dep.dk, dep.do, dep.verifier("key"), [dep.measurement("eval")])
    dep.start("eval")
    provision_model(dep.ev_addr, dep.package.read_bytes(), dep.mk, dep.mo, dep.verifier("eval"))
    with dep.client() as c:
        c.set_policy(dep.signed_policy())
    cams, per_cam = 4, 4
    results: dict[str, list[tuple[int, object]]] = {f"cam{i}": [] for i in range(cams)}
    errors: list[BaseException] = []
    start = threading.Barrier(cams)

    def camera(name: str, idx: int) -> None:
        try:
            with dep.client() as c:
                c.hello(name, RULES_ALL)
                start.wait(10)
                for k in range(per_cam):
                    seed = 100 * idx + k
                    blob = seal_window(dep.dk, name, k + 1, float(k), k + 1.0, window(seed), (idx,))
                    results[name].append((seed, c.submit(blob)))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=camera, args=(f"cam{i}", i)) for i in range(cams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    with dep.client() as c:
        nonce = new_nonce()
        enclave = dep.verifier("eval").verify(c.evidence(nonce), nonce)
        stats = c.stats()
    assert stats["windows_ok"] == cams * per_cam
    assert stats["batches"]["windows"] == cams * per_cam  # every window went through the batcher
    model = STGCN.from_checkpoint(dep.root / "model.pt").eval()
    opener = AlertOpener(dep.c1, enclave.sign_pub)
    for name, rs in results.items():
        seqs = []
        for k, (seed, r) in enumerate(rs):
            assert (r.status, r.window_seq, len(r.alerts)) == ("ok", k + 1, 1)
            a = opener.open(r.alerts[0])
            assert (a["device"], a["window_seq"], a["track_id"]) == (name, k + 1, int(name[3:]))
            with torch.no_grad():
                probs = torch.softmax(model(torch.from_numpy(window(seed)[None])).double(), 1)[0].numpy()
            assert a["label"] == LABELS[int(probs.argmax())]
            assert a["score"] == pytest.approx(float(probs.max()), abs=2e-3)
            seqs.append(a["seq"])
        assert seqs == [1, 2, 3, 4]  # alert numbers stay per device, in order
