"""Adversarial input against a real `veilcam enclave` process (and a real `veilcam gpu-worker`).

Every hostile window (replayed, reordered, truncated, bit-flipped, header-swapped, wrong kid,
wrong key, random mutation) is rejected with a reason, counted in the enclave's stats, does not
advance the replay counter, and the enclave keeps serving the next genuine window. Random and
malformed frames on both sockets never take a service down; oversized frames are refused before
their body is read, and memory follows the bytes actually sent, never the size announced.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.shared.attest import new_nonce
from enclave_bridge.shared.keys import generate_data_key
from enclave_bridge.shared.windows import seal_window
from enclave_bridge.shared.wire import connect, encode_frame, recv_frame, send_frame
from tests.enclave_bridge.test_enclave_service_support import assert_no_secrets, make_deployment, window
from tests.security.test_security_support import RULES_ALL, GpuWorker, provisioned, rss_bytes, short_root

REJECT_REASONS = {"malformed", "auth", "unknown_kid", "replay", "unknown_device"}


class Seq:
    """Strictly increasing window numbers for the genuine camera."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n


@pytest.fixture(scope="module")
def enclave():
    dep = make_deployment(short_root("adv"))
    try:
        provisioned(dep)
        with dep.client() as c:
            c.hello("cam1", RULES_ALL)
            c.hello("cam2", RULES_ALL)
        yield dep
    finally:
        dep.stop_all()
        shutil.rmtree(dep.root, ignore_errors=True)


@pytest.fixture(scope="module")
def seq() -> Seq:
    return Seq()


def _genuine_ok(dep, seq: Seq) -> None:
    """The enclave still accepts and evaluates a genuine window, and its alert opens."""
    with dep.client() as c:
        r = c.submit(seal_window(dep.dk, "cam1", seq.next(), 0.0, 1.0, window(1)))
        ev = c.evidence(nonce := new_nonce())
    assert (r.status, r.reason, len(r.alerts)) == ("ok", None, 1)
    opened = AlertOpener(dep.c1, dep.verifier("eval").verify(ev, nonce).sign_pub).open(r.alerts[0])
    assert opened["window_seq"] == seq.n


def _repack(blob: bytes, **changes: object) -> bytes:
    env = msgpack.unpackb(blob, raw=False)
    env.update(changes)
    return msgpack.packb(env, use_bin_type=True)


def test_hostile_windows_rejected_counted_and_harmless(enclave, seq: Seq) -> None:
    dep = enclave
    x = window(3)
    with dep.client() as c:
        before = dict(c.stats()["windows_rejected"])
        first = seal_window(dep.dk, "cam1", seq.next(), 0.0, 1.0, x)
        assert c.submit(first).status == "ok"
        earlier, later = seq.next(), seq.next()  # sealed in order, delivered out of order
        b_earlier = seal_window(dep.dk, "cam1", earlier, 1.0, 2.0, x)
        b_later = seal_window(dep.dk, "cam1", later, 2.0, 3.0, x)
        assert c.submit(b_later).status == "ok"
        fresh = seal_window(dep.dk, "cam1", 10_000, 3.0, 4.0, x)  # not submitted: mutated below
        stranger = generate_data_key("dk-1")  # right kid, wrong key
        unknown = generate_data_key("dk-evil")  # a kid the key enclave never got
        flip_tag = bytearray(fresh)
        flip_tag[-1] ^= 0x80
        flip_nonce = msgpack.unpackb(fresh, raw=False)["nonce"]
        cases: list[tuple[str, bytes, str]] = [
            ("replay", first, "replay"),
            ("reordered", b_earlier, "replay"),
            ("truncated-1", fresh[:-1], "malformed"),
            ("truncated-half", fresh[: len(fresh) // 2], "malformed"),
            ("truncated-header", fresh[:7], "malformed"),
            ("empty", b"", "malformed"),
            ("tag bit flipped", bytes(flip_tag), "auth"),
            ("nonce changed", _repack(fresh, nonce=bytes(b ^ 1 for b in flip_nonce)), "auth"),
            ("seq changed", _repack(fresh, seq=10_001), "auth"),
            ("t0 changed", _repack(fresh, t0=2.5), "auth"),
            ("t1 changed", _repack(fresh, t1=9.0), "auth"),
            ("device swapped", _repack(fresh, device="cam2"), "auth"),
            ("unknown device", _repack(fresh, device="cam-x"), "unknown_device"),
            ("kid swapped", _repack(fresh, kid="dk-evil"), "unknown_kid"),
            ("wrong key, right kid", seal_window(stranger, "cam1", 20_000, 0.0, 1.0, x), "auth"),
            ("unknown kid", seal_window(unknown, "cam1", 20_001, 0.0, 1.0, x), "unknown_kid"),
            ("version", _repack(fresh, v=2), "malformed"),
            ("extra field", _repack(fresh, extra=1), "malformed"),
            ("negative seq", _repack(fresh, seq=-1), "malformed"),
            ("seq as float", _repack(fresh, seq=10_000.0), "malformed"),
            ("nan t0", _repack(fresh, t0=float("nan")), "malformed"),
            ("not a map", msgpack.packb([1, 2, 3]), "malformed"),
            ("not msgpack", b"\xc1" * 64, "malformed"),
        ]
        got = {name: c.submit(blob) for name, blob, _ in cases}
        for name, _, reason in cases:
            assert (got[name].status, got[name].reason, got[name].alerts) == ("rejected", reason, []), name
        after = c.stats()["windows_rejected"]
    expected: dict[str, int] = {}
    for _, _, reason in cases:
        expected[reason] = expected.get(reason, 0) + 1
    assert {k: after.get(k, 0) - before.get(k, 0) for k in expected} == expected
    # forged windows with huge seq numbers did not advance the counter: the next genuine one works
    _genuine_ok(dep, seq)
    assert dep.procs["eval"].poll() is None
    assert_no_secrets([dep.log("eval"), dep.log("key")], dep.secrets())


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
)


def _mutate(blob: bytes, muts: list[tuple]) -> bytes:
    b = bytearray(blob)
    for kind, pos, arg in muts:
        i = pos % max(len(b), 1)
        if kind == "flip" and b:
            b[i] ^= 1 << arg
        elif kind == "cut":
            del b[i : i + arg]
        elif kind == "insert":
            b[i:i] = arg
        elif kind == "set" and b:
            b[i] = arg
    return bytes(b)


def test_random_mutations_never_accepted(enclave, seq: Seq) -> None:
    dep = enclave
    x = window(4)
    base_seq = seq.next()
    blob = seal_window(dep.dk, "cam1", base_seq, 0.0, 1.0, x)
    client = dep.client()
    reasons: dict[str, int] = {}

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(_mutation, min_size=1, max_size=4))
    def check(muts: list[tuple]) -> None:
        bad = _mutate(blob, muts)
        if bad == blob:
            return
        r = client.submit(bad)
        assert r.status == "rejected" and r.reason in REJECT_REASONS and r.alerts == []
        reasons[r.reason] = reasons.get(r.reason, 0) + 1

    try:
        check()
        assert client.submit(blob).status == "ok"  # the unmutated window was never consumed
    finally:
        client.close()
    assert reasons.get("auth", 0) > 0 and reasons.get("malformed", 0) > 0
    _genuine_ok(dep, seq)


_ops = st.sampled_from(
    ["hello", "submit", "evidence", "provision_model", "set_policy", "status", "stats", "nope", ""]
)
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=64),
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
    max_leaves=10,
)
_requests = st.one_of(
    st.builds(
        lambda op, kw, rid: {"op": op, "id": rid, **kw},
        _ops,
        st.dictionaries(
            st.sampled_from(
                ["device", "rules", "blob", "nonce", "kind", "package", "wrapped", "sig", "policy"]
            ),
            _values,
            max_size=4,
        ),
        _values,
    ),
    _values,
)


def _send_raw(addr: str, data: bytes) -> None:
    """Send bytes on a fresh connection and read whatever comes back (a reply, or a close)."""
    with contextlib.closing(connect(addr, 10)) as s, contextlib.suppress(OSError):
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        while s.recv(65536):
            pass


def test_fuzzed_frames_on_the_enclave_socket(enclave, seq: Seq) -> None:
    dep = enclave

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        st.one_of(_requests.map(lambda r: ("frame", r)), st.binary(max_size=256).map(lambda b: ("raw", b)))
    )
    def check(case: tuple[str, object]) -> None:
        kind, payload = case
        if kind == "raw":
            _send_raw(dep.ev_addr, payload)  # type: ignore[arg-type]
            return
        with contextlib.closing(connect(dep.ev_addr, 30)) as s:
            send_frame(s, payload)
            rep = recv_frame(s)
        assert isinstance(rep, dict) and "ok" in rep
        if rep["ok"] is False:
            assert isinstance(rep.get("error"), str) and isinstance(rep.get("message"), str)

    check()
    assert dep.procs["eval"].poll() is None
    with dep.client() as c:
        assert c.status()["model_kid"] == "mk-1"
        c.hello("cam1", RULES_ALL)  # fuzzed hellos may have changed cam1's rules
    _genuine_ok(dep, seq)


def test_oversized_and_partial_frames_bounded_memory(enclave, seq: Seq) -> None:
    dep = enclave
    pid = dep.procs["eval"].pid
    base = rss_bytes(pid)
    # a length far above the limit: refused before any body is read
    _send_raw(dep.ev_addr, struct.pack(">I", 0xFFFFFFFF) + b"x" * 1024)
    # many connections each *announcing* 500 MB but sending 4 MB: memory follows what was sent
    conns, sent = [], 4 * 1024 * 1024
    try:
        for _ in range(6):
            s = connect(dep.ev_addr, 30)
            s.sendall(struct.pack(">I", 500 * 1024 * 1024) + b"\0" * sent)
            conns.append(s)
        held = rss_bytes(pid) - base
        assert held < 6 * sent * 3 + 64 * 1024 * 1024, (
            f"{held / 2**20:.0f} MiB held for {6 * sent >> 20} MiB sent"
        )
        _genuine_ok(dep, seq)  # other connections are served meanwhile
    finally:
        for s in conns:
            s.close()
    # a frame with a valid length but a body that is not msgpack, then a good request on the same socket
    with contextlib.closing(connect(dep.ev_addr, 30)) as s:
        s.sendall(struct.pack(">I", 16) + b"\xc1" * 16)
        s.settimeout(10)
        assert s.recv(1) == b""  # the server drops a connection whose framing it cannot trust
    _genuine_ok(dep, seq)


# -- the GPU worker socket -------------------------------------------------------------------------
_worker_ops = st.sampled_from(["hello", "ping", "load", "unload", "compute", "nope"])
_tensorish = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["uint32", "int32", "float32", "int8", "object", "<u4", ""]),
        "shape": st.lists(st.integers(-2, 6), max_size=4),
        "data": st.binary(max_size=64),
    }
)
_worker_requests = st.one_of(
    st.builds(
        lambda op, kw: {"op": op, **kw},
        _worker_ops,
        st.dictionaries(
            st.sampled_from(["model_id", "ops", "names", "input"]),
            st.one_of(
                _values,
                _tensorish,
                st.lists(
                    st.fixed_dictionaries(
                        {"name": st.text(max_size=4)},
                        optional={"weight": _tensorish, "kind": st.text(max_size=6)},
                    ),
                    max_size=2,
                ),
            ),
            max_size=4,
        ),
    ),
    _values,
)


@pytest.fixture(scope="module")
def gpu_worker(tmp_path_factory):
    w = GpuWorker(tmp_path_factory.mktemp("gw") / "worker.log")
    yield w
    w.stop()


def test_fuzzed_frames_on_the_gpu_worker_socket(gpu_worker) -> None:
    addr = gpu_worker.addr

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        st.one_of(
            _worker_requests.map(lambda r: ("frame", r)), st.binary(max_size=256).map(lambda b: ("raw", b))
        )
    )
    def check(case: tuple[str, object]) -> None:
        kind, payload = case
        if kind == "raw":
            _send_raw(addr, payload)  # type: ignore[arg-type]
            return
        _send_raw(addr, encode_frame(payload))

    check()
    _send_raw(addr, struct.pack(">I", 0xFFFFFFFF))
    assert gpu_worker.proc.poll() is None
    with contextlib.closing(connect(addr, 10)) as s:
        send_frame(s, {"op": "hello"})
        assert recv_frame(s)["ok"] is True
