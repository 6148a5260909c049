# Typing view of the alias `enclave_bridge.stgcn.model` (see __init__.pyi): the measured module's API.
from enclave_bridge.measured.stgcn.model import *  # noqa: F403 - the alias is the whole module
