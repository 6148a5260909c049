"""Synthetic skeleton data and training of the default action model (outside the enclave's
trusted file set)."""
