"""Forged, mutated and replayed alert envelopes at the consumer (`AlertOpener` + the subscriber's
dedupe): no mutation of a genuine envelope is ever delivered as a new alert, and none opens to
content other than the genuine one."""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.broker import BrokerConfig
from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.measured.alerts import build_alert
from enclave_bridge.shared.errors import IntegrityError
from enclave_bridge.shared.keys import PartyKey, fingerprint
from enclave_bridge.shared.policy import ALERT_FIELDS, Recipient
from pipeline.app.subscriber import AlertSubscriber

SIGNER = PartyKey.generate("data-owner", "enclave-signer")
ME = PartyKey.generate("consumer", "ops")
OTHER = PartyKey.generate("consumer", "stats")
RECIPIENTS = [
    Recipient("ops", ME.public.rid, ME.public.kx_pub, tuple(ALERT_FIELDS)),
    Recipient("stats", OTHER.public.rid, OTHER.public.kx_pub, ("label",)),
]
FIELDS = {
    "window_seq": 9,
    "t0": 1.0,
    "t1": 11.0,
    "track_id": 7,
    "label": "fall",
    "score": 0.93,
    "topk": [["fall", 0.93], ["walk", 0.05]],
}


def genuine(seq: int = 1, device: str = "cam1") -> bytes:
    return build_alert(
        device,
        seq,
        1_700_000_000.0 + seq,
        FIELDS,
        RECIPIENTS,
        SIGNER.sign,
        fingerprint(SIGNER.public.sign_pub),
    )


def opener() -> AlertOpener:
    return AlertOpener(ME, SIGNER.public.sign_pub)


GENUINE = genuine()
OPENED = opener().open(GENUINE)

_byte_mutation = st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from(["set", "xor", "cut", "dup"])),
    min_size=1,
    max_size=3,
)


def _mutate(blob: bytes, muts: list[tuple[int, int, str]]) -> bytes:
    b = bytearray(blob)
    for pos, val, kind in muts:
        i = pos % len(b)
        if kind == "set":
            b[i] = val
        elif kind == "xor":
            b[i] ^= val or 1
        elif kind == "cut":
            del b[i : i + 1 + val % 16]
        else:
            b[i:i] = b[i : i + 1 + val % 16]
        if not b:
            b = bytearray(b"\0")
    return bytes(b)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(_byte_mutation)
def test_byte_mutations_rejected_or_identical(muts: list[tuple[int, int, str]]) -> None:
    bad = _mutate(GENUINE, muts)
    try:
        got = opener().open(bad)
    except IntegrityError:
        return
    assert got == OPENED  # only a re-encoding of the very same signed values can open


_field_changes = st.fixed_dictionaries(
    {},
    optional={
        "device": st.sampled_from(["cam2", "", "cam1 "]),
        "seq": st.sampled_from([0, 2, 2**40]),
        "ts": st.floats(allow_nan=False),
        "kid": st.text(max_size=20),
        "nonce": st.binary(min_size=12, max_size=12),
        "recipients": st.sampled_from([[], "swap", "drop-mine", "dup"]),
        "ct": st.binary(max_size=40),
        "sig": st.binary(min_size=64, max_size=64),
        "v": st.integers(0, 3),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_field_changes)
def test_field_substitutions_never_open_to_other_content(changes: dict) -> None:
    env = msgpack.unpackb(GENUINE, raw=False)
    rec = changes.pop("recipients", None)
    if rec == "swap":
        changes["recipients"] = list(reversed(env["recipients"]))
    elif rec == "drop-mine":
        changes["recipients"] = [r for r in env["recipients"] if r["rid"] != ME.public.rid]
    elif rec == "dup":
        changes["recipients"] = env["recipients"] * 2
    elif rec == []:
        changes["recipients"] = []
    forged = msgpack.packb({**env, **changes}, use_bin_type=True)
    try:
        got = opener().open(forged)
    except IntegrityError:
        return
    assert got == OPENED  # e.g. a "change" to the value the field already had


def test_subscriber_drops_every_mutation_and_replay_after_the_genuine_alert() -> None:
    """A stream: the genuine alert, then mutations/replays of it, then the next genuine one."""
    got: list[dict] = []
    sub = AlertSubscriber(BrokerConfig(), opener(), got.append)
    assert sub.handle("veilcam/cam1/alerts", GENUINE) is not None
    hostile = [
        GENUINE,
        GENUINE,
        genuine(1, "cam2"),
        msgpack.packb(msgpack.unpackb(GENUINE), use_bin_type=False),
    ]
    hostile += [_mutate(GENUINE, [(i * 37, i, "xor")]) for i in range(1, 120)]
    for blob in hostile:
        assert sub.handle("veilcam/cam1/alerts", blob) is None
    # the same genuine cam1 alert re-published on another device's topic
    assert sub.handle("veilcam/cam2/alerts", GENUINE) is None
    assert sub.handle("veilcam/cam1/alerts", genuine(2)) is not None
    s = sub.stats
    assert s.delivered == 2 and s.received == len(hostile) + 3
    assert s.duplicates + s.rejected_forged + s.rejected_replayed == len(hostile) + 1
    sub.seen.close()
