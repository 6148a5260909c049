"""ST-GCN exactly as the reference (yysijie/st-gcn), its graphs, checkpoints and folded form."""

from enclave_bridge.measured.stgcn.fold import FoldedBlock, FoldedSTGCN, fold_batchnorm
from enclave_bridge.measured.stgcn.graph import LAYOUTS, OPENPOSE_JOINTS, STRATEGIES, Graph
from enclave_bridge.measured.stgcn.model import STGCN, load_label_map, unwrap_state_dict

__all__ = [
    "LAYOUTS",
    "OPENPOSE_JOINTS",
    "STGCN",
    "STRATEGIES",
    "FoldedBlock",
    "FoldedSTGCN",
    "Graph",
    "fold_batchnorm",
    "load_label_map",
    "unwrap_state_dict",
]
