"""Synthetic 2-D skeleton motion generator for training the default action model.

No labelled CCTV skeleton data can ship with the project, so windows are synthesised: a 3-D
articulated body (several shapes) is animated per class, projected by a random CCTV-like camera
(height, tilt, distance, field of view, image size) and corrupted the way OpenPose output is
(jitter, low scores, missed joints, left/right swaps, truncation at the border, lost tracks,
uneven frame timing). Output windows follow docs/ARCHITECTURE.md §3: (3, T, 18, M) float32 with x/W−0.5,
y/H−0.5, score and zeros where a joint is missing.

Every sample is a pure function of `(seed, split, index)`, so datasets are reproducible and any
slice can be regenerated independently (used by training resume and the tests).

Why one module of ~930 lines: a sample is one pure function of `(seed, split, index)` drawing
body, per-class motion, camera and OpenPose-style corruption from one random stream in a fixed
order; split across modules, a change to one part's draws silently reshuffles every dataset, so
the whole derivation stays readable (and versioned) in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from enclave_bridge.shared.errors import ConfigError
from stages.windowing import normalise  # the serving path's own: no training/serving skew

_F64 = npt.NDArray[np.float64]  # joint angles, trajectories, positions, pixels
_F32 = npt.NDArray[np.float32]  # windows (3, T, 18, M), as the model reads them

CLASSES: tuple[str, ...] = (
    "standing",
    "walking",
    "running",
    "sitting_down",
    "sitting",
    "falling",
    "lying",
    "waving",
    "fighting",
)
"""Label order of the default model. `sitting` is a non-event class: a person who sat down on
purpose must not look like `lying`/`falling` to the model (fewer false fall alerts)."""

NUM_JOINTS = 18
SPLITS = {"train": 0, "val": 1, "test": 2}
# OpenPose-18 left/right pairs (docs/ARCHITECTURE.md §3 joint order).
LR_ARMS = ((2, 5), (3, 6), (4, 7))
LR_LEGS = ((8, 11), (9, 12), (10, 13))
LR_FACE = ((14, 15), (16, 17))
# Relative miss propensity per joint (OpenPose misses extremities and the face more often).
_MISS_FACTOR = np.array(
    [1.2, 0.3, 0.7, 1.0, 1.5, 0.7, 1.0, 1.5, 0.8, 1.0, 1.3, 0.8, 1.0, 1.3, 1.5, 1.5, 2.0, 2.0]
)
# Pieces of a person a bottom-up detector groups on its own when the rest is not linked up.
_FRAGMENTS = (
    (0, 14, 15, 16, 17),  # head
    (0, 1, 14, 15, 16, 17),  # head and neck
    (0, 1, 2, 3, 4, 5, 6, 7, 14, 15),  # upper body
    (1, 2, 5, 8, 11),  # shoulders and hips
    (8, 9, 10, 11, 12, 13),  # legs
)
_IMAGE_SIZES = ((320, 240), (384, 288), (640, 360), (640, 480), (768, 576), (1280, 720), (1920, 1080))
_DEG = math.pi / 180.0
ID_SWITCH_P = 0.15  # single-person windows whose track is split in two by a tracker id switch
CAMERA_MOVE_P = 0.08  # windows in which the camera is bumped or panned
STALL_P = 0.05  # windows in which the stream stalls (frames repeat exactly)
FURNITURE_FALL_P = 0.25  # falls that start seated or lying on a chair, sofa or bed
AXIAL_P = 0.3  # falls and lying bodies aligned with the camera's line of sight (foreshortened)
# Falls whose faller the detector loses while going down (measured on real night clips: the
# walker's legs go first, then the whole person, and nobody is found on the floor afterwards).
FALL_VANISH_P = 0.35
# Everyday windows in which the person walks or steps out of view behind an occluder (a door, a
# wall) in mid-frame: the track ends without any drop, so a vanishing track alone is no fall.
OCCLUDED_EXIT_P = 0.06


@dataclass(frozen=True, slots=True)
class SynthConfig:
    """Window geometry of the generated samples: T frames at `fps`, M person slots."""

    T: int = 30
    fps: float = 10.0
    M: int = 2

    def __post_init__(self) -> None:
        if self.T < 4 or self.fps <= 0 or self.M < 1:
            raise ConfigError(f"synth config needs T ≥ 4, fps > 0, M ≥ 1 (got {self})")


@dataclass(slots=True)
class Body:
    """Segment lengths in metres (derived from height with per-person proportions)."""

    height: float
    hip_half: float
    thigh: float
    shank: float
    torso: float
    shoulder_half: float
    upper_arm: float
    forearm: float

    @staticmethod
    def sample(rng: np.random.Generator) -> Body:
        h = rng.uniform(1.15, 1.45) if rng.random() < 0.06 else rng.uniform(1.48, 1.95)

        def j(x: float, s: float = 0.06) -> float:
            return x * h * float(rng.uniform(1 - s, 1 + s))

        return Body(h, j(0.055, 0.15), j(0.245), j(0.246), j(0.29), j(0.13, 0.12), j(0.186), j(0.146))


@dataclass(slots=True)
class Motion:
    """Per-frame joint angles (radians) and root trajectory of one person; arrays are (T,)."""

    n: int
    x: _F64 = field(init=False)  # root ground position, metres
    y: _F64 = field(init=False)
    yaw: _F64 = field(init=False)  # heading; body forward = (−sin yaw, cos yaw)
    tilt: _F64 = field(init=False)  # whole-body tilt from vertical (falls, lying)
    tilt_dir: float = 0.0  # tilt axis direction in the body frame
    lift: _F64 = field(init=False)  # extra root height (running flight, bobbing)
    spine: _F64 = field(init=False)  # forward bend of the torso
    lean: _F64 = field(init=False)  # sideways bend of the torso
    twist: _F64 = field(init=False)  # torso twist about the spine
    head: _F64 = field(init=False)  # head yaw
    angles: dict[str, _F64] = field(init=False)  # hip_flex_r, knee_l, sho_abd_r, …
    pivot_feet: bool = False  # keep the feet in place while tilting (falls)

    def __post_init__(self) -> None:
        z = np.zeros(self.n)
        self.x, self.y, self.yaw, self.tilt, self.lift = z.copy(), z.copy(), z.copy(), z.copy(), z.copy()
        self.spine, self.lean, self.twist, self.head = z.copy(), z.copy(), z.copy(), z.copy()
        self.angles = {}
        for side in ("r", "l"):
            for name, val in (
                ("hip_flex", 0.0),
                ("hip_abd", 3.0),
                ("knee", 3.0),
                ("sho_flex", 0.0),
                ("sho_abd", 8.0),
                ("elb_flex", 12.0),
                ("elb_abd", 0.0),
            ):
                self.angles[f"{name}_{side}"] = np.full(self.n, val * _DEG)

    def a(self, name: str) -> _F64:
        return self.angles[name]

    def set(self, name: str, value: _F64 | float) -> None:
        self.angles[name] = np.broadcast_to(np.asarray(value, dtype=np.float64), (self.n,)).copy()


# --------------------------------------------------------------------------------------------
# kinematics


def _rx(a: _F64) -> _F64:
    c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([o, z, z], -1), np.stack([z, c, -s], -1), np.stack([z, s, c], -1)], -2)


def _ry(a: _F64) -> _F64:
    c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1), np.stack([-s, z, c], -1)], -2)


def _rz(a: _F64) -> _F64:
    c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1), np.stack([z, z, o], -1)], -2)


def _mv(r: _F64, v: _F64) -> _F64:
    """(T,3,3) @ (T,3) or (3,) → (T,3)."""
    out: _F64 = np.einsum("tij,tj->ti", r, np.broadcast_to(v, (r.shape[0], 3)))
    return out


_DOWN = np.array([0.0, 0.0, -1.0])
_SUPPORT = [v for v in range(NUM_JOINTS) if v not in (3, 4, 6, 7)]  # joints that carry the body


def forward_kinematics(body: Body, m: Motion) -> _F64:
    """World joint positions (T, 18, 3) in metres; z up, ground at z=0.

    Body frame: x = the person's right, y = forward, z = up, origin at the pelvis. The root
    height is chosen so the lowest joint rests just above the ground, which makes sitting,
    falling and lying lower the pelvis without a separate height model.
    """
    n = m.n
    j = np.zeros((n, NUM_JOINTS, 3))
    rt = _ry(m.lean) @ _rx(-m.spine) @ _rz(m.twist)
    neck = _mv(rt, np.array([0.0, 0.0, body.torso]))
    j[:, 1] = neck
    rh = rt @ _rz(m.head)
    h = body.height
    j[:, 0] = neck + _mv(rh, np.array([0.0, 0.045 * h, 0.085 * h]))
    j[:, 14] = neck + _mv(rh, np.array([0.03 * h, 0.035 * h, 0.105 * h]))
    j[:, 15] = neck + _mv(rh, np.array([-0.03 * h, 0.035 * h, 0.105 * h]))
    j[:, 16] = neck + _mv(rh, np.array([0.065 * h, -0.005 * h, 0.095 * h]))
    j[:, 17] = neck + _mv(rh, np.array([-0.065 * h, -0.005 * h, 0.095 * h]))
    for side, sgn, (s_i, e_i, w_i), (h_i, k_i, a_i) in (
        ("r", 1.0, (2, 3, 4), (8, 9, 10)),
        ("l", -1.0, (5, 6, 7), (11, 12, 13)),
    ):
        sho = neck + _mv(rt, np.array([sgn * body.shoulder_half, 0.0, -0.02 * h]))
        sf, sa = m.a(f"sho_flex_{side}"), m.a(f"sho_abd_{side}")
        upper = _mv(rt @ _ry(-sgn * sa) @ _rx(sf), _DOWN)
        fore = _mv(rt @ _ry(-sgn * (sa + m.a(f"elb_abd_{side}"))) @ _rx(sf + m.a(f"elb_flex_{side}")), _DOWN)
        j[:, s_i] = sho
        j[:, e_i] = sho + body.upper_arm * upper
        j[:, w_i] = j[:, e_i] + body.forearm * fore
        hf, ha, kf = m.a(f"hip_flex_{side}"), m.a(f"hip_abd_{side}"), m.a(f"knee_{side}")
        hip = np.array([sgn * body.hip_half, 0.0, 0.0])
        thigh = _mv(_ry(-sgn * ha) @ _rx(hf), _DOWN)
        shank = _mv(_ry(-sgn * ha) @ _rx(hf - kf), _DOWN)
        j[:, h_i] = hip
        j[:, k_i] = hip + body.thigh * thigh
        j[:, a_i] = j[:, k_i] + body.shank * shank
    rb = _rz(m.yaw) @ _rz(np.full(n, m.tilt_dir)) @ _rx(m.tilt) @ _rz(np.full(n, -m.tilt_dir))
    w: _F64 = np.einsum("tij,tvj->tvi", rb, j)
    if m.pivot_feet:
        # A fall rotates about the feet, not the pelvis: keep the ankles' mid-point where it was.
        upright = np.einsum("tij,tvj->tvi", _rz(m.yaw), j)
        shift = (upright[:, (10, 13), :2].mean(1) - w[:, (10, 13), :2].mean(1)) * 0.8
        w[:, :, :2] += shift[:, None, :]
    w[:, :, 0] += m.x[:, None]
    w[:, :, 1] += m.y[:, None]
    # the lowest trunk/leg joint rests on the ground; hands cannot go through the floor
    w[:, :, 2] += (-w[:, _SUPPORT, 2].min(axis=1) + 0.06 + m.lift)[:, None]
    w[:, :, 2] = np.maximum(w[:, :, 2], 0.03)
    return w


# --------------------------------------------------------------------------------------------
# motions per class


def _smooth(u: _F64) -> _F64:
    u = np.clip(u, 0.0, 1.0)
    return u * u * (3 - 2 * u)


def _slow_noise(rng: np.random.Generator, t: _F64, amp: float, hz: float = 0.5) -> _F64:
    """Sum of two random low-frequency sinusoids: idle sway, breathing-scale drift."""
    out = np.zeros_like(t)
    for _ in range(2):
        f = rng.uniform(0.3, 1.0) * hz
        out += amp / 2 * np.sin(2 * math.pi * f * t + rng.uniform(0, 2 * math.pi))
    return out


def _idle(rng: np.random.Generator, m: Motion, t: _F64, gestures: bool = True) -> None:
    """Small movements of a person standing or sitting still."""
    m.spine += _slow_noise(rng, t, rng.uniform(0, 6) * _DEG)
    m.lean += _slow_noise(rng, t, rng.uniform(0, 4) * _DEG)
    m.head += _slow_noise(rng, t, rng.uniform(0, 40) * _DEG, 0.4)
    m.twist += _slow_noise(rng, t, rng.uniform(0, 10) * _DEG, 0.3)
    for side in ("r", "l"):
        m.set(f"sho_flex_{side}", m.a(f"sho_flex_{side}") + _slow_noise(rng, t, rng.uniform(0, 12) * _DEG))
        m.set(f"sho_abd_{side}", m.a(f"sho_abd_{side}") + rng.uniform(-5, 10) * _DEG)
        m.set(f"elb_flex_{side}", m.a(f"elb_flex_{side}") + rng.uniform(0, 30) * _DEG)
    if gestures and rng.random() < 0.35:
        # phone / hand to face / hands in pockets / arms crossed: a steady arm posture
        side = "r" if rng.random() < 0.5 else "l"
        m.set(f"sho_flex_{side}", rng.uniform(10, 50) * _DEG)
        m.set(f"elb_flex_{side}", rng.uniform(80, 140) * _DEG)
        if rng.random() < 0.4:
            other = "l" if side == "r" else "r"
            m.set(f"sho_flex_{other}", rng.uniform(10, 50) * _DEG)
            m.set(f"elb_flex_{other}", rng.uniform(80, 140) * _DEG)
    if gestures and rng.random() < 0.25:
        # talking with the hands: slow, small-amplitude forearm movements (not a wave)
        side = "r" if rng.random() < 0.5 else "l"
        m.set(f"elb_flex_{side}", m.a(f"elb_flex_{side}") + np.abs(_slow_noise(rng, t, 50 * _DEG, 1.0)))
        m.set(f"sho_flex_{side}", m.a(f"sho_flex_{side}") + np.abs(_slow_noise(rng, t, 25 * _DEG, 0.8)))


def _standing(rng: np.random.Generator, m: Motion, t: _F64) -> None:
    _idle(rng, m, t)
    if rng.random() < 0.3:  # weight shift, a small step or turning on the spot
        m.yaw += _smooth((t - rng.uniform(0, t[-1])) / rng.uniform(0.5, 1.5)) * rng.uniform(-1.2, 1.2)
        m.x += _slow_noise(rng, t, rng.uniform(0, 0.15))
        m.y += _slow_noise(rng, t, rng.uniform(0, 0.15))
    if rng.random() < 0.2:  # bending a little (tying a lace, looking down)
        m.spine += _smooth((t - rng.uniform(0, t[-1])) / 0.8) * rng.uniform(10, 35) * _DEG
        m.set("knee_r", m.a("knee_r") + rng.uniform(0, 20) * _DEG)
        m.set("knee_l", m.a("knee_l") + rng.uniform(0, 20) * _DEG)


def _gait(rng: np.random.Generator, m: Motion, t: _F64, speed: float, run: bool) -> None:
    """Walking/running cycle: hips out of phase, knees flex in swing, arms counter-swing."""
    freq = (0.7 + 0.22 * speed) if not run else rng.uniform(1.25, 1.6)
    w = 2 * math.pi * freq
    ph = rng.uniform(0, 2 * math.pi)
    hip_amp = (
        (rng.uniform(14, 26) if not run else rng.uniform(35, 50))
        * _DEG
        * (1 if run else min(speed, 1.6) / 1.2)
    )
    knee_amp = (rng.uniform(45, 65) if not run else rng.uniform(85, 115)) * _DEG
    arm_amp = (rng.uniform(8, 30) if not run else rng.uniform(30, 55)) * _DEG
    for side, off in (("r", 0.0), ("l", math.pi)):
        s = np.sin(w * t + ph + off)
        m.set(f"hip_flex_{side}", hip_amp * s + (rng.uniform(5, 15) * _DEG if run else 0.0))
        swing = np.clip(np.sin(w * t + ph + off + 1.2), 0, None) ** 1.5
        m.set(f"knee_{side}", 5 * _DEG + knee_amp * swing)
        m.set(f"sho_flex_{side}", -arm_amp * s + (rng.uniform(0, 15) * _DEG if run else 0.0))
        m.set(
            f"elb_flex_{side}",
            (rng.uniform(70, 100) if run else rng.uniform(10, 35)) * _DEG + 0.3 * arm_amp * s,
        )
    m.spine += (rng.uniform(6, 16) if run else rng.uniform(-2, 6)) * _DEG
    m.lift += (rng.uniform(0.03, 0.09) if run else rng.uniform(0.005, 0.02)) * np.abs(np.sin(w * t + ph))
    m.twist += rng.uniform(3, 10) * _DEG * np.sin(w * t + ph)
    m.head += _slow_noise(rng, t, rng.uniform(0, 30) * _DEG, 0.3)
    yaw0 = rng.uniform(-math.pi, math.pi)
    m.yaw += yaw0 + rng.uniform(-0.25, 0.25) * t  # gently curved paths
    hx, hy = -np.sin(m.yaw), np.cos(m.yaw)
    dt = np.diff(t, prepend=t[0])
    m.x += np.cumsum(speed * hx * dt)
    m.y += np.cumsum(speed * hy * dt)


def _walking(rng: np.random.Generator, m: Motion, t: _F64) -> None:
    _gait(rng, m, t, rng.uniform(0.7, 1.8), run=False)
    if rng.random() < 0.2:  # carrying something / hands in pockets
        side = "r" if rng.random() < 0.5 else "l"
        m.set(f"sho_flex_{side}", rng.uniform(-5, 40) * _DEG)
        m.set(f"elb_flex_{side}", rng.uniform(10, 120) * _DEG)


def _running(rng: np.random.Generator, m: Motion, t: _F64) -> None:
    _gait(rng, m, t, rng.uniform(2.4, 5.5), run=True)


def _sit_pose(rng: np.random.Generator, m: Motion, s: _F64, on_ground: bool) -> None:
    """Blend from standing (s=0) to seated (s=1)."""
    hip = rng.uniform(75, 105) * _DEG
    knee = (rng.uniform(0, 30) if on_ground else rng.uniform(70, 110)) * _DEG
    for side in ("r", "l"):
        m.set(f"hip_flex_{side}", m.a(f"hip_flex_{side}") + hip * s + rng.uniform(-8, 8) * _DEG * s)
        m.set(f"knee_{side}", m.a(f"knee_{side}") + knee * s + rng.uniform(-10, 10) * _DEG * s)
        m.set(f"hip_abd_{side}", m.a(f"hip_abd_{side}") + rng.uniform(0, 15) * _DEG * s)
        m.set(f"sho_flex_{side}", m.a(f"sho_flex_{side}") + rng.uniform(0, 35) * _DEG * s)
        m.set(f"elb_flex_{side}", m.a(f"elb_flex_{side}") + rng.uniform(0, 60) * _DEG * s)
    m.spine += rng.uniform(-5, 20) * _DEG * s


def _sitting(rng: np.random.Generator, m: Motion, t: _F64) -> None:
    _idle(rng, m, t)
    m.yaw += rng.uniform(-math.pi, math.pi)
    _sit_pose(rng, m, np.ones_like(t), on_ground=rng.random() < 0.2)


def _sitting_down(rng: np.random.Generator, m: Motion, t: _F64) -> None:
    _idle(rng, m, t, gestures=False)
    m.yaw += rng.uniform(-math.pi, math.pi)
    dur = rng.uniform(0.8, 1.8)
    start = rng.uniform(0.1, max(0.15, t[-1] - dur - 0.2))
    u = (t - start) / dur
    s = _smooth(u)
    bump = np.sin(math.pi * np.clip(u, 0, 1))
    m.spine += rng.uniform(20, 40) * _DEG * bump  # lean forward while lowering
    for side in ("r", "l"):  # hands reach for the seat / knees
        m.set(f"sho_flex_{side}", m.a(f"sho_flex_{side}") + rng.uniform(0, 40) * _DEG * bump)
    if rng.random() < 0.4:  # a turn before sitting
        m.yaw += rng.uniform(-2.5, 2.5) * _smooth((t - start + 0.8) / 0.8)
    _sit_pose(rng, m, s, on_ground=rng.random() < 0.15)


def _lying_pose(rng: np.random.Generator, m: Motion, s: _F64) -> None:
    """Limb configuration on the ground (blended in with s)."""
    for side in ("r", "l"):
        hip = rng.uniform(-10, 60)
        m.set(f"hip_flex_{side}", m.a(f"hip_flex_{side}") + hip * _DEG * s)
        # knees bend only as far as the hips allow the feet to stay on the floor
        m.set(
            f"knee_{side}", m.a(f"knee_{side}") + rng.uniform(0, min(90, 1.3 * max(hip, 0) + 15)) * _DEG * s
        )
        m.set(f"hip_abd_{side}", m.a(f"hip_abd_{side}") + rng.uniform(0, 25) * _DEG * s)
        m.set(f"sho_abd_{side}", m.a(f"sho_abd_{side}") + rng.uniform(0, 100) * _DEG * s)
        m.set(f"sho_flex_{side}", m.a(f"sho_flex_{side}") + rng.uniform(-30, 150) * _DEG * s)
        m.set(f"elb_flex_{side}", m.a(f"elb_flex_{side}") + rng.uniform(0, 90) * _DEG * s)


def _lying(rng: np.random.Generator, m: Motion, t: _F64) -> None:
    m.yaw += rng.uniform(-math.pi, math.pi)
    m.tilt_dir = rng.uniform(-math.pi, math.pi)
    m.tilt += rng.uniform(75, 100) * _DEG + _slow_noise(rng, t, rng.uniform(0, 8) * _DEG)
    _lying_pose(rng, m, np.ones_like(t))
    m.head += _slow_noise(rng, t, rng.uniform(0, 40) * _DEG)
    if rng.random() < 0.4:  # moving limbs / trying to get up
        side = "r" if rng.random() < 0.5 else "l"
        m.set(f"sho_flex_{side}", m.a(f"sho_flex_{side}") + _slow_noise(rng, t, 60 * _DEG, 0.8))
        m.spine += np.abs(_slow_noise(rng, t, rng.uniform(0, 40) * _DEG, 0.5))
        m.set(f"knee_{side}", m.a(f"knee_{side}") + np.abs(_slow_noise(rng, t, 50 * _DEG, 0.6)))


def _fall_from_furniture(rng: np.random.Generator, m: Motion, t: _F64) -> None:
    """Sliding off a chair or sofa, or rolling off a bed, and landing on the floor.

    Seated: the seated pose tips forward or sideways until the body is horizontal on the floor
    (the lowest joint rests on the ground, so the pelvis drops from seat height). Bed: the body
    lies (or sits) on a surface 0.4–0.7 m high, rolls about its long axis and drops to the floor.
    """
    _idle(rng, m, t, gestures=False)
    m.yaw += rng.uniform(-math.pi, math.pi)
    dur = rng.uniform(0.5, 1.3)
    start = rng.uniform(0.2, max(0.25, t[-1] - dur - 0.3))
    u = np.clip((t - start) / dur, 0.0, 1.0)
    m.tilt_dir = rng.uniform(-math.pi, math.pi)
    if rng.random() < 0.5:  # from a chair / sofa
        _sit_pose(rng, m, 1.0 - _smooth((u - 0.3) / 0.7), on_ground=False)  # legs unfold on the floor
        m.tilt += rng.uniform(75, 100) * _DEG * u**2
    else:  # from a bed: lying (or sitting up) on it, then rolling over the edge
        bed = rng.uniform(0.4, 0.7)
        lying_first = rng.random() < 0.6
        tilt0 = rng.uniform(70, 95) * _DEG if lying_first else rng.uniform(0, 20) * _DEG
        m.tilt += tilt0 + (rng.uniform(75, 100) * _DEG - tilt0) * _smooth(u / 0.5)
        m.lift += bed * (1.0 - u**2)  # gravity: the drop is fastest at the end
        m.twist += rng.choice([-1.0, 1.0]) * rng.uniform(30, 120) * _DEG * _smooth(u)  # roll
        m.x += rng.uniform(0.3, 0.7) * _smooth(u) * math.cos(m.tilt_dir)
        m.y += rng.uniform(0.3, 0.7) * _smooth(u) * math.sin(m.tilt_dir)
        if not lying_first:
            _sit_pose(rng, m, 1.0 - _smooth(u), on_ground=True)
    for side in ("r", "l"):  # protective arm reaction
        m.set(f"sho_flex_{side}", m.a(f"sho_flex_{side}") + rng.uniform(20, 120) * _DEG * _smooth(u / 0.7))
    _lying_pose(rng, m, _smooth((u - 0.6) / 0.4) * 0.5)


def _falling(rng: np.random.Generator, m: Motion, t: _F64) -> None:
    if rng.random() < FURNITURE_FALL_P:
        _fall_from_furniture(rng, m, t)
        return
    walking = rng.random() < 0.4
    speed = rng.uniform(0.6, 1.6)
    if walking:
        _gait(rng, m, t, speed, run=False)
    else:
        _idle(rng, m, t, gestures=False)
        m.yaw += rng.uniform(-math.pi, math.pi)
    dur = rng.uniform(0.5, 1.4)
    start = rng.uniform(0.3, max(0.35, t[-1] - dur - 0.4))
    u = np.clip((t - start) / dur, 0.0, 1.0)
    after = u >= 1.0
    if walking:  # the gait stops and the feet stay where they were once the fall starts
        k = int(np.searchsorted(t, start))
        for arr in (m.x, m.y, m.yaw, m.spine, m.twist, m.lift, m.head):
            arr[k:] = arr[k] if k < len(arr) else arr[-1]
        for name in list(m.angles):
            if k < m.n:
                m.angles[name][k:] = m.angles[name][k]
    m.pivot_feet = True
    m.tilt_dir = rng.uniform(-math.pi, math.pi)
    if walking and rng.random() < 0.7:
        # tripping while walking: momentum carries the body on along its heading (stumbling
        # steps) while it goes down, and it lands forward — not a topple about frozen feet
        k = min(int(np.searchsorted(t, start)), m.n - 1)
        hx, hy = -math.sin(m.yaw[k]), math.cos(m.yaw[k])
        carry = speed * dur * (u - 0.5 * u**2) * rng.uniform(0.6, 1.3)
        m.x = m.x + carry * hx
        m.y = m.y + carry * hy
        m.tilt_dir = math.pi + rng.uniform(-0.6, 0.6)  # forward (the spine bends forward at −x rotation)
    collapse = rng.random() < 0.4
    if collapse:  # knees buckle first, then the body topples
        c = _smooth(u / 0.5)
        for side in ("r", "l"):
            m.set(
                f"hip_flex_{side}",
                m.a(f"hip_flex_{side}") + rng.uniform(30, 80) * _DEG * c * (1 - after * 0.5),
            )
            m.set(f"knee_{side}", m.a(f"knee_{side}") + rng.uniform(60, 120) * _DEG * c * (1 - after * 0.5))
        tilt = np.clip((u - 0.3) / 0.7, 0, 1) ** 2
    else:
        tilt = u**2  # gravity: slow start, fast impact
        if rng.random() < 0.5:
            for side in ("r", "l"):
                m.set(f"knee_{side}", m.a(f"knee_{side}") + rng.uniform(10, 60) * _DEG * np.sin(math.pi * u))
    m.tilt += rng.uniform(75, 100) * _DEG * tilt
    # protective arm reaction during the fall
    for side in ("r", "l"):
        m.set(f"sho_flex_{side}", m.a(f"sho_flex_{side}") + rng.uniform(20, 140) * _DEG * _smooth(u / 0.7))
        m.set(f"sho_abd_{side}", m.a(f"sho_abd_{side}") + rng.uniform(0, 60) * _DEG * _smooth(u / 0.7))
    _lying_pose(rng, m, _smooth((u - 0.6) / 0.4) * 0.5)
    if rng.random() < 0.3:  # small movements on the ground afterwards
        m.set("sho_flex_r", m.a("sho_flex_r") + after * _slow_noise(rng, t, 40 * _DEG, 0.8))


def _waving(rng: np.random.Generator, m: Motion, t: _F64) -> None:
    if rng.random() < 0.2:
        _gait(rng, m, t, rng.uniform(0.4, 1.0), run=False)
    else:
        _idle(rng, m, t, gestures=False)
        m.yaw += rng.uniform(-math.pi, math.pi)
    f = rng.uniform(1.2, 3.0)
    ph = rng.uniform(0, 2 * math.pi)
    osc = np.sin(2 * math.pi * f * t + ph)
    raise_at = rng.uniform(-0.5, 0.8)
    up = _smooth((t - raise_at) / 0.4)
    sides = ("r", "l") if rng.random() < 0.35 else (("r",) if rng.random() < 0.5 else ("l",))
    overhead = rng.random() < 0.4
    for side in sides:
        if overhead:  # big overhead wave: the whole arm sweeps side to side above the head
            m.set(
                f"sho_abd_{side}",
                (1 - up) * m.a(f"sho_abd_{side}")
                + up * (rng.uniform(125, 160) * _DEG + rng.uniform(15, 30) * _DEG * osc),
            )
            m.set(f"elb_flex_{side}", up * rng.uniform(0, 25) * _DEG)
            m.set(f"sho_flex_{side}", up * rng.uniform(0, 30) * _DEG)
        else:  # forearm wave: upper arm out to the side, forearm up and oscillating
            m.set(f"sho_abd_{side}", (1 - up) * m.a(f"sho_abd_{side}") + up * rng.uniform(60, 110) * _DEG)
            m.set(f"sho_flex_{side}", up * rng.uniform(0, 40) * _DEG)
            m.set(f"elb_abd_{side}", up * (rng.uniform(50, 90) * _DEG + rng.uniform(20, 40) * _DEG * osc))
            m.set(f"elb_flex_{side}", up * rng.uniform(0, 20) * _DEG)


def _fighter(rng: np.random.Generator, m: Motion, t: _F64) -> None:
    """One fighter: guard stance, then punches, hooks, kicks and pushes at random times."""
    for side in ("r", "l"):
        m.set(f"sho_flex_{side}", rng.uniform(35, 65) * _DEG)
        m.set(f"sho_abd_{side}", rng.uniform(5, 25) * _DEG)
        m.set(f"elb_flex_{side}", rng.uniform(80, 125) * _DEG)
        m.set(f"hip_flex_{side}", rng.uniform(5, 25) * _DEG)
        m.set(f"knee_{side}", rng.uniform(10, 35) * _DEG)
    m.spine += rng.uniform(5, 20) * _DEG + _slow_noise(rng, t, 10 * _DEG, 1.5)
    m.lean += _slow_noise(rng, t, 10 * _DEG, 1.5)
    m.lift += np.abs(_slow_noise(rng, t, 0.04, 2.5))
    rate = rng.uniform(1.0, 2.8)
    tt = rng.uniform(-0.3, 0.3)
    while tt < t[-1]:
        kind = rng.choice(["punch", "punch", "hook", "kick", "push", "grab"])
        side = "r" if rng.random() < 0.5 else "l"
        dur = rng.uniform(0.15, 0.35) if kind != "kick" else rng.uniform(0.3, 0.5)
        e = np.sin(math.pi * np.clip((t - tt) / dur, 0, 1))  # out and back
        if kind == "punch":
            m.set(f"sho_flex_{side}", m.a(f"sho_flex_{side}") + (90 * _DEG - m.a(f"sho_flex_{side}")) * e)
            m.set(f"elb_flex_{side}", m.a(f"elb_flex_{side}") * (1 - e))
            m.twist += (1 if side == "r" else -1) * rng.uniform(15, 35) * _DEG * e
        elif kind == "hook":
            m.set(f"sho_abd_{side}", m.a(f"sho_abd_{side}") + rng.uniform(50, 80) * _DEG * e)
            m.twist += (1 if side == "r" else -1) * rng.uniform(25, 45) * _DEG * e
        elif kind == "kick":
            m.set(f"hip_flex_{side}", m.a(f"hip_flex_{side}") + rng.uniform(50, 90) * _DEG * e)
            knee = m.a(f"knee_{side}") + rng.uniform(40, 80) * _DEG * np.sin(
                math.pi * np.clip((t - tt) / dur, 0, 1) * 0.5 + 0.5
            )
            m.set(
                f"knee_{side}",
                np.where((t >= tt) & (t <= tt + dur), knee * (1 - e * 0.8), m.a(f"knee_{side}")),
            )
        elif kind == "push":
            for s2 in ("r", "l"):
                m.set(f"sho_flex_{s2}", m.a(f"sho_flex_{s2}") + (85 * _DEG - m.a(f"sho_flex_{s2}")) * e)
                m.set(f"elb_flex_{s2}", m.a(f"elb_flex_{s2}") * (1 - 0.8 * e))
            m.spine += 15 * _DEG * e
        else:  # grab / grapple: arms forward, torso rocks
            for s2 in ("r", "l"):
                m.set(f"sho_flex_{s2}", m.a(f"sho_flex_{s2}") + 30 * _DEG * e)
            m.lean += rng.uniform(-25, 25) * _DEG * e
        tt += dur + rng.exponential(1.0 / rate)
    m.head += _slow_noise(rng, t, 25 * _DEG, 1.5)


def _fighting_pair(rng: np.random.Generator, t: _F64) -> tuple[Motion, Motion]:
    a, b = Motion(len(t)), Motion(len(t))
    _fighter(rng, a, t)
    _fighter(rng, b, t)
    dist = rng.uniform(0.55, 1.2) + _slow_noise(rng, t, 0.35, 1.2)
    centre_yaw = rng.uniform(-math.pi, math.pi) + rng.uniform(-0.6, 0.6) * t  # circling
    cx, cy = _slow_noise(rng, t, 0.4, 0.6), _slow_noise(rng, t, 0.4, 0.6)
    ux, uy = -np.sin(centre_yaw), np.cos(centre_yaw)
    a.x, a.y = cx - ux * dist / 2, cy - uy * dist / 2
    b.x, b.y = cx + ux * dist / 2, cy + uy * dist / 2
    a.yaw = centre_yaw + _slow_noise(rng, t, 30 * _DEG, 1.0)
    b.yaw = centre_yaw + math.pi + _slow_noise(rng, t, 30 * _DEG, 1.0)
    return a, b


_MOTIONS: dict[str, Callable[[np.random.Generator, Motion, _F64], None]] = {
    "standing": _standing,
    "walking": _walking,
    "running": _running,
    "sitting_down": _sitting_down,
    "sitting": _sitting,
    "falling": _falling,
    "lying": _lying,
    "waving": _waving,
}


# --------------------------------------------------------------------------------------------
# camera and OpenPose-style corruption


@dataclass(frozen=True, slots=True)
class Camera:
    """Pinhole camera at (0, 0, height) looking along +y, tilted down by `tilt` (radians)."""

    width: int
    height_px: int
    focal: float
    height: float
    tilt: float
    roll: float

    def project(self, pts: _F64) -> tuple[_F64, _F64]:
        """World points (..., 3) → pixels (..., 2) and a mask of points in front of the camera."""
        p = pts - np.array([0.0, 0.0, self.height])
        ct, st = math.cos(self.tilt), math.sin(self.tilt)
        fwd = np.array([0.0, ct, -st])
        down = np.array([0.0, -st, -ct])
        right = np.array([1.0, 0.0, 0.0])
        zc = p @ fwd
        xc, yc = p @ right, p @ down
        cr, sr = math.cos(self.roll), math.sin(self.roll)
        xc, yc = cr * xc - sr * yc, sr * xc + cr * yc
        ok = zc > 0.2
        zs = np.where(ok, zc, 1.0)
        u = self.focal * xc / zs + self.width / 2
        v = self.focal * yc / zs + self.height_px / 2
        return np.stack([u, v], -1), ok


def sample_camera(rng: np.random.Generator) -> tuple[Camera, _F64, float]:
    """A random CCTV-like camera and the ground point (x, y) where the main subject stands.

    Returns (camera, subject position, subject yaw offset) with the subject in view: small and far
    from high cameras as well as large and close from eye level.
    """
    w, h = _IMAGE_SIZES[rng.integers(len(_IMAGE_SIZES))]
    hfov = rng.uniform(45, 100) * _DEG
    focal = w / (2 * math.tan(hfov / 2))
    vfov = 2 * math.atan(h / (2 * focal))
    cam_h = float(rng.choice([rng.uniform(1.2, 3.0), rng.uniform(2.5, 6.0), rng.uniform(5.0, 12.0)]))
    dist = float(np.exp(rng.uniform(math.log(max(2.0, cam_h * 0.5)), math.log(max(cam_h * 4, 12.0) + 14))))
    bearing = rng.uniform(-0.38, 0.38) * hfov
    # aim so that the person's middle lands somewhere in the lower 3/4 of the image
    below = math.atan2(cam_h - 0.9, dist)
    tilt = float(np.clip(below + rng.uniform(-0.3, 0.25) * vfov, -5 * _DEG, 80 * _DEG))
    cam = Camera(w, h, focal, cam_h, tilt, rng.normal(0, 2.5) * _DEG)
    pos = np.array([dist * math.sin(bearing), dist * math.cos(bearing)])
    return cam, pos, bearing


def _corrupt(
    rng: np.random.Generator,
    cam: Camera,
    world: _F64,
    facing: _F64,
    may_vanish: bool = True,
    vanish_falling: bool = False,
    occluded_exit: bool = False,
) -> _F64:
    """OpenPose-like detections of one person: (T, 18, 3) pixel x, y, score; zeros when missed.

    `facing` is (T, 3): the head's forward direction, used to hide the face seen from behind.
    Bottom-up detectors trained on mostly upright people often lose a person lying on the floor
    and during fast motion (blur); `may_vanish` allows losing every horizontal frame.
    `vanish_falling`: the person is lost for good once the trunk tilts past a random angle, the
    legs a frame or two before the rest (a faller on a dark floor). `occluded_exit`: the person
    is lost for good from a random frame on with no change of pose (walking out behind a door).
    """
    n = world.shape[0]
    px, front = cam.project(world)
    valid = front.copy()
    person_px = 0.0
    if valid.any():
        hts = [np.ptp(px[i, valid[i], 1]) for i in range(n) if valid[i].sum() >= 2]
        person_px = float(np.median(hts)) if hts else 0.0
    q = float(np.clip((person_px - 25.0) / 160.0, 0.0, 1.0))
    # jitter: white plus slowly drifting error, proportional to the person's size in pixels
    sig = person_px * rng.uniform(0.004, 0.03) + rng.uniform(0.3, 1.5)
    px = px + rng.normal(0, sig, px.shape)
    drift = np.cumsum(rng.normal(0, sig * 0.3, px.shape), axis=0)
    px = px + drift - drift.mean(0, keepdims=True)
    # scores
    base = 0.3 + 0.5 * q + rng.normal(0, 0.06)
    score = np.clip(base + rng.normal(0, 0.12, (n, NUM_JOINTS)) - 0.1 * (_MISS_FACTOR - 1), 0.05, 1.0)
    # misses: independent plus runs, worse for small people and extremities
    p_miss = np.clip((rng.uniform(0.0, 0.1) + (1 - q) * rng.uniform(0.05, 0.35)) * _MISS_FACTOR, 0, 0.85)
    miss = rng.random((n, NUM_JOINTS)) < p_miss * 0.5
    for v in np.nonzero(rng.random(NUM_JOINTS) < p_miss)[0]:
        s0 = rng.integers(0, n)
        miss[s0 : s0 + rng.integers(2, 12), v] = True
    # face hidden when the head points away from the camera
    to_cam = np.array([0.0, 0.0, cam.height]) - world[:, 0]
    to_cam /= np.linalg.norm(to_cam, axis=1, keepdims=True) + 1e-9
    away = (facing * to_cam).sum(1) < -0.15
    miss[away, 0] |= True
    miss[away, 14] |= True
    miss[away, 15] |= True
    # whole-person dropouts and tracks that start/stop within the window
    drop = rng.random(n) < rng.uniform(0, 0.08)
    # fast motion (blur): the more the body moves between frames, the likelier it is lost
    hips = world[:, (8, 11)].mean(1)
    speed = np.linalg.norm(np.diff(world, axis=0), axis=2).max(1)
    speed = np.concatenate([[0.0], speed]) / max(1e-6, float(np.ptp(world[0, :, 2])) + 0.5)
    drop |= rng.random(n) < np.clip(speed - 0.15, 0, 1) * rng.uniform(0, 1.5)
    # a person lying down: often detected badly or not at all
    trunk = world[:, 1] - hips
    horizontal = np.abs(trunk[:, 2]) < 0.6 * np.linalg.norm(trunk, axis=1)
    # (OpenCV OpenPose on the sample fall clip finds nobody once the person is on the floor, so
    # after a fall "gone" is the commonest case, not the exception.)
    mode = rng.random()
    if mode < 0.25:
        drop |= horizontal & (rng.random(n) < rng.uniform(0.3, 0.9))
    elif mode < 0.7 and may_vanish:
        drop |= horizontal
    # detector flicker: missed for runs of frames and found again (small people, occlusion, PAF
    # grouping failures). On real CCTV this happens to walkers as much as to fallers, so a person
    # vanishing for a while must not by itself look like a fall.
    if rng.random() < 0.25 + 0.45 * (1 - q):
        for _ in range(int(rng.integers(1, 4))):
            s0 = int(rng.integers(0, n))
            drop[s0 : s0 + int(rng.integers(2, 16))] = True
    # fragments: on some frames only a piece of the person (head, upper body, legs) is grouped
    if rng.random() < 0.2 + 0.3 * (1 - q):
        for _ in range(int(rng.integers(1, 3))):
            s0 = int(rng.integers(0, n))
            lost = np.ones(NUM_JOINTS, dtype=bool)
            lost[list(_FRAGMENTS[int(rng.integers(len(_FRAGMENTS)))])] = False
            miss[s0 : s0 + int(rng.integers(1, 10))] |= lost
    # lying bodies lose limbs: foreshortened, self-occluded arms and legs on the floor
    limb_loss = horizontal[:, None] & (rng.random((n, NUM_JOINTS)) < rng.uniform(0, 0.45))
    miss |= limb_loss & np.isin(np.arange(NUM_JOINTS), (3, 4, 6, 7, 9, 10, 12, 13, 0, 14, 15))[None, :]
    tilt_deg = np.degrees(np.arccos(np.clip(trunk[:, 2] / (np.linalg.norm(trunk, axis=1) + 1e-9), -1, 1)))
    if vanish_falling:
        over = np.flatnonzero(tilt_deg > rng.uniform(15, 55))
        if len(over):
            k = int(over[0])
            drop[k:] = True
            legs = max(0, k - int(rng.integers(0, 3)))
            miss[legs:k, 8:14] = True
    if occluded_exit and n >= 6:
        drop[int(rng.integers(n // 3, n - 2)) :] = True
    if rng.random() < 0.2:
        cut = rng.integers(1, max(2, n // 3))
        if rng.random() < 0.5:
            drop[:cut] = True
        else:
            drop[n - cut :] = True
    miss |= drop[:, None]
    # truncation at the image border
    inside = (px[..., 0] >= 0) & (px[..., 0] < cam.width) & (px[..., 1] >= 0) & (px[..., 1] < cam.height_px)
    miss |= ~(inside & valid)
    out: _F64 = np.concatenate([px, score[..., None]], -1)
    # left/right confusions of whole limb groups on some frames
    p_swap = rng.uniform(0, 0.05)
    for group in (LR_ARMS, LR_LEGS, LR_FACE):
        for i in np.nonzero(rng.random(n) < p_swap)[0]:
            for a, b in group:
                out[i, [a, b]] = out[i, [b, a]]
                miss[i, [a, b]] = miss[i, [b, a]]
    out[miss] = 0.0
    return out


def _times(rng: np.random.Generator, cfg: SynthConfig) -> _F64:
    """Frame times with uneven sampling: speed variety, repeated and skipped frames."""
    dt = np.full(cfg.T, 1.0 / cfg.fps) * rng.uniform(0.85, 1.15)
    dt *= rng.uniform(0.9, 1.1, cfg.T)
    dup = rng.random(cfg.T) < rng.uniform(0, 0.08)
    dt[dup] = 0.0
    skip = rng.random(cfg.T) < rng.uniform(0, 0.05)
    dt[skip] *= 2
    dt[0] = 0.0
    return np.cumsum(dt)


def _place(m: Motion, origin: tuple[float, float], pos: _F64, yaw: float) -> None:
    """Rotate a motion about `origin` by `yaw` and move `origin` to ground point `pos`."""
    c, s = math.cos(yaw), math.sin(yaw)
    x0, y0 = m.x - origin[0], m.y - origin[1]
    m.x, m.y = pos[0] + c * x0 - s * y0, pos[1] + s * x0 + c * y0
    m.yaw = m.yaw + yaw


def _axial_yaw(rng: np.random.Generator, m: Motion, bearing: float) -> float:
    """The placement yaw that lays a tilted body along the camera's line of sight (bearing =
    direction from the camera to the subject), head away from (60 %) or towards the camera, ±15°:
    the body stays short and upright-looking in the image (measured on a real backward fall)."""
    target = (math.pi if rng.random() < 0.6 else 0.0) - bearing + rng.normal(0, 15 * _DEG)
    return target - m.tilt_dir - float(m.yaw[-1])


def _head_forward(world: _F64) -> _F64:
    """Approximate facing direction from the eyes/nose relative to the ears, (T, 3)."""
    f = world[:, 0] - (world[:, 16] + world[:, 17]) / 2
    unit: _F64 = f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-9)
    return unit


def make_sample(label: str, rng: np.random.Generator, cfg: SynthConfig) -> _F32:
    """One window (3, T, 18, M) float32 of class `label` (docs/ARCHITECTURE.md §3 normalisation)."""
    if label not in CLASSES:
        raise ConfigError(f"unknown class {label!r}; known: {', '.join(CLASSES)}")
    t = _times(rng, cfg)
    motions: list[Motion] = []
    if label == "fighting":
        a, b = _fighting_pair(rng, t)
        motions = [a, b]
    else:
        m = Motion(cfg.T)
        _MOTIONS[label](rng, m, t)
        motions = [m]
        if cfg.M > 1 and rng.random() < 0.35:
            # a bystander (standing/walking) or a companion: two people ≠ fighting
            other = Motion(cfg.T)
            kind = "standing" if label in ("standing", "sitting") or rng.random() < 0.5 else "walking"
            _MOTIONS[kind](rng, other, t)
            if label == "walking" and kind == "walking" and rng.random() < 0.5:
                other.x, other.y, other.yaw = m.x.copy(), m.y.copy(), m.yaw.copy()  # walking together
                off = rng.uniform(0.5, 1.0)
                other.x = other.x + off * np.cos(m.yaw)
                other.y = other.y + off * np.sin(m.yaw)
            else:
                ang = rng.uniform(-math.pi, math.pi)
                d = rng.uniform(0.8, 5.0)
                other.x = other.x - other.x[0] + d * math.cos(ang)
                other.y = other.y - other.y[0] + d * math.sin(ang)
                if kind == "standing" and rng.random() < 0.5:  # conversation: face each other
                    other.yaw = other.yaw - other.yaw[0] + math.atan2(other.x[0], -other.y[0])
            motions.append(other)
    cam, pos, bearing = sample_camera(rng)
    yaw = rng.uniform(-math.pi, math.pi)
    if label in ("falling", "lying") and rng.random() < AXIAL_P:
        yaw = _axial_yaw(rng, motions[0], bearing)
    vanish = label == "falling" and rng.random() < FALL_VANISH_P
    exit_ = label in ("standing", "walking", "sitting_down", "waving") and rng.random() < OCCLUDED_EXIT_P
    dets = []
    origin = (float(motions[0].x[0]), float(motions[0].y[0]))
    for k, mo in enumerate(motions):
        _place(mo, origin, pos, yaw)
        world = forward_kinematics(Body.sample(rng), mo)
        det = _corrupt(
            rng,
            cam,
            world,
            _head_forward(world),
            may_vanish=label != "lying",
            vanish_falling=vanish and k == 0,
            occluded_exit=exit_ and k == 0,
        )
        dets.append(normalise(det, cam.width, cam.height_px))
    if len(dets) < cfg.M and cfg.T >= 8 and rng.random() < ID_SWITCH_P:
        dets = _id_switch(rng, dets)
    dets = _camera_artefacts(rng, dets)
    out = np.zeros((3, cfg.T, NUM_JOINTS, cfg.M), dtype=np.float32)
    slots = rng.permutation(cfg.M)
    for k, person in enumerate(dets[: cfg.M]):
        out[:, :, :, slots[k]] = person.transpose(2, 0, 1)
    return out


def _camera_artefacts(rng: np.random.Generator, dets: list[_F32]) -> list[_F32]:
    """Whole-scene artefacts of real CCTV streams, applied to every person alike (so they are never
    an action cue): the camera is bumped or panned (every skeleton jumps or drifts together) and the
    stream stalls (a run of frames repeats the last one exactly, no detector jitter)."""
    n = dets[0].shape[0]
    out = [d.copy() for d in dets]
    if rng.random() < CAMERA_MOVE_P:
        shift = rng.uniform(-0.08, 0.08, 2)
        start = int(rng.integers(1, n))
        ramp = np.clip((np.arange(n) - start + 1) / max(1, int(rng.integers(1, 6))), 0.0, 1.0)
        for d in out:
            present = d[:, :, 2] > 0
            d[:, :, :2] += np.where(present[..., None], ramp[:, None, None] * shift, 0.0)
            d[(np.abs(d[:, :, :2]) >= 0.5).any(axis=2)] = 0.0  # moved out of the picture
    if rng.random() < STALL_P and n >= 6:
        k = int(rng.integers(1, n - 2))
        run = int(rng.integers(3, 16))
        for d in out:
            d[k : k + run] = d[k - 1]
    return out


def _id_switch(rng: np.random.Generator, dets: list[_F32]) -> list[_F32]:
    """The tracker loses the main person and picks them up again under a new id: the window holds
    one track that ends and another that starts (after a gap of 0–3 frames) where the first ended.
    Real trackers do this to pedestrians all the time, so a track vanishing while another appears
    must not look like a fall."""
    det = dets[0]
    n = det.shape[0]
    cut = int(rng.integers(3, n - 3))
    gap = int(rng.integers(0, 4))
    before, after = det.copy(), det.copy()
    before[cut:] = 0.0
    after[: min(n, cut + gap)] = 0.0
    return [before, after, *dets[1:]]


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one sample: independent of every other sample and of the order of generation."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {sorted(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index])


def generate(
    n: int,
    seed: int,
    split: str = "train",
    cfg: SynthConfig | None = None,
    start: int = 0,
    classes: tuple[str, ...] = CLASSES,
) -> tuple[_F32, npt.NDArray[np.int64]]:
    """`n` samples (balanced, class = index mod num_classes) → X (n, 3, T, 18, M), y (n,) int64."""
    cfg = cfg or SynthConfig()
    x = np.zeros((n, 3, cfg.T, NUM_JOINTS, cfg.M), dtype=np.float32)
    y = np.zeros(n, dtype=np.int64)
    for i in range(n):
        idx = start + i
        y[i] = idx % len(classes)
        x[i] = make_sample(classes[y[i]], sample_rng(seed, split, idx), cfg)
    return x, y


__all__ = [
    "CLASSES",
    "Body",
    "Camera",
    "Motion",
    "SynthConfig",
    "forward_kinematics",
    "generate",
    "make_sample",
    "sample_camera",
    "sample_rng",
]
