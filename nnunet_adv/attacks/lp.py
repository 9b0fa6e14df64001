"""Lp-ball geometry shared by the voxel attacks: budgets, projection, step direction, random start."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .base import Attack, AttackContext
from .options import COMMON_DEFAULTS, TARGET_DEFAULTS, broadcast_param
from .selection import per_sample_view

Tensor = torch.Tensor

LP_DEFAULTS: Dict[str, Any] = {"eps": 4 / 255, "norm": "linf"}


class LpAttack(Attack):
    """Shared L-inf / L2 machinery: budget tensors, projection, step direction, random start.

    ``norm='linf'``: ``|x_adv - x| <= eps`` voxel-wise (eps per channel/sample allowed).
    ``norm='l2'``: ``||x_adv - x||_2 <= eps`` per sample over all channels and voxels;
    ``eps``/``alpha`` must then be the same for all channels of a sample (a float or a
    ``(B, 1, ..., 1)``-like tensor).
    """

    defaults = {**COMMON_DEFAULTS, **TARGET_DEFAULTS, **LP_DEFAULTS}

    def prepare(self, ctx: AttackContext) -> None:
        ctx.norm = self.options["norm"]
        ctx.eps = self._budget(ctx, "eps", self.options["eps"])
        ctx.alpha = self._budget(ctx, "alpha", self.options["alpha"]) if "alpha" in self.options else None

    def _budget(self, ctx: AttackContext, name: str, value) -> Tensor:
        t = broadcast_param(name, value, ctx.x0)
        if bool((t < 0).any()):
            raise ValueError(f"{name} must be >= 0")
        if ctx.norm == "l2":
            t = self._per_sample(name, t, ctx)
        return t

    @staticmethod
    def _per_sample(name: str, t: Tensor, ctx: AttackContext) -> Tensor:
        if t.dim() == 0:
            return t
        dims = tuple(range(1, t.dim()))
        if not bool((t.amax(dim=dims) == t.amin(dim=dims)).all()):
            raise ValueError(f"with norm='l2', {name} must be one value per sample (the L2 ball is over all "
                             f"channels and voxels), got per-channel/voxel values of shape {tuple(t.shape)}")
        return t.amax(dim=dims, keepdim=True)

    def l2_norm(self, v: Tensor) -> Tensor:
        return per_sample_view(v.flatten(1).norm(dim=1), v.dim())

    def direction(self, ctx: AttackContext, g: Tensor) -> Tensor:
        """Steepest-ascent direction of unit size: ``sign(g)`` (L-inf) or ``g/||g||_2`` (L2)."""
        if ctx.norm == "linf":
            return g.sign()
        return g / self.l2_norm(g).clamp_min(1e-12)

    def project(self, ctx: AttackContext, x: Tensor, eps: Optional[Tensor] = None) -> Tensor:
        """Projection onto the eps-ball around the clean image, then onto the box."""
        eps = ctx.eps if eps is None else eps
        d = x - ctx.x0
        if ctx.norm == "linf":
            d = torch.maximum(torch.minimum(d, eps), -eps)
        else:
            n = self.l2_norm(d)
            d = d * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
        return self.clamp_box(ctx, ctx.x0 + d)

    def random_init(self, ctx: AttackContext) -> Tensor:
        """Uniform sample of the eps-ball (L-inf: per voxel; L2: uniform in the ball), boxed."""
        x0, g = ctx.x0, ctx.generator
        if ctx.norm == "linf":
            u = torch.rand(x0.shape, generator=g, device=x0.device, dtype=x0.dtype) * 2 - 1
            d = u * ctx.eps
        else:
            v = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
            v = v / self.l2_norm(v).clamp_min(1e-12)
            n = x0[0].numel()
            r = torch.rand((x0.shape[0],), generator=g, device=x0.device, dtype=x0.dtype) ** (1.0 / n)
            d = v * per_sample_view(r, x0.dim()) * ctx.eps
        return self.project(ctx, x0 + d)
