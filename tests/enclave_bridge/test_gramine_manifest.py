"""Gramine-SGX packaging: structural checks (SGX hardware is not available here)."""

from __future__ import annotations

import struct
import tomllib
from pathlib import Path

import pytest
import yaml

from enclave_bridge.host.gramine import render_manifest
from enclave_bridge.measured.gramine_backend import (
    MRENCLAVE_OFFSET,
    REPORT_DATA_OFFSET,
    GramineBackend,
    parse_sgx_quote,
)
from enclave_bridge.shared.errors import AttestationError, ConfigError
from enclave_bridge.shared.measurement import PACKAGE_ROOT, enclave_files


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    p = tmp_path / "key.yaml"
    p.write_text(yaml.safe_dump({"role": "key", "backend": "gramine-sgx", "data_owner_pub": "A" * 43 + "="}))
    return p


def test_manifest_renders_and_lists_every_enclave_file(cfg_file):
    text = render_manifest(role="key", config=str(cfg_file), listen="127.0.0.1:7001", state_dir="/var/lib/vc")
    manifest = tomllib.loads(text)
    sgx = manifest["sgx"]
    assert sgx["remote_attestation"] == "dcap"
    assert sgx["debug"] is False
    trusted = set(sgx["trusted_files"])
    code = PACKAGE_ROOT.parent
    expected = {f"file:{code}/enclave_bridge/{rel}" for rel, _ in enclave_files()}
    assert expected <= trusted
    assert len(expected) >= 10
    assert f"file:{code}/enclave_bridge/gpu/worker.py" not in trusted
    assert not [f for f in trusted if "/enclave_bridge/host/" in f]
    assert f"file:{cfg_file.resolve()}" in trusted
    assert "allowed_files" not in sgx
    mounts = {m["path"]: m for m in manifest["fs"]["mounts"]}
    assert mounts["/state"] == {
        "type": "encrypted",
        "path": "/state",
        "uri": "file:/var/lib/vc",
        "key_name": "_sgx_mrenclave",
    }
    argv = manifest["loader"]["argv"]
    assert argv[1:3] == ["-m", "enclave_bridge.measured.enclave"]
    assert argv[argv.index("--role") + 1] == "key"
    assert argv[argv.index("--listen") + 1] == "127.0.0.1:7001"


def test_manifest_refuses_unix_socket_and_bad_role(cfg_file):
    with pytest.raises(ConfigError, match="TCP"):
        render_manifest(role="eval", config=str(cfg_file), listen="unix:/tmp/x.sock", state_dir="/s")
    with pytest.raises(ConfigError):
        render_manifest(role="gpu", config=str(cfg_file), listen="127.0.0.1:1", state_dir="/s")


def _fake_quote(mrenclave: bytes, report_data: bytes, version: int = 3) -> bytes:
    q = bytearray(48 + 384 + 64)
    struct.pack_into("<HH", q, 0, version, 2)
    q[MRENCLAVE_OFFSET : MRENCLAVE_OFFSET + 32] = mrenclave
    q[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + 64] = report_data
    return bytes(q)


def test_quote_layout_parser():
    mr, rd = bytes(range(32)), bytes(range(64, 128))
    got_mr, _, got_rd = parse_sgx_quote(_fake_quote(mr, rd))
    assert (got_mr, got_rd) == (mr, rd)
    with pytest.raises(AttestationError, match="too short"):
        parse_sgx_quote(b"\x03\x00\x02\x00" + bytes(100))
    with pytest.raises(AttestationError, match="version"):
        parse_sgx_quote(_fake_quote(mr, rd, version=9))


def test_backend_refuses_outside_gramine(tmp_path):
    with pytest.raises(ConfigError, match="only runs inside a Gramine SGX enclave"):
        GramineBackend(tmp_path / "no-attestation")
    (tmp_path / "attestation_type").write_text("none")
    with pytest.raises(ConfigError, match="dcap"):
        GramineBackend(tmp_path)


@pytest.mark.sgx
def test_real_dev_attestation():
    if not Path("/dev/attestation/quote").exists():
        pytest.skip("needs Gramine-SGX with DCAP (/dev/attestation)")
    b = GramineBackend()
    assert len(b.measurement()) == 32
    assert len(b.sealing_key()) == 32
