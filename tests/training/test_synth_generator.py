"""The synthetic skeleton generator: determinism, shapes/normalisation, per-class motion statistics."""

from __future__ import annotations

import numpy as np
import pytest

from enclave_bridge.shared.errors import ConfigError
from training.synth import (
    _MOTIONS,
    CLASSES,
    Body,
    Motion,
    SynthConfig,
    _fighting_pair,
    forward_kinematics,
    generate,
    make_sample,
    sample_rng,
)

CFG = SynthConfig(T=30, fps=10.0, M=2)


def test_same_seed_same_arrays_and_order_independent() -> None:
    x1, y1 = generate(18, seed=7, cfg=CFG)
    x2, y2 = generate(18, seed=7, cfg=CFG)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    # any slice regenerates on its own (resume / parallel generation rely on it)
    x3, y3 = generate(4, seed=7, cfg=CFG, start=10)
    assert np.array_equal(x3, x1[10:14]) and np.array_equal(y3, y1[10:14])
    x4, _ = generate(18, seed=8, cfg=CFG)
    assert not np.array_equal(x1, x4)
    xv, _ = generate(18, seed=7, split="test", cfg=CFG)
    assert not np.array_equal(x1, xv)


def test_shapes_ranges_and_missing_joints_are_zero() -> None:
    x, y = generate(45, seed=1, cfg=CFG)
    assert x.shape == (45, 3, 30, 18, 2) and x.dtype == np.float32
    assert y.dtype == np.int64 and set(y.tolist()) == set(range(len(CLASSES)))
    score = x[:, 2]
    present = score > 0
    assert present.mean() > 0.25  # people are mostly visible
    assert (score >= 0).all() and (score <= 1).all()
    assert (x[:, 0][present] >= -0.5).all() and (x[:, 0][present] < 0.5).all()
    assert (x[:, 1][present] >= -0.5).all() and (x[:, 1][present] < 0.5).all()
    # a missing joint is an all-zero triple (docs/ARCHITECTURE.md §3)
    assert (x[:, 0][~present] == 0).all() and (x[:, 1][~present] == 0).all()
    # noise: some joints are missing in most windows
    assert (~present[:, :, :, 0]).any(axis=(1, 2)).mean() > 0.5


def test_bad_arguments_raise_typed_errors() -> None:
    with pytest.raises(ConfigError):
        make_sample("dancing", np.random.default_rng(0), CFG)
    with pytest.raises(ConfigError):
        sample_rng(1, "holdout", 0)
    with pytest.raises(ConfigError):
        SynthConfig(T=2)


def _clean(label: str, seed: int, n: int = 12) -> list[tuple[Body, np.ndarray]]:
    """World joints (T, 18, 3) of `n` people doing `label`, without camera or detector noise."""
    t = np.arange(30) / 10.0
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        body = Body.sample(rng)
        if label == "fighting":
            a, b = _fighting_pair(rng, t)
            out.append((body, forward_kinematics(body, a)))
            out.append((body, forward_kinematics(Body.sample(rng), b)))
            continue
        m = Motion(30)
        _MOTIONS[label](rng, m, t)
        out.append((body, forward_kinematics(body, m)))
    return out


def _hip_z(w: np.ndarray) -> np.ndarray:
    return w[:, (8, 11), 2].mean(1)


def _ground_speed(w: np.ndarray) -> float:
    hip = w[:, (8, 11), :2].mean(1)
    return float(np.linalg.norm(hip[-1] - hip[0]) / 2.9)


def test_each_class_has_its_motion_signature() -> None:
    # standing: hips stay at standing height, little displacement
    for body, w in _clean("standing", 1):
        assert _hip_z(w).min() > 0.4 * body.height
        assert _ground_speed(w) < 0.4
    # walking vs running: ground speed
    walk = [_ground_speed(w) for _, w in _clean("walking", 2)]
    run = [_ground_speed(w) for _, w in _clean("running", 3)]
    assert 0.4 < np.median(walk) < 2.0 and np.median(run) > 2.2 and min(run) > max(walk) * 0.9
    # falling: the hips drop from standing (or seat / bed) height to near the ground (some falls
    # end on the knees and hands, hips a little higher)
    ends, starts = [], []
    for body, w in _clean("falling", 4, n=24):
        hz = _hip_z(w)
        assert hz[0] > 0.2 * body.height and hz[-1] < 0.4 * body.height and hz[-1] < 0.85 * hz[0]
        ends.append(hz[-1] / body.height)
        starts.append(hz[0] / body.height)
    assert np.median(ends) < 0.25
    assert np.mean(np.array(starts) > 0.4) > 0.5  # most falls start on the feet
    # lying: low the whole time, head near hip height
    for body, w in _clean("lying", 5):
        assert _hip_z(w).max() < 0.35 * body.height
        assert np.median(np.abs(w[:, 0, 2] - _hip_z(w))) < 0.45 * body.height
    # sitting down: hips drop but the trunk ends upright (neck well above hips), unlike a fall
    for body, w in _clean("sitting_down", 6):
        hz = _hip_z(w)
        assert hz[0] > 0.45 * body.height and hz[-1] < hz[0] - 0.1 * body.height
        assert w[-1, 1, 2] - hz[-1] > 0.2 * body.height
    # sitting: hips low-ish and steady, trunk upright
    for body, w in _clean("sitting", 7):
        hz = _hip_z(w)
        assert np.ptp(hz) < 0.15 * body.height and hz.max() < 0.42 * body.height
        assert (w[:, 1, 2] - hz).min() > 0.2 * body.height
    # waving: a wrist above its shoulder for most of the window, moving back and forth
    for _, w in _clean("waving", 8):
        above = np.maximum(w[:, 4, 2] - w[:, 2, 2], w[:, 7, 2] - w[:, 5, 2])
        assert (above > 0).mean() > 0.4
    # fighting: two people within reach; fast wrists
    pairs = _clean("fighting", 9, n=6)
    for (_, a), (_, b) in zip(pairs[::2], pairs[1::2], strict=True):
        d = np.linalg.norm(a[:, 1, :2] - b[:, 1, :2], axis=1)
        assert np.median(d) < 1.6
    wrist_speed = [np.abs(np.diff(w[:, (4, 7)], axis=0)).max() for _, w in pairs]
    stand_speed = [np.abs(np.diff(w[:, (4, 7)], axis=0)).max() for _, w in _clean("standing", 1)]
    assert np.median(wrist_speed) > 2 * np.median(stand_speed)


def test_falls_from_furniture_start_raised_and_end_on_the_floor() -> None:
    """Falls from a chair, sofa or bed: the hips start at seat/bed height, not standing height,
    and end low with the trunk lying."""
    from training.synth import _fall_from_furniture

    t = np.arange(30) / 10.0
    for i in range(16):
        rng = np.random.default_rng([21, i])
        body = Body.sample(rng)
        m = Motion(30)
        _fall_from_furniture(rng, m, t)
        w = forward_kinematics(body, m)
        hz = _hip_z(w)
        assert 0.15 * body.height < hz[0] < 0.6 * body.height, hz[0] / body.height  # seat or bed
        assert hz[-1] < 0.25 * body.height
        trunk = w[-1, 1] - w[-1, (8, 11)].mean(0)
        assert abs(trunk[2]) < 0.5 * np.linalg.norm(trunk)  # lying, not sitting


def test_fall_vanish_and_occluded_exit_cut_the_track_for_good() -> None:
    """`vanish_falling` loses a faller once the trunk tilts (for the rest of the window);
    `occluded_exit` loses a walker from some frame on with no tilt at all."""
    from training.synth import _corrupt, _head_forward, sample_camera

    t = np.arange(30) / 10.0
    lost_fall = lost_exit = 0
    for i in range(12):
        rng = np.random.default_rng([31, i])
        cam, pos, _ = sample_camera(rng)
        for label in ("falling", "walking"):
            m = Motion(30)
            _MOTIONS[label](rng, m, t)
            m.x, m.y = m.x - m.x[0] + pos[0], m.y - m.y[0] + pos[1]
            w = forward_kinematics(Body.sample(rng), m)
            fall = label == "falling"
            det = _corrupt(rng, cam, w, _head_forward(w), vanish_falling=fall, occluded_exit=not fall)
            seen = np.flatnonzero((det[:, :, 2] > 0).any(axis=1))
            if len(seen) and seen[-1] < 29:
                assert not (det[seen[-1] + 1 :, :, 2] > 0).any()
                if label == "falling":
                    lost_fall += 1
                else:
                    lost_exit += 1
            if label == "falling" and len(seen):  # lost only after the trunk started to tilt
                trunk = w[seen[-1], 1] - w[seen[-1], (8, 11)].mean(0)
                assert trunk[2] > 0.5 * np.linalg.norm(trunk)
    assert lost_fall >= 10 and lost_exit >= 10


def test_axial_yaw_lays_the_body_along_the_line_of_sight() -> None:
    """Lying people seen head-first or feet-first (a real backward fall): the placed body's
    neck-to-hip axis is (anti)parallel to the direction from the camera to the person."""
    from training.synth import _axial_yaw, _place

    t = np.arange(30) / 10.0
    for i in range(20):
        rng = np.random.default_rng([41, i])
        m = Motion(30)
        _MOTIONS["lying"](rng, m, t)
        bearing = rng.uniform(-0.6, 0.6)
        pos = np.array([6 * np.sin(bearing), 6 * np.cos(bearing)])
        _place(m, (float(m.x[0]), float(m.y[0])), pos, _axial_yaw(rng, m, bearing))
        w = forward_kinematics(Body.sample(rng), m)
        axis = (w[-1, 1] - w[-1, (8, 11)].mean(0))[:2]
        sight = np.array([np.sin(bearing), np.cos(bearing)])
        cos = abs(axis @ sight) / np.linalg.norm(axis)
        assert cos > 0.7, (i, cos)  # within ~45° (the pose, twist and ±15° noise spread it)


def _aspect(p: np.ndarray) -> float:
    """Median height/width of one person's skeleton over frames, p (3, t, 18)."""
    vals = [
        np.ptp(p[1, f][p[2, f] > 0]) / max(1e-3, np.ptp(p[0, f][p[2, f] > 0]))
        for f in range(p.shape[1])
        if (p[2, f] > 0).sum() >= 4
    ]
    return float(np.median(vals)) if vals else np.nan


def test_projected_fall_flattens_the_skeleton() -> None:
    """In image space (with camera + noise) a fall makes the skeleton wider than tall at the end."""
    fall_idx = CLASSES.index("falling")
    stand_idx = CLASSES.index("standing")
    ratios: dict[int, list[float]] = {fall_idx: [], stand_idx: []}
    for k, cls in enumerate((fall_idx, stand_idx)):
        for i in range(20):
            x = make_sample(CLASSES[cls], sample_rng(11, "test", 100 * k + i), CFG)
            person = int(np.argmax((x[2] > 0).sum(axis=(0, 1))))
            ratio = _aspect(x[:, -4:, :, person]) / _aspect(x[:, :4, :, person])
            ratios[cls].append(ratio)
    assert np.nanmedian(ratios[fall_idx]) < 0.75 * np.nanmedian(ratios[stand_idx])


def test_walkers_flicker_too_so_vanishing_is_not_a_fall_cue() -> None:
    """Real detectors lose people for a few frames and find them again, in every class."""
    walk = CLASSES.index("walking")
    x, y = generate(9 * 40, seed=3, cfg=CFG)
    gaps = fragments = 0
    n = 0
    for xi in x[y == walk]:
        vis = (xi[2] > 0).sum(axis=1)  # (T, M) visible joints per frame and slot
        for m in range(vis.shape[1]):
            v = vis[:, m]
            if (v > 0).sum() < 10:
                continue
            n += 1
            seen = np.flatnonzero(v > 0)
            inner = v[seen[0] : seen[-1] + 1]
            gaps += int((inner == 0).sum() >= 2)
            fragments += int(((v > 0) & (v <= 6)).any())
    assert n >= 30
    assert gaps / n > 0.2, (gaps, n)
    assert fragments / n > 0.1, (fragments, n)


def test_id_switch_splits_one_track_into_two_disjoint_ones() -> None:
    from training.synth import _id_switch

    det = np.random.default_rng(0).uniform(0.1, 1.0, (30, 18, 3)).astype(np.float32)
    for seed in range(20):
        before, after = _id_switch(np.random.default_rng(seed), [det])
        on_a, on_b = before[:, 0, 2] > 0, after[:, 0, 2] > 0
        assert on_a.any() and on_b.any() and not (on_a & on_b).any()
        last_a, first_b = np.nonzero(on_a)[0].max(), np.nonzero(on_b)[0].min()
        assert on_a[: last_a + 1].all() and on_b[first_b:].all()  # one ends, then the other starts
        assert 1 <= first_b - last_a <= 4  # after a gap of 0-3 frames
        assert np.array_equal(before[on_a], det[on_a]) and np.array_equal(after[on_b], det[on_b])
    # in generated data some single-person windows show the switch (two slots, never both present)
    x, _y = generate(90, seed=3, split="train", cfg=SynthConfig(T=30, M=2))
    present = (x[:, 2] > 0).any(axis=2)  # (n, T, M)
    switched = [
        i
        for i in range(len(x))
        if present[i, :, 0].any()
        and present[i, :, 1].any()
        and not (present[i, :, 0] & present[i, :, 1]).any()
    ]
    assert switched


def test_camera_artefacts_move_everyone_alike_and_stalls_repeat_frames() -> None:
    from training import synth

    rng0 = np.random.default_rng(0)
    dets = [
        np.concatenate([rng0.uniform(-0.3, 0.3, (30, 18, 2)), rng0.uniform(0.1, 1.0, (30, 18, 1))], 2).astype(
            np.float32
        )
        for _ in range(2)
    ]
    dets[1][:, 5] = 0.0  # a missing joint stays (0, 0, 0)
    moved = stalled = 0
    for seed in range(200):
        out = synth._camera_artefacts(np.random.default_rng(seed), dets)
        assert (out[1][:, 5] == 0).all()
        assert all((np.abs(o[:, :, :2]) < 0.5).all() for o in out)  # nothing outside the picture
        if all(np.array_equal(o, d) for o, d in zip(out, dets, strict=True)):
            continue
        frozen = [t for t in range(1, 30) if np.array_equal(out[0][t], out[0][t - 1])]
        if frozen:
            stalled += 1
            continue
        # a pure camera move: one offset per frame for every (still visible) joint of every person
        moved += 1
        for o, d in zip(out, dets, strict=True):
            vis = o[:, :, 2] > 0
            assert np.allclose(o[:, :, 2][vis], d[:, :, 2][vis])
        off = np.array(
            [
                (out[0][t, :, :2] - dets[0][t, :, :2])[out[0][t, :, 2] > 0].mean(0)
                if (out[0][t, :, 2] > 0).any()
                else (0, 0)
                for t in range(30)
            ]
        )
        for o, d in zip(out, dets, strict=True):
            vis = o[:, :, 2] > 0
            delta = (o[:, :, :2] - d[:, :, :2])[vis]
            assert np.allclose(delta, np.broadcast_to(off[:, None], (30, 18, 2))[vis], atol=1e-6)
        assert np.abs(off).max() <= 0.08 + 1e-6
    assert moved > 5 and stalled > 3  # both happen, in a minority of windows
    assert moved + stalled < 60
