"""Everything around the trust boundary, one folder per side of it:

- `measured/` — the enclave's code (the measured package), with `shared/` the only thing it imports;
- `shared/` — formats and arithmetic both sides agree on (measured with the enclave);
- `host/` — party-side code: the daemon's enclave client, owner tooling, Gramine rendering;
- `gpu/` — the untrusted GPU worker.

The top-level modules (`protocol`, `enclave`, `attest`, `keys`, `stgcn`, …) are import aliases.
"""
