"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf, as ROG adapts it to 3D segmentation
(Daza et al., MICCAI 2021, ``rog/autoattack/square.py``): gradient-free, one forward per query.

It is the attack a defence that only hides its gradients cannot stop: it never asks the model for
a gradient, so a robustness number that holds against PGD but falls under Square was never robust.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..outputs import full_res
from .base import AttackContext
from .lp import LpAttack
from .selection import per_sample_view


class Square(LpAttack):
    """Random search over the vertices of the L-inf ball, in cubes (3D) or squares (2D).

    Algorithm (ROG's code, per query; everything under ``torch.no_grad()``):
      * start: ``x0 + eps * s`` with a random sign ``s`` per channel and stripe (constant along the
        first spatial axis: ``(B, C, 1, *S[1:])``), clipped to the box;
      * query ``i``: a cube of side ``round((p_i * prod(S)) ** (1 / n_spatial))`` voxels (``p_i`` the
        share of the volume, AutoAttack's schedule from ``p_init`` halved at queries 10, 50, 200, 500,
        1000, 2000, 4000, 6000, 8000, rescaled to ``queries`` when ``rescale_schedule``) at a random
        position gets ``2 eps`` times a random sign per channel added to the best point so far; the
        candidate is projected onto the eps-ball and the box and kept where it lowers the score;
      * score, per sample (lower wins): the foreground Dice of the full-resolution prediction (ROG),
        ties broken by the higher voxel-mean cross-entropy (a query that leaves the Dice unchanged
        but raises the loss is kept, so the search climbs where the Dice is flat);
      * restarts: independent runs, the lowest score kept.

    Cost: ``restarts * (queries + 1)`` forwards and no gradient: no backward pass, no
    ``torch.autograd`` call at all.

    Options (units of the tensor received): eps 4/255 (a float, per-channel values or a tensor
    broadcastable to the images: each channel gets its own budget and its own signs); queries 100;
    p_init 0.8; rescale_schedule True; restarts 1; seed, lower / upper. L-inf only.
    Differences from ROG: ROG's queries are its ``n_iter`` (5, the same 5 as its APGD steps) with
    the schedule not rescaled, so its p stays at ``p_init``; the tie-break by the loss; the cube
    is drawn per call for the whole batch as in ROG, its sign per channel (ROG: the same).
    Shapes: images ``(B, C, *S)`` -> ``(B, C, *S)``.
    """

    name = "square"
    summary = "Square: gradient-free random search in cubes, per-channel budgets (ROG)"
    supports_regions = False
    gradient_free = True
    defaults = {k: v for k, v in {**LpAttack.defaults, "queries": 100, "p_init": 0.8, "rescale_schedule": True,
                                  "restarts": 1}.items() if k not in ("targeted", "target", "loss")}

    def validate(self) -> None:
        o = self.options
        if o["norm"] != "linf":
            raise ValueError("square is an L-inf attack (norm='linf')")
        if isinstance(o["queries"], bool) or not isinstance(o["queries"], int) or o["queries"] < 1:
            raise ValueError(f"queries must be an integer >= 1, got {o['queries']!r}")
        p = o["p_init"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p!r}")
        if not isinstance(o["rescale_schedule"], bool):
            raise ValueError(f"rescale_schedule must be True or False, got {o['rescale_schedule']!r}")

    def p_at(self, i: int) -> float:
        """Share of the volume that query ``i`` (0-based) changes: AutoAttack's schedule."""
        queries, p = int(self.options["queries"]), float(self.options["p_init"])
        it = int(i / queries * 10000) if self.options["rescale_schedule"] else i
        for bound, divisor in ((8000, 512), (6000, 256), (4000, 128), (2000, 64), (1000, 32), (500, 16),
                               (200, 8), (50, 4), (10, 2)):
            if it > bound:
                return p / divisor
        return p

    @torch.no_grad()
    def perturb(self, ctx: AttackContext):
        best_x, best_score = None, None
        for _ in range(int(self.options["restarts"])):
            x, score = self._run(ctx)
            if best_x is None:
                best_x, best_score = x, score
            else:
                better = _lower(score, best_score)
                best_x = torch.where(per_sample_view(better, x.dim()), x, best_x)
                best_score = tuple(torch.where(better, new, old) for new, old in zip(score, best_score))
        return best_x

    def _score(self, ctx: AttackContext, x: torch.Tensor):
        """``(dice, -ce)`` per sample, each ``(B,)``: lexicographically lower is a stronger attack."""
        out = self.forward(ctx, x)
        logits = full_res(out).float()
        ce = F.cross_entropy(logits, ctx.y, reduction="none").flatten(1).mean(1)
        return self.dice_per_sample(ctx, out), -ce

    def _run(self, ctx: AttackContext):
        x0, eps, g = ctx.x0, ctx.eps, ctx.generator
        B, C, spatial = ctx.B, ctx.C, ctx.spatial
        stripes = (B, C, 1) + tuple(spatial[1:])
        x = self.project(ctx, x0 + eps * _signs(stripes, g, x0))
        score = self._score(ctx, x)
        volume = math.prod(spatial)
        for i in range(int(self.options["queries"])):
            side = max(int(round((self.p_at(i) * volume) ** (1.0 / len(spatial)))), 1)
            side = min(side, min(spatial))
            corner = [int(torch.randint(0, n - side + 1, (1,), generator=g, device=x0.device)) for n in spatial]
            window = (slice(None), slice(None)) + tuple(slice(c, c + side) for c in corner)
            delta = torch.zeros_like(x0)
            delta[window] = 2.0 * _signs((1, C) + (1,) * len(spatial), g, x0)
            candidate = self.project(ctx, x + delta * eps)
            new = self._score(ctx, candidate)
            better = _lower(new, score)
            x = torch.where(per_sample_view(better, x.dim()), candidate, x)
            score = tuple(torch.where(better, n, o) for n, o in zip(new, score))
        return x, score


def _signs(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Random +-1 of ``shape`` drawn from the attack's private generator."""
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (bits * 2 - 1).to(like.dtype)


def _lower(a, b) -> torch.Tensor:
    """``(B,)`` where score tuple ``a`` is lexicographically lower than ``b`` (NaN Dice never lower)."""
    dice_a, dice_b = torch.nan_to_num(a[0], nan=float("inf")), torch.nan_to_num(b[0], nan=float("inf"))
    return (dice_a < dice_b) | ((dice_a == dice_b) & (a[1] < b[1]))
