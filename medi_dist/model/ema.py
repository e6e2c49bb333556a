"""Exponential moving average of the model's parameters (float32 shadow copy)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .unet import unwrap


class EMA:
    """shadow <- d * shadow + (1 - d) * param after each optimizer step.

    With warmup=True the effective decay is min(decay, (1 + n) / (10 + n)) for update n, so early
    averages are not dominated by the random initialisation (short runs still get a useful EMA).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.step = 0
        self.shadow = {k: p.detach().float().clone() for k, p in self._params(model)}

    @staticmethod
    def _params(model: nn.Module):
        return ((k, p) for k, p in unwrap(model).named_parameters() if p.requires_grad)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.step) / (10 + self.step))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        w = 1.0 - self.current_decay()
        shadows, params = [], []
        for k, p in self._params(model):
            if self.shadow[k].device != p.device:  # model moved after the EMA was created
                self.shadow[k] = self.shadow[k].to(p.device)
            shadows.append(self.shadow[k])
            params.append(p.detach().float())
        torch._foreach_lerp_(shadows, params, w)  # one fused launch per group, not one per tensor
        self.step += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averages (e.g. before sampling)."""
        for k, p in self._params(model):
            p.copy_(self.shadow[k].to(device=p.device, dtype=p.dtype))

    def averaged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full state dict with EMA values substituted: a complete, loadable weights file."""
        sd = unwrap(model).state_dict()
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in sd.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "step": self.step, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        if missing:
            raise KeyError(f"EMA state lacks parameters: {missing[:10]}")
        self.decay, self.warmup, self.step = float(state["decay"]), bool(state["warmup"]), int(state["step"])
        for k, s in self.shadow.items():
            self.shadow[k] = state["shadow"][k].to(device=s.device, dtype=torch.float32).clone()
