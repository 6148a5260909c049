"""`veilcam` console script. Each area registers its own subcommands from a `pipeline/cli_*.py`
module (`register(subparsers)`), so the CLI grows without one file owning everything."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pipeline import __version__
from pipeline.errors import VeilcamError

# Modules that add subcommands; each defines `register(subparsers) -> None` and sets
# `func(args) -> int` on its parsers.
_COMMAND_MODULES = (
    "pipeline.app.cli_daemon",  # run, replay, check-config, demo
    "pipeline.app.cli_mqtt",  # subscribe
    "pipeline.app.cli_enclave",  # platform, keygen, model, provision, enclave, attest
    "pipeline.app.cli_worker",  # gpu-worker, bench
    "pipeline.app.cli_train",  # train, evaluate
    "pipeline.app.cli_batch",  # batch (archive replay on Ray)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="veilcam",
        description="Privacy-preserving action recognition for CCTV cameras (ST-GCN in an enclave).",
    )
    parser.add_argument("--version", action="version", version=f"veilcam {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except VeilcamError as e:
        print(f"veilcam: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
