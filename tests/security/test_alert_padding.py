"""Alert lengths reveal nothing (issue 19.4): every label, score and ranking gives the same sizes.

Before padding, a `label` ciphertext was its length + 17 bytes, so a broker observer told `lying`
from `sitting_down`. Here every label of a realistic label map (1 to 64 bytes, ASCII and not) is
put through `build_alert`: each field's ciphertext has one length per field kind, the whole
envelope has one length, and consumers still decrypt the exact values.
"""

from __future__ import annotations

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.measured.alerts import build_alert
from enclave_bridge.shared.alert_format import ENVELOPE_BLOCK
from enclave_bridge.shared.keys import PartyKey, fingerprint, raw_public_bytes
from enclave_bridge.shared.policy import ALERT_FIELDS, Recipient

LABELS = ["a", "lying", "waving", "running", "fighting", "sitting_down", "falling", "émeute", "x" * 64]


@pytest.fixture(scope="module")
def parties():
    signer = Ed25519PrivateKey.generate()
    pub = raw_public_bytes(signer.public_key())
    c1, c2 = PartyKey.generate("consumer", "ops"), PartyKey.generate("consumer", "stats")
    recips = [
        Recipient("ops", c1.public.rid, c1.public.kx_pub, tuple(ALERT_FIELDS)),
        Recipient("stats", c2.public.rid, c2.public.kx_pub, ("label", "t1")),
    ]
    return signer, pub, c1, recips


def alert(parties, label: str, i: int) -> tuple[bytes, dict]:
    signer, pub, _, recips = parties
    others = [lb for lb in LABELS if lb != label][:4]
    fields = {
        "window_seq": 10 ** (i % 12),  # 1-byte to 9-byte msgpack ints
        "t0": float(i),
        "t1": float(i) + 30.0,
        "track_id": -1 if i % 2 else 70000 + i,
        "label": label,
        "score": 0.5 + i / 100,
        "topk": [[label, 0.9], *[[o, 0.02] for o in others]],
    }
    return build_alert("cam1", 7, 1.7e9, fields, recips, signer.sign, fingerprint(pub)), fields


def test_every_label_gives_the_same_lengths(parties) -> None:
    _, pub, c1, _ = parties
    sizes, field_sizes = set(), {f: set() for f in ALERT_FIELDS}
    for i, label in enumerate(LABELS):
        blob, fields = alert(parties, label, i)
        sizes.add(len(blob))
        cts = msgpack.unpackb(msgpack.unpackb(blob)["ct"])
        for f in ALERT_FIELDS:
            field_sizes[f].add(len(cts[f]))
        opened = AlertOpener(c1, pub).open(blob)
        assert {f: opened[f] for f in ALERT_FIELDS} == fields
    assert len(sizes) == 1, f"envelope lengths differ by label: {sorted(sizes)}"
    assert sizes.pop() % ENVELOPE_BLOCK == 0
    assert all(len(s) == 1 for s in field_sizes.values()), field_sizes
