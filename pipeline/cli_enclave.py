"""Moved to `pipeline.app.cli_enclave` (issue 13: the application layer sits on top of `pipeline`).

Transitional alias for code written before the move; removed when nothing imports it.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("pipeline.app.cli_enclave")
