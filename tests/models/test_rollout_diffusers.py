"""The diffusers student's K-step rollout (adapters/student.py ``DiffusersGenerator``) is this library's one
rollout (models/rollout.py) with ``noise_input: pure``, in every re-noising mode and step distribution: given
the same noise generator and the same per-iteration seed, the student and a hand-built ``Rollout`` over its
denoiser give the same tensors in training (backward simulation, ``train_output``) and sampling
(docs/fewstep.md)."""

import pytest
import torch

pytest.importorskip("diffusers")

from scoredistill.adapters.diffusers_teacher import build_diffusers_teacher  # noqa: E402
from scoredistill.adapters.student import build_diffusers_generator  # noqa: E402
from scoredistill.adapters.tiny import save_tiny  # noqa: E402
from scoredistill.models.rollout import Rollout, rollout_seed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind, timesteps, mode, weights", [
    ("ddpm", [999, 749, 499, 249], "fresh", None), ("sd3", [1000, 750, 500], "fresh", None),
    ("ddpm", [999, 749, 499, 249], "ddim", [1, 0, 2, 1]), ("ddpm", [999, 749, 499], "fixed", None)])
def test_diffusers_student_is_the_shared_rollout(tmp_path, kind, timesteps, mode, weights):
    cfg = {"kind": "diffusers", "path": save_tiny(kind, str(tmp_path / kind))}
    if kind != "ddpm":
        cfg["prompts"] = ["a red cube", "a blue ball"]
    teacher = build_diffusers_teacher(cfg)
    gen = build_diffusers_generator({"kind": "teacher", "timesteps": timesteps, "rollout": mode,
                                     "step_weights": weights}, teacher)
    # a flow student starts at sigma = 1, i.e. t = 1, above RectifiedFlow's t_max: t_range widens the check
    rollout = Rollout(teacher.process, gen.t_steps, mode, "pure", weights, t_range=(0.0, 1.0))
    z = torch.randn(2, *teacher.data_shape)
    cond = torch.tensor([0, 1]) if kind != "ddpm" else None
    seen = set()
    with torch.no_grad():
        gen.train()
        for it in range(8):
            seed = rollout_seed(4, it)
            gen.set_rollout_seed(seed)
            ref = gen(z, cond, generator=torch.Generator().manual_seed(11))
            k = rollout.choose_step(seed)
            out = rollout.train_step(gen.denoiser, z, cond, k, torch.Generator().manual_seed(11))
            assert out.x0.equal(ref) and gen.current_step() == k
            so = gen.train_output(z, cond, generator=torch.Generator().manual_seed(11))
            assert so.step == k and so.x0.equal(ref) and so.x_t.equal(out.x_t) and so.t_next.equal(out.t_next)
            seen.add(k)
        gen.eval()
        ref = gen(z, cond, generator=torch.Generator().manual_seed(12))
        assert rollout.sample(gen.denoiser, z, cond, generator=torch.Generator().manual_seed(12)).equal(ref)
    assert len(seen) > 1  # several steps compared, not only the first
    if weights is not None:
        assert 1 not in seen  # step_weights: a zero-weight step is never trained
