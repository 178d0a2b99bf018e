"""Orbit cameras: geometry, seeded sampling, turntable, view labels, bad ranges."""

import math

import pytest
import torch

from scoredistill.errors import ConfigError
from scoredistill.splat.cameras import (
    CameraRanges,
    Cameras,
    sample_cameras,
    turntable,
    view_labels,
    view_prompts,
)


def cams(el, az, dist=1.2, fov=50.0):
    el, az = torch.as_tensor(el, dtype=torch.float64).reshape(-1), torch.as_tensor(az, dtype=torch.float64).reshape(-1)
    n = len(el)
    return Cameras(el, az, torch.full((n,), dist, dtype=torch.float64), torch.full((n,), fov, dtype=torch.float64))


def test_defaults_are_threestudio_ranges():
    r = CameraRanges()
    assert r.elevation == (-10.0, 90.0) and r.azimuth == (-180.0, 180.0)
    assert r.distance == (1.0, 1.5) and r.fov == (40.0, 70.0)


def test_view_matrix_looks_at_origin_z_up():
    c = cams([0.0, 30.0, 90.0, -10.0], [0.0, 45.0, 10.0, -170.0])
    w2c = c.world_to_camera()
    r = w2c[:, :3, :3]
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(4, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(r), torch.ones(4, dtype=torch.float64))
    # the camera centre maps to the camera origin, the world origin straight ahead at depth d
    centre = torch.cat([c.centers(), torch.ones(4, 1, dtype=torch.float64)], 1)
    assert torch.allclose((w2c @ centre[:, :, None])[:, :3, 0], torch.zeros(4, 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(w2c[:, :3, 3], torch.tensor([0, 0, 1.2], dtype=torch.float64).expand(4, 3), atol=1e-12)
    # world up (+z) points up in the image (negative camera y) for non-overhead views
    up_cam = r[:3, :, 2]  # camera coordinates of world +z
    assert (up_cam[:3, 1] < 0).all()
    assert torch.allclose(c.camera_to_world() @ w2c, torch.eye(4, dtype=torch.float64).expand(4, 4, 4), atol=1e-12)


def test_front_camera_on_plus_x_and_right_is_plus_y():
    c = cams([0.0], [0.0], dist=2.0)
    assert torch.allclose(c.centers()[0], torch.tensor([2.0, 0, 0], dtype=torch.float64))
    assert torch.allclose(c.rotations()[0, 0], torch.tensor([0, 1.0, 0], dtype=torch.float64))


def test_intrinsics_from_vertical_fov():
    c = cams([0.0], [0.0], fov=60.0)
    k = c.intrinsics(32, 48)[0]
    f = 16 / math.tan(math.radians(30))
    assert torch.allclose(k, torch.tensor([[f, 0, 24], [0, f, 16], [0, 0, 1]], dtype=torch.float64))


def test_sampling_is_seeded_and_in_range():
    r = CameraRanges(elevation=(0, 30), azimuth=(-90, 90), distance=(2, 3), fov=(30, 40))
    a = sample_cameras(500, r, torch.Generator().manual_seed(3))
    b = sample_cameras(500, r, torch.Generator().manual_seed(3))
    c = sample_cameras(500, r, torch.Generator().manual_seed(4))
    assert torch.equal(a.as_cond(), b.as_cond()) and not torch.equal(a.as_cond(), c.as_cond())
    for name in ("elevation", "azimuth", "distance", "fov"):
        v = getattr(a, name)
        lo, hi = getattr(r, name)
        assert v.min() >= lo and v.max() <= hi and v.max() - v.min() > 0.8 * (hi - lo)


def test_turntable_and_cond_round_trip():
    t = turntable(8)
    assert torch.allclose(t.azimuth, torch.arange(-180.0, 180.0, 45.0))
    assert (t.elevation == 15).all() and (t.distance == 1.25).all() and (t.fov == 55).all()
    back = Cameras.from_cond(t.as_cond())
    assert torch.equal(back.as_cond(), t.as_cond())
    assert t.features().shape == (8, 16)
    assert torch.equal(t.features()[:, -4:], torch.tensor([0, 0, 0, 1.0]).expand(8, 4))
    with pytest.raises(ConfigError, match="cond"):
        Cameras.from_cond(torch.zeros(3, 5))


def test_view_labels_threestudio_thresholds():
    c = cams([0, 0, 0, 0, 61, 59, 0, 0], [0, 44, 46, 134, 0, 170, 136, -200])
    assert view_labels(c) == ["front", "front", "side", "side", "overhead", "back", "back", "back"]
    assert view_prompts("a snowman", c[4:6]) == ["a snowman, overhead view", "a snowman, back view"]


@pytest.mark.parametrize("kw,field", [
    ({"elevation": (30, 10)}, "cameras.elevation"),
    ({"elevation": (-100, 10)}, "cameras.elevation"),
    ({"elevation": (0, 95)}, "cameras.elevation"),
    ({"azimuth": (10, -10)}, "cameras.azimuth"),
    ({"distance": (0, 1)}, "cameras.distance"),
    ({"distance": (2, 1)}, "cameras.distance"),
    ({"fov": (0, 50)}, "cameras.fov"),
    ({"fov": (40, 180)}, "cameras.fov"),
    ({"fov": "wide"}, "cameras.fov"),
])
def test_impossible_ranges_are_one_line(kw, field):
    with pytest.raises(ConfigError) as e:
        CameraRanges.from_config(kw)
    assert e.value.field == field and "\n" not in str(e.value)


def test_unknown_camera_key():
    with pytest.raises(ConfigError, match="cameras.elevations"):
        CameraRanges.from_config({"elevations": [0, 1]})
    assert CameraRanges.from_config({"distance": 2.0}).distance == (2.0, 2.0)
