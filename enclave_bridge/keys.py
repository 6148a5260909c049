"""Moved to `enclave_bridge.shared.keys` (issue 13: the trust boundary in the folder names).

docs/ARCHITECTURE.md documents this import path; it stays as an alias.
The alias is the same module object, so patches and isinstance checks see one module.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("enclave_bridge.shared.keys")
