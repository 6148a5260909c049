"""Secure evaluation, host-side import path (docs/ARCHITECTURE.md §5).

The code lives in the measured package (`enclave_bridge.measured.protocol`); this alias is that
module object, plus one thing the measured code may not do itself: wiring `worker=None` to the
in-process worker from the untrusted package (`enclave_bridge.gpu.worker.LocalWorker`).
"""

import importlib
import sys

from enclave_bridge.gpu.worker import LocalWorker

_protocol = importlib.import_module("enclave_bridge.measured.protocol")
_protocol.register_local_worker(LocalWorker)
sys.modules[__name__] = _protocol
