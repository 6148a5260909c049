# What type checkers see for `enclave_bridge.protocol`: at run time protocol.py replaces itself in sys.modules
# with `enclave_bridge.measured.protocol`, which mypy cannot follow, so this stub names the same public API.
from enclave_bridge.measured.protocol import *  # noqa: F403 - the alias is the whole module
