"""Key objects and key files: round trips, 0600 permissions, passphrases, no key bytes in repr."""

from __future__ import annotations

import base64
import json
import stat

import pytest

from enclave_bridge.shared.errors import ConfigError, IntegrityError
from enclave_bridge.shared.keys import (
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


def test_cli_keygen_roles_rotation_and_passphrase(tmp_path, monkeypatch, capsys):
    from pipeline.app.cli import main

    assert main(["keygen", "--role", "data-owner", "--out", str(tmp_path / "city")]) == 0
    for name in ("city.key", "city.data.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    pub = PartyPublic.load(tmp_path / "city.pub")
    assert (pub.role, pub.name) == ("data-owner", "city")
    first = load_data_key(tmp_path / "city.data.key")
    assert main(["keygen", "--role", "data-owner", "--out", str(tmp_path / "city")]) == 1  # no overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["keygen", "--data-key", str(tmp_path / "dk2.key"), "--kid", "dk-2"]) == 0
    second = load_data_key(tmp_path / "dk2.key")
    assert second.kid == "dk-2" and second.export_secret() != first.export_secret()
    monkeypatch.setenv("VEILCAM_PASSPHRASE", "s3cret")
    assert main(["keygen", "--role", "consumer", "--out", str(tmp_path / "c1")]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in (tmp_path / "c1.key").read_text() and "s3cret" not in out
    assert PartyKey.load(tmp_path / "c1.key", "s3cret").role == "consumer"
    with pytest.raises(ConfigError, match="passphrase-protected"):
        PartyKey.load(tmp_path / "c1.key")
    with pytest.raises(SystemExit):  # argparse refuses unknown roles
        main(["keygen", "--role", "admin", "--out", str(tmp_path / "x")])
