"""Gramine-SGX packaging of the enclaves: manifest rendering and the `/dev/attestation` backend.

`python -m enclave_bridge.host.gramine render --role eval --config enclave.yaml --listen 0.0.0.0:7000
--state-dir /var/lib/veilcam/eval --out veilcam-enclave.manifest` writes a manifest whose trusted
files are exactly the measured enclave file set (`enclave_bridge.shared.measurement.enclave_files`).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from enclave_bridge.shared.errors import ConfigError
from enclave_bridge.shared.measurement import PACKAGE_ROOT, enclave_files

TEMPLATE = Path(__file__).with_name("veilcam-enclave.manifest.template")


class _GramineGlobals:
    """Stand-in for the `gramine` object `gramine-manifest` injects into templates."""

    def __init__(self, libos: str, runtimedir: str) -> None:
        self.libos = libos
        self._runtimedir = runtimedir

    def runtimedir(self) -> str:
        return self._runtimedir


def render_manifest(
    *,
    role: str,
    config: str,
    listen: str,
    state_dir: str,
    code_dir: str | None = None,
    gramine_libos: str = "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so",
    gramine_runtimedir: str = "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc",
    enclave_size: str = "8G",
    max_threads: int = 64,
    threads: int = 4,
    log_level: str = "error",
    template: Path = TEMPLATE,
) -> str:
    """Render the manifest template for `role` ("eval" or "key")."""
    try:
        import jinja2
    except ImportError as e:  # jinja2 ships with torch; gramine-manifest needs it too
        raise ConfigError("rendering the Gramine manifest needs jinja2") from e
    if role not in ("eval", "key"):
        raise ConfigError("role must be 'eval' or 'key'")
    if listen.startswith("unix:") or listen.startswith("/"):
        raise ConfigError(
            "under Gramine the enclave must listen on TCP (host:port): Unix sockets stay inside"
        )
    code = Path(code_dir) if code_dir else PACKAGE_ROOT.parent
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)  # noqa: S701 (TOML, not HTML)
    paths = sysconfig.get_paths()
    variables: dict[str, Any] = {
        "gramine": _GramineGlobals(gramine_libos, gramine_runtimedir),
        "python": sys.executable,
        "python_prefix": sys.prefix,
        "python_stdlib": paths["stdlib"],
        "python_sitepackages": paths["purelib"],
        "arch_libdir": "/lib/x86_64-linux-gnu",
        "role": role,
        "listen": listen,
        "state_dir": state_dir,
        "config": str(Path(config).resolve()),
        "code_dir": str(code),
        "enclave_files": [rel for rel, _ in enclave_files(code / "enclave_bridge")],
        "enclave_size": enclave_size,
        "max_threads": max_threads,
        "threads": threads,
        "log_level": log_level,
    }
    return env.from_string(template.read_text(encoding="utf-8")).render(**variables) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m enclave_bridge.host.gramine", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="render the Gramine manifest")
    r.add_argument("--role", choices=("eval", "key"), required=True)
    r.add_argument("--config", required=True)
    r.add_argument("--listen", required=True)
    r.add_argument("--state-dir", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--enclave-size", default="8G")
    args = p.parse_args(argv)
    text = render_manifest(
        role=args.role,
        config=args.config,
        listen=args.listen,
        state_dir=args.state_dir,
        enclave_size=args.enclave_size,
    )
    Path(args.out).write_text(text, encoding="utf-8")
    print(
        f"wrote {args.out}; next: gramine-sgx-sign --manifest {args.out} "
        "--output veilcam-enclave.manifest.sgx"
    )
    return 0


__all__ = ["TEMPLATE", "main", "render_manifest"]
