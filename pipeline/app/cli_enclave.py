"""Enclave-area subcommands: platform, keygen, model package, enclave configs and services,
provisioning (model, data key, policy), access policies and `attest`.

Every command that handles a secret reads it from a 0600 file (passphrase from `--passphrase-file`
or `$VEILCAM_PASSPHRASE`), never from argv, and prints only ids/fingerprints.

Why one module of ~500 lines: the enclave-side CLI commands (platform, measure, enclave,
key-enclave, provision, policy) share argument helpers and error reporting.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _pass(args: argparse.Namespace) -> str | None:
    from enclave_bridge.shared.keys import resolve_passphrase

    return resolve_passphrase(getattr(args, "passphrase_file", None))


def _add_pass(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--passphrase-file",
        help="file whose first line is the key-file passphrase (default: $VEILCAM_PASSPHRASE, else none)",
    )


# ---------------------------------------------------------------------------------------------
# platform, keys
# ---------------------------------------------------------------------------------------------


def cmd_platform_init(args: argparse.Namespace) -> int:
    from enclave_bridge.shared.attest import PlatformKey
    from enclave_bridge.shared.errors import ConfigError

    target = Path(args.dir) / "platform.key"
    if target.exists() and not args.force:
        raise ConfigError(f"{target} exists (use --force to replace it; sealed enclave state will be lost)")
    plat = PlatformKey.generate()
    key_path, pub_path = plat.save(args.dir)
    print(f"platform {plat.platform_id}: private {key_path} (0600), public {pub_path}")
    print("SIMULATED platform: give platform.pub to verifiers; keep platform.key on the enclave host only.")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from enclave_bridge.shared.errors import ConfigError
    from enclave_bridge.shared.keys import PartyKey, generate_data_key

    pw = _pass(args)
    if args.data_key:
        dk = generate_data_key(args.kid)
        path = dk.save(args.data_key, pw)
        print(f"data key {dk.kid}: {path} (0600)")
        return 0
    if not args.role or not args.out:
        raise ConfigError("keygen: give --role and --out (or --data-key FILE for a new data key)")
    out = Path(args.out)
    key_path, pub_path = out.with_suffix(".key"), out.with_suffix(".pub")
    if key_path.exists() and not args.force:
        raise ConfigError(f"{key_path} exists (use --force to overwrite)")
    pk = PartyKey.generate(args.role, args.name or out.name)
    pk.save(key_path, pw)
    pk.public.save(pub_path)
    print(f"{args.role} {pk.name!r}: private {key_path} (0600), public {pub_path}")
    print(f"  signer id {pk.public.signer_id}, recipient id {pk.public.rid}")
    if args.role == "data-owner":
        dk = generate_data_key(args.kid)
        dk_path = dk.save(out.with_suffix(".data.key"), pw)
        print(f"  data key {dk.kid}: {dk_path} (0600) — the capture host's window key")
    return 0


# ---------------------------------------------------------------------------------------------
# model package
# ---------------------------------------------------------------------------------------------


def cmd_model_package(args: argparse.Namespace) -> int:
    from enclave_bridge.host.packaging import package_model
    from enclave_bridge.shared.errors import ConfigError
    from enclave_bridge.shared.keys import generate_model_key, load_model_key

    pw = _pass(args)
    key_path = Path(args.model_key)
    if key_path.exists():
        mk = load_model_key(key_path, pw)
    else:
        mk = generate_model_key(args.kid)
        mk.save(key_path, pw)
        print(f"new model key {mk.kid}: {key_path} (0600)")
    try:
        meta = json.loads(Path(args.meta).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{args.meta}: cannot read model metadata JSON ({type(e).__name__})") from e
    out = package_model(args.checkpoint, args.labels, meta, mk, args.out)
    print(f"model package {out} ({out.stat().st_size} bytes), encrypted under model key {mk.kid}")
    return 0


# ---------------------------------------------------------------------------------------------
# enclave configs and services
# ---------------------------------------------------------------------------------------------


def _sign_pub_b64(pub_path: str, role: str) -> str:
    from enclave_bridge.shared.errors import ConfigError
    from enclave_bridge.shared.keys import PartyPublic, b64e

    pub = PartyPublic.load(pub_path)
    if pub.role != role:
        raise ConfigError(f"{pub_path}: expected a {role} public key, got {pub.role}")
    return b64e(pub.sign_pub)


def cmd_enclave_config(args: argparse.Namespace) -> int:
    import yaml

    from enclave_bridge.measured.enclave import validate_enclave_config
    from enclave_bridge.shared.measurement import compute_measurement

    cfg: dict[str, Any] = {
        "role": args.role,
        "backend": args.backend,
        "data_owner_pub": _sign_pub_b64(args.data_owner_pub, "data-owner"),
    }
    if args.role == "eval":
        from enclave_bridge.shared.errors import ConfigError

        if not args.model_owner_pub or not args.key_enclave:
            raise ConfigError("--role eval needs --model-owner-pub and --key-enclave")
        cfg["model_owner_pub"] = _sign_pub_b64(args.model_owner_pub, "model-owner")
        cfg["key_enclave"] = {"address": args.key_enclave, "measurements": list(args.key_measurement or [])}
        cfg["evaluator"] = {"mode": args.mode, "worker": args.worker}
        if args.workers:
            cfg["evaluator"]["workers"] = list(args.workers)
        if args.act_limbs is not None:
            cfg["evaluator"]["act_limbs"] = args.act_limbs
        cfg["topk"] = args.topk
    validate_enclave_config(cfg, args.role)
    Path(args.out).write_text(yaml.safe_dump(cfg, sort_keys=True), encoding="utf-8")
    print(f"{args.role} enclave config {args.out}; measurement {compute_measurement(cfg)}")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    import yaml

    from enclave_bridge.measured.enclave import load_enclave_config
    from enclave_bridge.shared.measurement import compute_measurement, file_digests

    raw = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    role = raw.get("role") if isinstance(raw, dict) else None
    cfg = load_enclave_config(args.config, str(role))
    if args.files:
        for rel, digest in file_digests():
            print(f"{digest}  {rel}")
    print(compute_measurement(cfg))
    return 0


def cmd_enclave(args: argparse.Namespace) -> int:
    import enclave_bridge.protocol  # noqa: F401 - the simulated host wires worker=None to an in-process worker
    from enclave_bridge.measured.enclave import run_enclave

    return run_enclave(args.config, args.state_dir, args.listen, args.platform_key, args.policy)


def cmd_key_enclave(args: argparse.Namespace) -> int:
    from enclave_bridge.measured.keyenclave import run_key_enclave

    return run_key_enclave(args.config, args.state_dir, args.listen, args.platform_key)


# ---------------------------------------------------------------------------------------------
# attestation and provisioning
# ---------------------------------------------------------------------------------------------


def _verifier(args: argparse.Namespace, role: str) -> Any:
    from enclave_bridge.measured.enclave import load_enclave_config
    from enclave_bridge.shared.attest import Verifier, load_platform_pub
    from enclave_bridge.shared.errors import ConfigError
    from enclave_bridge.shared.measurement import compute_measurement

    allowed = [m.lower() for m in (args.measurement or [])]
    allowed += [
        compute_measurement(load_enclave_config(c, role)) for c in getattr(args, "allow_config", None) or []
    ]
    if not allowed and not getattr(args, "any_measurement", False):
        raise ConfigError("give the allowed measurement(s): --measurement HEX or --allow-config enclave.yaml")
    return Verifier(load_platform_pub(args.platform_pub), allowed or None, role=role)


def _add_verifier_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform-pub", required=True, help="pinned platform public key (platform.pub)")
    p.add_argument("--measurement", action="append", help="allowed enclave measurement (hex); repeatable")
    p.add_argument(
        "--allow-config",
        action="append",
        help="allow the measurement of this enclave config with the code installed here; repeatable",
    )


def cmd_attest(args: argparse.Namespace) -> int:
    from enclave_bridge.host.client import _Rpc
    from enclave_bridge.shared.attest import evidence_to_json, new_nonce
    from enclave_bridge.shared.errors import AttestationError

    verifier = _verifier(args, args.role)
    nonce = new_nonce()
    rpc = _Rpc(args.enclave, 30.0)
    try:
        ev = rpc.call("evidence", nonce=nonce, kind="quote")["evidence"]
    finally:
        rpc.close()
    printable = evidence_to_json(ev)
    printable.pop("quote", None)
    try:
        v = verifier.verify(ev, nonce)
    except AttestationError as e:
        print(json.dumps({"verified": False, "error": str(e), "evidence": printable}, indent=2))
        print(f"veilcam: attestation FAILED: {e}", file=sys.stderr)
        return 1
    out = {
        "verified": True,
        "role": v.role,
        "backend": v.backend,
        "measurement": v.measurement,
        "signing_key": v.sign_pub.hex(),
        "signing_kid": v.signer_id,
        "allowed": verifier.allowed is not None,
    }
    if args.evidence_out:
        import msgpack

        Path(args.evidence_out).write_bytes(msgpack.packb(ev, use_bin_type=True))
        out["evidence_file"] = args.evidence_out
    print(json.dumps(out, indent=2))
    if ev.get("backend") == "simulated":
        print("note: simulated backend — no hardware protection", file=sys.stderr)
    return 0


def cmd_provision_model(args: argparse.Namespace) -> int:
    from enclave_bridge.host.client import provision_model
    from enclave_bridge.shared.keys import PartyKey, load_model_key

    pw = _pass(args)
    rep = provision_model(
        args.enclave,
        Path(args.package).read_bytes(),
        load_model_key(args.model_key, pw),
        PartyKey.load(args.owner_key, pw),
        _verifier(args, "eval"),
    )
    print(
        f"model {rep['model_kid']} ({rep['num_class']} classes) provisioned to enclave {rep['measurement']}"
    )
    return 0


def cmd_provision_data_key(args: argparse.Namespace) -> int:
    from enclave_bridge.host.client import provision_data_key
    from enclave_bridge.measured.enclave import load_enclave_config
    from enclave_bridge.shared.errors import ConfigError
    from enclave_bridge.shared.keys import PartyKey, load_data_key
    from enclave_bridge.shared.measurement import compute_measurement

    pw = _pass(args)
    allow = list(args.allow_eval or [])
    allow += [compute_measurement(load_enclave_config(c, "eval")) for c in args.allow_eval_config or []]
    if not allow:
        raise ConfigError(
            "give the evaluation enclaves allowed to use the key: --allow-eval HEX / --allow-eval-config"
        )
    rep = provision_data_key(
        args.key_enclave,
        load_data_key(args.data_key, pw),
        PartyKey.load(args.owner_key, pw),
        _verifier(args, "key"),
        allow,
        grace_s=args.grace_s,
    )
    print(f"data key {rep['kid']} provisioned to key enclave {rep['measurement']}; live kids {rep['kids']}")
    return 0


def cmd_provision_policy(args: argparse.Namespace) -> int:
    from enclave_bridge.host.client import EnclaveClient
    from enclave_bridge.shared.policy import load_policy_doc

    with EnclaveClient(args.enclave) as c:
        rep = c.set_policy(load_policy_doc(args.policy))
    print(f"policy v{rep['version']} active (digest {rep['digest'][:16]})")
    return 0


# ---------------------------------------------------------------------------------------------
# policy documents
# ---------------------------------------------------------------------------------------------


def cmd_policy_create(args: argparse.Namespace) -> int:
    import yaml

    from enclave_bridge.shared.errors import ConfigError
    from enclave_bridge.shared.keys import PartyPublic
    from enclave_bridge.shared.policy import ALERT_FIELDS, create_policy, save_policy_doc

    recips = []
    for spec in args.recipient:
        path, _, fields = spec.partition("=")
        fl = [f.strip() for f in fields.split(",") if f.strip()] if fields else list(ALERT_FIELDS)
        pub = PartyPublic.load(path)
        if pub.role != "consumer":
            raise ConfigError(f"{path}: recipients must be consumer keys, got {pub.role}")
        recips.append((pub, fl))
    rules = None
    if args.rules:
        rules = yaml.safe_load(Path(args.rules).read_text(encoding="utf-8"))
    doc = create_policy(recips, version=args.version, rules=rules)
    save_policy_doc(doc, args.out)
    print(
        f"policy v{args.version} with {len(recips)} recipient(s) written to {args.out}; "
        "now sign it by both owners"
    )
    return 0


def cmd_policy_sign(args: argparse.Namespace) -> int:
    from enclave_bridge.shared.keys import PartyKey
    from enclave_bridge.shared.policy import load_policy_doc, save_policy_doc, sign_policy

    key = PartyKey.load(args.key, _pass(args))
    doc = sign_policy(load_policy_doc(args.policy), key)
    save_policy_doc(doc, args.policy)
    print(f"{args.policy}: signed by {key.role} {key.name!r}; signatures: {sorted(doc['signatures'])}")
    return 0


def cmd_policy_verify(args: argparse.Namespace) -> int:
    from enclave_bridge.shared.keys import PartyPublic
    from enclave_bridge.shared.policy import load_policy_doc, verify_policy

    pol = verify_policy(
        load_policy_doc(args.policy),
        PartyPublic.load(args.data_owner_pub).sign_pub,
        PartyPublic.load(args.model_owner_pub).sign_pub,
    )
    print(f"policy v{pol.version} OK (digest {pol.digest[:16]})")
    for r in pol.recipients:
        print(f"  {r.name} ({r.rid}): {', '.join(r.fields)}")
    return 0


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this area's subcommands to the `veilcam` parser."""
    from enclave_bridge.shared.keys import ROLES

    p = sub.add_parser("platform", help="simulated enclave platform key")
    psub = p.add_subparsers(dest="platform_cmd", metavar="ACTION", required=True)
    q = psub.add_parser("init", help="create platform.key (0600) and platform.pub")
    q.add_argument("--dir", required=True)
    q.add_argument("--force", action="store_true")
    q.set_defaults(func=cmd_platform_init)

    p = sub.add_parser("keygen", help="create a party's keys (or a new data key with --data-key)")
    p.add_argument("--role", choices=ROLES)
    p.add_argument("--out", help="path prefix: writes PREFIX.key (0600) and PREFIX.pub")
    p.add_argument("--name", help="party name recorded in the public key (default: prefix name)")
    p.add_argument("--data-key", metavar="FILE", help="only generate a data key into FILE (rotation)")
    p.add_argument("--kid", help="key id for a generated data key")
    p.add_argument("--force", action="store_true")
    _add_pass(p)
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("model", help="model owner: package a model")
    msub = p.add_subparsers(dest="model_cmd", metavar="ACTION", required=True)
    q = msub.add_parser("package", help="encrypt checkpoint + label map + metadata")
    q.add_argument("--checkpoint", required=True, help="ST-GCN state_dict (.pt)")
    q.add_argument("--labels", required=True, help="label map, one label per line")
    q.add_argument("--meta", required=True, help="model.json (num_class, layout, strategy, T, stride, fps)")
    q.add_argument("--model-key", required=True, help="model key file (created if missing)")
    q.add_argument("--kid", help="kid for a newly created model key")
    q.add_argument("--out", required=True)
    _add_pass(q)
    q.set_defaults(func=cmd_model_package)

    p = sub.add_parser(
        "enclave-config", help="write an enclave config (measured) from the owners' public keys"
    )
    p.add_argument("--role", choices=("eval", "key"), required=True)
    p.add_argument("--data-owner-pub", required=True)
    p.add_argument("--model-owner-pub")
    p.add_argument("--key-enclave", help="key enclave address (eval role)")
    p.add_argument("--key-measurement", action="append", help="pin the key enclave measurement (eval role)")
    p.add_argument(
        "--mode", default="enclave", choices=("paper", "slalom", "split2", "split3", "enclave", "plaintext")
    )
    p.add_argument("--worker", default=None, help="GPU worker address (paper/slalom modes)")
    p.add_argument(
        "--workers",
        nargs="+",
        default=None,
        metavar="ADDR",
        help="the non-colluding GPU workers of split2 (2 addresses) or split3 (3 addresses)",
    )
    p.add_argument("--act-limbs", type=int, choices=(1,), default=None, help=argparse.SUPPRESS)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--backend", default="simulated", choices=("simulated", "gramine-sgx"))
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_enclave_config)

    p = sub.add_parser("measure", help="print the measurement of an enclave config with the installed code")
    p.add_argument("--config", required=True)
    p.add_argument("--files", action="store_true", help="also list every measured file and its hash")
    p.set_defaults(func=cmd_measure)

    for name, func, helptext in (
        ("enclave", cmd_enclave, "run the evaluation enclave service"),
        ("key-enclave", cmd_key_enclave, "run the key enclave service"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--listen", required=True, help="unix:/path or host:port")
        p.add_argument("--state-dir", required=True, help="sealed state directory")
        p.add_argument("--config", required=True, help="enclave config (YAML), part of the measurement")
        p.add_argument("--platform-key", help="platform.key (simulated backend)")
        if name == "enclave":
            p.add_argument("--policy", help="signed access policy to install at start")
        p.set_defaults(func=func)

    p = sub.add_parser("attest", help="challenge an enclave, verify and print its evidence")
    p.add_argument("--enclave", required=True, help="enclave address")
    p.add_argument("--role", choices=("eval", "key"), default="eval")
    p.add_argument("--any-measurement", action="store_true", help="print evidence without an allow-list")
    p.add_argument("--evidence-out", help="write the verified evidence (msgpack) here")
    _add_verifier_args(p)
    p.set_defaults(func=cmd_attest)

    p = sub.add_parser("provision", help="owners: provision secrets into attested enclaves")
    vsub = p.add_subparsers(dest="provision_cmd", metavar="WHAT", required=True)
    q = vsub.add_parser("model", help="model owner: send the model key to an attested evaluation enclave")
    q.add_argument("--enclave", required=True)
    q.add_argument("--package", required=True)
    q.add_argument("--model-key", required=True)
    q.add_argument("--owner-key", required=True, help="model-owner key (signs the request)")
    _add_verifier_args(q)
    _add_pass(q)
    q.set_defaults(func=cmd_provision_model)
    q = vsub.add_parser("data-key", help="data owner: send a data key to an attested key enclave")
    q.add_argument("--key-enclave", required=True)
    q.add_argument("--data-key", required=True)
    q.add_argument("--owner-key", required=True, help="data-owner key (signs the request)")
    q.add_argument(
        "--allow-eval", action="append", help="evaluation enclave measurement allowed to get the key"
    )
    q.add_argument("--allow-eval-config", action="append", help="allow the measurement of this eval config")
    q.add_argument("--grace-s", type=float, default=3600.0, help="older keys stay valid this long (rotation)")
    _add_verifier_args(q)
    _add_pass(q)
    q.set_defaults(func=cmd_provision_data_key)
    q = vsub.add_parser("policy", help="install a policy signed by both owners")
    q.add_argument("--enclave", required=True)
    q.add_argument("--policy", required=True)
    q.set_defaults(func=cmd_provision_policy)

    p = sub.add_parser("policy", help="access policies (who gets which alert fields)")
    ysub = p.add_subparsers(dest="policy_cmd", metavar="ACTION", required=True)
    q = ysub.add_parser("create", help="create an unsigned policy")
    q.add_argument(
        "--recipient",
        action="append",
        required=True,
        help="CONSUMER.pub[=field,field,...] (default: all fields); repeatable",
    )
    q.add_argument("--version", type=int, default=1)
    q.add_argument(
        "--rules", help="YAML {device|'*': {labels, min_score, debounce_s}} overriding camera rules"
    )
    q.add_argument("--out", required=True)
    q.set_defaults(func=cmd_policy_create)
    q = ysub.add_parser("sign", help="sign a policy (data owner and model owner)")
    q.add_argument("--policy", required=True)
    q.add_argument("--key", required=True)
    _add_pass(q)
    q.set_defaults(func=cmd_policy_sign)
    q = ysub.add_parser("verify", help="check both signatures")
    q.add_argument("--policy", required=True)
    q.add_argument("--data-owner-pub", required=True)
    q.add_argument("--model-owner-pub", required=True)
    q.set_defaults(func=cmd_policy_verify)
