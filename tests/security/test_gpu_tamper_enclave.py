"""A malicious GPU worker behind a real enclave in `paper` mode: tampered replies at several rates.

The enclave's worker address points at a `TcpProxy` (test-owned forwarder) whose upstream is
switched between `veilcam gpu-worker` processes started with `--tamper flip|scale --tamper-rate r`.
Every tampered reply must fail Freivalds (counted, blamed on the worker) and be recomputed in the
enclave: the alert's probabilities equal, bit for bit, the exact integer reference of the
delegated modes (`SecureEvaluator.exact_reference`; `enclave` mode is the float32 model now).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.measured.window_eval import softmax
from enclave_bridge.protocol import SecureEvaluator
from enclave_bridge.shared.attest import new_nonce
from enclave_bridge.shared.windows import seal_window
from tests.enclave_bridge.test_enclave_service_support import (
    LABELS,
    assert_no_secrets,
    make_deployment,
    window,
)
from tests.security.test_security_support import RULES_ALL, GpuWorker, TcpProxy, provisioned, short_root

RATES_FAST = [("flip", 0.5)]  # rate 1.0 (every reply) runs fast at the evaluator level too
RATES_ALL = [("flip", 0.0), ("flip", 0.1), ("flip", 0.25), ("scale", 0.5), ("replace", 0.75), ("flip", 1.0)]


def test_tampered_replies_rejected_fast() -> None:
    _run(RATES_FAST, windows=1)


@pytest.mark.slow
def test_tampered_replies_rejected_at_every_rate() -> None:
    _run(RATES_ALL, windows=3)


def _run(rates: list[tuple[str, float]], windows: int) -> None:
    dep = make_deployment(short_root("tmp"))
    workers = {
        spec: GpuWorker(dep.root / f"worker-{spec[0]}-{spec[1]}.log", *_flags(*spec)) for spec in rates
    }
    proxy = TcpProxy(workers[rates[0]].addr)
    try:
        provisioned(dep, {"mode": "paper", "worker": proxy.addr})
        model = STGCN.from_checkpoint(dep.root / "model.pt").eval()
        reference = SecureEvaluator(model, "enclave")
        seq, results = 0, {}
        with dep.client() as c:
            ev = c.evidence(nonce := new_nonce())
            opener = AlertOpener(dep.c1, dep.verifier("eval").verify(ev, nonce).sign_pub)
            c.hello("cam1", RULES_ALL)
            for spec in rates:
                proxy.upstream = workers[spec].addr
                proxy.cut()
                seq += 1  # warm-up: the cut connection fails once; the window finishes in the enclave
                assert c.submit(seal_window(dep.dk, "cam1", seq, 0.0, 1.0, window(seq))).status == "ok"
                before = c.stats()["evaluator"]
                for _ in range(windows):
                    seq += 1
                    x = window(100 + seq)
                    r = c.submit(seal_window(dep.dk, "cam1", seq, 0.0, 1.0, x))
                    assert r.status == "ok" and len(r.alerts) == 1
                    got = opener.open(r.alerts[0])
                    probs = softmax(np.asarray(reference.exact_reference(x[None]), dtype=np.float64)[0])
                    expect = sorted(
                        ((LABELS[i], float(probs[i])) for i in range(len(LABELS))), key=lambda t: -t[1]
                    )
                    assert [tuple(p) for p in got["topk"]] == expect[: len(got["topk"])]  # bit-exact
                after = c.stats()["evaluator"]
                results[spec] = {
                    k: after[k] - before[k]
                    for k in ("delegated_ops", "freivalds_failures", "transport_errors", "enclave_recomputes")
                }
                faults = after.get("worker_faults", {})
                results[spec]["blamed"] = sum(faults.values()) - sum(before.get("worker_faults", {}).values())
        for spec, d in results.items():
            assert d["transport_errors"] == 0 and d["delegated_ops"] > 0, (spec, d)
            assert d["blamed"] == d["freivalds_failures"], (spec, d)  # each failure named the worker
            if spec[1] == 0.0:
                assert d["freivalds_failures"] == 0, (spec, d)
            elif spec[1] == 1.0:
                assert d["freivalds_failures"] == d["delegated_ops"], (spec, d)
            else:
                assert 0 < d["freivalds_failures"] < d["delegated_ops"], (spec, d)
        assert dep.procs["eval"].poll() is None
        logs = [dep.log("eval"), dep.log("key")] + [w.log.read_text() for w in workers.values()]
        assert_no_secrets(logs, dep.secrets())
        print("tamper results", results)  # shown with -s (README figures)
    finally:
        proxy.close()
        for w in workers.values():
            w.stop()
        dep.stop_all()
        shutil.rmtree(dep.root, ignore_errors=True)


def _flags(mode: str, rate: float) -> list[str]:
    return [] if rate == 0.0 else ["--tamper", mode, "--tamper-rate", str(rate)]
