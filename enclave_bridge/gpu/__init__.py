"""The untrusted GPU worker: sees only masked ring elements; imports only `enclave_bridge.shared`."""
