# What type checkers see for `enclave_bridge.attest`: at run time attest.py replaces itself in sys.modules
# with `enclave_bridge.shared.attest`, which mypy cannot follow, so this stub names the same public API.
from enclave_bridge.shared.attest import *  # noqa: F403 - the alias is the whole module
