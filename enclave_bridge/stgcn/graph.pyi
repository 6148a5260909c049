# Typing view of the alias `enclave_bridge.stgcn.graph` (see __init__.pyi): the measured module's API.
from enclave_bridge.measured.stgcn.graph import *  # noqa: F403 - the alias is the whole module
