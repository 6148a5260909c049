"""Everything that crosses the trust boundary: ST-GCN, ring arithmetic, masking protocol,
enclave runtime, GPU worker, attestation and keys."""
