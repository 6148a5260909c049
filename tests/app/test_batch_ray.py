"""`veilcam batch` on a real local Ray (2 CPUs, no dashboard) with real clips and the in-process
evaluator: a batch gives exactly the alerts of sequential replays, a rerun resumes, undecodable
clips are recorded as failed, long clips split into overlapping segments without duplicate windows,
and a Ray worker killed mid-segment is survived without duplicate alerts."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.app.batch import BatchOptions, BatchRun, device_for, expand_clips, run_batch
from pipeline.app.batch_report import read_report
from pipeline.app.batch_segments import plan_segments
from tests.app.batch_helpers import (
    EXERCISE,
    SMALL,
    VTEST,
    base_config,
    replay_alerts,
    report_alerts,
    segment_workers,
)

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (starting it costs a few seconds)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024)
    yield
    ray.shutdown()


def _opts(out: Path, **kw) -> BatchOptions:
    return BatchOptions(out=out, progress=False, **kw)


def test_batch_equals_sequential_replays_and_resumes(local_ray, tmp_path: Path) -> None:
    if not EXERCISE.exists():
        pytest.skip(f"{EXERCISE} not present")
    base = base_config(tmp_path)
    out = tmp_path / "report.jsonl"
    # first run: one clip only (an interrupted archive run, as far as the manifest knows)
    s1 = run_batch([str(VTEST.resolve())], base, _opts(out), overrides=SMALL)
    assert s1.clips_done == 1 and s1.clips_failed == 0 and s1.frames == SMALL["max_frames"]
    # the same command with both clips: the first is skipped, the second done
    clips = [str(VTEST.resolve()), str(EXERCISE.resolve())]
    s2 = run_batch(clips, base, _opts(out), overrides=SMALL)
    assert (s2.clips_skipped, s2.clips_done, s2.clips_failed) == (1, 1, 0)
    assert s2.frames == SMALL["max_frames"]  # only the second clip was posed
    alerts, summaries = read_report(out)
    assert len(summaries) == 2
    ref_v = replay_alerts(VTEST, base, tmp_path / "replay-state-1", SMALL)
    ref_e = replay_alerts(EXERCISE, base, tmp_path / "replay-state-2", SMALL)
    assert ref_v and ref_e  # rules alert on every window: a real comparison
    assert report_alerts(alerts, VTEST) == ref_v
    assert report_alerts(alerts, EXERCISE) == ref_e
    devices = {a["device"] for a in alerts}
    assert devices == {device_for(c, "cam") for c in clips}  # one device per clip
    # everything done: a rerun poses nothing and writes no alert line twice
    s3 = run_batch(clips, base, _opts(out), overrides=SMALL)
    assert (s3.clips_skipped, s3.clips_done, s3.frames) == (2, 0, 0)
    assert read_report(out)[0] == alerts


def test_undecodable_and_missing_clips_are_recorded_and_the_run_goes_on(local_ray, tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 50)
    missing = tmp_path / "gone.avi"
    base = base_config(tmp_path)
    out = tmp_path / "r.jsonl"
    s = run_batch([str(bad), str(missing)], base, _opts(out), overrides=SMALL)
    assert s.clips_failed == 2 and s.exit_code == 1
    reasons = {f["clip"]: f["reason"] for f in s.failures}
    assert "cannot decode" in reasons[str(bad)]
    assert "not found" in reasons[str(missing)]
    manifest = (tmp_path / "r.jsonl.manifest").read_text()
    assert manifest.count('"status": "failed"') == 2
    _alerts, summaries = read_report(out)
    assert summaries[-1]["clips_failed"] == 2 and len(summaries[-1]["failures"]) == 2


def test_cli_batch_lists_failures_and_exits_1(tmp_path: Path) -> None:
    """`veilcam batch --list` as a user runs it (its own local Ray, no set-up): clips that cannot
    be read are in the summary with their reason, the report's summary line, and the exit code."""
    import subprocess
    import sys

    bad = tmp_path / "broken.avi"
    bad.write_bytes(b"RIFF not really a video" * 100)
    lst = tmp_path / "clips.txt"
    lst.write_text("# archive\nbroken.avi\nmissing.mp4\n")
    out = tmp_path / "cli.jsonl"
    cmd = [sys.executable, "-m", "pipeline", "batch", "--list", str(lst), "--out", str(out), "--no-progress"]
    cmd += ["--ray", "local", "--local-cpus", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "2 failed" in r.stdout and "2 clip(s) failed" in r.stderr
    _alerts, summaries = read_report(out)
    assert [f["clip"] for f in summaries[-1]["failures"]] == [str(bad), str(tmp_path / "missing.mp4")]


def test_expand_clips_dirs_globs_and_list_file(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in ("a/x.mp4", "a/b/y.AVI", "a/notes.txt"):
        (tmp_path / p).write_bytes(b"")
    lst = tmp_path / "list.txt"
    lst.write_text("# archive\na/x.mp4\n\n/abs/elsewhere.mkv\n")
    got = expand_clips([str(tmp_path / "a"), str(tmp_path / "a" / "*.mp4")], lst)
    assert got == [
        str(tmp_path / "a" / "b" / "y.AVI"),
        str(tmp_path / "a" / "x.mp4"),
        "/abs/elsewhere.mkv",
    ]
    dev = device_for("/x/" + "very long name with spaces " * 5 + ".mp4", "site-7")
    assert len(dev) <= 64 and " " not in dev and dev.startswith("site-7-")


def test_segment_plan_overlaps_by_whole_windows_on_the_stride_grid() -> None:
    specs = plan_segments("c", "d", 1000, segment_frames=300, length_frames=30, stride_frames=10, seq_base=5)
    assert [(s.start, s.end, s.warmup_from) for s in specs] == [
        (0, 300, 0),
        (300, 600, 270),
        (600, None, 570),
    ]
    assert all(s.start % 10 == 0 and s.warmup_from % 10 == 0 for s in specs)
    assert (
        plan_segments("c", "d", 400, segment_frames=300, length_frames=30, stride_frames=10, seq_base=1)[
            0
        ].end
        is None
    )  # < 1.5 segments: whole


@pytest.mark.slow
def test_long_clip_in_segments_gives_the_windows_of_one_replay(local_ray, tmp_path: Path) -> None:
    """120 frames in segments of 40 (overlap 8): the same windows (media spans) as one replay, none
    twice, and the same alerts for windows whose tracks are settled (the first window of a
    segment is made from the same frames; track numbering restarts per segment)."""
    over = {"max_frames": 120, "length_frames": 8, "stride_frames": 4}
    base = base_config(tmp_path)
    out = tmp_path / "seg.jsonl"
    s = run_batch([str(VTEST.resolve())], base, _opts(out, segment_frames=40), overrides=over)
    assert s.clips_failed == 0 and s.outcomes[0].segments == 3
    alerts, _ = read_report(out)
    spans = [(a["t0"], a["t1"]) for a in alerts]
    assert len(spans) == len(set(spans))  # no window twice (one alert per window with these rules)
    ref = replay_alerts(VTEST, base, tmp_path / "rs", over)
    assert sorted(spans) == sorted((r[0], r[1]) for r in ref)
    assert {a["segment"] for a in alerts} == {0, 1, 2}
    ref_labels = {(r[0], r[1]): r[2] for r in ref}
    same = sum(ref_labels[(a["t0"], a["t1"])] == a["label"] for a in alerts)
    assert same >= 0.9 * len(alerts)


@pytest.mark.slow
def test_killed_ray_worker_is_survived_without_duplicate_alerts(local_ray, tmp_path: Path) -> None:
    over = {"max_frames": 60, "length_frames": 8, "stride_frames": 4}
    base = base_config(tmp_path)
    out = tmp_path / "kill.jsonl"
    result: dict[str, object] = {}
    batch = BatchRun([str(VTEST.resolve())], base, _opts(out), overrides=over)

    def run() -> None:
        result["summary"] = batch.run()

    t = threading.Thread(target=run)
    t.start()
    killed = None
    deadline = time.monotonic() + 120
    while t.is_alive() and time.monotonic() < deadline:
        pids = segment_workers()
        if pids:
            time.sleep(2.0)  # mid-segment: some frames posed, nothing returned yet
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
            break
        time.sleep(0.1)
    t.join(300)
    assert killed is not None, "no segment worker seen"
    s = result["summary"]
    assert s.clips_failed == 0 and s.clips_done == 1, s.failures
    assert killed not in batch.first_clip_of_worker  # the result came from the retry, elsewhere
    alerts, _ = read_report(out)
    spans = [(a["t0"], a["t1"]) for a in alerts]
    assert len(spans) == len(set(spans))
    assert sorted(spans) == sorted((r[0], r[1]) for r in replay_alerts(VTEST, base, tmp_path / "rs", over))


@pytest.mark.slow
@pytest.mark.broker
def test_batch_alerts_also_go_to_mqtt(local_ray, mosquitto, tmp_path: Path) -> None:
    """With a broker in the config, every alert of the report is published (via the durable outbox)
    on `veilcam/<clip device>/alerts`, and opens for the consumer with the evaluator's key."""
    import paho.mqtt.client as mqtt

    from config.broker import BrokerConfig
    from enclave_bridge.shared.keys import PartyKey
    from pipeline.app.subscriber import PoolOpener

    consumer = PartyKey.generate("consumer", "ops")
    base = base_config(tmp_path).model_copy(
        update={"broker": BrokerConfig(host=mosquitto.host, port=mosquitto.port)}
    )
    got: list[tuple[str, bytes]] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = lambda _c, _u, m: got.append((m.topic, bytes(m.payload)))
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe("veilcam/+/alerts", qos=1)
    sub.loop_start()
    try:
        out = tmp_path / "mqtt.jsonl"
        s = run_batch([str(VTEST.resolve())], base, _opts(out, consumer_key=consumer), overrides=SMALL)
        assert s.clips_failed == 0 and s.alerts > 0
        deadline = time.monotonic() + 20
        while len(got) < s.alerts and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sub.loop_stop()
        sub.disconnect()
    alerts, _ = read_report(out)
    signer = PartyKey.load(tmp_path / "mqtt.jsonl.state" / "local-evaluator.key")
    opener = PoolOpener(consumer, [signer.public.sign_pub])
    opened = sorted((a["device"], round(a["t0"], 4), a["label"]) for a in (opener.open(p) for _t, p in got))
    assert opened == sorted((a["device"], round(a["t0"], 4), a["label"]) for a in alerts)
    assert {t for t, _p in got} == {f"veilcam/{alerts[0]['device']}/alerts"}
