"""Re-export of the error tree for the untrusted side (stages import `pipeline`, not the enclave)."""

from enclave_bridge.shared.errors import (
    AttestationError,
    CheckpointError,
    ConfigError,
    EnclaveError,
    IntegrityError,
    StageError,
    TransportError,
    VeilcamError,
)

__all__ = [
    "AttestationError",
    "CheckpointError",
    "ConfigError",
    "EnclaveError",
    "IntegrityError",
    "StageError",
    "TransportError",
    "VeilcamError",
]
