# What type checkers see for `enclave_bridge.enclave`: at run time enclave.py replaces itself in sys.modules
# with `enclave_bridge.measured.enclave`, which mypy cannot follow, so this stub names the same public API.
from enclave_bridge.measured.enclave import *  # noqa: F403 - the alias is the whole module
