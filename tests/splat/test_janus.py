"""The Janus measurement: a view-inconsistent exact-render teacher (``teacher.janus``) and the Janus rate
(share of side / back views closer to the front template than to the true view)."""

import pytest
import torch

from scoredistill.errors import ConfigError
from scoredistill.process.processes import EDM
from scoredistill.splat import turntable, view_labels
from scoredistill.splat.metrics import front_cameras, janus_rate, scene_janus
from scoredistill.splat.presets import preset_scene
from scoredistill.teachers.scene import build_scene_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 12


def test_janus_rate_counts_side_and_back_views_closer_to_the_front_template():
    true, front = torch.zeros(4, 3, 2, 2), torch.ones(4, 3, 2, 2)
    labels = ["front", "side", "back", "side"]
    imgs = torch.stack([front[0], front[1], true[2], 0.4 * front[3]])   # view 0 is a front view: ignored
    assert janus_rate(imgs, true, front, labels) == pytest.approx(1 / 3)
    assert janus_rate(true, true, front, labels) == 0.0 and janus_rate(front, true, front, labels) == 1.0
    with pytest.raises(ValueError, match="side or back"):
        janus_rate(imgs, true, front, ["front", "overhead", "front", "front"])


def test_true_scene_scores_zero_and_its_front_template_scores_one():
    cams = turntable(8, elevation=15.0)
    scene = preset_scene("snowman")
    assert scene_janus(scene, scene, cams, RES, RES, (0.5, 0.5, 0.5)) == 0.0
    front = front_cameras(cams)
    assert torch.equal(front.azimuth, torch.zeros(8)) and torch.equal(front.elevation, cams.elevation)


@pytest.mark.parametrize("labels", [False, True])
def test_janus_teacher_samples_show_the_front_face_at_rate_beta(labels):
    teacher = build_scene_teacher({"scenes": ["snowman"], "std": 0.03, "resolution": RES, "janus": 0.5,
                                   "janus_labels": labels}, EDM())
    cams = turntable(8, elevation=15.0)
    cond = cams.as_cond().repeat(4, 1)
    x, k = teacher.sample(cond, torch.Generator().manual_seed(0), return_components=True)
    lab = view_labels(cams) * 4
    told = torch.tensor([v in ("side", "back") for v in lab])
    true, front = teacher.renders(cond)[:, 0].float(), teacher.front_renders(cond)[:, 0].float()
    rate = janus_rate((x + 1) / 2, (true + 1) / 2, (front + 1) / 2, lab)
    # the metric tells the two components apart on exact samples (pixel noise 0.03)
    assert rate == pytest.approx(float((k[told] == 1).double().mean()))
    assert (rate == 0.0) if labels else (0.3 < rate < 0.7)
    # at high noise the exact denoiser returns the prior mean (1 - beta) R + beta F of each view
    t = torch.full((len(cond),), 0.999)
    d = teacher.denoise(torch.zeros_like(x), t, cond).double()
    beta = torch.where(told, 0.0, 0.5)[:, None, None, None] if labels else 0.5
    assert torch.allclose(d, (1 - beta) * true.double() + beta * front.double(), atol=1e-3)


def test_janus_keys_are_checked():
    for cfg, field in [({"janus": 1.0}, "teacher.janus"), ({"janus": True}, "teacher.janus"),
                       ({"janus": 0.5, "janus_labels": "yes"}, "teacher.janus_labels")]:
        with pytest.raises(ConfigError) as e:
            build_scene_teacher({"scenes": ["snowman"], "resolution": RES, **cfg}, EDM())
        assert e.value.field == field
