"""Authentic but unusable windows are counted rejections, not transport errors (issue 19.7).

A window sealed with the right data key but holding NaN/inf, no frames, no persons, or the wrong
number of joints used to fail inside the model; the enclave answered with a generic transport
error, which the daemon retried and finally dropped as "enclave unreachable". Now each gets a
`rejected` reply with a reason, the enclave counts it, and the connection keeps working.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from enclave_bridge.shared.windows import seal_window
from tests.enclave_bridge.test_enclave_service_support import make_deployment, window
from tests.security.test_security_support import RULES_ALL, provisioned, short_root


@pytest.fixture
def dep():
    d = make_deployment(short_root("vals"))
    try:
        provisioned(d)
        yield d
    finally:
        d.stop_all()
        shutil.rmtree(d.root, ignore_errors=True)


def test_nan_and_misshaped_windows_are_counted_rejections(dep) -> None:
    nan = window(1)
    nan[0, 3, 4, 0] = np.nan
    inf = window(2)
    inf[1, 0, 0, 0] = np.inf
    bad = {
        "nan": (nan, "nonfinite"),
        "inf": (inf, "nonfinite"),
        "no frames": (np.zeros((3, 0, 18, 1), np.float32), "malformed"),
        "no persons": (np.zeros((3, 16, 18, 0), np.float32), "malformed"),
        "17 joints": (window(3)[:, :, :17], "malformed"),
    }
    with dep.client() as c:
        c.hello("cam1", RULES_ALL)
        for seq, (name, (x, reason)) in enumerate(bad.items(), start=1):
            r = c.submit(seal_window(dep.dk, "cam1", seq, float(seq), seq + 1.0, np.ascontiguousarray(x)))
            assert (r.status, r.reason) == ("rejected", reason), name
        good = c.submit(seal_window(dep.dk, "cam1", 99, 99.0, 100.0, window(4)))
        assert (good.status, len(good.alerts)) == ("ok", 1)
        rejected = c.stats()["windows_rejected"]
    assert rejected == {"nonfinite": 2, "malformed": 3}
