"""Test helper (no tests here): one of our socket services in its own process, with a low fd limit.

`python -m tests.reliability.socket_server_main request|gpu ADDR NOFILE IDLE_S MAX_CONN` starts the
enclaves' `RequestServer` (a `status` op only) or the GPU worker's `serve` on ADDR after lowering
RLIMIT_NOFILE to NOFILE, so a test can drive `accept()` into EMFILE without touching its own limits.
"""

from __future__ import annotations

import logging
import resource
import signal
import sys
import threading


def main(argv: list[str]) -> int:
    kind, addr, nofile, idle_s, max_conn = argv[0], argv[1], int(argv[2]), float(argv[3]), int(argv[4])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    stop = threading.Event()
    if kind == "gpu":
        from enclave_bridge.gpu.worker import WorkerCore, serve

        core = WorkerCore("cpu")
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        serve(
            addr,
            core,
            ready=lambda a: print("READY", a, flush=True),
            stop=stop,
            max_connections=max_conn,
            idle_timeout_s=idle_s,
        )
        return 0
    from enclave_bridge.measured.service import RequestServer, install_signal_handlers

    server = RequestServer(
        "test-service",
        {"status": lambda c, r: {"alive": True}},
        max_connections=max_conn,
        idle_timeout_s=idle_s,
    )
    install_signal_handlers(server)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    server.serve(addr, ready=lambda: print("READY", addr, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
