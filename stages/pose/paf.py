"""Multi-person grouping of OpenPose heatmaps and part affinity fields (PAFs), vectorised numpy.

This follows tf-pose-estimation's `pafprocess` (the post-processing the mobilenet_thin graph was
released with) step by step, so its published thresholds mean the same thing here:

1. heatmaps (19, h, w) and PAFs (38, h, w) are upsampled by `upsample` (cubic);
2. the heatmaps are Gaussian-smoothed and peaks are 3x3 local maxima above `thresh_heat`; a peak's
   score is the *unsmoothed* upsampled heatmap value, and a peak whose score is not positive is
   dropped (score 0 means "missing" in the output);
3. for every limb type, every (A, B) candidate pair is scored by sampling the PAF at `step_paf`
   points along the segment A→B and projecting it on the unit vector A→B; a pair is kept when more
   than `thresh_vector_cnt1` samples exceed `thresh_vector_score` and the mean score, penalised for
   limbs longer than half the map height, is positive;
4. candidates are accepted greedily per limb type, best score first, each peak used once;
5. accepted limbs are assembled into humans (CMU's subset merge), which are dropped when they have
   fewer than `thresh_part_cnt` parts or a mean score below `thresh_human_score`. One deliberate
   difference from the reference: a limb never moves a peak that another human already holds, so
   a joint is never reported for two people (the reference can, on cluttered maps).

The pair scoring (the only part whose cost grows with the square of the people count) is a single
numpy gather per limb type; the assembly loops over accepted limbs only (a few per person).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import cv2
import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import StageError

_F32 = npt.NDArray[np.float32]  # network maps, output skeletons
_F64 = npt.NDArray[np.float64]  # peak coordinates and scores, limb scores
_I64 = npt.NDArray[np.int64]  # peak ids

NUM_PARTS = 18
"""OpenPose/COCO-18 keypoints (docs/ARCHITECTURE.md §3); heatmap channel 18 is the background."""

# (part_a, part_b, paf_x_channel, paf_y_channel); PAF channels are relative to the first PAF
# channel (absolute output channel − 19). Order = tf-pose COCOPAIRS / COCOPAIRS_NET.
LIMBS: tuple[tuple[int, int, int, int], ...] = (
    (1, 2, 12, 13),
    (1, 5, 20, 21),
    (2, 3, 14, 15),
    (3, 4, 16, 17),
    (5, 6, 22, 23),
    (6, 7, 24, 25),
    (1, 8, 0, 1),
    (8, 9, 2, 3),
    (9, 10, 4, 5),
    (1, 11, 6, 7),
    (11, 12, 8, 9),
    (12, 13, 10, 11),
    (1, 0, 28, 29),
    (0, 14, 30, 31),
    (14, 16, 34, 35),
    (0, 15, 32, 33),
    (15, 17, 36, 37),
    (2, 16, 18, 19),
    (5, 17, 26, 27),
)
# The last two limbs (shoulder→ear) only extend existing humans, never start one (tf-pose: pair_id < 17).
_SEED_LIMBS = 17


@dataclass(frozen=True, slots=True)
class PafParams:
    """Post-processing knobs; defaults are tf-pose's `pafprocess.h` values and its upsample ratio."""

    upsample: float = 4.0
    blur_ksize: int = 25
    blur_sigma: float = 3.0
    thresh_heat: float = 0.05
    thresh_vector_score: float = 0.05
    thresh_vector_cnt1: int = 6
    thresh_part_cnt: int = 4
    thresh_human_score: float = 0.3
    step_paf: int = 10

    def __post_init__(self) -> None:
        if not self.upsample > 0:
            raise StageError(f"pose: upsample must be > 0, got {self.upsample}")
        if self.blur_ksize < 0 or (self.blur_ksize and self.blur_ksize % 2 == 0):
            raise StageError(f"pose: blur_ksize must be 0 (off) or odd, got {self.blur_ksize}")
        if self.step_paf < 2:
            raise StageError(f"pose: step_paf must be >= 2, got {self.step_paf}")
        if not 0 <= self.thresh_vector_cnt1 < self.step_paf:
            raise StageError(
                f"pose: thresh_vector_cnt1 must be in [0, step_paf), got {self.thresh_vector_cnt1}"
            )


@dataclass(frozen=True, slots=True)
class Peaks:
    """All keypoint candidates of one frame, numbered globally (the ids the assembly uses).

    `xy` (K, 2) float64 map coordinates, `score` (K,), `part` (K,) int, and `by_part[p]` the global
    ids of part p's peaks.
    """

    xy: _F64
    score: _F64
    part: _I64
    by_part: tuple[_I64, ...]


def prepare_maps(
    heat: _F32, paf: _F32, params: PafParams
) -> tuple[_F32, _F32, _F32]:
    """(heat (C,h,w), paf (38,h,w)) network layout → channel-last maps at grouping resolution:
    (heat_up (H,W,18), blurred (H,W,18), paf_up (H,W,38)) float32, H,W = upsample·(h,w).

    Channel-last because OpenCV resizes/filters all channels of an HWC image in one call and the
    PAF gather below reads both components of a sample from one cache line.
    """
    if heat.ndim != 3 or heat.shape[0] < NUM_PARTS or paf.ndim != 3 or paf.shape[0] != 2 * len(LIMBS):
        raise StageError(f"pose: expected heat (>=18,h,w) and paf (38,h,w), got {heat.shape} {paf.shape}")
    if heat.shape[1:] != paf.shape[1:]:
        raise StageError(f"pose: heat {heat.shape} and paf {paf.shape} grids differ")
    h, w = heat.shape[1:]
    size = (max(1, round(w * params.upsample)), max(1, round(h * params.upsample)))
    hwc: _F32 = np.ascontiguousarray(heat[:NUM_PARTS].transpose(1, 2, 0), dtype=np.float32)
    pwc: _F32 = np.ascontiguousarray(paf.transpose(1, 2, 0), dtype=np.float32)
    if size != (w, h):
        # cv2 types its results as any numeric array; resizing keeps float32
        hwc = cast(_F32, cv2.resize(hwc, size, interpolation=cv2.INTER_CUBIC))
        pwc = cast(_F32, cv2.resize(pwc, size, interpolation=cv2.INTER_CUBIC))
    hwc = hwc.reshape(size[1], size[0], NUM_PARTS)
    pwc = pwc.reshape(size[1], size[0], 2 * len(LIMBS))
    blurred = (
        cast(_F32, cv2.GaussianBlur(hwc, (params.blur_ksize, params.blur_ksize), params.blur_sigma)).reshape(
            hwc.shape
        )
        if params.blur_ksize
        else hwc
    )
    return hwc, blurred, pwc


def find_peaks(heat: _F32, blurred: _F32, thresh: float) -> Peaks:
    """3x3 non-maximum suppression on `blurred` (H,W,P); scores read from `heat` (H,W,P)."""
    p = blurred.shape[2]
    dilated = cv2.dilate(blurred, np.ones((3, 3), np.uint8)).reshape(blurred.shape)
    local_max = blurred >= dilated
    local_max &= blurred > thresh
    part, ys, xs = np.nonzero(local_max.transpose(2, 0, 1))
    # Plateaus (e.g. a peak midway between cells after upsampling) give several equal maxima: keep
    # the first in raster order and place it at the mean of its tied neighbours.
    lm = np.pad(local_max, ((1, 1), (1, 1), (0, 0)))
    earlier = lm[ys + 1, xs, part] | lm[ys, xs, part] | lm[ys, xs + 1, part] | lm[ys, xs + 2, part]
    keep = ~earlier
    part, ys, xs = part[keep], ys[keep], xs[keep]
    sx = np.zeros(len(ys))
    sy = np.zeros(len(ys))
    n = np.zeros(len(ys))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            tied = lm[ys + 1 + dy, xs + 1 + dx, part]
            sx += tied * dx
            sy += tied * dy
            n += tied
    score = np.clip(heat[ys, xs, part].astype(np.float64), 0.0, 1.0)
    xy = np.stack([xs + sx / n, ys + sy / n], axis=1)
    # A maximum of the *smoothed* map can sit on a raw value <= 0 (a dip between strong
    # neighbours). Its score would be 0, which the output reserves for "missing joint": a person
    # built on it would show fewer joints than it was counted with (even none). Such a peak is
    # no evidence of a joint, so it is not a candidate.
    real = score > 0
    part, xy, score = part[real], xy[real], score[real]
    bounds = np.searchsorted(part, np.arange(p + 1))
    by_part = tuple(np.arange(bounds[i], bounds[i + 1]) for i in range(p))
    return Peaks(xy=xy, score=score, part=part.astype(np.int64), by_part=by_part)


def score_limb(
    a_xy: _F64, b_xy: _F64, paf_x: _F32, paf_y: _F32, params: PafParams
) -> _F64:
    """PAF line-integral score of every (A, B) pair: (na, nb) float64, −inf where rejected.

    Samples `step_paf` points A + i/step·(B−A), i=0…step−1 (rounded to the grid like tf-pose).
    """
    na, nb = len(a_xy), len(b_xy)
    if na == 0 or nb == 0:
        return np.full((na, nb), -np.inf)
    h, w = paf_x.shape
    d = b_xy[None, :, :] - a_xy[:, None, :]  # (na, nb, 2)
    norm = np.hypot(d[..., 0], d[..., 1])  # (na, nb)
    safe = np.where(norm < 1e-12, 1.0, norm)
    unit = d / safe[..., None]
    t = np.arange(params.step_paf, dtype=np.float64) / params.step_paf  # (S,)
    pts = a_xy[:, None, None, :] + d[:, :, None, :] * t[None, None, :, None]  # (na, nb, S, 2)
    xi = np.clip(np.floor(pts[..., 0] + 0.5).astype(np.int64), 0, w - 1)
    yi = np.clip(np.floor(pts[..., 1] + 0.5).astype(np.int64), 0, h - 1)
    proj = paf_x[yi, xi] * unit[..., 0, None] + paf_y[yi, xi] * unit[..., 1, None]  # (na, nb, S)
    count = (proj > params.thresh_vector_score).sum(axis=-1)
    with np.errstate(divide="ignore"):
        penalty = np.minimum(0.0, 0.5 * h / safe - 1.0)
    crit2 = proj.sum(axis=-1) / params.step_paf + penalty
    ok = (norm >= 1e-12) & (count > params.thresh_vector_cnt1) & (crit2 > 0)
    return np.where(ok, crit2, -np.inf)


def match_limb(scores: _F64) -> list[tuple[int, int, float]]:
    """Greedy one-to-one assignment, best score first: [(i_a, i_b, score)] (tf-pose's rule)."""
    ia, ib = np.nonzero(np.isfinite(scores))
    if len(ia) == 0:
        return []
    vals = scores[ia, ib]
    order = np.argsort(-vals, kind="stable")
    used_a: set[int] = set()
    used_b: set[int] = set()
    out: list[tuple[int, int, float]] = []
    for k in order:
        a, b = int(ia[k]), int(ib[k])
        if a in used_a or b in used_b:
            continue
        used_a.add(a)
        used_b.add(b)
        out.append((a, b, float(vals[k])))
        if len(used_a) == scores.shape[0] or len(used_b) == scores.shape[1]:
            break
    return out


def assemble(peaks: Peaks, connections: list[list[tuple[int, int, float]]], params: PafParams) -> _I64:
    """Join accepted limbs into humans: (P, 18) int64 global peak ids (−1 = missing), best first.

    `connections[l]` holds (global id A, global id B, limb score) for limb type `l`. A human row also
    accumulates its total score and part count, used for the final filter.
    """
    rows: list[_F64] = []  # each: 18 ids, then [total score, part count]

    def attach(r: _F64, part: int, gid: int, s: float) -> None:
        # The reference overwrites unconditionally; a peak another human already holds is left
        # there, so no joint is ever reported for two people.
        if r[part] == gid or any(o is not r and o[part] == gid for o in rows):
            return
        if r[part] < 0:
            r[19] += 1
        r[part] = gid
        r[18] += peaks.score[gid] + s

    for limb, conns in enumerate(connections):
        pa, pb = LIMBS[limb][0], LIMBS[limb][1]
        for ga, gb, s in conns:
            hits = [i for i, r in enumerate(rows) if r[pa] == ga or r[pb] == gb]
            if len(hits) == 1:
                attach(rows[hits[0]], pb, gb, s)
            elif len(hits) >= 2:
                r1, r2 = rows[hits[0]], rows[hits[1]]
                overlap = bool(np.any((r1[:NUM_PARTS] >= 0) & (r2[:NUM_PARTS] >= 0)))
                if not overlap:
                    r1[:NUM_PARTS] = np.where(r2[:NUM_PARTS] >= 0, r2[:NUM_PARTS], r1[:NUM_PARTS])
                    r1[18] += r2[18] + s
                    r1[19] += r2[19]
                    del rows[hits[1]]
                else:
                    attach(r1, pb, gb, s)
            elif limb < _SEED_LIMBS:
                r = np.full(NUM_PARTS + 2, -1.0)
                r[pa], r[pb] = ga, gb
                r[18] = peaks.score[ga] + peaks.score[gb] + s
                r[19] = 2
                rows.append(r)
    kept = [r for r in rows if r[19] >= params.thresh_part_cnt and r[18] / r[19] >= params.thresh_human_score]
    kept.sort(key=lambda r: -r[18])
    if not kept:
        return np.zeros((0, NUM_PARTS), dtype=np.int64)
    ids: _I64 = np.stack([r[:NUM_PARTS] for r in kept]).astype(np.int64)
    return ids


def group(heat_up: _F32, blurred: _F32, paf_up: _F32, params: PafParams) -> _F32:
    """Channel-last maps from `prepare_maps` → (P, 18, 3) float32 humans in map coordinates.

    Missing joints are (0, 0, 0). Coordinates are map pixels; the caller rescales to the image.
    """
    peaks = find_peaks(heat_up, blurred, params.thresh_heat)
    connections: list[list[tuple[int, int, float]]] = []
    for pa, pb, cx, cy in LIMBS:
        ids_a, ids_b = peaks.by_part[pa], peaks.by_part[pb]
        scores = score_limb(peaks.xy[ids_a], peaks.xy[ids_b], paf_up[..., cx], paf_up[..., cy], params)
        connections.append([(int(ids_a[i]), int(ids_b[j]), s) for i, j, s in match_limb(scores)])
    humans = assemble(peaks, connections, params)
    out = np.zeros((len(humans), NUM_PARTS, 3), dtype=np.float32)
    present = humans >= 0
    ids = np.where(present, humans, 0)
    out[..., :2] = np.where(present[..., None], peaks.xy[ids], 0.0)
    out[..., 2] = np.where(present, peaks.score[ids], 0.0)
    return out


def to_image_coords(humans: _F32, map_wh: tuple[int, int], image_wh: tuple[int, int]) -> _F32:
    """Map-pixel (x, y) → original-image pixels with pixel-centre alignment; missing stay (0,0,0).

    The network input is the whole image resized (no crop), so each axis scales independently.
    """
    out = humans.copy()
    if len(out) == 0:
        return out
    sx, sy = image_wh[0] / map_wh[0], image_wh[1] / map_wh[1]
    present = out[..., 2] > 0
    x = (out[..., 0] + 0.5) * sx - 0.5
    y = (out[..., 1] + 0.5) * sy - 0.5
    out[..., 0] = np.where(present, np.clip(x, 0, image_wh[0] - 1), 0.0)
    out[..., 1] = np.where(present, np.clip(y, 0, image_wh[1] - 1), 0.0)
    return out


__all__ = [
    "LIMBS",
    "NUM_PARTS",
    "PafParams",
    "Peaks",
    "assemble",
    "find_peaks",
    "group",
    "match_limb",
    "prepare_maps",
    "score_limb",
    "to_image_coords",
]
