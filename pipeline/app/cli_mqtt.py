"""MQTT-area subcommands: `veilcam subscribe` (alert consumer), `veilcam broker` (a local broker
for trials) and `veilcam demo` (one-command tour).

Secrets follow the project's CLI rule: key files are 0600 files, their passphrase comes from
`--passphrase-file` or `$VEILCAM_PASSPHRASE`, the broker password from a file or an environment
variable — never from argv.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this area's subcommands to the `veilcam` parser."""
    p = sub.add_parser(
        "subscribe",
        help="consume alerts: verify the enclave signature, decrypt, drop duplicates, print",
        description="Subscribe to <prefix>/<device>/alerts, open every alert with your consumer key "
        "and the enclave's attested signing key, drop duplicates by (device, seq), print lines or JSON.",
    )
    p.add_argument("--broker", required=True, metavar="HOST:PORT", help="MQTT broker address")
    p.add_argument("--consumer-key", required=True, type=Path, help="your party key (veilcam keygen)")
    p.add_argument(
        "--passphrase-file", help="passphrase of the consumer key (default: $VEILCAM_PASSPHRASE, else none)"
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--enclave-evidence",
        type=Path,
        action="append",
        help="verified evidence of the evaluation enclave (veilcam attest --evidence-out FILE); repeat it "
        "once per enclave of an enclave pool (alerts signed by any of them open)",
    )
    who.add_argument(
        "--evidence-from-broker",
        action="store_true",
        help="use the evidence the daemon retains on <prefix>/<device>/enclave (checked, max 5 min old)",
    )
    who.add_argument(
        "--signer-pub",
        type=Path,
        help="development only: public (or key) file of the in-process local evaluator's signing key",
    )
    p.add_argument("--platform-pub", type=Path, help="pinned platform public key (with --enclave-evidence)")
    p.add_argument("--measurement", action="append", help="allowed enclave measurement (hex); repeatable")
    p.add_argument(
        "--allow-config", action="append", help="allow the measurement of this enclave config; repeatable"
    )
    p.add_argument("--device", default="+", help="one device id, or + for all (default)")
    p.add_argument("--topic-prefix", default="veilcam")
    p.add_argument("--json", action="store_true", help="one JSON object per alert (and stats at the end)")
    p.add_argument("--count", type=int, help="exit after this many alerts")
    p.add_argument("--timeout-s", type=float, help="exit after this many seconds")
    p.add_argument("--client-id", default="", help="fixed MQTT client id (needed with --persistent)")
    p.add_argument(
        "--persistent", action="store_true", help="keep a broker session: alerts wait for you while away"
    )
    p.add_argument("--state", type=Path, help="SQLite file remembering seen (device, seq) across restarts")
    p.add_argument(
        "--share",
        metavar="GROUP",
        help="join the MQTT 5 shared subscription $share/GROUP/<prefix>/<device>/alerts: consumers of one "
        "group split the alerts between them (needs an MQTT 5 broker, e.g. Mosquitto 2)",
    )
    p.add_argument(
        "--max-age-s",
        type=float,
        help="reject alerts whose enclave time is further than this from now "
        "(default: 300 without --state, off with it; 0 = off)",
    )
    p.add_argument("--username", help="MQTT user name")
    p.add_argument("--password-file", type=Path, help="file holding the MQTT password")
    p.add_argument("--ca-file", type=Path, help="CA bundle for TLS to the broker")
    p.add_argument(
        "--wait",
        action="store_true",
        help="keep retrying while the broker is unreachable (default: exit 1 after connect_timeout 10 s)",
    )
    p.set_defaults(func=cmd_subscribe)

    p = sub.add_parser(
        "broker",
        help="run a local MQTT broker for trials: Mosquitto if installed, else the embedded one",
        description="Runs a broker in the foreground on HOST:PORT (anonymous, no TLS: for trials and "
        "`veilcam run` on one machine) and prints its address; Ctrl-C or SIGTERM stops it. Production "
        "runs its own broker with TLS and ACLs (README, 'Alerts over MQTT').",
    )
    p.add_argument("--port", type=int, default=1883, help="TCP port (default 1883)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument(
        "--kind",
        default="auto",
        choices=("auto", "mosquitto", "embedded"),
        help="auto = Mosquitto if installed and working, else the embedded (amqtt, MQTT 3.1.1) one",
    )
    p.add_argument("--workdir", type=Path, help="keep the broker's config and log here (default: temp dir)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser(
        "demo",
        help="one command: throw-away keys, broker, enclave, GPU worker, replay a sample clip, print alerts",
        description="Runs the whole system on this machine with throw-away keys in a temp dir and prints "
        "the decrypted alerts as a subscriber sees them. Uses the same public commands as a deployment.",
    )
    p.add_argument("--clip", type=Path, help="video to replay (default: the shipped samples/vtest.avi)")
    p.add_argument(
        "--max-frames",
        type=int,
        default=40,
        help="replay this many frames (default 40 = 4 s of the clip, two 30-frame windows; 0 = whole clip)",
    )
    p.add_argument(
        "--broker", default="auto", choices=("auto", "mosquitto", "embedded"), help="local broker to start"
    )
    p.add_argument(
        "--mode",
        default="paper",
        choices=("paper", "slalom", "split2", "split3", "enclave"),
        help="secure-eval mode (split2/split3 start 2/3 GPU-worker processes)",
    )
    p.add_argument(
        "--keep", type=Path, help="keep the keys/state/logs in this directory instead of a temp dir"
    )
    p.add_argument("--min-score", type=float, default=0.0, help="alert threshold for the demo rules")
    p.add_argument(
        "--crop",
        type=int,
        nargs=4,
        metavar=("X", "Y", "W", "H"),
        help="region of interest of the clip (e.g. 320 0 320 240: the RGB half of the shared fall clip)",
    )
    p.add_argument("--json", action="store_true", help="print alerts as JSON lines")
    p.set_defaults(func=cmd_demo)


def _broker_cfg(args: argparse.Namespace) -> Any:
    from config.broker import BrokerConfig, TLSConfig

    kw: dict[str, Any] = {"topic_prefix": args.topic_prefix}
    if args.username:
        kw["username"] = args.username
    if args.password_file:
        kw["password_file"] = args.password_file
    if args.ca_file:
        kw["tls"] = TLSConfig(ca_file=args.ca_file)
    return BrokerConfig.from_address(args.broker, **kw)


def build_opener(args: argparse.Namespace) -> Any:
    """Consumer key + the enclave's signing key (from verified evidence, or a dev signer file)."""
    from enclave_bridge.host.alert_opener import AlertOpener
    from enclave_bridge.measured.enclave import load_enclave_config
    from enclave_bridge.shared.attest import load_platform_pub
    from enclave_bridge.shared.errors import ConfigError, TransportError, VeilcamError
    from enclave_bridge.shared.keys import PartyKey, PartyPublic, resolve_passphrase
    from enclave_bridge.shared.measurement import compute_measurement
    from pipeline.app.subscriber import verify_key_from_evidence

    consumer = PartyKey.load(args.consumer_key, resolve_passphrase(args.passphrase_file))
    if args.enclave_evidence is not None or args.evidence_from_broker:
        if args.platform_pub is None:
            raise ConfigError("enclave evidence needs --platform-pub (the pinned platform key)")
        allowed = [m.lower() for m in args.measurement or []]
        allowed += [compute_measurement(load_enclave_config(c, "eval")) for c in args.allow_config or []]
        if not allowed:
            raise ConfigError(
                "give the allowed measurement(s): --measurement HEX or --allow-config enclave.yaml"
            )
        max_age_s: float | None = None
        blobs: list[bytes] = []
        if args.enclave_evidence is not None:
            for path in args.enclave_evidence:
                try:
                    blobs.append(path.read_bytes())
                except OSError as e:
                    raise ConfigError(f"--enclave-evidence {path}: {e.strerror}") from e
        else:
            from pipeline.app.subscriber import fetch_retained

            cfg = _broker_cfg(args)
            give_up = None if args.timeout_s is None else time.monotonic() + args.timeout_s
            while True:  # with --wait, a broker (or daemon) still starting is waited for
                try:
                    topic, blob = fetch_retained(cfg, cfg.topic(args.device, "enclave"))
                    break
                except TransportError as e:
                    if not args.wait or (give_up is not None and time.monotonic() >= give_up):
                        raise
                    log.warning("enclave evidence not available yet (%s); retrying in 2 s", e)
                    time.sleep(2.0)
            log.info("enclave evidence from %s", topic)
            max_age_s = 300.0  # not an answer to our nonce: freshness by the evidence timestamp
            blobs.append(blob)
        platform_pub = load_platform_pub(args.platform_pub)
        keys = [verify_key_from_evidence(b, platform_pub, allowed, max_age_s) for b in blobs]
        if len(keys) > 1:  # an enclave pool: each alert opens with the key of the enclave that signed it
            from pipeline.app.subscriber import PoolOpener

            return PoolOpener(consumer, keys)
        verify_key = keys[0]
    else:
        try:
            verify_key = PartyPublic.load(args.signer_pub).sign_pub
        except VeilcamError:
            verify_key = PartyKey.load(args.signer_pub).public.sign_pub
        log.warning("alerts are checked against a local-evaluator key (development only: no attestation)")
    return AlertOpener(consumer, verify_key)


def freshness_window(max_age_s: float | None, state: Path | None) -> float | None:
    """`--max-age-s`, else 5 min when there is no `--state` (nothing else stops an old genuine alert
    re-published later); 0 turns the check off."""
    if max_age_s is None:
        return None if state is not None else 300.0
    return max_age_s if max_age_s > 0 else None


def cmd_subscribe(args: argparse.Namespace) -> int:
    """Exit 0 after `--count`/`--timeout-s`/a signal; 1 when this key has no grant in the policy or
    (without `--wait`) the broker cannot be reached — a consumer that would silently print nothing
    must not look like one that is working."""
    from enclave_bridge.shared.errors import TransportError
    from pipeline.app.subscriber import AlertSubscriber, alert_json, format_alert, stats_json

    cfg = _broker_cfg(args)
    opener = build_opener(args)
    done = threading.Event()
    delivered = 0
    lock = threading.Lock()

    def on_alert(alert: dict[str, Any]) -> None:
        nonlocal delivered
        line = alert_json(alert) if args.json else format_alert(alert)
        with lock:
            print(line, flush=True)
            delivered += 1
            if args.count is not None and delivered >= args.count:
                done.set()

    sub = AlertSubscriber(
        cfg,
        opener,
        on_alert,
        device=args.device,
        state_path=args.state,
        client_id=args.client_id,
        persistent=args.persistent,
        max_age_s=freshness_window(args.max_age_s, args.state),
        share_group=args.share,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    sub.start()
    deadline = None if args.timeout_s is None else time.monotonic() + args.timeout_s
    connect_by = time.monotonic() + cfg.connect_timeout_s
    announced = False
    while not (done.is_set() or sub.no_grant.is_set()):
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        if not announced and sub.subscribed.is_set():
            announced = True
            print(f"# subscribed to {sub.topic} on {args.broker}", file=sys.stderr, flush=True)
        if not announced and not args.wait and (sub.connect_failed.is_set() or now >= connect_by):
            break
        done.wait(0.1)
    sub.stop()
    if not sub.subscribed.is_set() and not args.wait and not done.is_set():
        why = sub.connect_error or f"no answer within {cfg.connect_timeout_s:.0f} s"
        raise TransportError(f"broker {args.broker}: {why} (add --wait to keep retrying)")
    st = sub.stats
    if args.json:
        print(stats_json(st), flush=True)
    print(
        f"# {st.delivered} alert(s), {st.duplicates} duplicate(s) dropped, "
        f"{st.rejected_forged} forged and {st.rejected_replayed} replayed rejected"
        + (f", {st.rejected_no_grant} without a grant for this key" if st.rejected_no_grant else "")
        + (f", {st.rejected_stale} outside the freshness window" if st.rejected_stale else ""),
        file=sys.stderr,
    )
    if sub.no_grant.is_set():
        print(
            f"veilcam: error: this key has no grant in the policy: alerts signed by the attested enclave "
            f"carry no field for {args.consumer_key} (ask both owners to add its .pub to the policy)",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from pipeline.broker import serve_broker

    return serve_broker(args.kind, args.host, args.port, args.workdir)


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.app.demo import run_demo

    return run_demo(
        clip=args.clip,
        max_frames=args.max_frames,
        broker_kind=args.broker,
        mode=args.mode,
        keep_dir=args.keep,
        min_score=args.min_score,
        crop=tuple(args.crop) if args.crop else None,
        as_json=args.json,
        out=sys.stdout,
    )
