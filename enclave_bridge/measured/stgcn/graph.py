"""Skeleton graphs and ST-GCN adjacency partitions, reproducing yysijie/st-gcn `net/utils/graph.py`.

The graph is data, separate from the model (as in mmaction2/pyskl). The reference computes hop
distances with `max_hop=1`, so joints two or more hops from the centre have distance `inf`; in the
`spatial` strategy `inf == inf` puts such neighbour pairs into the *root* partition. That quirk is
what released checkpoints were trained with, so it is reproduced on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

# OpenPose/COCO-18 joints (docs/ARCHITECTURE.md §3) and their bones, as in the reference `openpose` layout.
OPENPOSE_JOINTS: tuple[str, ...] = (
    "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
    "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
)  # fmt: skip
_OPENPOSE_EDGES: tuple[tuple[int, int], ...] = (
    (4, 3), (3, 2), (7, 6), (6, 5), (13, 12), (12, 11), (10, 9), (9, 8), (11, 5), (8, 2),
    (5, 1), (2, 1), (0, 1), (15, 0), (14, 0), (17, 15), (16, 14),
)  # fmt: skip
# NTU-RGB+D 25 joints, edges in the reference's 1-based numbering.
_NTU_EDGES_1BASED: tuple[tuple[int, int], ...] = (
    (1, 2), (2, 21), (3, 21), (4, 3), (5, 21), (6, 5), (7, 6), (8, 7), (9, 21), (10, 9), (11, 10),
    (12, 11), (13, 1), (14, 13), (15, 14), (16, 15), (17, 1), (18, 17), (19, 18), (20, 19),
    (22, 23), (23, 8), (24, 25), (25, 12),
)  # fmt: skip

LAYOUTS = ("openpose", "ntu-rgb+d")
STRATEGIES = ("uniform", "distance", "spatial")


def hop_distance(num_node: int, edges: list[tuple[int, int]], max_hop: int = 1) -> npt.NDArray[np.float64]:
    """(V, V) hop counts up to `max_hop`; farther pairs are `inf` (reference behaviour)."""
    adj = np.zeros((num_node, num_node))
    for i, j in edges:
        adj[j, i] = 1
        adj[i, j] = 1
    dist = np.full((num_node, num_node), np.inf)
    reach = np.stack([np.linalg.matrix_power(adj, d) for d in range(max_hop + 1)]) > 0
    for d in range(max_hop, -1, -1):
        dist[reach[d]] = d
    return dist


def normalize_digraph(adj: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Column-normalise: A · D^-1 with D the column degrees (reference `normalize_digraph`)."""
    deg = adj.sum(axis=0)
    inv = np.zeros_like(deg)
    nz = deg > 0
    inv[nz] = 1.0 / deg[nz]
    norm: npt.NDArray[np.float64] = adj @ np.diag(inv)
    return norm


@dataclass(frozen=True)
class Graph:
    """Adjacency partitions `A` of shape (K, V, V) for a layout and partition strategy."""

    layout: str = "openpose"
    strategy: str = "spatial"
    max_hop: int = 1
    dilation: int = 1
    num_node: int = field(init=False)
    center: int = field(init=False)
    edges: tuple[tuple[int, int], ...] = field(init=False)
    A: npt.NDArray[np.float64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.layout == "openpose":
            num_node, center, neighbours = 18, 1, list(_OPENPOSE_EDGES)
        elif self.layout == "ntu-rgb+d":
            num_node, center = 25, 21 - 1
            neighbours = [(i - 1, j - 1) for i, j in _NTU_EDGES_1BASED]
        else:
            raise ValueError(f"unknown graph layout {self.layout!r}; expected one of {LAYOUTS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown partition strategy {self.strategy!r}; expected one of {STRATEGIES}")
        edges = [(i, i) for i in range(num_node)] + neighbours
        object.__setattr__(self, "num_node", num_node)
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "edges", tuple(edges))
        object.__setattr__(self, "A", self._adjacency(hop_distance(num_node, edges, self.max_hop)))

    def _adjacency(self, hop: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        valid_hop = range(0, self.max_hop + 1, self.dilation)
        adjacency = np.zeros((self.num_node, self.num_node))
        for h in valid_hop:
            adjacency[hop == h] = 1
        norm = normalize_digraph(adjacency)
        if self.strategy == "uniform":
            return norm[None]
        if self.strategy == "distance":
            parts = np.zeros((len(valid_hop), self.num_node, self.num_node))
            for i, h in enumerate(valid_hop):
                parts[i][hop == h] = norm[hop == h]
            return parts
        parts_list: list[npt.NDArray[np.float64]] = []
        c = self.center
        for h in valid_hop:
            root = np.zeros((self.num_node, self.num_node))
            close = np.zeros_like(root)
            further = np.zeros_like(root)
            for i in range(self.num_node):
                for j in range(self.num_node):
                    if hop[j, i] != h:
                        continue
                    if hop[j, c] == hop[i, c]:
                        root[j, i] = norm[j, i]
                    elif hop[j, c] > hop[i, c]:
                        close[j, i] = norm[j, i]
                    else:
                        further[j, i] = norm[j, i]
            if h == 0:
                parts_list.append(root)
            else:
                parts_list.append(root + close)
                parts_list.append(further)
        return np.stack(parts_list)


__all__ = ["LAYOUTS", "OPENPOSE_JOINTS", "STRATEGIES", "Graph", "hop_distance", "normalize_digraph"]
