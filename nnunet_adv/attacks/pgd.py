"""BIM / I-FGSM and PGD (L-inf and L2).

* BIM: Kurakin, Goodfellow, Bengio, "Adversarial examples in the physical world", ICLR-W 2017.
* PGD: Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018.

Defaults follow the VAFA evaluation (Hanif et al., MICCAI 2023; ref. code ``attacks/bim.py``,
``attacks/pgd.py`` with its command-line defaults): eps = 4/255, alpha = 0.01, 20 steps, on
[0, 1] images.
"""
from __future__ import annotations

import torch

from .base import AttackContext
from .lp import LpAttack
from .selection import PerSampleBest


class PGD(LpAttack):
    """Projected gradient ascent with uniform random start and optional restarts.

    ``x_0 = Π(x + U(ball))``; ``x_{t+1} = Π(x_t + alpha * dir(∇ objective_t))`` for ``t = 1..T``,
    ``dir`` = sign (L-inf) or g/||g||_2 (L2). With ``restarts > 1`` the per-sample worst case
    (largest ``sign * L``, the attack's own loss; CE by default) over the restarts is kept.

    Options (units of the tensor received):
        eps: 4/255; alpha: 0.01 (step size); steps: 20; norm: ``'linf'`` | ``'l2'`` (then eps and
        alpha must be given); random_start: True; restarts: 1; targeted / target, loss, seed,
        lower / upper, amp_loss_scale: see :mod:`nnunet_adv.attacks.base`.
    Shapes: images ``(B, C, *S)`` -> ``(B, C, *S)``.
    """

    name = "pgd"
    summary = "PGD: random start, optional restarts (Madry et al. 2018)"
    defaults = {**LpAttack.defaults, "alpha": 0.01, "steps": 20, "random_start": True, "restarts": 1}

    def perturb(self, ctx: AttackContext):
        steps = int(self.options["steps"])
        restarts = int(self.options.get("restarts", 1))
        best = PerSampleBest("max")
        for _ in range(restarts):
            x = self.random_init(ctx) if self.options.get("random_start", False) else ctx.x0
            for t in range(1, steps + 1):
                g, _ = self.input_grad(ctx, x, t, steps)
                x = self.project(ctx, x + ctx.alpha * self.direction(ctx, g))
            if restarts == 1:
                return x
            with torch.no_grad():
                best.update(x, self.per_sample_objective(ctx, self.forward(ctx, x)))
        return best.x


class BIM(PGD):
    """BIM / I-FGSM: PGD without random start or restarts (``x_0 = x``).

    Options: eps 4/255, alpha 0.01, steps 20, norm, targeted / target, loss, seed, lower /
    upper, amp_loss_scale (see :class:`PGD`).
    """

    name = "bim"
    summary = "BIM / I-FGSM: iterated FGSM without random start (Kurakin et al. 2017)"
    defaults = {k: v for k, v in PGD.defaults.items() if k not in ("random_start", "restarts")}
