"""Model input transforms: `reference` is the identity, `person-centred` removes position and size."""

from __future__ import annotations

import numpy as np
import pytest

from enclave_bridge.measured.model_inputs import apply_input_transform, input_transform_of
from enclave_bridge.shared.errors import ConfigError


def _windows(n: int = 4, t: int = 12, m: int = 2, seed: int = 0) -> np.ndarray:
    """Reference-normalised windows: people of different sizes and places, some joints missing."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 3, t, 18, m), np.float32)
    for i in range(n):
        for p in range(m):
            centre, size = rng.uniform(-0.3, 0.3, 2), rng.uniform(0.02, 0.5)
            body = rng.uniform(-0.5, 0.5, (2, 18)) * size
            motion = np.cumsum(rng.normal(0, 0.01, (2, t, 1)), axis=1)
            x[i, :2, :, :, p] = centre[:, None, None] + body[:, None, :] + motion
            x[i, 2, :, :, p] = rng.uniform(0.2, 1.0, (t, 18))
    missing = rng.random((n, t, 18, m)) < 0.2
    x.transpose(0, 2, 3, 4, 1)[missing] = 0.0  # a missing joint is (0, 0, 0)
    return x


def test_reference_is_the_identity_and_the_default() -> None:
    x = _windows()
    assert input_transform_of({}) == "reference"
    assert np.array_equal(apply_input_transform(x, "reference"), x)


@pytest.mark.parametrize("scale", [0.1, 0.5, 3.0])
def test_person_centred_ignores_where_and_how_big(scale: float) -> None:
    x = _windows()
    moved = x.copy()
    present = x[:, 2] > 0
    shift = np.array([0.13, -0.21], np.float32)[None, :, None, None, None]
    moved[:, :2] = np.where(present[:, None], x[:, :2] * scale + shift, 0.0)
    a, b = apply_input_transform(x, "person-centred"), apply_input_transform(moved, "person-centred")
    assert np.allclose(a, b, atol=1e-4)
    assert np.abs(a[:, :2]).max() < 10  # in units of the largest person's size


def test_person_centred_keeps_scores_missing_joints_and_motion() -> None:
    x = _windows()
    y = apply_input_transform(x, "person-centred")
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.array_equal(y[:, 2], x[:, 2])
    missing = x[:, 2] == 0
    assert (y[:, :2][np.broadcast_to(missing[:, None], y[:, :2].shape)] == 0).all()
    # a window is centred on its people: the mean of the present joints is 0
    for w in y:
        pres = w[2] > 0
        assert np.abs(w[:2][:, pres].mean(axis=1)).max() < 1e-5
    # one translation and one scale per window: frame-to-frame motion survives (up to that scale)
    dx_in = np.diff(x[0, 0, :, 3, 0])
    dx_out = np.diff(y[0, 0, :, 3, 0])
    both = (x[0, 2, 1:, 3, 0] > 0) & (x[0, 2, :-1, 3, 0] > 0)
    ratio = dx_out[both] / dx_in[both]
    assert np.allclose(ratio, ratio[0], rtol=1e-3)


def test_person_centred_single_window_and_empty_window() -> None:
    x = _windows()
    assert np.array_equal(
        apply_input_transform(x[1], "person-centred"), apply_input_transform(x, "person-centred")[1]
    )
    empty = np.zeros((3, 10, 18, 2), np.float32)
    assert np.array_equal(apply_input_transform(empty, "person-centred"), empty)
    one_joint = empty.copy()
    one_joint[:, 4, 0, 0] = (0.1, 0.2, 0.9)  # a lone joint: centred, not magnified
    out = apply_input_transform(one_joint, "person-centred")
    assert np.isfinite(out).all() and np.allclose(out[:, 4, 0, 0], [0.0, 0.0, 0.9])


def test_bad_names_metadata_and_shapes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown input transform"):
        apply_input_transform(_windows(), "mirror")
    with pytest.raises(ConfigError, match="input_transform must be one of"):
        input_transform_of({"input_transform": "mirror"})
    with pytest.raises(ConfigError, match="windows must be"):
        apply_input_transform(np.zeros((2, 18, 3), np.float32), "person-centred")
