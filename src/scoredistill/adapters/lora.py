"""peft LoRA on diffusers networks: the fake score as "teacher + LoRA" in one module, LoRA students.

``attach_lora`` adds a peft adapter with diffusers' ``add_adapter`` (``lora_B`` starts at zero, so
the adapted network starts equal to the base). ``set_lora_enabled`` switches the adapter on or off
for the next forward *without* touching ``requires_grad`` (peft's own ``enable_adapters`` re-enables
gradients on the adapter weights, which would defeat the engine's freezing of auxiliary roles).

:class:`LoRACritic` is the fake-score role of SwiftBrush / ProlificDreamer / DMD2-LoRA: it shares
every base weight with the frozen teacher (adapters off = teacher, on = fake), and registers only
the LoRA parameters, so its ``parameters()``, optimizer state, ``requires_grad_`` toggles and
checkpoint entries cover the adapter alone.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from scoredistill.errors import ConfigError
from scoredistill.models.denoiser import Denoiser

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # attention projections (SwiftBrush, ProlificDreamer)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn the LoRA adapters of ``model`` on or off for the next forward (no-op without adapters)."""
    layers = model.__dict__.get("_sd_lora_layers")
    if not layers:
        return
    for m in layers:
        m._disable_adapters = not enabled


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the one the next forward of ``model`` uses. peft's ``set_adapter`` would also set
    ``requires_grad`` (on for ``name``, off for the others), undoing the engine's freezing of the role."""
    for m in model.__dict__.get("_sd_lora_layers") or ():
        m._active_adapter = [name]


def attach_lora(model: nn.Module, rank: int, alpha: float | None = None, targets=None, section: str = "fake_score",
                adapter_names=("default",)) -> list[tuple[str, nn.Parameter]]:
    """Add LoRA adapters (one per name, all alike; several: a student's experts, one per phase, switched with
    :func:`set_active_adapter`) to a diffusers model; returns their ``(name, parameter)`` list (trainable)."""
    from peft import LoraConfig

    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"{section}.lora_rank", f"must be an integer >= 1, got {rank!r}")
    if not hasattr(model, "add_adapter"):  # diffusers' PeftAdapterMixin (not on e.g. UNet2DModel)
        accepted = "teacher (a full copy)" if section == "generator" else "teacher (= full), full, mlp"
        raise ConfigError(f"{section}.kind", f"lora is not supported for {type(model).__name__} (diffusers gives it "
                          f"no peft adapter support); accepted: {accepted}")
    if model.__dict__.get("_sd_lora_layers"):
        raise ConfigError(f"{section}.kind", "this network already carries a LoRA adapter")
    targets = list(targets) if targets else list(DEFAULT_TARGETS)
    cfg = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), target_modules=targets,
                     init_lora_weights=True)
    try:
        with warnings.catch_warnings():  # peft warns that a second adapter makes several: that is the intent
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for name in adapter_names:
                model.add_adapter(cfg, adapter_name=name)
    except ValueError as e:
        raise ConfigError(f"{section}.lora_targets", f"{str(e).splitlines()[0]} (targets {targets})") from None
    model.__dict__["_sd_lora_layers"] = lora_layers(model)
    params = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    for _, p in params:
        p.requires_grad_(True)
    set_lora_enabled(model, False)
    return params


def _key(name: str) -> str:
    return name.replace(".", "__")


class LoRAHolder(nn.Module):
    """Mixin: hold a base network without registering it, register only its LoRA parameters."""

    shares_teacher_module = False  # True where the held base is the teacher's own module (LoRA critic)

    def _hold(self, base: nn.Module, params: list[tuple[str, nn.Parameter]]):
        self.__dict__["_lora_base"] = base
        self.lora = nn.ParameterDict({_key(n): p for n, p in params})
        self.lora_names = [n for n, _ in params]

    def _apply(self, fn, recurse=True):  # .to(device) moves the held base too
        base = self.__dict__.get("_lora_base")
        if base is not None:
            base._apply(fn)
        return super()._apply(fn, recurse)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """peft-named LoRA weights (``...lora_A.default.weight``)."""
        return {n: self.lora[_key(n)].detach() for n in self.lora_names}


class LoRACritic(LoRAHolder, Denoiser):
    """Fake score = the frozen teacher's network with its LoRA adapter enabled (shared base weights)."""

    shares_teacher_module = True

    def __init__(self, teacher: Denoiser, rank: int, alpha: float | None = None, targets=None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        params = attach_lora(teacher.model, rank, alpha, targets, "fake_score")
        self._hold(teacher, params)
        self.lora_config = {"rank": rank, "alpha": alpha if alpha is not None else rank,
                            "targets": list(targets) if targets else list(DEFAULT_TARGETS)}
        self.process = teacher.process
        self.data_shape = teacher.data_shape
        self.num_classes = teacher.num_classes
        self.sigma_data = teacher.sigma_data
        if gradient_checkpointing:
            enable_checkpointing(teacher.model, "fake_score")

    @property
    def base(self):
        return self.__dict__["_lora_base"]

    def denoise(self, x_t, t, cond=None):
        return self.base.denoise(x_t, t, cond, lora=True)

    def model_output(self, x_t, t, cond=None):
        return self.base.model_output(x_t, t, cond, lora=True)

    def features(self, x_t, t, cond=None):
        return self.base.features(x_t, t, cond, lora=True)


def enable_checkpointing(model: nn.Module, section: str) -> None:
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise ConfigError(f"{section}.gradient_checkpointing", f"{type(model).__name__} does not support it")
    model.enable_gradient_checkpointing()


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights with the (enabled) LoRA deltas merged in, under the base model's key names."""
    import copy

    m = copy.deepcopy(model)
    for layer in m.__dict__.get("_sd_lora_layers") or lora_layers(m):
        layer._disable_adapters = False
        layer.merge()
    out = {}
    for k, v in m.state_dict().items():
        if "lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v
    return out
