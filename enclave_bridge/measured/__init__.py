"""The enclave's code: the one measured package (with `enclave_bridge.shared`, which it imports).

Runtime services (evaluation and key enclaves), secure evaluation (ring masking, Freivalds, the
precompute pool, the client side of the worker protocol), ST-GCN, alert building and sealing. It
imports nothing from the host side — not `enclave_bridge.host`, not the GPU worker
(`enclave_bridge.gpu`), not `pipeline`, `stages`, `config` or `training`;
tests/test_import_contract.py enforces it. Workers are injected, never imported.
"""
