"""Layering of the top-level packages: each layer imports only the layers below it (no cycles).

    benchmarks
    pipeline.app                      daemon, CLIs, demo, subscriber, replay, batch
    training
    stages                            capture, pose, windowing, enclave client, alerts
    enclave_bridge.host               party side of the enclaves
    enclave_bridge.measured  .gpu     the enclave; the untrusted worker
    pipeline                          base: messages, queues, errors, stats, outbox, broker
    config
    enclave_bridge.shared             formats both sides of the boundary agree on

`pipeline/__main__.py` (run as a script, never imported) and the import aliases at the top of
`enclave_bridge` are the only modules outside this table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_import_contract import REPO, imports_of

BELOW: dict[str, set[str]] = {
    "enclave_bridge.shared": set(),
    "config": {"enclave_bridge.shared"},
    "pipeline": {"config", "enclave_bridge.shared"},
    "enclave_bridge.measured": {"enclave_bridge.shared"},
    "enclave_bridge.gpu": {"enclave_bridge.shared"},
    "enclave_bridge.host": {"enclave_bridge.shared", "enclave_bridge.measured"},
    "stages": {
        "pipeline",
        "config",
        "enclave_bridge.shared",
        "enclave_bridge.measured",
        "enclave_bridge.host",
    },
}
BELOW["training"] = BELOW["stages"] | {"stages"}
BELOW["pipeline.app"] = BELOW["training"] | {"training", "enclave_bridge.gpu", "enclave_bridge"}
BELOW["benchmarks"] = BELOW["pipeline.app"] | {"pipeline.app"}
UNITS = sorted(BELOW, key=len, reverse=True)
EXEMPT = {"pipeline/__main__.py"}


def unit_of(module: str) -> str | None:
    """The layer a module belongs to (most specific first); None for third-party and aliases."""
    for u in UNITS:
        if module == u or module.startswith(u + "."):
            return u
    return "enclave_bridge" if module.split(".")[0] == "enclave_bridge" else None


def layer_violations() -> list[str]:
    out = []
    for top in ("enclave_bridge", "config", "pipeline", "stages", "training", "benchmarks"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            mod = ".".join(path.relative_to(REPO).with_suffix("").parts)
            me = unit_of(mod)
            if rel in EXEMPT or me in (None, "enclave_bridge"):
                continue
            for line, name in imports_of(path):
                other = unit_of(name)
                if other is None or other == me:
                    continue
                if other not in BELOW[me]:
                    out.append(f"{rel}:{line} ({me}) imports {name} ({other})")
    return out


def test_every_package_imports_only_layers_below_it() -> None:
    assert layer_violations() == []


def test_the_layers_form_no_cycle() -> None:
    for u, below in BELOW.items():
        for v in below:
            assert u not in BELOW.get(v, set()), f"{u} and {v} are both below each other"


@pytest.mark.parametrize("unit", ["pipeline", "stages", "config"])
def test_no_lower_layer_reaches_the_application(unit: str) -> None:
    assert "pipeline.app" not in BELOW[unit] and "training" not in BELOW[unit]


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    probe = REPO / "stages" / "_layer_probe.py"
    probe.write_text("from pipeline.app import daemon\n")
    try:
        found = layer_violations()
    finally:
        probe.unlink()
    assert "stages/_layer_probe.py:1 (stages) imports pipeline.app (pipeline.app)" in found
