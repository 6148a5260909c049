"""Sealed windows: round trip, wrong key/kid, bit flips, truncation, replay/reorder, malformed input."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from enclave_bridge.shared.errors import IntegrityError, StageError
from enclave_bridge.shared.keys import DataKey, generate_data_key
from enclave_bridge.shared.windows import ReplayGuard, open_window, parse_header, seal_window


def _window(seed: int = 0, t: int = 8, m: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, t, 18, m)).astype(np.float32)


@pytest.fixture
def key() -> DataKey:
    return generate_data_key("dk-a")


def test_round_trip(key):
    data = _window()
    blob = seal_window(key, "cam1", 5, 1.5, 11.5, data, track_ids=(3, 9))
    w = open_window(blob, {key.kid: key}, ReplayGuard())
    assert (w.device, w.seq, w.t0, w.t1, w.kid, w.track_ids) == ("cam1", 5, 1.5, 11.5, "dk-a", (3, 9))
    np.testing.assert_array_equal(w.data, data)
    assert w.data.dtype == np.float32
    assert "data" not in repr(w) or "shape" in repr(w)


def test_ciphertext_hides_plaintext(key):
    data = np.full((3, 4, 18, 1), 0.123456, dtype=np.float32)
    blob = seal_window(key, "cam1", 0, 0.0, 1.0, data)
    assert data.tobytes()[:64] not in blob


def test_wrong_key_same_kid(key):
    blob = seal_window(key, "cam1", 1, 0.0, 1.0, _window())
    other = DataKey(generate_data_key().export_secret(), key.kid)
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_window(blob, {key.kid: other}, ReplayGuard())


def test_unknown_kid(key):
    blob = seal_window(key, "cam1", 1, 0.0, 1.0, _window())
    k2 = generate_data_key("dk-b")
    with pytest.raises(IntegrityError, match="unknown or expired kid"):
        open_window(blob, {k2.kid: k2}, ReplayGuard())


def test_every_bit_flip_region_rejected(key):
    blob = seal_window(key, "cam1", 1, 0.0, 1.0, _window(t=2, m=1))
    rng = np.random.default_rng(1)
    positions = sorted(set(rng.integers(0, len(blob), 60).tolist()) | {len(blob) - 1})
    for pos in positions:
        bad = bytearray(blob)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(IntegrityError):
            open_window(bytes(bad), {key.kid: key}, ReplayGuard())


def test_header_fields_bound_by_aad(key):
    blob = seal_window(key, "cam1", 7, 0.0, 1.0, _window())
    env = msgpack.unpackb(blob)
    for field, value in (("device", "cam2"), ("seq", 8), ("t0", 0.5), ("t1", 2.0)):
        forged = dict(env, **{field: value})
        with pytest.raises(IntegrityError, match="authentication failed"):
            open_window(msgpack.packb(forged), {key.kid: key}, ReplayGuard())


def test_truncation(key):
    blob = seal_window(key, "cam1", 1, 0.0, 1.0, _window())
    for n in (0, 1, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(IntegrityError):
            open_window(blob[:n], {key.kid: key}, ReplayGuard())
    env = msgpack.unpackb(blob)
    env["ct"] = env["ct"][:-1]
    with pytest.raises(IntegrityError):
        open_window(msgpack.packb(env), {key.kid: key}, ReplayGuard())


def test_replay_and_reorder_rejected(key):
    guard = ReplayGuard()
    keys = {key.kid: key}
    b1 = seal_window(key, "cam1", 1, 0.0, 1.0, _window())
    b2 = seal_window(key, "cam1", 2, 1.0, 2.0, _window())
    b3 = seal_window(key, "cam1", 3, 2.0, 3.0, _window())
    open_window(b1, keys, guard)
    open_window(b3, keys, guard)
    with pytest.raises(IntegrityError, match="replayed or reordered"):
        open_window(b3, keys, guard)
    with pytest.raises(IntegrityError, match="replayed or reordered"):
        open_window(b2, keys, guard)
    # other devices have their own counter
    open_window(seal_window(key, "cam2", 1, 0.0, 1.0, _window()), keys, guard)
    # persisted state keeps protecting after a restart
    restored = ReplayGuard(guard.state())
    with pytest.raises(IntegrityError):
        open_window(b3, keys, restored)


def test_forged_window_does_not_advance_counter(key):
    guard = ReplayGuard()
    attacker = generate_data_key(key.kid)
    forged = seal_window(attacker, "cam1", 100, 0.0, 1.0, _window())
    with pytest.raises(IntegrityError):
        open_window(forged, {key.kid: key}, guard)
    assert guard.last("cam1") is None
    open_window(seal_window(key, "cam1", 2, 0.0, 1.0, _window()), {key.kid: key}, guard)


def test_malformed_envelopes(key):
    for bad in (b"", b"\x93\x01\x02\x03", msgpack.packb({"v": 1}), msgpack.packb([1, 2]), b"\xc1"):
        with pytest.raises(IntegrityError, match="malformed"):
            parse_header(bad)
    env = msgpack.unpackb(seal_window(key, "cam1", 1, 0.0, 1.0, _window()))
    for field, value in (("v", 2), ("seq", -1), ("device", ""), ("nonce", b"short"), ("t0", "x")):
        with pytest.raises(IntegrityError, match="malformed"):
            parse_header(msgpack.packb(dict(env, **{field: value})))


def test_seal_input_checks(key):
    with pytest.raises(StageError):
        seal_window(key, "cam1", 1, 0.0, 1.0, np.zeros((2, 4, 18, 1), np.float32))
    with pytest.raises(StageError):
        seal_window(key, "cam1", 1, 0.0, 1.0, np.zeros((3, 4, 18, 1), np.float64))
    with pytest.raises(StageError):
        seal_window(key, "a|b", 1, 0.0, 1.0, _window())
    with pytest.raises(StageError):
        seal_window(key, "cam1", -1, 0.0, 1.0, _window())
    with pytest.raises(StageError):
        seal_window(key, "cam1", 1, 2.0, 1.0, _window())


def test_key_rotation_both_kids_accepted(key):
    new = generate_data_key("dk-b")
    keys = {key.kid: key, new.kid: new}
    guard = ReplayGuard()
    open_window(seal_window(key, "cam1", 1, 0.0, 1.0, _window()), keys, guard)
    w = open_window(seal_window(new, "cam1", 2, 1.0, 2.0, _window()), keys, guard)
    assert w.kid == "dk-b"
