"""Key objects and key files: round trips, 0600 permissions, passphrases, no key bytes in repr."""

from __future__ import annotations

import base64
import json
import stat

import pytest

from enclave_bridge.errors import ConfigError, IntegrityError
from enclave_bridge.keys import (
    DataKey,
    PartyKey,
    PartyPublic,
    generate_data_key,
    generate_model_key,
    load_data_key,
    load_model_key,
)


def test_data_key_round_trip_plain(tmp_path):
    key = generate_data_key()
    path = key.save(tmp_path / "data.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_data_key(path)
    assert loaded.kid == key.kid
    assert loaded.export_secret() == key.export_secret()


def test_data_key_passphrase(tmp_path):
    key = generate_data_key("dk-test")
    path = key.save(tmp_path / "data.key", passphrase="correct horse")
    raw = path.read_text()
    assert base64.b64encode(key.export_secret()).decode() not in raw
    assert load_data_key(path, "correct horse").export_secret() == key.export_secret()
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_data_key(path, "wrong")
    with pytest.raises(ConfigError, match="passphrase-protected"):
        load_data_key(path)


def test_repr_hides_key():
    key = generate_data_key()
    secret = key.export_secret()
    for text in (repr(key), str(key)):
        assert secret.hex() not in text
        assert base64.b64encode(secret).decode() not in text
        assert key.kid in text


def test_wrong_file_type_refused(tmp_path):
    mk = generate_model_key()
    path = mk.save(tmp_path / "model.key")
    with pytest.raises(ConfigError, match="expected a veilcam-data-key"):
        load_data_key(path)
    assert load_model_key(path).kid == mk.kid


def test_bad_kid_and_size_refused():
    with pytest.raises(ConfigError):
        DataKey(b"\0" * 16, "k")
    with pytest.raises(ConfigError):
        DataKey(b"\0" * 32, "a|b")


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_data_key(tmp_path / "nope.key")
    bad = tmp_path / "bad.key"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_data_key(bad)


def test_party_key_round_trip_and_signatures(tmp_path):
    pk = PartyKey.generate("data-owner", "city")
    path = pk.save(tmp_path / "do.key", passphrase="pw")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = PartyKey.load(path, "pw")
    assert loaded.public == pk.public
    pub_path = pk.public.save(tmp_path / "do.pub")
    pub = PartyPublic.load(pub_path)
    sig = loaded.sign(b"message")
    pub.verify(sig, b"message")
    with pytest.raises(IntegrityError):
        pub.verify(sig, b"messagf")
    assert json.loads(pub_path.read_text())["rid"] == pub.rid


def test_party_key_role_checked():
    with pytest.raises(ConfigError, match="role"):
        PartyKey.generate("admin", "x")


def test_x25519_exchange_agrees():
    a = PartyKey.generate("consumer", "a")
    b = PartyKey.generate("consumer", "b")
    assert a.exchange(b.public.kx_pub) == b.exchange(a.public.kx_pub)
