"""f-distill's density-ratio estimator checked against the exact ratio (docs/objectives/fdistill.md).

A fixed Gaussian student ``q = N(mu, s^2 I)`` and a GMM teacher ``p`` both have closed-form noisy
densities under any Gaussian forward process (``p_t = sum_k pi_k N(a mu_k, (a^2 s_k^2 + s_t^2) I)``,
``q_t = N(a mu, (a^2 s^2 + s_t^2) I)``), so ``log r_t = log p_t - log q_t`` is known exactly. The
estimator is trained exactly as in a distillation run — the objective's own ``auxiliary_losses`` (fake
score + discriminator loss on student vs teacher samples, times from its ratio sampler) stepped by Adam
on a fake network and the engine's discriminator head — and its logit is compared with the exact log
ratio on held-out noisy **student** samples at field times, which is where f-distill reads ``r̂``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scoredistill.engine.build import build_discriminator
from scoredistill.engine.optim import build_optimizer
from scoredistill.models.mlp import MLPDenoiser
from scoredistill.objectives import Batch, Roles, build_objective
from scoredistill.objectives.common import head_logits, noise_like
from scoredistill.process import EDM
from scoredistill.teachers.gmm import PRESETS, GMMTeacher


@dataclass
class RatioCheck:
    """How well the trained logit ``l`` tracks the exact ``log r_t`` on held-out student samples."""

    spearman: float      # rank correlation of l and log r over all held-out points
    spearman_low: float  # the same on the lower half of the field's noise levels (where r is informative)
    mae: float           # mean |clamp(l) - clamp(log r)| with the objective's logit clamp
    exact_std: float     # spread of the exact log r (a near-constant exact ratio makes ranks meaningless)
    bayes_acc: float     # accuracy of the exact ratio as classifier, at the discriminator's times
    disc_acc: float      # the discriminator's training accuracy over the last updates


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (no ties expected for continuous values)."""
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def gaussian_student(mean, std: float, process) -> GMMTeacher:
    """``N(mean, std^2 I)`` as a one-component mixture (its ``log_prob`` is the exact noisy density)."""
    return GMMTeacher([list(mean)], std, process=process)


def fit_ratio(teacher: GMMTeacher, student: GMMTeacher, objective: dict | None = None, *, steps: int = 300,
              batch: int = 256, width: int = 64, depth: int = 2, lr: float = 1e-3, disc_lr: float | None = None,
              seed: int = 0, n_eval: int = 4000):
    """Train fake score + discriminator on ``student`` vs ``teacher`` samples with f-distill's
    ``auxiliary_losses``; return ``(RatioCheck, objective, roles)``.

    ``objective``: extra ``objective.*`` keys (the estimator's settings). Fake and head are trained
    together (one Adam each, betas (0, 0.99) like the toy recipe), as the engine does on a fake step."""
    torch.manual_seed(seed)
    proc = teacher.process
    obj = build_objective({"name": "fdistill", **(objective or {})})
    fake = MLPDenoiser(proc, teacher.dim, width, depth, sigma_data=student.data_std())
    head = build_discriminator(fake, **obj.discriminator_arch())
    roles = Roles(teacher=teacher, fake=fake, discriminator=head)
    opt_f = build_optimizer("adam", fake.parameters(), lr, (0.0, 0.99))
    opt_d = build_optimizer("adam", head.parameters(), disc_lr or lr, (0.0, 0.99))
    g = torch.Generator().manual_seed(seed)
    accs = []
    for _ in range(steps):
        b = Batch(x=student.sample(batch, generator=g), real=teacher.sample(batch, generator=g), rng=g)
        out = obj.auxiliary_losses(b, roles)
        opt_f.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt_f.step()
        opt_d.step()
        accs.append(float(out["disc_acc"]))
    check = evaluate_ratio(teacher, student, obj, roles, n_eval=n_eval, seed=seed + 101)
    check.disc_acc = sum(accs[-50:]) / len(accs[-50:])
    return check, obj, roles


@torch.no_grad()
def evaluate_ratio(teacher, student, obj, roles: Roles, n_eval: int = 4000, seed: int = 1) -> RatioCheck:
    """Compare the head's logit with the exact log ratio at noisy student samples, field times."""
    g = torch.Generator().manual_seed(seed)
    proc = teacher.process
    x = student.sample(n_eval, generator=g)
    t = obj.time(n_eval, proc, generator=g)
    x_t = proc.add_noise(x, noise_like(x, g), t)
    exact = teacher.log_prob(x_t, t) - student.log_prob(x_t, t)
    est = head_logits(roles.fake, roles.discriminator, x_t, t, None).double()
    rng = obj._ratio_range()
    if rng is not None:  # what the weights use: log r = 0 outside the discriminator's range
        est = torch.where((t >= rng[0]) & (t <= rng[1]), est, torch.zeros_like(est))
    c = obj.p.logit_clamp
    low = t <= t.median()
    # the best achievable accuracy: 1/2 P_q(log r < 0) + 1/2 P_p(log r > 0) at the discriminator's times
    b = Batch(x=x, rng=g)
    td = obj._disc_t(b, n_eval, None, proc)
    xq = proc.add_noise(x, noise_like(x, g), td)
    y = teacher.sample(n_eval, generator=g)
    yp = proc.add_noise(y, noise_like(y, g), td)
    bayes = 0.5 * float((teacher.log_prob(xq, td) < student.log_prob(xq, td)).double().mean()
                        + (teacher.log_prob(yp, td) > student.log_prob(yp, td)).double().mean())
    return RatioCheck(spearman=spearman(est, exact), spearman_low=spearman(est[low], exact[low]),
                      mae=float((est.clamp(-c, c) - exact.clamp(-c, c)).abs().mean()),
                      exact_std=float(exact.std()), bayes_acc=bayes, disc_acc=float("nan"))


def pair_case(process=None):
    """The ``pair`` teacher and a Gaussian student sitting on its heavy mode, missing the light one."""
    process = process or EDM()
    teacher = GMMTeacher(**PRESETS["pair"](), process=process)
    return teacher, gaussian_student([-1.2, 0.0], 0.5, process)


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--disc-lr", type=float, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="objective key")
    a = ap.parse_args()
    import yaml

    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    teacher, student = pair_case()
    for s in (int(v) for v in a.seeds.split(",")):
        c, _, _ = fit_ratio(teacher, student, extra, steps=a.steps, batch=a.batch, width=a.width, depth=a.depth,
                            lr=a.lr, disc_lr=a.disc_lr, seed=s)
        print(f"seed {s}: {c}")


if __name__ == "__main__":
    main()
