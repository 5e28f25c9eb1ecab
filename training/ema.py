"""Exponential moving average of a model's weights (the reference recipe's EMA, decay 0.999).

The shadow is a full-precision copy of the *unwrapped* module, so it is the same under DDP
(replicas are identical) and under DeepSpeed ZeRO-2 (parameters are not partitioned; only
gradients and optimizer states are). Every rank keeps it, so any rank can sample.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step."""

    def __init__(self, shadow: nn.Module, model: nn.Module, decay: float, warmup: bool = True) -> None:
        """
        Args:
            shadow: a freshly built module of the same architecture; it becomes the EMA copy.
                (Not a deepcopy of ``model``: Accelerate may have patched ``model.forward``.)
            model: the unwrapped training module whose parameters are tracked.
            decay: EMA decay in [0, 1).
            warmup: ramp the decay up over the first steps (see ``decay_at``).
        """
        self.decay = decay
        self.warmup = warmup
        shadow.load_state_dict(model.state_dict())
        device = next(model.parameters()).device
        self.model = shadow.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self._src: list[torch.Tensor] = []
        self._dst: list[torch.Tensor] = []
        self.bind(model)

    def bind(self, model: nn.Module) -> None:
        """Track ``model``'s parameters (call again if the module was replaced by a wrapper's)."""
        src = dict(model.named_parameters())
        self._dst, self._src = [], []
        for name, p in self.model.named_parameters():
            self._dst.append(p)
            self._src.append(src[name])

    def decay_at(self, step: int) -> float:
        """Decay used after optimizer step ``step`` (1-based).

        With ``warmup`` the decay ramps as (1 + step) / (10 + step) up to ``decay`` (the
        num_updates rule of TensorFlow's ExponentialMovingAverage): without it a short run's EMA
        is still mostly the zero-initialised net (0.999^2000 = 14% of it after 2,000 steps), and
        its shrunken noise predictions make the sampler's states grow step after step.
        """
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        src = [p.detach().float() for p in self._src]
        torch._foreach_lerp_(self._dst, src, 1.0 - self.decay_at(step))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{k}": v for k, v in self.model.state_dict().items()}

    def load_state_dict(self, extra: dict[str, torch.Tensor]) -> None:
        sd = {k[4:]: v for k, v in extra.items() if k.startswith("ema.")}
        if not sd:
            raise KeyError("the checkpoint holds no EMA weights")
        self.model.load_state_dict(sd)
