"""README output blocks against the code that prints them: the demo block shows as many alerts as
the default `veilcam demo` evaluates windows, and the subscribe examples show exactly the fields
the walkthrough's own policy grants (docs/OWNERS.md, docs/CONSUMERS.md), rendered by the real
`format_alert`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline.app.cli import build_parser
from pipeline.app.subscriber import format_alert

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
OWNERS = (REPO / "docs" / "OWNERS.md").read_text()  # the provisioning walkthrough and its policy
CONSUMERS = (REPO / "docs" / "CONSUMERS.md").read_text()  # "Consuming alerts"
_TS = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def _quickstart() -> str:
    return README[README.index("<!-- section:quickstart -->") : README.index("<!-- /section:quickstart -->")]


def _demo_default(option: str) -> object:
    parser = build_parser()
    return parser.parse_args(["demo"]).__dict__[option]


def test_demo_block_shows_what_the_default_demo_prints() -> None:
    block = re.search(r"\nveilcam demo\n```\n\n```\n(.*?)\n```", _quickstart(), re.S)
    assert block is not None, "quick start: no output block after `veilcam demo`"
    lines = block.group(1).splitlines()
    frames = int(_demo_default("max_frames"))  # type: ignore[call-overload]
    meta = json.loads((REPO / "samples" / "default_model" / "model.json").read_text())
    windows = (frames - int(meta["T"])) // int(meta["stride"]) + 1
    alerts = [x for x in lines if x.startswith("ALERT ")]
    # the demo rules alert on every window (min_score 0, no debounce): one alert per window
    assert len(alerts) == windows, (
        f"README shows {len(alerts)} alerts; `veilcam demo` evaluates {windows} windows"
    )
    assert any(f"replaying {frames} frames of vtest.avi" in x for x in lines)
    assert any(f": {windows} alert(s) delivered" in x for x in lines)
    assert any(f"secure evaluation mode '{_demo_default('mode')}'" in x for x in lines)
    progress = [x for x in lines if not x.startswith("ALERT ")]
    assert all(re.match(r"\[demo +\d+\.\ds\] ", x) for x in progress), (
        "only demo lines and alerts are printed"
    )
    assert "MQTT broker on" in progress[1], "the broker is started (and checked) before the set-up"
    for a in alerts:  # the demo's policy grants every field: window number and top-k are shown
        assert re.search(r"  window \d+  \[\w+ [01]\.\d\d, ", a), a


def _walkthrough_grant() -> list[str]:
    m = re.search(r"--recipient keys/control-room\.pub=([\w,]+)", OWNERS)
    assert m is not None
    return m.group(1).split(",")


def _line_for(grant: list[str], example: str) -> str:
    """What `format_alert` prints for an alert carrying only `grant`, with the example's values."""
    m = re.search(r"(\S+) #(\d+)  (\w+) ([\d.]+)  track (\d+)  t ([\d.]+)-([\d.]+) s", example)
    assert m is not None, example
    full = {
        "device": m.group(1), "seq": int(m.group(2)), "ts": 0.0, "label": m.group(3),
        "score": float(m.group(4)), "track_id": int(m.group(5)), "t0": float(m.group(6)),
        "t1": float(m.group(7)), "window_seq": 1, "topk": [[m.group(3), float(m.group(4))]],
    }  # fmt: skip
    alert = {k: v for k, v in full.items() if k in ("device", "seq", "ts", *grant)}
    return format_alert(alert).split("  ", 1)[1]  # without the local-time stamp


def test_subscribe_examples_show_exactly_the_granted_fields() -> None:
    grant = _walkthrough_grant()
    assert "window_seq" not in grant and "topk" not in grant
    mqtt = CONSUMERS[CONSUMERS.index("**Consuming alerts.**") :]
    example = re.search(rf"^# ({_TS}  .+)$", mqtt, re.M)
    assert example is not None, "Alerts over MQTT: no example subscriber line"
    shown = example.group(1).split("  ", 1)[1]
    assert shown == _line_for(grant, shown)
    prose = re.search(rf"`({_TS}  trial #\d+  .+?)`", OWNERS)
    assert prose is not None, "walkthrough: no example subscriber line"
    shown = prose.group(1).split("  ", 1)[1]
    assert shown == _line_for(grant, shown)
