# What type checkers see for `enclave_bridge.keys`: at run time keys.py replaces itself in sys.modules
# with `enclave_bridge.shared.keys`, which mypy cannot follow, so this stub names the same public API.
from enclave_bridge.shared.keys import *  # noqa: F403 - the alias is the whole module
