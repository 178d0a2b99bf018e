"""One rollout for every K-step student over a one-step x0-predictor ``f(x_t, t, cond) -> x0``.

A K-step student evaluates its network at canonical times ``t_0 > t_1 > ... > t_{K-1}`` (docs/fewstep.md):

* step ``j`` maps its input ``x_j`` to ``x0_j = f(x_j, t_j, cond)``;
* the first input is ``x_0 = s(t_0) z`` (``noise_input: scaled``, the library's one-step
  :class:`~scoredistill.models.generators.DenoiserGenerator`) or ``x_0 = z`` (``pure``, what diffusers
  pipelines feed at their largest timestep);
* between steps the prediction is re-noised to the next time, ``x_{j+1} = a(t_{j+1}) x0_j + s(t_{j+1}) e_j``,
  where the noise ``e_j`` is chosen by the re-noising mode:

  - ``fresh``: new Gaussian noise at every step (DMD2's ``sample_backward``, arXiv 2405.14867 §4.5);
  - ``fixed``: the student's input noise ``z`` again at every step (SiD^2's ``noise_type: fixed``,
    arXiv 2505.12674);
  - ``ddim``: the student's own noise estimate ``e_j = (x_j - a(t_j) x0_j) / s(t_j)``, a deterministic
    DDIM step (TDM, arXiv 2503.06674 §3; DDIM arXiv 2010.02502).

The output of the student is ``x0_{K-1}``. Training uses *backward simulation* (DMD2 §4.5; SiD^2's uniform
step mixture): per iteration one step ``k`` is drawn, steps ``0..k-1`` run without gradient and step ``k``
with gradient, and the objective sees ``x0_k``. So the distribution trained to match the data is the
mixture of all step outputs, and the rollout costs ``k`` gradient-free evaluations plus one.

Default times: ``t_j = t_0 (K - j) / K``: the tops of the K equal sub-intervals of ``(0, t_0]``, with
``t_0`` the student's first time (the process's ``t_max`` unless the student starts lower). On a
1000-step DDPM (``t_max = 0.999``) this is DDPM index ``999, 749.25, 499.5, 249.75``, within one index of
DMD2's ``[999, 749, 499, 249]`` (``range(999, 0, -250)``, i.e. ``t_j = t_0 - j/K``); pass
``timesteps: [0.999, 0.749, 0.499, 0.249]`` for DMD2's grid exactly.

Randomness is explicit: the step choice comes from a counter-based seed (:func:`rollout_seed`) that the
training loop derives from ``(seed, iteration)``, so every rank and micro-batch draws the same ``k`` and a
resume needs no state; the re-noising noise comes from the ``torch.Generator`` the caller passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import expand_t
from scoredistill.process.processes import Process

RENOISE_MODES = ("fresh", "fixed", "ddim")
NOISE_INPUTS = ("scaled", "pure")
_SEED_MASK = 2**62 - 1


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# -- time grids ------------------------------------------------------------------------------------------
def default_times(process: Process, steps: int, t_first: float | None = None, field: str = "generator.steps"
                  ) -> list[float]:
    """``K`` canonical times ``t_j = t_first (K - j) / K``, ``j = 0..K-1`` (``t_first`` defaults to the
    process's ``t_max``); raises :class:`ConfigError` naming ``field`` for a bad ``K``."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(field, f"must be an integer >= 1 (the student's number of steps), got {steps!r}")
    t0 = process.t_max if t_first is None else float(t_first)
    times = [t0 * ((steps - j) / steps) for j in range(steps)]  # (K - 0)/K == 1.0: t_0 exact
    if times[-1] < process.t_min:
        raise ConfigError(field, f"{steps} steps from t = {t0:g} put the last step at t = {times[-1]:g}, below the "
                          f"process's t_min = {process.t_min:g}; use fewer steps")
    return times


def check_times(process: Process, timesteps, field: str = "generator.timesteps",
                t_range: tuple[float, float] | None = None) -> list[float]:
    """Validate explicit canonical step times: a non-empty list of numbers, strictly decreasing, inside
    ``t_range`` (default the process's ``[t_min, t_max]``); returns them as floats."""
    ts = [timesteps] if _is_number(timesteps) else timesteps
    if not isinstance(ts, (list, tuple)) or not ts or not all(_is_number(v) for v in ts):
        raise ConfigError(field, f"must be a non-empty list of canonical times in [0, 1], got {timesteps!r}")
    ts = [float(v) for v in ts]
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ConfigError(field, f"must be strictly decreasing, got {ts}")
    lo, hi = t_range if t_range is not None else (process.t_min, process.t_max)
    bad = [v for v in ts if not lo <= v <= hi]
    if bad:
        raise ConfigError(field, f"canonical times must lie in the process's range [{lo:g}, {hi:g}], got {bad} "
                          f"(a 1000-step DDPM index n is t = n/1000)")
    return ts


def step_times(process: Process, steps: int | None = None, timesteps=None, t_first: float | None = None,
               t_range: tuple[float, float] | None = None, field: str = "generator") -> list[float]:
    """The student's step times from config values: explicit ``timesteps`` (then ``steps``, if given, must
    equal their number), else ``steps`` (default 1) evenly spaced by :func:`default_times`."""
    if timesteps is not None:
        ts = check_times(process, timesteps, f"{field}.timesteps", t_range)
        if steps is not None and steps != len(ts):
            raise ConfigError(f"{field}.steps", f"is {steps!r} but {field}.timesteps lists {len(ts)} times; "
                              "give one of them, or make them agree")
        return ts
    return default_times(process, 1 if steps is None else steps, t_first, f"{field}.steps")


def strided_subset(num_steps: int, steps: int, field: str = "--steps") -> list[int]:
    """Indices of the steps a ``steps``-step sample runs with a ``num_steps``-step student: the evenly strided
    ``floor(i K / K')``, ``i = 0..K'-1``, so it always starts at the first (noisiest) step, ``K' = K`` is
    every step and ``K' = 1`` the one-step student (K = 4: K' = 2 runs steps 0 and 2)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= num_steps:
        raise ConfigError(field, f"must be an integer in [1, {num_steps}] (the student's number of steps), "
                          f"got {steps!r}")
    return [i * num_steps // steps for i in range(steps)]


# -- step choice -----------------------------------------------------------------------------------------
def rollout_seed(seed: int, iteration: int) -> int:
    """The per-iteration seed of the step choice, exactly what the training loop passes to
    ``set_rollout_seed`` (engine/distiller.py: ``hash((seed, step, -1))``, the phase slot ``-1`` keeping it
    apart from the micro-batch seeds ``(seed, step, phase, i)``)."""
    return hash((int(seed), int(iteration), -1)) & _SEED_MASK


def sample_noise_seed(seed: int) -> int:
    """The seed of the re-noising generator of ``scoredistill sample --seed S`` (its input noise ``z`` comes from
    ``torch.Generator().manual_seed(S)``); an exported pipeline called with ``latents=z`` and
    ``generator=torch.Generator().manual_seed(sample_noise_seed(S))`` draws the same re-noising noise."""
    return hash((int(seed), 7)) & _SEED_MASK


def check_weights(weights, num_steps: int, field: str = "generator.step_weights") -> list[float] | None:
    """``None`` (uniform) or ``num_steps`` non-negative finite numbers with a positive sum, normalised."""
    if weights is None:
        return None
    if (not isinstance(weights, (list, tuple)) or len(weights) != num_steps
            or not all(_is_number(w) and w >= 0 for w in weights) or sum(weights) <= 0):
        raise ConfigError(field, f"must be {num_steps} non-negative numbers with a positive sum (one per step), "
                          f"got {weights!r}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def draw_step(seed: int, num_steps: int, weights: list[float] | None = None) -> int:
    """The step ``k`` trained this iteration, a function of ``seed`` alone: ``U{0..K-1}`` (DMD2, SiD^2), or
    ``P(k) = weights[k]`` by inverse CDF of one uniform draw."""
    if num_steps == 1:
        return 0
    g = torch.Generator().manual_seed(int(seed) & _SEED_MASK)
    if weights is None:
        return int(torch.randint(0, num_steps, (), generator=g))
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    cdf = 0.0
    for k, w in enumerate(weights):
        cdf += w
        if u < cdf:
            return k
    return max(k for k, w in enumerate(weights) if w > 0)  # u within rounding of 1


# -- the rollout -----------------------------------------------------------------------------------------
@dataclass
class StepOutput:
    """One student step: ``x0 = f(x_t, t, cond)`` at step ``step`` of the rollout; ``t_next`` is the time of
    the following step (``0`` after the last), so ``(t_next, t]`` is the noise interval the step covers
    (TDM's per-step interval, arXiv 2503.06674). Times are ``(B,)`` float64."""

    x0: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    t_next: torch.Tensor
    step: int

    def eps(self, process: Process) -> torch.Tensor:
        """The student's own noise estimate ``(x_t - a_t x0) / s_t`` (differentiable through ``x0``)."""
        return process.from_x0(self.x_t, self.x0, self.t, "eps")


def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``N(0, I)`` shaped like ``like``, drawn on the generator's device (CPU generators give the same noise
    whatever device the student runs on) then moved."""
    if generator is None:
        raise ValueError("the 'fresh' rollout draws noise between steps: pass a torch.Generator")
    n = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
    return n.to(like.device)


class Rollout:
    """The K-step schedule of a student: step times, first input and re-noising mode (module docstring).

    ``f`` is any callable ``f(x_t, t, cond) -> x0`` in canonical time (a
    :class:`~scoredistill.models.denoiser.Denoiser`, a diffusers student's denoiser)."""

    def __init__(self, process: Process, times: list[float], mode: str = "fresh", noise_input: str = "scaled",
                 step_weights: list[float] | None = None, t_range: tuple[float, float] | None = None,
                 field: str = "generator"):
        if mode not in RENOISE_MODES:
            raise ConfigError(f"{field}.rollout", f"unknown value {mode!r}; accepted: {', '.join(RENOISE_MODES)}")
        if noise_input not in NOISE_INPUTS:
            raise ConfigError(f"{field}.noise_input",
                              f"unknown value {noise_input!r}; accepted: {', '.join(NOISE_INPUTS)}")
        self.process = process
        self.times = check_times(process, times, f"{field}.timesteps", t_range)
        self.t_range = tuple(t_range) if t_range is not None else None
        self.mode = mode
        self.noise_input = noise_input
        self.step_weights = check_weights(step_weights, len(self.times), f"{field}.step_weights")

    @property
    def num_steps(self) -> int:
        return len(self.times)

    def describe(self) -> dict:
        d = {"times": list(self.times), "mode": self.mode, "noise_input": self.noise_input,
             "step_weights": self.step_weights}
        if self.t_range is not None:
            d["t_range"] = list(self.t_range)
        return d

    @classmethod
    def from_description(cls, d: dict, process: Process) -> Rollout:
        return cls(process, d["times"], d.get("mode", "fresh"), d.get("noise_input", "scaled"),
                   d.get("step_weights"), tuple(d["t_range"]) if d.get("t_range") is not None else None)

    def choose_step(self, seed: int) -> int:
        return draw_step(seed, self.num_steps, self.step_weights)

    # -- pieces --------------------------------------------------------------------------------------------
    def _t(self, j: int, like: torch.Tensor) -> torch.Tensor:
        return expand_t(self.times[j], like.shape[0], like.device)

    def first_input(self, z: torch.Tensor) -> torch.Tensor:
        """``x_0``: ``s(t_0) z`` (computed exactly as the one-step ``DenoiserGenerator`` does) or ``z``."""
        if self.noise_input == "pure":
            return z
        t = self._t(0, z)
        return self.process.sigma(t).view((-1,) + (1,) * (z.dim() - 1)).to(z.dtype) * z

    def renoise(self, x0: torch.Tensor, x_t: torch.Tensor, j: int, j_next: int, z: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        """The input of step ``j_next`` from step ``j``'s input ``x_t`` and prediction ``x0`` (float64 inside)."""
        t_next = self._t(j_next, x0)
        if self.mode == "fresh":
            e = _noise(x0, generator)
        elif self.mode == "fixed":
            e = z
        else:
            e = self.process.from_x0(x_t, x0, self._t(j, x_t), "eps")
        return self.process.add_noise(x0, e, t_next)

    # -- sampling and training ---------------------------------------------------------------------------
    def run(self, f, z: torch.Tensor, cond=None, steps: list[int] | None = None,
            generator: torch.Generator | None = None, grad_step: int | None = None) -> list[StepOutput]:
        """Every step of the rollout through the step indices ``steps`` (default all, in order), as
        :class:`StepOutput`s. ``grad_step`` = ``k``: steps before ``k`` run without gradient, the rollout stops
        after ``k`` (backward simulation); ``None`` runs every step under the caller's grad mode."""
        idx = list(range(self.num_steps)) if steps is None else list(steps)
        stop = len(idx) if grad_step is None else idx.index(grad_step) + 1
        outs: list[StepOutput] = []
        x = self.first_input(z)
        for n, j in enumerate(idx[:stop]):
            last = n == stop - 1
            nxt = idx[n + 1] if n + 1 < len(idx) else None
            with torch.set_grad_enabled(torch.is_grad_enabled() and (grad_step is None or last)):
                t = self._t(j, x)
                x0 = f(x, t, cond)
                t_next = self._t(nxt, x) if nxt is not None else expand_t(0.0, x.shape[0], x.device)
                outs.append(StepOutput(x0, x, t, t_next, j))
                if not last:
                    x = self.renoise(x0, x, j, nxt, z, generator)
        return outs

    def sample(self, f, z: torch.Tensor, cond=None, steps: int | None = None,
               generator: torch.Generator | None = None, field: str = "--steps") -> torch.Tensor:
        """The student's sample: all K steps, or ``steps = K'`` of them (:func:`strided_subset`)."""
        idx = None if steps is None else strided_subset(self.num_steps, steps, field)
        return self.run(f, z, cond, idx, generator)[-1].x0

    def train_step(self, f, z: torch.Tensor, cond, k: int, generator: torch.Generator | None = None) -> StepOutput:
        """Backward simulation: steps ``0..k-1`` without gradient, step ``k`` with gradient; its
        :class:`StepOutput` (``x0`` is what the objective trains on; ``x_t``, ``t``, ``t_next`` for methods
        that score within the step's interval)."""
        if not 0 <= k < self.num_steps:
            raise ValueError(f"rollout step must be in [0, {self.num_steps - 1}], got {k}")
        return self.run(f, z, cond, None, generator, grad_step=k)[-1]


# -- the student protocol --------------------------------------------------------------------------------
class RolloutStudent:
    """Mixin of every K-step student module over a :class:`Rollout` (``self.rollout``) and a step network
    (``self.denoiser``): the native ``FewStepGenerator`` (models/fewstep.py) and the diffusers student
    (adapters/student.py). It owns the step choice and the re-noising noise source, so the engine drives both
    alike: ``set_rollout_seed`` every iteration, ``train_output`` for objectives that read the trained step,
    ``forward`` (training: backward simulation; eval: all K steps) and ``sample(steps=K')``.

    Subclasses say what happens without the engine's inputs: :meth:`_unseeded_step` (no per-iteration seed in
    training) and :meth:`_default_noise` (a ``fresh`` rollout called without a noise generator)."""

    takes_noise_generator = True  # forward(z, cond, generator=...): the engine passes its rollout noise source
    _rollout_seed: int | None = None
    _rollout_step: int | None = None

    @property
    def num_steps(self) -> int:
        """Network evaluations per sample (engine/report.py's ``student_steps`` reads it)."""
        return self.rollout.num_steps

    def set_rollout_seed(self, seed: int) -> None:
        """The training loop calls this once per iteration with a seed derived from ``(seed, iteration)``
        (:func:`rollout_seed`): every rank and micro-batch then trains the same step, and a resume redraws it
        with no saved state. Clears a step fixed by :meth:`set_rollout_step`."""
        self._rollout_seed = int(seed)
        self._rollout_step = None

    def set_rollout_step(self, k: int | None) -> None:
        """Train step ``k`` on every following call (``None``: back to the seeded draw)."""
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < self.num_steps):
            raise ValueError(f"rollout step must be an integer in [0, {self.num_steps - 1}], got {k!r}")
        self._rollout_step = k

    def current_step(self) -> int:
        """The step a training-mode call trains now."""
        if self._rollout_step is not None:
            return self._rollout_step
        if self.num_steps == 1:
            return 0
        if self._rollout_seed is None:
            return self._unseeded_step()
        return self.rollout.choose_step(self._rollout_seed)

    def _unseeded_step(self) -> int:
        raise RuntimeError(f"a {self.num_steps}-step student in training mode trains one step per iteration: "
                           "call set_rollout_seed(seed) (the training loop does, every iteration) or "
                           "set_rollout_step(k) first")

    def _default_noise(self, z: torch.Tensor, k: int | None) -> torch.Generator | None:
        """The re-noising source of a ``fresh`` call without one: in training a generator seeded by this
        iteration's rollout seed (the same on every rank, micro-batch and resume: every micro-batch then shares
        one noise draw), in eval mode seed 0 (a reproducible sample for a given ``z``). ``k``: the trained step
        (None in eval mode)."""
        seed = hash((self._rollout_seed or 0, 1)) & _SEED_MASK if self.training else 0
        return torch.Generator().manual_seed(seed)

    def _noise_generator(self, generator: torch.Generator | None, z: torch.Tensor,
                         k: int | None = None) -> torch.Generator | None:
        if generator is not None or self.rollout.mode != "fresh":
            return generator
        return self._default_noise(z, k)

    def train_output(self, z, cond=None, generator: torch.Generator | None = None) -> StepOutput:
        """Backward simulation of :meth:`current_step`; its :class:`StepOutput` (``x0`` with gradient, and the
        step's input ``x_t``, time ``t`` and next time ``t_next`` for methods that need them)."""
        k = self.current_step()
        return self.rollout.train_step(self.denoiser, z, cond, k, self._noise_generator(generator, z, k))

    def sample(self, z, cond=None, steps: int | None = None, generator: torch.Generator | None = None):
        """All ``K`` steps, or ``steps = K'`` of them (evenly strided from the first, ``--steps``)."""
        return self.rollout.sample(self.denoiser, z, cond, steps, self._noise_generator(generator, z))

    def forward(self, z, cond=None, generator: torch.Generator | None = None):
        if self.training:
            return self.train_output(z, cond, generator).x0
        return self.sample(z, cond, generator=generator)
