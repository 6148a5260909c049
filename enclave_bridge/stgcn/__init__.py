"""Moved to `enclave_bridge.measured.stgcn` (issue 13).

docs/ARCHITECTURE.md documents `enclave_bridge.stgcn.STGCN`; this package aliases the measured one
and its submodules so both import paths give the same module objects (one `STGCN` class, not two).
"""

import importlib
import sys

for _sub in ("fold", "graph", "model"):
    sys.modules[f"{__name__}.{_sub}"] = importlib.import_module(f"enclave_bridge.measured.stgcn.{_sub}")
sys.modules[__name__] = importlib.import_module("enclave_bridge.measured.stgcn")
