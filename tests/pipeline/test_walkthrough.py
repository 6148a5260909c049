"""docs/OWNERS.md's "Provisioning, step by step", run as written: the test takes the bash block between
the `walkthrough:begin/end` markers of docs/OWNERS.md and runs its commands one after another, in an empty
temp dir outside the checkout, as real processes (key enclave, evaluation enclave, broker,
subscriber, camera daemon). README and test cannot drift: editing the block changes the test.

Then, on the same deployment: restarted enclaves need no owner online (sealed state), and
`veilcam run` with a data key the enclave was never given exits 1 and says why.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "docs" / "OWNERS.md"  # the walkthrough moved here from README.md
PORT = 18830  # the walkthrough's broker port (outside the ephemeral range other tests draw from)
# what the walkthrough creates in its directory, and so must never appear in the checkout
ARTEFACTS = ("platform", "keys", "state", "run", "model.vcpkg", "policy.json", "enclave.evidence")


def walkthrough_commands(text: str) -> list[str]:
    """The commands of the README block: continuation lines joined, comments and blanks dropped."""
    m = re.search(r"<!-- walkthrough:begin -->\n```bash\n(.*?)\n```\n<!-- walkthrough:end -->", text, re.S)
    if m is None:
        raise AssertionError("docs/OWNERS.md: no ```bash block between walkthrough:begin/end markers")
    commands: list[str] = []
    pending = ""
    for line in m.group(1).splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        commands.append(pending + line)
        pending = ""
    assert not pending, "README walkthrough ends inside a continued command"
    return commands


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VEILCAM_")}
    # `veilcam` and `python` of the interpreter running the tests, whatever the shell's PATH says
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of an earlier run is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_readme_block_parses_into_the_expected_steps() -> None:
    cmds = walkthrough_commands(README.read_text())
    words = [c.split()[0] + (" " + c.split()[1] if c.startswith("veilcam") else "") for c in cmds]
    for needed in (
        "veilcam platform",
        "veilcam key-enclave",
        "veilcam enclave",
        "veilcam broker",
        "veilcam subscribe",
        "veilcam run",
    ):
        assert needed in words, f"walkthrough lost its `{needed}` step"
    assert all("/run/veilcam" not in c for c in cmds), "walkthrough must not need root-owned paths"


def test_walkthrough_runs_verbatim_in_an_empty_directory(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("the walkthrough is a bash block and bash is not installed")
    if not _port_free(PORT):
        pytest.skip(f"127.0.0.1:{PORT} is in use (another walkthrough running?)")
    work = tmp_path / "trial"
    work.mkdir()
    before = {a: (REPO / a).exists() for a in ARTEFACTS}
    cmds = walkthrough_commands(README.read_text())
    script = ["set -eu"]
    for i, cmd in enumerate(cmds):
        script += [f"echo '@@ step {i}' >&2", cmd]
    script.append("echo '@@ done' >&2")
    proc = subprocess.Popen(
        ["bash", "-c", "\n".join(script)],
        cwd=work,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: whatever it leaves behind is ours to end
    )
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_group(proc.pid)
    steps = re.findall(r"^@@ (step \d+|done)$", err, re.M)
    last = steps[-1] if steps else "none"
    where = cmds[int(last.split()[1])] if last.startswith("step") else last
    assert proc.returncode == 0 and last == "done", (
        f"walkthrough failed (exit {proc.returncode}) at: {where}\n--- stderr tail:\n{err[-3000:]}"
        + _logs(work)
    )
    # the subscriber printed the two alerts, with exactly the fields the policy grants control-room
    alerts = [line for line in out.splitlines() if re.search(r"  trial #\d+  ", line)]
    assert len(alerts) == 2, out
    for line in alerts:
        assert re.search(r"  trial #\d+  \w+ [01]\.\d\d  track -?\d+  t \d+\.\d-\d+\.\d s$", line), line
        assert "window" not in line and "[" not in line  # window_seq and topk were not granted
    assert "# 2 alert(s)" in (work / "subscribe.log").read_text()
    # everything landed in the trial dir, nothing in the checkout
    for a in ARTEFACTS:
        assert (work / a).exists(), a
        assert (REPO / a).exists() == before[a], f"walkthrough created {a} inside the checkout"
    assert not (work / "run" / "enclave.sock").exists()  # services stopped and removed their sockets

    _run_with_a_key_the_enclave_never_got(work)


def _run_with_a_key_the_enclave_never_got(work: Path) -> None:
    """Restart both enclaves from their sealed state (no owner involved), then run a camera whose
    data key was never provisioned: every window is rejected and `veilcam run` exits 1."""
    env = _env()
    services: list[subprocess.Popen[bytes]] = []
    try:
        for name, sock, state, cfg in (
            ("key-enclave", "key", "key", "key-enclave.yaml"),
            ("enclave", "enclave", "eval", "enclave.yaml"),
        ):
            services.append(_restart(work, env, name, sock, state, cfg))
        subprocess.run(
            ["veilcam", "keygen", "--data-key", "keys/stranger.data.key"], cwd=work, env=env, check=True
        )
        cfg = yaml.safe_load((work / "veilcam.yaml").read_text())
        cfg.update(data_key_path="keys/stranger.data.key", state_dir="state/stranger", broker=None)
        cfg["cameras"]["trial"]["max_frames"] = 30  # one window is enough
        (work / "stranger.yaml").write_text(yaml.safe_dump(cfg))
        run = subprocess.run(
            ["veilcam", "run", "--config", "stranger.yaml"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        for p in services:
            p.terminate()
        for p in services:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert run.returncode == 1, run.stderr[-3000:]
    assert "the enclave rejected all 1 window(s)" in run.stderr, run.stderr[-3000:]


def _restart(
    work: Path, env: dict[str, str], name: str, sock: str, state: str, cfg: str
) -> subprocess.Popen[bytes]:
    """`veilcam <name>` again on the walkthrough's socket and sealed state; returns once it listens."""
    log_path = work / f"{name}-restart.log"
    argv = ["veilcam", name, "--listen", f"unix:run/{sock}.sock", "--state-dir", f"state/{state}"]
    argv += ["--config", cfg, "--platform-key", "platform/platform.key"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (work / "run" / f"{sock}.sock").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{name} did not listen again:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def _kill_group(pid: int) -> None:
    """End whatever the walkthrough's shell left running (its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
        time.sleep(1.0)
        os.killpg(pid, signal.SIGKILL)


def _logs(work: Path) -> str:
    out = []
    for f in sorted(work.glob("*.log")) + sorted((work / "state").glob("**/*.log")):
        out.append(f"--- {f.name}:\n{f.read_text(errors='replace')[-1500:]}")
    return "\n" + "\n".join(out)
