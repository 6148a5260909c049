"""Sealing: round trip, name binding, cross-measurement and cross-platform failure, file modes."""

from __future__ import annotations

import hashlib
import stat

import pytest

from enclave_bridge.shared.attest import PlatformKey
from enclave_bridge.shared.errors import IntegrityError
from enclave_bridge.shared.sealing import SealedStore, Sealer


def _sealer(platform: PlatformKey, measurement: bytes) -> Sealer:
    return Sealer(platform.sealing_key(measurement))


def test_round_trip_and_name_binding():
    plat = PlatformKey.generate()
    m = hashlib.sha256(b"code").digest()
    s = _sealer(plat, m)
    blob = s.seal("model_key", b"secret bytes")
    assert b"secret bytes" not in blob
    assert s.unseal("model_key", blob) == b"secret bytes"
    with pytest.raises(IntegrityError):
        s.unseal("policy", blob)  # a blob cannot be moved to another name
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(IntegrityError):
        s.unseal("model_key", bytes(flipped))
    with pytest.raises(IntegrityError, match="malformed"):
        s.unseal("model_key", blob[:10])


def test_other_measurement_or_platform_cannot_unseal():
    plat = PlatformKey.generate()
    blob = _sealer(plat, hashlib.sha256(b"code v1").digest()).seal("x", b"data")
    with pytest.raises(IntegrityError, match="different enclave"):
        _sealer(plat, hashlib.sha256(b"code v2").digest()).unseal("x", blob)
    with pytest.raises(IntegrityError):
        _sealer(PlatformKey.generate(), hashlib.sha256(b"code v1").digest()).unseal("x", blob)


def test_store_persists_across_instances_with_private_modes(tmp_path):
    plat = PlatformKey.generate()
    m = hashlib.sha256(b"code").digest()
    store = SealedStore(tmp_path / "sealed", _sealer(plat, m))
    assert store.get("counters") is None
    store.put("counters", b'{"a": 1}')
    store.put("counters", b'{"a": 2}')
    assert stat.S_IMODE((tmp_path / "sealed").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "sealed" / "counters.sealed").stat().st_mode) == 0o600
    reopened = SealedStore(tmp_path / "sealed", _sealer(PlatformKey.load(plat.save(tmp_path)[0]), m))
    assert reopened.get("counters") == b'{"a": 2}'
    other = SealedStore(tmp_path / "sealed", _sealer(plat, hashlib.sha256(b"evil").digest()))
    with pytest.raises(IntegrityError):
        other.get("counters")
