"""Model packages: encrypt/decrypt round trip equals the original model; wrong key, tampering, CLI."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
import torch

from enclave_bridge.host.packaging import package_model
from enclave_bridge.measured.model_package import open_package, package_kid
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.errors import CheckpointError, ConfigError, IntegrityError
from enclave_bridge.shared.keys import ModelKey, generate_model_key, load_model_key
from pipeline.app.cli import main
from tests.enclave_bridge.test_enclave_service_support import LABELS, write_small_model


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_small_model(tmp_path_factory.mktemp("model"))


def test_round_trip_matches_original(model_files, tmp_path):
    ckpt, labels, meta = model_files
    key = generate_model_key("mk-a")
    out = package_model(ckpt, labels, json.loads(meta.read_text()), key, tmp_path / "m.vcpkg")
    blob = out.read_bytes()
    assert package_kid(blob) == "mk-a"
    raw = torch.load(ckpt, weights_only=True)["fcn.weight"].numpy().tobytes()
    assert raw[:64] not in blob  # weights are not in the clear
    bundle = open_package(blob, key)
    assert bundle.labels == LABELS and bundle.meta["T"] == 16
    assert "tensor" in repr(bundle) and "0." not in repr(bundle)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 16, 18, 1)).astype(np.float32))
    original = STGCN.from_checkpoint(ckpt).eval()
    with torch.no_grad():
        np.testing.assert_allclose(bundle.build_model()(x).numpy(), original(x).numpy(), rtol=0, atol=0)


def test_wrong_key_and_tampering(model_files, tmp_path):
    ckpt, labels, meta = model_files
    key = generate_model_key("mk-a")
    blob = package_model(ckpt, labels, json.loads(meta.read_text()), key, tmp_path / "m.vcpkg").read_bytes()
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_package(blob, ModelKey(generate_model_key().export_secret(), "mk-a"))
    with pytest.raises(IntegrityError, match="not"):
        open_package(blob, generate_model_key("mk-b"))
    doc = msgpack.unpackb(blob)
    doc["ct"] = doc["ct"][:100] + bytes([doc["ct"][100] ^ 1]) + doc["ct"][101:]
    with pytest.raises(IntegrityError):
        open_package(msgpack.packb(doc), key)
    with pytest.raises(IntegrityError):
        open_package(b"not a package", key)


def test_metadata_and_checkpoint_checks(model_files, tmp_path):
    ckpt, labels, _ = model_files
    key = generate_model_key()
    with pytest.raises(ConfigError, match="label map has 4"):
        package_model(ckpt, labels, {"num_class": 5}, key, tmp_path / "x")
    bad = tmp_path / "bad.pt"
    torch.save({"fcn.weight": torch.zeros(4, 256, 1, 1)}, bad)
    with pytest.raises(CheckpointError):
        package_model(bad, labels, {"num_class": 4}, key, tmp_path / "x")


def test_cli_model_package(model_files, tmp_path, capsys):
    ckpt, labels, meta = model_files
    args = [
        "model",
        "package",
        "--checkpoint",
        str(ckpt),
        "--labels",
        str(labels),
        "--meta",
        str(meta),
        "--model-key",
        str(tmp_path / "mk.key"),
        "--kid",
        "mk-cli",
        "--out",
        str(tmp_path / "m.vcpkg"),
    ]
    assert main(args) == 0
    key = load_model_key(tmp_path / "mk.key")
    assert key.kid == "mk-cli"
    assert open_package((tmp_path / "m.vcpkg").read_bytes(), key).labels == LABELS
    out = capsys.readouterr().out
    assert key.export_secret().hex() not in out
