"""How close two pose backends' skeletons are on the same frames (people matched one to one).

Used to check that a faster runtime finds the same people at the same places as `opencv-openpose`
(tests, `benchmarks/pose_fps.py`): people are paired greedily by the mean distance of the joints
both found, closest pair first; a pair farther apart than `match_px` counts as two unmatched people.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


def person_distance(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> tuple[float, int]:
    """Mean pixel distance over the joints both (18, 3) skeletons have, and how many those are."""
    both = (a[:, 2] > 0) & (b[:, 2] > 0)
    n = int(both.sum())
    if n == 0:
        return float("inf"), 0
    return float(np.hypot(*(a[both, :2] - b[both, :2]).T).mean()), n


def match_people(
    a: npt.NDArray[np.float32], b: npt.NDArray[np.float32], match_px: float
) -> list[tuple[int, int, float]]:
    """Greedy one-to-one pairs (i in a, j in b, mean joint distance), closest first, ≤ `match_px`."""
    cand = []
    for i in range(len(a)):
        for j in range(len(b)):
            d, n = person_distance(a[i], b[j])
            if n and d <= match_px:
                cand.append((d, i, j))
    cand.sort()
    used_a: set[int] = set()
    used_b: set[int] = set()
    out = []
    for d, i, j in cand:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            out.append((i, j, d))
    return out


@dataclass
class Agreement:
    """Running totals over frames of (reference, candidate) skeletons."""

    match_px: float = 10.0
    frames: int = 0
    people_ref: int = 0
    people_cand: int = 0
    matched: int = 0
    same_count_frames: int = 0
    joints_compared: int = 0
    joints_ref_only: int = 0
    joints_cand_only: int = 0
    distances: list[float] = field(default_factory=list)

    def add(self, ref: npt.NDArray[np.float32], cand: npt.NDArray[np.float32]) -> None:
        """One frame: (P, 18, 3) from the reference and from the candidate backend."""
        self.frames += 1
        self.people_ref += len(ref)
        self.people_cand += len(cand)
        self.same_count_frames += int(len(ref) == len(cand))
        for i, j, _ in match_people(ref, cand, self.match_px):
            self.matched += 1
            r, c = ref[i], cand[j]
            both = (r[:, 2] > 0) & (c[:, 2] > 0)
            self.distances.extend(np.hypot(*(r[both, :2] - c[both, :2]).T).tolist())
            self.joints_compared += int(both.sum())
            self.joints_ref_only += int(((r[:, 2] > 0) & ~(c[:, 2] > 0)).sum())
            self.joints_cand_only += int((~(r[:, 2] > 0) & (c[:, 2] > 0)).sum())

    def summary(self) -> dict[str, float]:
        """People per frame of both, share of reference people matched, joint distance stats (px)."""
        f = max(1, self.frames)
        d = np.asarray(self.distances) if self.distances else np.zeros(1)
        return {
            "frames": self.frames,
            "people_per_frame_ref": round(self.people_ref / f, 3),
            "people_per_frame_cand": round(self.people_cand / f, 3),
            "same_people_count_share": round(self.same_count_frames / f, 3),
            "ref_people_matched_share": round(self.matched / max(1, self.people_ref), 3),
            "mean_joint_distance_px": round(float(d.mean()), 3),
            "p95_joint_distance_px": round(float(np.percentile(d, 95)), 3),
            "joints_compared": self.joints_compared,
            "joints_ref_only": self.joints_ref_only,
            "joints_cand_only": self.joints_cand_only,
        }


__all__ = ["Agreement", "match_people", "person_distance"]
