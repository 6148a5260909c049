"""`gramine-sgx` backend: the `EnclaveBackend` interface over Gramine's `/dev/attestation` files.

- quote: write the 64-byte report_data to `/dev/attestation/user_report_data`, read the DCAP quote
  from `/dev/attestation/quote` (needs `sgx.remote_attestation = "dcap"` in the manifest);
- measurement: MRENCLAVE, taken from our own quote's report body;
- sealing key: `/dev/attestation/keys/_sgx_mrenclave` (the MRENCLAVE-bound SGX sealing key, 16
  bytes), stretched with HKDF — the same key Gramine's encrypted `/state` mount uses.

Local attestation uses DCAP quotes as well (`kind="report"` only changes the label the peer
checks); a production deployment would use EREPORT + target info for same-CPU checks. Verifying a
DCAP quote (PCK certificate chain, TCB status) needs Intel's quote-verification library and is
not part of this Python verifier — see README "Running on SGX hardware".
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclave_bridge.shared.errors import AttestationError, ConfigError

log = logging.getLogger(__name__)

# DCAP quote v3/v4 layout: 48-byte header, then the 384-byte SGX report body.
QUOTE_HEADER_BYTES = 48
MRENCLAVE_OFFSET = QUOTE_HEADER_BYTES + 64
MRSIGNER_OFFSET = QUOTE_HEADER_BYTES + 128
REPORT_DATA_OFFSET = QUOTE_HEADER_BYTES + 320
MIN_QUOTE_BYTES = QUOTE_HEADER_BYTES + 384


def parse_sgx_quote(quote: bytes) -> tuple[bytes, bytes, bytes]:
    """(MRENCLAVE, MRSIGNER, report_data) of a DCAP quote — structure only, no signature check."""
    if len(quote) < MIN_QUOTE_BYTES:
        raise AttestationError(f"SGX quote too short ({len(quote)} bytes)")
    version, att_key_type = struct.unpack_from("<HH", quote, 0)
    if version not in (3, 4):
        raise AttestationError(f"unsupported SGX quote version {version}")
    if att_key_type != 2:  # ECDSA-256-with-P-256
        raise AttestationError(f"unsupported attestation key type {att_key_type}")
    return (
        quote[MRENCLAVE_OFFSET : MRENCLAVE_OFFSET + 32],
        quote[MRSIGNER_OFFSET : MRSIGNER_OFFSET + 32],
        quote[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + 64],
    )


class GramineBackend:
    """Runs inside a Gramine-SGX enclave; `root` is `/dev/attestation` there."""

    name = "gramine-sgx"
    insecure = False

    def __init__(self, root: str | Path = "/dev/attestation") -> None:
        self.root = Path(root)
        att_type = self.root / "attestation_type"
        if not att_type.exists():
            raise ConfigError(
                f"{att_type} not found: the gramine-sgx backend only runs inside a Gramine SGX enclave"
            )
        kind = att_type.read_text().strip()
        if kind != "dcap":
            raise ConfigError(f"Gramine attestation type is {kind!r}; the manifest must set dcap")
        self._measurement: bytes | None = None
        log.info("gramine-sgx backend: DCAP attestation via %s", self.root)

    def quote(self, report_data: bytes, kind: str = "quote") -> bytes:
        if len(report_data) != 64:
            raise ConfigError("report_data must be 64 bytes")
        (self.root / "user_report_data").write_bytes(report_data)
        quote = (self.root / "quote").read_bytes()
        _, _, rd = parse_sgx_quote(quote)
        if rd != report_data:
            raise AttestationError("quote does not carry our report_data (concurrent quote request?)")
        return quote

    def measurement(self) -> bytes:
        if self._measurement is None:
            mrenclave, _, _ = parse_sgx_quote(self.quote(b"\0" * 64))
            self._measurement = mrenclave
        return self._measurement

    def sealing_key(self) -> bytes:
        raw = (self.root / "keys" / "_sgx_mrenclave").read_bytes()
        if len(raw) != 16:
            raise AttestationError("unexpected SGX sealing key size")
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"veilcam-seal-sgx-v1").derive(raw)


__all__ = ["GramineBackend", "parse_sgx_quote"]
