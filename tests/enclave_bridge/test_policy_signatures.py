"""Access policies: both owners sign; tampering, a missing signature or a wrong signer is refused."""

from __future__ import annotations

import copy
import json

import pytest

from enclave_bridge.shared.errors import ConfigError, IntegrityError
from enclave_bridge.shared.keys import PartyKey
from enclave_bridge.shared.policy import create_policy, sign_policy, verify_policy
from pipeline.app.cli import main


@pytest.fixture
def parties():
    return (
        PartyKey.generate("data-owner", "city"),
        PartyKey.generate("model-owner", "vendor"),
        PartyKey.generate("consumer", "c1"),
        PartyKey.generate("consumer", "c2"),
    )


def _signed(parties, **kw):
    do, mo, c1, c2 = parties
    doc = create_policy([(c1.public, ["label", "score"]), (c2.public, ["t0", "t1"])], **kw)
    return sign_policy(sign_policy(doc, do), mo)


def test_sign_and_verify(parties):
    do, mo, c1, c2 = parties
    pol = verify_policy(_signed(parties, version=4), do.public.sign_pub, mo.public.sign_pub)
    assert pol.version == 4
    assert [(r.rid, r.fields) for r in pol.recipients] == [
        (c1.public.rid, ("label", "score")),
        (c2.public.rid, ("t0", "t1")),
    ]
    assert pol.rules_for("cam1") is None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["body"]["recipients"][1].__setitem__("fields", ["label", "score", "topk"]),
        lambda d: d["body"].__setitem__("version", 99),
        lambda d: d["body"]["recipients"].pop(0),
        lambda d: d["body"].__setitem__("rules", {"*": {"labels": ["*"]}}),
    ],
)
def test_tampering_detected(parties, mutate):
    do, mo, *_ = parties
    doc = copy.deepcopy(_signed(parties))
    mutate(doc)
    with pytest.raises(IntegrityError, match="signature"):
        verify_policy(doc, do.public.sign_pub, mo.public.sign_pub)


def test_swapped_recipient_key_detected_even_if_resigned(parties):
    """A recipient whose rid does not match its key is refused (no silent redirection)."""
    do, mo, c1, c2 = parties
    doc = create_policy([(c1.public, ["label"])])
    doc["body"]["recipients"][0]["kx_pub"] = create_policy([(c2.public, ["label"])])["body"]["recipients"][0][
        "kx_pub"
    ]
    doc = sign_policy(sign_policy(doc, do), mo)
    with pytest.raises(IntegrityError, match="inconsistent"):
        verify_policy(doc, do.public.sign_pub, mo.public.sign_pub)


def test_missing_or_wrong_signer(parties):
    do, mo, c1, _ = parties
    only_do = sign_policy(create_policy([(c1.public, ["label"])]), do)
    with pytest.raises(IntegrityError, match="model-owner"):
        verify_policy(only_do, do.public.sign_pub, mo.public.sign_pub)
    other_mo = PartyKey.generate("model-owner", "other")
    doc = sign_policy(only_do, other_mo)
    with pytest.raises(IntegrityError, match="model-owner signature"):
        verify_policy(doc, do.public.sign_pub, mo.public.sign_pub)
    with pytest.raises(ConfigError, match="signed by"):
        sign_policy(only_do, c1)


def test_create_validation(parties):
    _, _, c1, _ = parties
    with pytest.raises(ConfigError, match="subset"):
        create_policy([(c1.public, ["label", "skeleton"])])
    with pytest.raises(ConfigError):
        create_policy([])
    with pytest.raises(ConfigError, match="labels"):
        create_policy([(c1.public, ["label"])], rules={"*": {"labels": []}})


def test_policy_rules_per_device(parties):
    do, mo, *_ = parties
    doc = _signed(parties, rules={"cam1": {"labels": ["fall"], "min_score": 0.7}, "*": {"labels": ["*"]}})
    pol = verify_policy(doc, do.public.sign_pub, mo.public.sign_pub)
    assert pol.rules_for("cam1").labels == ("fall",) and pol.rules_for("cam1").min_score == 0.7
    assert pol.rules_for("cam2").labels == ("*",)


def test_cli_create_sign_verify(tmp_path, capsys):
    d = tmp_path
    for role, name in (("data-owner", "do"), ("model-owner", "mo"), ("consumer", "c1")):
        assert main(["keygen", "--role", role, "--out", str(d / name)]) == 0
    pol = d / "policy.json"
    assert main(["policy", "create", "--recipient", f"{d / 'c1.pub'}=label,score", "--out", str(pol)]) == 0
    verify = [
        "policy",
        "verify",
        "--policy",
        str(pol),
        "--data-owner-pub",
        str(d / "do.pub"),
        "--model-owner-pub",
        str(d / "mo.pub"),
    ]
    assert main(verify) == 1  # unsigned
    assert main(["policy", "sign", "--policy", str(pol), "--key", str(d / "do.key")]) == 0
    assert main(["policy", "sign", "--policy", str(pol), "--key", str(d / "mo.key")]) == 0
    assert main(verify) == 0
    assert "c1" in capsys.readouterr().out
    doc = json.loads(pol.read_text())
    doc["body"]["recipients"][0]["fields"].append("topk")
    pol.write_text(json.dumps(doc))
    assert main(verify) == 1
    assert "signature" in capsys.readouterr().err
