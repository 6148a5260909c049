"""Moved (issue 13): the envelope format to `enclave_bridge.shared.alert_format`, building to
`enclave_bridge.measured.alerts`, opening to `enclave_bridge.host.alert_opener`.

Transitional alias for code written before the move (it re-exports all three); removed when nothing
imports it.
"""

from enclave_bridge.host.alert_opener import AlertOpener, NoGrantError
from enclave_bridge.measured.alerts import build_alert
from enclave_bridge.shared.alert_format import ENVELOPE_BLOCK, FIELD_PAD_BYTES, parse_alert

__all__ = ["ENVELOPE_BLOCK", "FIELD_PAD_BYTES", "AlertOpener", "NoGrantError", "build_alert", "parse_alert"]
