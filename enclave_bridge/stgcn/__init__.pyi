# What type checkers see for `enclave_bridge.stgcn`: at run time __init__.py replaces this package and
# its submodules in sys.modules with `enclave_bridge.measured.stgcn`, which mypy cannot follow.
from enclave_bridge.measured.stgcn import *  # noqa: F403 - the alias is the whole package
