"""Gaussian noise (GN), the random baseline of VAFA (Hanif et al., MICCAI 2023; ref. code ``attacks/gn.py``)."""
from __future__ import annotations

import torch

from .base import Attack, AttackContext
from .options import COMMON_DEFAULTS, broadcast_param


class GaussianNoise(Attack):
    """``x_adv = clip(x + N(0, std^2), lower, upper)``; the model is not queried.

    Options (units of the tensor received):
        std: 4/255 (ref. value on [0, 1] images; float, C per-channel values or a tensor
            broadcastable to images); seed; lower / upper (None: unbounded).
        loss, amp_loss_scale: accepted for a uniform interface, unused.
    Shapes: images ``(B, C, *S)`` -> ``(B, C, *S)``; ``labels`` are only shape-checked.
    """

    name = "gn"
    gradient_free = True
    summary = "Gaussian noise, the VAFA paper's baseline"
    defaults = {**COMMON_DEFAULTS, "std": 4 / 255}

    def perturb(self, ctx: AttackContext):
        std = broadcast_param("std", self.options["std"], ctx.x0)
        if bool((std < 0).any()):
            raise ValueError("std must be >= 0")
        n = torch.randn(ctx.x0.shape, generator=ctx.generator, device=ctx.x0.device, dtype=ctx.x0.dtype)
        return self.clamp_box(ctx, ctx.x0 + std * n)
