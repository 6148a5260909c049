"""`veilcam batch CLIPS… --out report.jsonl`: archive replay spread over a Ray cluster (issue 18).

Every clip goes through the pipeline of `veilcam replay` — capture, pose, tracking, sealed windows
(`pipeline.app.batch_segments`, in Ray tasks), then the enclave and its alert rules — and its
alerts land in a JSON-lines report (`pipeline.app.batch_report`).

Where things run and what crosses the cluster:
- Ray tasks (any node, sized by `cpus_per_clip` / `gpus_per_clip`): decode, pose, tracking, and
  sealing under the data owner's key, read on that node from `data_key_path`. They return
  ciphertext windows only. Long clips are cut into overlapping segments so one long file does not
  serialise the run.
- This driver: hands each clip's windows, in media order, to an `EnclaveStage` — the very class
  the daemon uses (hello with the camera's rules, retries with backoff, rejections counted) —
  talking to the in-process local evaluator (no `enclave.address`: development, like replay), one
  remote enclave, or an `EnclavePool` (`enclave.addresses`).
- Each clip is its own device (`<prefix>-<stem>-<hash>`): window and alert numbers, replay
  protection and debounce are per clip, so clips run in parallel without interleaving one
  device's windows, and a clip's alerts equal those of `veilcam replay` of that clip.

Faults: a Ray worker that dies mid-segment has its task retried by Ray (`max_task_retries`);
nothing of a segment reaches the enclave before its task returned, so a retry cannot double an
alert. A clip that cannot be opened is recorded as failed with the reason and the run goes on.
Rerunning the command skips clips the manifest records as done (`--restart` ignores it).

Why one module of ~610 lines: `BatchRun` is one driver loop (plan segments, collect them in any
order, feed each clip's windows in media order to its enclave stage, write the report, record the
manifest) over shared per-run state; inputs and the Ray side are already their own modules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from config.schema import DEFAULT_MODEL_DIR, VeilcamConfig
from pipeline.app.batch_inputs import (
    BatchOptions,
    BatchSummary,
    ClipOutcome,
    device_for,
    expand_clips,
    format_summary,
)
from pipeline.app.batch_ray import FrameProgress, connect_ray, progress_bar, segment_task, warm_up
from pipeline.app.batch_report import Manifest, ReportWriter
from pipeline.app.batch_segments import SEQ_BLOCK, SegmentOutput, SegmentSpec, plan_segments
from pipeline.app.daemon import make_local_enclave, window_params
from pipeline.errors import ConfigError, IntegrityError, StageError, VeilcamError
from pipeline.messages import AlertEnvelope, EndOfStream, SealedWindow
from pipeline.queues import BoundedQueue
from pipeline.stats import CameraStats
from stages.capture import CaptureStage
from stages.enclave_client import EnclaveStage

log = logging.getLogger(__name__)


# -- alert opening ---------------------------------------------------------------------------------
class _Openers:
    """Opens alerts for the report; None for one that does not open (logged, never fatal)."""

    def __init__(self, consumer_key: Any, verify_keys: Sequence[bytes]) -> None:
        from pipeline.app.subscriber import PoolOpener

        self._opener = PoolOpener(consumer_key, list(verify_keys))

    def open(self, payload: bytes) -> dict[str, Any] | None:
        try:
            return self._opener.open(payload)
        except IntegrityError as e:
            log.error("batch: an alert did not open: %s", e)
            return None


# -- one clip on the driver side ----------------------------------------------------------------------
class _ClipRun:
    """A clip's segments arrive in any order; its windows go to its `EnclaveStage` in media order."""

    def __init__(self, batch: BatchRun, clip: str, cfg: VeilcamConfig, specs: list[SegmentSpec]) -> None:
        self.batch = batch
        self.clip = clip
        self.cfg = cfg
        self.specs = specs
        self.device = specs[0].device
        self.outputs: dict[int, SegmentOutput] = {}
        self.latency: dict[int, float] = {}
        self.next_index = 0
        self.failure: str | None = None
        self.warning: str | None = None
        self.windows: dict[int, tuple[float, float, int]] = {}  # window seq → (t0, t1, segment)
        self.envelopes: list[AlertEnvelope] = []
        self.stats = CameraStats(self.device)
        self.queue: BoundedQueue[SealedWindow | EndOfStream] = BoundedQueue(
            1 << 20, "block", name=f"batch-{self.device}"
        )
        self.stage: EnclaveStage | None = None
        self.thread: threading.Thread | None = None
        self.finished = threading.Event()
        self._lock = threading.Lock()

    def _start_stage(self) -> None:
        name = next(iter(self.cfg.cameras))
        e = self.cfg.enclave
        self.stage = EnclaveStage(
            self.device,
            self.batch.link,
            self.cfg.rules_of(name).as_dict(),
            self.queue,
            self._sink,
            self.stats,
            max_retries=e.max_retries,
            retry_backoff_s=e.retry_backoff_s,
            retry_timeout_s=e.retry_timeout_s,
            on_end=lambda _eos: None,
        )
        self.thread = threading.Thread(target=self._run_stage, name=f"enclave-{self.device}", daemon=True)
        self.thread.start()

    def _sink(self, env: AlertEnvelope) -> None:
        self.envelopes.append(env)
        if self.batch.outbox is not None:
            self.batch.outbox.put(env)

    def _run_stage(self) -> None:
        assert self.stage is not None
        try:
            self.stage.run(self.batch.stop)
        except VeilcamError as e:
            self.failure = self.failure or f"enclave: {e}"
        except Exception as e:  # the run goes on; this clip is recorded as failed
            log.exception("batch: clip %s: enclave stage failed", self.clip)
            self.failure = self.failure or f"enclave: {type(e).__name__}: {e}"
        finally:
            self.batch.finish_clip(self)
            self.finished.set()

    def segment_done(self, out: SegmentOutput, latency_s: float) -> None:
        """Called by the driver loop as each segment task returns (or fails for good)."""
        with self._lock:
            self.outputs[out.spec.index] = out
            self.latency[out.spec.index] = latency_s
            if self.stage is None:
                self._start_stage()
            while self.next_index in self.outputs and self.failure is None:
                o = self.outputs[self.next_index]
                if o.error is not None:
                    self.failure = o.error
                    break
                if o.warning and self.warning is None:
                    self.warning = o.warning
                for w in o.windows:
                    self.windows[w.seq] = (w.t0, w.t1, o.spec.index)
                    self.queue.put(w)
                # the stage's queue holds the windows now; keep only the counts (memory stays flat)
                self.outputs[self.next_index] = dataclasses.replace(o, windows=[], window_frames=[])
                self.next_index += 1
            if self.failure is not None or self.next_index == len(self.specs):
                self.queue.put(EndOfStream(self.device, self.next_index, time.time(), reason="eof"))

    def outcome(self) -> ClipOutcome:
        outs = list(self.outputs.values())
        failure = self.failure
        dropped = self.stats.get("windows_dropped")
        rejected = self.stats.get("windows_rejected")
        if failure is None and dropped:
            failure = f"{dropped} window(s) dropped: enclave unreachable past enclave.retry_timeout_s"
        if failure is None and rejected:
            failure = f"the enclave rejected {rejected} of {self.stats.get('windows_submitted')} window(s)"
        if failure is None and self.warning is not None:
            failure = self.warning  # alerts of the readable part are reported; the clip is redone
        return ClipOutcome(
            clip=self.clip,
            device=self.device,
            status="failed" if failure else "done",
            reason=failure,
            frames=sum(o.frames_owned for o in outs),
            windows=self.stats.get("windows_submitted"),
            alerts=len(self.envelopes),
            segments=len(self.specs),
            pose_s=sum(o.pose_s for o in outs),
            task_wall_s=sum(o.wall_s for o in outs),
            task_latency_s=sum(self.latency.values()),
            warning=self.warning,
            timings_s=self._timings(outs),
            cpu_s=sum(o.cpu_s for o in outs),
            first_task_on_worker=any(self.batch.first_clip_of_worker.get(o.pid) == self.clip for o in outs),
        )

    def _timings(self, outs: list[SegmentOutput]) -> dict[str, float]:
        total: dict[str, float] = {}
        for o in outs:
            for k, v in o.timings_s.items():
                total[k] = total.get(k, 0.0) + v
        enclave = self.stats.stages.get("enclave")
        if enclave is not None:
            total["enclave"] = float(enclave.snapshot().latency_sum_s)
        return total


# -- the run ---------------------------------------------------------------------------------------
class BatchRun:
    """One `veilcam batch` invocation: plan, dispatch to Ray, evaluate, report. See `run_batch`."""

    def __init__(
        self,
        clips: Sequence[str],
        base: VeilcamConfig | None,
        opts: BatchOptions,
        *,
        camera: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.clips = list(clips)
        self.base = base
        self.opts = opts
        self.camera = camera
        self.overrides = dict(overrides or {})
        self.out = Path(opts.out)
        self.state_dir = Path(opts.state_dir or self.out.with_name(self.out.name + ".state"))
        self.stop = threading.Event()
        self.link: Any = None
        self.outbox: Any = None
        self.publisher: Any = None
        self.openers: Any = None
        self.report: ReportWriter | None = None
        self.manifest: Manifest | None = None
        self.outcomes: list[ClipOutcome] = []
        self.first_clip_of_worker: dict[int, str] = {}  # worker pid → the clip of its first task
        self._lock = threading.Lock()

    # -- config ----------------------------------------------------------------------------------
    def clip_config(self, clip: str, data_key_path: Path | None) -> VeilcamConfig:
        from pipeline.app.replay import replay_config

        over = {**self.overrides, "device_id": device_for(clip, self._prefix())}
        try:
            cfg = replay_config(clip, self.base, camera=self.camera, state_dir=self.state_dir, overrides=over)
        except ValueError as e:  # pydantic ValidationError from an override
            raise ConfigError(f"batch options: {e}") from e
        if data_key_path is not None:
            cfg = cfg.model_copy(update={"data_key_path": data_key_path})
        return cfg

    def _prefix(self) -> str:
        """Device prefix: the config camera's device id (or name), else `device_prefix`."""
        if self.base is None:
            return self.opts.device_prefix
        name = self.camera or next(iter(self.base.cameras))
        return self.base.cameras[name].device_id or name

    def settings_digest(self, cfg: VeilcamConfig) -> str:
        """What decides a clip's alerts (camera settings but its source, rules, model): a manifest
        made with other settings is not resumed."""
        name = next(iter(cfg.cameras))
        cam = cfg.cameras[name].model_dump(mode="json", exclude={"source", "device_id"})
        doc = {
            "camera": cam,
            "rules": cfg.rules_of(name).as_dict(),
            "model": str(cfg.enclave.model_dir or DEFAULT_MODEL_DIR),
            "window": asdict(window_params(cfg, cfg.cameras[name])),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def reserve_seq(self, device: str) -> int:
        """A fresh block of window numbers for this clip and run (persisted before use), so a
        rerun never reuses a number an enclave has seen; first use starts at Unix ms, like
        `SeqCounter`."""
        path = self.state_dir / "window-seq" / f"{device}.seq"
        try:
            last = int(path.read_text().strip())
        except FileNotFoundError:
            last = int(time.time() * 1000)
        except (OSError, ValueError) as e:
            raise ConfigError(f"batch state: window counter {path} unreadable: {e}") from e
        base = last + 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(f"{base + SEQ_BLOCK}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return base

    # -- enclave side ----------------------------------------------------------------------------------
    def _setup_enclave(self, cfg: VeilcamConfig, devices: list[str]) -> None:
        from enclave_bridge.shared.keys import PartyKey

        addresses = [a for a in [cfg.enclave.address, *cfg.enclave.addresses] if a]
        if not addresses:
            from config.files import load_data_key_from_config

            log.warning(
                "batch: no enclave address: windows are evaluated by the in-process local evaluator "
                "(development only — no enclave isolation)"
            )
            consumer = self.opts.consumer_key or PartyKey.generate("consumer", "batch-report")
            local = make_local_enclave(cfg, load_data_key_from_config(cfg), [consumer.public])
            self.link = local
            self.openers = _Openers(consumer, [local.verify_key])
        else:
            if len(addresses) == 1:
                from stages.enclave_client import RemoteEnclave

                self.link = RemoteEnclave(addresses[0], timeout_s=cfg.enclave.timeout_s)
            else:
                from stages.enclave_pool import EnclavePool

                self.link = EnclavePool(
                    addresses, timeout_s=cfg.enclave.timeout_s, backoff_s=cfg.enclave.retry_backoff_s
                )
            if self.opts.consumer_key is not None and self.opts.enclave_verify_keys:
                self.openers = _Openers(self.opts.consumer_key, self.opts.enclave_verify_keys)
            else:
                log.warning(
                    "batch: no --consumer-key/verified enclave key: report lines carry window times "
                    "but not label, score or track (the alerts stay encrypted)"
                )
        if cfg.broker is not None and devices:
            from pipeline.outbox import Outbox
            from stages.alerts import AlertPublisher, enclave_evidence_provider

            provider = None  # consumers find each device's enclave evidence retained (remote only)
            if hasattr(self.link, "evidence_provider"):
                provider = self.link.evidence_provider(timeout_s=cfg.enclave.timeout_s)
            elif addresses:
                provider = enclave_evidence_provider(addresses[0], timeout_s=cfg.enclave.timeout_s)
            self.outbox = Outbox(self.state_dir / "outbox.sqlite")
            self.publisher = AlertPublisher(
                cfg.broker, self.outbox, devices=devices, evidence_provider=provider
            )
            self.publisher.start()

    # -- finishing a clip (enclave-stage threads) ----------------------------------------------------
    def finish_clip(self, run: _ClipRun) -> None:
        outcome = run.outcome()
        assert self.report is not None and self.manifest is not None
        for env in run.envelopes:
            alert = self.openers.open(env.payload) if self.openers is not None else None
            t0, t1, segment = run.windows.get(env.window_seq, (math.nan, math.nan, -1))
            doc: dict[str, Any] = {
                "clip": run.clip,
                "device": run.device,
                "window_seq": env.window_seq,
                "alert_seq": env.seq,
                "segment": segment,
                "t0": float(alert.get("t0", t0)) if alert else t0,
                "t1": float(alert.get("t1", t1)) if alert else t1,
                "label": alert.get("label") if alert else None,
                "score": alert.get("score") if alert else None,
                "track": alert.get("track_id") if alert else None,
            }
            self.report.alert(doc)
        self.report.sync()  # alerts on disk before the manifest says the clip is done
        self.manifest.record(
            run.clip,
            outcome.status,
            outcome.reason,
            device=run.device,
            frames=outcome.frames,
            windows=outcome.windows,
            alerts=outcome.alerts,
        )
        run.windows.clear()  # a finished clip keeps only its outcome
        run.envelopes.clear()
        if outcome.status == "failed":
            log.error("batch: clip %s failed: %s", run.clip, outcome.reason)
        with self._lock:
            self.outcomes.append(outcome)

    # -- main ------------------------------------------------------------------------------------------
    def run(self) -> BatchSummary:
        import ray

        t_start = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        data_key_path = self._data_key_path()
        first = self.clip_config(self.clips[0] if self.clips else "none", data_key_path)
        settings = self.settings_digest(first)
        manifest_path = self.out.with_name(self.out.name + ".manifest")
        if self.opts.restart:
            for p in (self.out, manifest_path):
                p.unlink(missing_ok=True)
        self.manifest = Manifest(manifest_path, settings)
        if self.manifest.other_settings():
            raise ConfigError(
                f"{manifest_path}: earlier runs used other settings (config, window, rules or model); "
                "write to a new --out, or pass --restart to start this report over"
            )
        self.report = ReportWriter(self.out)
        todo = [c for c in self.clips if not self.manifest.is_done(c)]
        skipped = len(self.clips) - len(todo)
        if skipped:
            log.info("batch: %d clip(s) already done (manifest %s); skipped", skipped, manifest_path)
        if todo:  # nothing to do: no Ray, no evaluator
            how = connect_ray(self.opts.ray, self.opts.local_cpus)
            log.info("batch: Ray %s; %d clip(s) to do", how, len(todo))
            try:
                cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
                per_task = max(self.opts.cpus_per_clip, 0.01)
                warm: Any = ray.remote(warm_up)
                # fire and forget: the workers import while this driver loads the evaluator and plans
                warming = [
                    warm.options(num_cpus=per_task).remote()
                    for _ in range(max(1, int(cluster_cpus // per_task)))
                ]
                self._setup_enclave(first, [device_for(c, self._prefix()) for c in todo])
                self._dispatch(todo, data_key_path, cluster_cpus)
                del warming
            finally:
                # A Ray this run started or joined is left as found: a private local one stops
                # (its processes are the run's), a cluster is only disconnected from. A caller
                # that had Ray up already ("already") keeps it.
                if how != "already":
                    ray.shutdown()
        outcomes = list(self.outcomes)
        failed = [o for o in outcomes if o.status == "failed"]
        summary = BatchSummary(
            clips=len(self.clips),
            clips_done=len(outcomes) - len(failed),
            clips_skipped=skipped,
            clips_failed=len(failed),
            frames=sum(o.frames for o in outcomes),
            windows=sum(o.windows for o in outcomes),
            alerts=sum(o.alerts for o in outcomes),
            failures=[{"clip": o.clip, "reason": o.reason or ""} for o in failed],
            wall_s=time.monotonic() - t_start,
            outcomes=outcomes,
            report=str(self.out),
        )
        self.report.summary(summary.as_line())
        self.report.close()
        self.manifest.close()
        return summary

    def _plan(self, clip: str, data_key_path: Path | None) -> _ClipRun | None:
        """Probe one clip and cut it into segments; None (recorded as failed) when it cannot be read.
        Called as the dispatch loop needs work, so a huge archive starts at once, not after
        probing every file."""
        assert self.manifest is not None
        cfg = self.clip_config(clip, data_key_path)
        name = next(iter(cfg.cameras))
        device = cfg.device_of(name)
        try:
            est = self._frames_estimate(cfg)
        except VeilcamError as e:
            self.manifest.record(clip, "failed", str(e), device=device)
            with self._lock:
                self.outcomes.append(ClipOutcome(clip, device, "failed", str(e), 0, 0, 0, 0, 0.0, 0.0, 0.0))
            log.error("batch: clip %s failed: %s", clip, e)
            return None
        params = window_params(cfg, cfg.cameras[name])
        specs = plan_segments(
            clip,
            device,
            est,
            segment_frames=self.opts.segment_frames,
            length_frames=params.length_frames,
            stride_frames=params.stride_frames,
            seq_base=self.reserve_seq(device),
        )
        return _ClipRun(self, clip, cfg, specs)

    def _dispatch(self, todo: list[str], data_key_path: Path | None, cluster_cpus: float) -> None:
        """Plan clips as needed, keep at most `inflight_cap` segment tasks in flight, hand results
        to their clips in any order; returns when every clip's enclave stage finished."""
        import ray

        bar = progress_bar(0, self.opts.progress)
        progress: Any = ray.remote(FrameProgress).options(num_cpus=0).remote()
        task: Any = ray.remote(segment_task)
        threads = max(1, math.floor(self.opts.cpus_per_clip)) if self.opts.cpus_per_clip >= 1 else 1
        inflight_cap = self.opts.max_inflight or max(
            2, 2 * int(cluster_cpus // max(self.opts.cpus_per_clip, 0.01))
        )
        runs: dict[str, _ClipRun] = {}
        cfg_docs: dict[str, dict[str, Any]] = {}
        pending: dict[Any, tuple[SegmentSpec, float]] = {}
        queue: list[SegmentSpec] = []
        clips = iter(todo)
        more = True
        shown = 0
        try:
            while more or queue or pending:
                while len(pending) < inflight_cap and (queue or more):
                    if not queue:
                        clip = next(clips, None)
                        if clip is None:
                            more = False
                            continue
                        run = self._plan(clip, data_key_path)
                        if run is None:
                            continue
                        runs[clip] = run
                        cfg_docs[clip] = run.cfg.model_copy(update={"broker": None}).model_dump(mode="json")
                        queue.extend(reversed(run.specs))
                        bar.grow(sum(sp.frames_estimate for sp in run.specs))
                        continue
                    spec = queue.pop()
                    ref = task.options(
                        num_cpus=self.opts.cpus_per_clip,
                        num_gpus=self.opts.gpus_per_clip,
                        max_retries=self.opts.max_task_retries,
                        retry_exceptions=False,
                        name=f"veilcam-segment:{spec.key}",
                    ).remote(spec, cfg_docs[spec.clip], progress, threads)
                    pending[ref] = (spec, time.monotonic())
                if not pending:
                    continue
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    spec, t_sent = pending.pop(ref)
                    out = self._result(ref, spec)
                    self.first_clip_of_worker.setdefault(out.pid, spec.clip)
                    runs[spec.clip].segment_done(out, time.monotonic() - t_sent)
                    if spec.index == len(runs[spec.clip].specs) - 1:
                        cfg_docs.pop(spec.clip, None)
                done_frames = int(ray.get(progress.total.remote()))
                if done_frames > shown:
                    bar.update(done_frames - shown)
                    shown = done_frames
            for r in runs.values():
                r.finished.wait()
        except BaseException:
            self.stop.set()
            raise
        finally:
            bar.close()
            self._close()

    def _result(self, ref: Any, spec: SegmentSpec) -> SegmentOutput:
        """The segment's output; a task that failed for good becomes an output with the error."""
        import ray

        try:
            out: SegmentOutput = ray.get(ref)
            return out
        except ray.exceptions.RayError as e:
            reason = f"Ray task failed after {self.opts.max_task_retries} retries: {type(e).__name__}"
            detail = str(e).strip().splitlines()
            if detail:
                reason += f": {detail[-1][:300]}"
            return SegmentOutput(spec, [], [], 0, 0, "error", reason, None, 0.0, 0.0, "", -1)

    def _frames_estimate(self, cfg: VeilcamConfig) -> int:
        """Frames after the fps throttle (the progress total and the segment plan)."""
        name = next(iter(cfg.cameras))
        cam = cfg.cameras[name]
        params = window_params(cfg, cam)
        probe_q: BoundedQueue[Any] = BoundedQueue(1, "block", name="probe")
        info = CaptureStage(cfg.device_of(name), cam, probe_q, CameraStats(cfg.device_of(name))).probe()
        if info.frame_count <= 0:
            raise StageError(f"{cam.source}: no frame count in the file header (not a seekable video file)")
        total = info.frame_count
        target = cam.fps or params.fps
        if target and info.fps and target < info.fps:
            total = math.ceil(total * target / info.fps)
        if cam.max_frames:
            total = min(total, cam.max_frames)
        return int(total)

    def _data_key_path(self) -> Path | None:
        """None: the config names the data key (every Ray node reads it there). Without a config,
        a throw-away key for this report in the state dir (a local Ray only, like `replay`)."""
        if self.base is not None:
            return None
        if self.opts.ray not in ("auto", "local"):
            raise ConfigError(
                "--ray ADDRESS needs --config with data_key_path (a key file present on every node); "
                "a throw-away key exists on this machine only"
            )
        from enclave_bridge.shared.keys import generate_data_key

        path = self.state_dir / "throwaway-data.key"
        if not path.exists():
            generate_data_key().save(path)
        return path

    def _close(self) -> None:
        if self.publisher is not None:
            self.publisher.stop(flush_timeout_s=30.0)
        if self.outbox is not None:
            self.outbox.close()
        if self.link is not None:
            try:
                self.link.close()
            except VeilcamError as e:
                log.debug("batch: enclave link close: %s", e)


def run_batch(
    clips: Sequence[str],
    base: VeilcamConfig | None,
    opts: BatchOptions,
    *,
    camera: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> BatchSummary:
    """Run `clips` (absolute paths, see `expand_clips`) and write the report; see the module doc."""
    return BatchRun(clips, base, opts, camera=camera, overrides=overrides).run()


__all__ = [
    "BatchOptions",
    "BatchSummary",
    "ClipOutcome",
    "connect_ray",
    "device_for",
    "expand_clips",
    "format_summary",
    "run_batch",
]
