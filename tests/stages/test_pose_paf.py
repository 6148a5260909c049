"""PAF grouping on hand-built heatmaps and part affinity fields: exact skeletons and limb assignment."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from enclave_bridge.shared.errors import StageError
from stages.pose.paf import (
    LIMBS,
    NUM_PARTS,
    PafParams,
    group,
    match_limb,
    prepare_maps,
    score_limb,
    to_image_coords,
)

# An upright person facing the camera, grid pixels relative to the neck (person's right = image left).
TEMPLATE = np.array(
    [
        (0, -5),  # nose
        (0, 0),  # neck
        (-4, 0),  # r shoulder
        (-6, 6),  # r elbow
        (-7, 12),  # r wrist
        (4, 0),  # l shoulder
        (6, 6),  # l elbow
        (7, 12),  # l wrist
        (-3, 12),  # r hip
        (-3, 19),  # r knee
        (-3, 26),  # r ankle
        (3, 12),  # l hip
        (3, 19),  # l knee
        (3, 26),  # l ankle
        (-2, -7),  # r eye
        (2, -7),  # l eye
        (-4, -6),  # r ear
        (4, -6),  # l ear
    ],
    dtype=np.float64,
)
H, W = 48, 80


def person_at(x: float, y: float) -> np.ndarray:
    """The template with its neck at grid (x, y): (18, 2) float64."""
    return TEMPLATE + np.array([x, y])


def render(people: list[np.ndarray], h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    """Network-layout maps for `people` ((18, 2) joint positions, NaN = absent):
    heat (19, h, w) Gaussian blobs (σ=1) + background, paf (38, h, w) unit vectors within 1 px of
    each limb, averaged where limbs of the same type overlap (as OpenPose's ground truth)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    heat = np.zeros((19, h, w))
    paf = np.zeros((38, h, w))
    for j in range(NUM_PARTS):
        for p in people:
            if not np.isnan(p[j]).any():
                heat[j] = np.maximum(heat[j], np.exp(-((xx - p[j, 0]) ** 2 + (yy - p[j, 1]) ** 2) / 2.0))
    heat[18] = 1.0 - heat[:18].max(axis=0)
    for a, b, cx, cy in LIMBS:
        count = np.zeros((h, w))
        for p in people:
            if np.isnan(p[[a, b]]).any():
                continue
            d = p[b] - p[a]
            length = float(np.hypot(*d))
            u = d / length
            rx, ry = xx - p[a, 0], yy - p[a, 1]
            along = rx * u[0] + ry * u[1]
            across = np.abs(rx * u[1] - ry * u[0])
            on = (along >= -0.5) & (along <= length + 0.5) & (across <= 1.0)
            paf[cx][on] += u[0]
            paf[cy][on] += u[1]
            count += on
        nz = count > 0
        paf[cx][nz] /= count[nz]
        paf[cy][nz] /= count[nz]
    return heat.astype(np.float32), paf.astype(np.float32)


EXACT = PafParams(upsample=1.0, blur_ksize=0)


def run(heat: np.ndarray, paf: np.ndarray, params: PafParams) -> np.ndarray:
    heat_up, blurred, paf_up = prepare_maps(heat, paf, params)
    humans = group(heat_up, blurred, paf_up, params)
    return to_image_coords(humans, (heat_up.shape[1], heat_up.shape[0]), (heat.shape[2], heat.shape[1]))


def by_neck(humans: np.ndarray) -> np.ndarray:
    return humans[np.argsort(humans[:, 1, 0])]


def test_two_people_give_two_complete_skeletons_exactly() -> None:
    a, b = person_at(20, 12), person_at(56, 12)
    humans = by_neck(run(*render([a, b]), EXACT))
    assert humans.shape == (2, 18, 3)
    assert humans.dtype == np.float32
    np.testing.assert_allclose(humans[0, :, :2], a, atol=1e-4)
    np.testing.assert_allclose(humans[1, :, :2], b, atol=1e-4)
    np.testing.assert_allclose(humans[..., 2], 1.0, atol=1e-4)  # peak of each blob


def test_default_upsampling_and_blur_keep_joints_within_half_a_cell() -> None:
    a, b = person_at(20, 12), person_at(56, 12)
    humans = by_neck(run(*render([a, b]), PafParams()))
    assert humans.shape == (2, 18, 3)
    assert np.abs(humans[0, :, :2] - a).max() <= 0.5
    assert np.abs(humans[1, :, :2] - b).max() <= 0.5


def test_crossing_forearms_follow_the_field_not_the_nearest_wrist() -> None:
    a, b = person_at(20, 12), person_at(40, 12)
    # A's right forearm reaches across B's: A's elbow is nearer B's wrist than its own wrist.
    a[3], a[4] = (26, 20), (40, 26)
    b[2], b[3], b[4] = (36, 12), (34, 20), (28, 26)
    assert np.hypot(*(a[3] - b[4])) < np.hypot(*(a[3] - a[4]))
    humans = by_neck(run(*render([a, b]), EXACT))
    assert humans.shape[0] == 2
    np.testing.assert_allclose(humans[0, 4, :2], a[4], atol=1e-4)
    np.testing.assert_allclose(humans[1, 4, :2], b[4], atol=1e-4)
    np.testing.assert_allclose(humans[0, :, :2], a, atol=1e-4)
    np.testing.assert_allclose(humans[1, :, :2], b, atol=1e-4)


def test_missing_joints_are_zero_and_fragments_are_filtered() -> None:
    a = person_at(20, 12)
    a[[4, 7, 10, 13]] = np.nan  # no wrists, no ankles
    frag = np.full((18, 2), np.nan)
    frag[1], frag[2], frag[3] = (60, 12), (56, 12), (54, 18)  # neck, shoulder, elbow: 3 parts < 4
    humans = run(*render([a, frag]), EXACT)
    assert humans.shape == (1, 18, 3)
    for j in (4, 7, 10, 13):
        assert humans[0, j].tolist() == [0.0, 0.0, 0.0]
    present = [j for j in range(18) if j not in (4, 7, 10, 13)]
    np.testing.assert_allclose(humans[0, present, :2], a[present], atol=1e-4)
    # with a lower part-count threshold the fragment becomes a (3-part) human
    loose = PafParams(upsample=1.0, blur_ksize=0, thresh_part_cnt=3)
    assert run(*render([a, frag]), loose).shape[0] == 2


def test_weak_people_are_dropped_by_the_human_score() -> None:
    heat, paf = render([person_at(20, 12)])
    heat[:18] *= 0.2  # peaks of 0.2: parts found, but mean score below thresh_human_score…
    paf *= 0.1  # …once the limb scores are weak too
    assert run(heat, paf, EXACT).shape[0] == 0
    assert run(heat, paf, PafParams(upsample=1.0, blur_ksize=0, thresh_human_score=0.1)).shape[0] == 1


def test_empty_maps_give_no_people() -> None:
    heat = np.zeros((19, H, W), np.float32)
    paf = np.zeros((38, H, W), np.float32)
    out = run(heat, paf, PafParams())
    assert out.shape == (0, 18, 3)
    assert out.dtype == np.float32


def test_score_limb_projects_and_penalises_long_limbs() -> None:
    h, w = 40, 100
    px = np.ones((h, w), np.float32)  # field pointing +x everywhere
    py = np.zeros((h, w), np.float32)
    a = np.array([[10.0, 10.0]])
    b = np.array([[18.0, 10.0], [10.0, 18.0], [2.0, 10.0], [90.0, 10.0]])
    s = score_limb(a, b, px, py, EXACT)
    assert s.shape == (1, 4)
    assert s[0, 0] == pytest.approx(1.0)  # aligned
    assert s[0, 1] == -np.inf  # perpendicular
    assert s[0, 2] == -np.inf  # against the field
    # 80 px long in a 40 px high map: mean 1.0 + min(0, 0.5·40/80 − 1) = 0.25
    assert s[0, 3] == pytest.approx(0.25)


def test_match_limb_is_greedy_one_to_one() -> None:
    s = np.array([[0.9, 0.8], [0.85, -np.inf], [0.1, 0.2]])
    assert match_limb(s) == [(0, 0, 0.9), (2, 1, 0.2)]
    assert match_limb(np.full((0, 3), -np.inf)) == []


def test_to_image_coords_maps_cell_centres_and_keeps_missing_zero() -> None:
    humans = np.zeros((1, 18, 3), np.float32)
    humans[0, 0] = (0.0, 0.0, 0.5)
    humans[0, 1] = (53.0, 45.0, 0.7)
    out = to_image_coords(humans, (54, 46), (432, 368))
    assert out[0, 0].tolist() == pytest.approx([3.5, 3.5, 0.5])
    assert out[0, 1].tolist() == pytest.approx([427.5, 363.5, 0.7])
    assert out[0, 2].tolist() == [0.0, 0.0, 0.0]


def test_bad_maps_and_params_raise_stage_errors() -> None:
    with pytest.raises(StageError, match="expected heat"):
        prepare_maps(np.zeros((19, 4, 4)), np.zeros((30, 4, 4)), PafParams())
    with pytest.raises(StageError, match="grids differ"):
        prepare_maps(np.zeros((19, 4, 4)), np.zeros((38, 5, 4)), PafParams())
    with pytest.raises(StageError, match="odd"):
        PafParams(blur_ksize=24)
    with pytest.raises(StageError, match="thresh_vector_cnt1"):
        PafParams(step_paf=5, thresh_vector_cnt1=6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), upsample=st.sampled_from([1.0, 2.0, 4.0]))
# Found by Hypothesis: smoothed maxima on raw values <= 0 became joints with score 0 (= "missing"),
# so people came out with no visible joint, or fewer than thresh_part_cnt.
@example(seed=32666402, upsample=1.0)
def test_random_maps_always_give_well_formed_distinct_people(seed: int, upsample: float) -> None:
    """Noise in, contract out: shapes, scores in [0, 1], at least `thresh_part_cnt` visible joints
    per person, no peak shared by two people."""
    rng = np.random.default_rng(seed)
    heat = rng.uniform(-0.1, 1.0, (19, 12, 14)).astype(np.float32)
    paf = rng.uniform(-1.0, 1.0, (38, 12, 14)).astype(np.float32)
    params = PafParams(upsample=upsample, thresh_part_cnt=2, thresh_human_score=0.0)
    out = run(heat, paf, params)
    assert out.ndim == 3 and out.shape[1:] == (18, 3) and out.dtype == np.float32
    assert np.all((out[..., 2] >= 0) & (out[..., 2] <= 1))
    present = out[..., 2] > 0
    assert np.all((out[..., 0] >= 0) & (out[..., 0] <= 13) & (out[..., 1] >= 0) & (out[..., 1] <= 11))
    assert np.all(out[~present] == 0)
    assert np.all(present.sum(axis=1) >= params.thresh_part_cnt)
    for j in range(18):
        pts = out[present[:, j], j, :2]
        assert len(np.unique(pts, axis=0)) == len(pts)  # each peak belongs to one person at most
