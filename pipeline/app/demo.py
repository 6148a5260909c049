"""`veilcam demo`: the whole system on one machine, with throw-away keys, in one command.

It runs exactly the public commands a deployment runs (`veilcam platform init`, `keygen`,
`model package`, `enclave-config`, `key-enclave`, `provision data-key`, `gpu-worker`, `enclave`,
`provision model`, `policy create/sign`, `provision policy`, `attest`, `run`) as child processes,
starts a local MQTT broker first (Mosquitto, else the embedded one), and prints the alerts the way a
consumer holding the control-room key sees them (`pipeline.app.subscriber.AlertSubscriber`: enclave
signature checked against the attested key, fields decrypted, duplicates dropped).

Everything lives in a temp dir that is removed at the end (`--keep DIR` keeps it for a look at
the keys, configs and logs). The simulated enclave backend is used: it shows the protocol, not
hardware protection.

Why one module of ~420 lines: the demo is one scripted story (keys, broker, enclave, worker, replay,
consumer) read top to bottom; its steps share one temporary deployment.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

from enclave_bridge.shared.errors import ConfigError, StageError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]  # pipeline/app/demo.py → the repository
SAMPLE_CLIP = REPO_ROOT / "samples" / "vtest.avi"
DEFAULT_MODEL = REPO_ROOT / "samples" / "default_model"
DEVICE = "demo-cam"
_PLACEHOLDER_LABELS = ("standing", "walking", "sitting", "falling", "lying")


class Demo:
    """Runs the steps, owns the child processes, and cleans up whatever happens."""

    def __init__(self, work: Path, out: TextIO, keep: bool) -> None:
        self.work = work
        self.out = out
        self.keep = keep
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.env = dict(os.environ, VEILCAM_PASSPHRASE="")  # throw-away keys: unencrypted files
        self.t_start = time.monotonic()
        self.timings: dict[str, float] = {}

    # -- output ------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        print(f"[demo {time.monotonic() - self.t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- commands ----------------------------------------------------------------------------------
    def veilcam(self, *args: str, timeout_s: float = 600) -> str:
        """Run one `veilcam …` command to completion; its stdout, or a StageError with its stderr."""
        t0 = time.monotonic()
        p = subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        self.timings[args[0] + (" " + args[1] if args[0] in ("provision", "model", "policy") else "")] = (
            time.monotonic() - t0
        )
        with (self.work / "commands.log").open("a") as f:
            f.write(f"$ veilcam {' '.join(args)}\n{p.stdout}{p.stderr}\n")
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
            raise StageError(f"demo: `veilcam {' '.join(args[:2])}` failed: " + " | ".join(tail))
        return p.stdout

    def spawn(self, name: str, *args: str, wait_for: Path, timeout_s: float = 120) -> None:
        """Start a long-running `veilcam …` service and wait until its socket exists."""
        logf = (self.work / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *args],
            cwd=self.work,
            env=self.env,
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        logf.close()
        self.procs.append((name, proc))
        deadline = time.monotonic() + timeout_s
        while not wait_for.exists():
            if proc.poll() is not None:
                tail = (self.work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise StageError(f"demo: {name} exited with {proc.returncode}: " + " | ".join(tail))
            if time.monotonic() > deadline:
                raise StageError(f"demo: {name} did not start within {timeout_s:.0f} s")
            time.sleep(0.1)

    def cleanup(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    log.warning("demo: %s did not stop on SIGTERM; killing it", name)
                    proc.kill()
                    proc.wait()
        self.procs.clear()


def _model_dir(demo: Demo) -> tuple[Path, dict[str, Any], bool]:
    """The shipped default model, or (fresh checkout without it) an untrained placeholder."""
    if (DEFAULT_MODEL / "model.pt").is_file() and (DEFAULT_MODEL / "labels.txt").is_file():
        meta_path = DEFAULT_MODEL / "model.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return DEFAULT_MODEL, meta, True
    import torch

    from enclave_bridge.measured.stgcn import STGCN

    d = demo.work / "placeholder_model"
    d.mkdir(exist_ok=True)
    torch.manual_seed(0)
    torch.save(STGCN(len(_PLACEHOLDER_LABELS)).state_dict(), d / "model.pt")
    (d / "labels.txt").write_text("\n".join(_PLACEHOLDER_LABELS) + "\n")
    meta = {"num_class": len(_PLACEHOLDER_LABELS), "T": 30, "stride": 10, "fps": 10.0}
    meta.update(layout="openpose", strategy="spatial")
    (d / "model.json").write_text(json.dumps(meta))
    return d, meta, False


def run_demo(
    *,
    clip: Path | None = None,
    max_frames: int | None = None,
    broker_kind: str = "auto",
    mode: str = "paper",
    keep_dir: Path | None = None,
    min_score: float = 0.0,
    crop: tuple[int, ...] | None = None,
    as_json: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Run the demo; returns 0 when the replay finished and every alert reached the subscriber."""
    from pipeline.broker import start_broker

    clip = (clip or SAMPLE_CLIP).resolve()
    if not clip.is_file():
        raise ConfigError(f"demo: clip {clip} not found")
    if keep_dir is not None:
        keep_dir.mkdir(parents=True, exist_ok=True)
        work = keep_dir.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="veilcam-demo-"))
    demo = Demo(work, out, keep=keep_dir is not None)
    broker = None
    subscriber = None
    try:
        demo.say(f"working in {work}")
        # 0. the broker first: a missing or broken one fails in a second, not after the set-up.
        # `auto` = Mosquitto if installed and working, else the embedded one (a regular dependency).
        broker = start_broker(broker_kind, workdir=work / "broker")  # type: ignore[arg-type]
        demo.say(f"{broker.kind} MQTT broker on {broker.address}")
        # 1. parties and keys --------------------------------------------------------------------
        demo.veilcam("platform", "init", "--dir", "platform")
        for role, name in (("data-owner", "city"), ("model-owner", "vendor"), ("consumer", "control-room")):
            demo.veilcam("keygen", "--role", role, "--out", f"keys/{name}")
        demo.say(
            "throw-away keys: platform, city (data owner), vendor (model owner), control-room (consumer)"
        )
        model_dir, meta, trained = _model_dir(demo)
        if not trained:
            demo.say(
                "WARNING: samples/default_model is missing — using an UNTRAINED placeholder ST-GCN; "
                "labels and scores below are meaningless"
            )
        demo.veilcam(
            "model", "package",
            "--checkpoint", str(model_dir / "model.pt"),
            "--labels", str(model_dir / "labels.txt"),
            "--meta", str(model_dir / "model.json"),
            "--model-key", "keys/vendor.model.key",
            "--out", "model.vcpkg",
        )  # fmt: skip
        # 2. enclaves and GPU worker ---------------------------------------------------------------
        key_sock, eval_sock, worker_sock = work / "key.sock", work / "enclave.sock", work / "worker.sock"
        n_workers = {"split2": 2, "split3": 3}.get(mode, 1)
        worker_socks = (
            [worker_sock] if n_workers == 1 else [work / f"worker{i}.sock" for i in range(n_workers)]
        )
        for i, sock in enumerate(worker_socks):  # split modes: one process per non-colluding party
            demo.spawn(
                f"gpu-worker{i if n_workers > 1 else ''}",
                "gpu-worker",
                "--listen",
                f"unix:{sock}",
                wait_for=sock,
            )
        worker_args = (
            ["--worker", f"unix:{worker_sock}"]
            if n_workers == 1
            else ["--workers", *(f"unix:{s}" for s in worker_socks)]
        )
        demo.veilcam(
            "enclave-config",
            "--role",
            "key",
            "--data-owner-pub",
            "keys/city.pub",
            "--out",
            "key-enclave.yaml",
        )
        demo.veilcam(
            "enclave-config", "--role", "eval",
            "--data-owner-pub", "keys/city.pub", "--model-owner-pub", "keys/vendor.pub",
            "--key-enclave", f"unix:{key_sock}",
            "--mode", mode, *worker_args,
            "--out", "enclave.yaml",
        )  # fmt: skip
        demo.veilcam("measure", "--config", "enclave.yaml")  # what the owners would approve
        demo.spawn(
            "key-enclave", "key-enclave",
            "--listen", f"unix:{key_sock}", "--state-dir", "state/key",
            "--config", "key-enclave.yaml", "--platform-key", "platform/platform.key",
            wait_for=key_sock,
        )  # fmt: skip
        demo.veilcam(
            "provision", "data-key",
            "--key-enclave", f"unix:{key_sock}", "--data-key", "keys/city.data.key",
            "--owner-key", "keys/city.key", "--platform-pub", "platform/platform.pub",
            "--allow-config", "key-enclave.yaml", "--allow-eval-config", "enclave.yaml",
        )  # fmt: skip
        demo.spawn(
            "enclave", "enclave",
            "--listen", f"unix:{eval_sock}", "--state-dir", "state/eval",
            "--config", "enclave.yaml", "--platform-key", "platform/platform.key",
            wait_for=eval_sock,
        )  # fmt: skip
        demo.veilcam(
            "provision", "model",
            "--enclave", f"unix:{eval_sock}", "--package", "model.vcpkg",
            "--model-key", "keys/vendor.model.key", "--owner-key", "keys/vendor.key",
            "--platform-pub", "platform/platform.pub", "--allow-config", "enclave.yaml",
        )  # fmt: skip
        demo.veilcam(
            "policy", "create", "--recipient",
            "keys/control-room.pub=window_seq,t0,t1,track_id,label,score,topk", "--out", "policy.json",
        )  # fmt: skip
        demo.veilcam("policy", "sign", "--policy", "policy.json", "--key", "keys/city.key")
        demo.veilcam("policy", "sign", "--policy", "policy.json", "--key", "keys/vendor.key")
        demo.veilcam("provision", "policy", "--enclave", f"unix:{eval_sock}", "--policy", "policy.json")
        attested = demo.veilcam(
            "attest", "--enclave", f"unix:{eval_sock}", "--platform-pub", "platform/platform.pub",
            "--allow-config", "enclave.yaml", "--evidence-out", "evidence.msgpack",
        )  # fmt: skip
        measurement = str(json.loads(attested)["measurement"])
        demo.say(
            f"enclaves attested (measurement {measurement[:16]}…), model, data key and policy provisioned"
        )
        if mode == "enclave":
            demo.say("secure evaluation mode 'enclave': every layer inside the enclave (GPU worker unused)")
        elif n_workers > 1:
            demo.say(
                f"secure evaluation mode {mode!r}: linear layers shared over {n_workers} non-colluding "
                "GPU-worker processes (CPU here), nothing precomputed in the enclave"
            )
        else:
            demo.say(f"secure evaluation mode {mode!r}: linear layers on the GPU-worker process (CPU here)")

        # 3. subscriber ------------------------------------------------------------------------------
        subscriber, received = _start_subscriber(demo, broker.host, broker.port, measurement, as_json)

        # 4. the camera daemon replays the clip --------------------------------------------------------
        cfg_path = _write_daemon_config(
            work, clip, max_frames, broker.host, broker.port, meta, min_score, mqtt5=broker.mqtt5, crop=crop
        )
        frames = f"{max_frames} frames of " if max_frames else ""
        demo.say(f"veilcam run: replaying {frames}{clip.name} (pose → windows → enclave → MQTT) …")
        t0 = time.monotonic()
        with (work / "daemon.log").open("wb") as logf:
            run = subprocess.run(
                [sys.executable, "-m", "pipeline", "run", "--config", str(cfg_path)],
                cwd=work,
                env=demo.env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                timeout=3600,
            )
        demo.timings["run"] = time.monotonic() - t0
        if run.returncode != 0:
            tail = (work / "daemon.log").read_text(errors="replace").strip().splitlines()[-8:]
            raise StageError(f"demo: veilcam run exited with {run.returncode}: " + " | ".join(tail))
        # the daemon flushed its outbox to the broker before exiting; let the last messages arrive
        _wait_quiet(received, quiet_s=2.0, max_s=15.0)
        st = subscriber.stats
        demo.say(
            f"done in {time.monotonic() - demo.t_start:.0f} s (replay {demo.timings['run']:.0f} s): "
            f"{st.delivered} alert(s) delivered, {st.duplicates} duplicate(s) dropped, "
            f"{st.rejected_forged + st.rejected_replayed} rejected"
        )
        if st.delivered == 0:
            demo.say("no alert passed the rules (try --min-score 0 or a longer clip)")
        return 0
    finally:
        if subscriber is not None:
            subscriber.stop()
        demo.cleanup()
        if broker is not None:
            broker.stop()
        if demo.keep:
            demo.say(f"kept {work} (keys, configs, logs)")
        else:
            shutil.rmtree(work, ignore_errors=True)


class _Received:
    def __init__(self) -> None:
        self.count = 0
        self.last = time.monotonic()
        self.lock = threading.Lock()


def _start_subscriber(
    demo: Demo, host: str, port: int, measurement: str, as_json: bool
) -> tuple[Any, _Received]:
    """The control room's consumer: attested signing key from the evidence file, own key, dedupe."""
    from config.broker import BrokerConfig
    from enclave_bridge.host.alert_opener import AlertOpener
    from enclave_bridge.shared.attest import load_platform_pub
    from enclave_bridge.shared.keys import PartyKey
    from pipeline.app.subscriber import AlertSubscriber, alert_json, format_alert, verify_key_from_evidence

    verify_key = verify_key_from_evidence(
        (demo.work / "evidence.msgpack").read_bytes(),
        load_platform_pub(demo.work / "platform" / "platform.pub"),
        [measurement],
    )
    opener = AlertOpener(PartyKey.load(demo.work / "keys" / "control-room.key"), verify_key)
    received = _Received()

    def on_alert(alert: dict[str, Any]) -> None:
        with received.lock:
            received.count += 1
            received.last = time.monotonic()
            print(alert_json(alert) if as_json else "ALERT " + format_alert(alert), file=demo.out, flush=True)

    cfg = BrokerConfig(host=host, port=port, reconnect_min_delay_s=0.2, reconnect_max_delay_s=2.0)
    if logging.getLogger().getEffectiveLevel() == logging.INFO:
        # the demo prints its own progress lines; the subscriber's INFO lines would repeat them
        logging.getLogger("pipeline.app.subscriber").setLevel(logging.WARNING)
    sub = AlertSubscriber(cfg, opener, on_alert)
    sub.start()
    if not sub.subscribed.wait(15):
        sub.stop()
        raise StageError(f"demo: subscriber could not subscribe on {host}:{port}")
    demo.say(f"control-room subscriber listening on {sub.topic}")
    return sub, received


def _write_daemon_config(
    work: Path,
    clip: Path,
    max_frames: int | None,
    host: str,
    port: int,
    meta: dict[str, Any],
    min_score: float,
    mqtt5: bool = True,
    crop: tuple[int, ...] | None = None,
) -> Path:
    camera: dict[str, Any] = {"source": str(clip), "device_id": DEVICE}
    if crop:
        camera["crop"] = list(crop)
    if max_frames:
        camera["max_frames"] = int(max_frames)
    if "fps" in meta:
        camera["fps"] = float(meta["fps"])
    if "T" in meta:
        camera["window"] = {"length_frames": int(meta["T"]), "stride_frames": int(meta.get("stride", 10))}
    cfg = {
        "state_dir": str(work / "state" / "daemon"),
        "data_key_path": str(work / "keys" / "city.data.key"),
        "enclave": {"address": f"unix:{work / 'enclave.sock'}", "timeout_s": 300},
        "rules": {"labels": ["*"], "min_score": float(min_score), "debounce_s": 0.0},
        "broker": {
            "host": host,
            "port": port,
            "client_id": f"veilcam-{DEVICE}",
            "keepalive_s": 10,
            "reconnect_min_delay_s": 0.2,
            "reconnect_max_delay_s": 2.0,
            "protocol": "auto" if mqtt5 else "3.1.1",
        },
        "metrics": {"enabled": False},
        "supervisor": {"stats_interval_s": 5, "shutdown_timeout_s": 600},
        "cameras": {"demo": camera},
    }
    path = work / "veilcam-demo.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _wait_quiet(received: _Received, quiet_s: float, max_s: float) -> None:
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        with received.lock:
            idle = time.monotonic() - received.last
        if idle >= quiet_s:
            return
        time.sleep(0.1)


__all__ = ["run_demo"]
