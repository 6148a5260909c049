"""Moved to `enclave_bridge.shared.sealing` (issue 13: the trust boundary in the folder names).

Transitional alias for code written before the move; removed when nothing
imports it.
The alias is the same module object, so patches and isinstance checks see one module.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("enclave_bridge.shared.sealing")
