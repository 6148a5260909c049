"""Wall-clock jumps (NTP step back an hour, forward a day) in the middle of a replay: no crash, no
window or alert number reused, every window evaluated and alerted. Window/alert numbers come from
persisted counters and window times are media time, so only the envelopes' `ts` follow the clock."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from config.schema import REPO_ROOT, EnclaveConfig, RulesConfig
from enclave_bridge.host.alert_opener import AlertOpener
from enclave_bridge.measured.stgcn import STGCN
from enclave_bridge.shared.keys import PartyKey, generate_data_key
from pipeline.app.daemon import Daemon, ListSink, make_local_enclave
from pipeline.app.replay import replay_config

VTEST = REPO_ROOT / "samples" / "vtest.avi"


class JumpyClock:
    """`time.time` with an offset the test moves (a stepped system clock)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._real = time.time

    def __call__(self) -> float:
        return self._real() + self.offset


def test_clock_steps_back_and_forward_mid_stream(tmp_path: Path, monkeypatch) -> None:
    model = tmp_path / "model"
    model.mkdir()
    torch.manual_seed(2)
    torch.save(STGCN(3).state_dict(), model / "model.pt")
    (model / "labels.txt").write_text("walking\nstanding\nfalling\n")
    (model / "model.json").write_text(json.dumps({"T": 8, "stride": 4, "fps": 10}))
    cfg = replay_config(VTEST, state_dir=tmp_path / "state", overrides={"max_frames": 24})
    cfg = cfg.model_copy(
        update={
            "enclave": EnclaveConfig(model_dir=model),
            "rules": RulesConfig(labels=["*"], min_score=0.0, debounce_s=0.0),
        }
    )
    clock = JumpyClock()
    monkeypatch.setattr(time, "time", clock)
    consumer = PartyKey.generate("consumer", "ops")
    key = generate_data_key()
    link = make_local_enclave(cfg, key, [consumer.public])
    steps = iter([-3600.0, +86400.0, -86400.0 - 600.0])
    sealed: list[int] = []

    def on_result(w, result, _lat) -> None:
        sealed.append(w.seq)
        assert result.status == "ok"
        step = next(steps, None)
        if step is not None:
            clock.offset += step

    sink = ListSink()
    daemon = Daemon(cfg, key=key, link=link, sink=sink, metrics=False, on_result=on_result)
    daemon.start()
    assert daemon.run_until_done(tick_s=0.1) == 0
    assert len(sealed) == 5 and sealed == sorted(set(sealed))  # strictly increasing window seqs
    alerts = [AlertOpener(consumer, link.verify_key).open(e.payload) for e in sink.items]
    assert len(alerts) == 5  # one per window
    seqs = [a["seq"] for a in alerts]
    assert seqs == sorted(set(seqs)) and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    ts = [a["ts"] for a in alerts]
    assert ts != sorted(ts)  # the clock really moved backwards under the pipeline
    assert [a["window_seq"] for a in alerts] == sorted(a["window_seq"] for a in alerts)
    t1s = [a["t1"] for a in alerts]
    assert t1s == sorted(t1s)  # media time, not the wall clock
