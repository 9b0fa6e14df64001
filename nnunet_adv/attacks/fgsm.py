"""FGSM (Goodfellow, Shlens, Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015).

As evaluated in VAFA (Hanif et al., MICCAI 2023; ref. code ``attacks/fgsm.py``).
"""
from __future__ import annotations

from .base import AttackContext
from .lp import LpAttack


class FGSM(LpAttack):
    """One step of size ``eps`` along the gradient sign (L-inf) or the normalised gradient (L2).

    ``x_adv = Π(x + eps * sign(∇_x L(f(x), y)))``; targeted: descends the loss to ``target``.

    Options (units of the tensor received; defaults are the published ones on [0, 1] images):
        eps: 4/255 (L-inf radius; a float, C per-channel values or a tensor broadcastable to
            images). norm: ``'linf'`` (default) or ``'l2'`` (then ``eps`` must be given).
        targeted / target, loss, seed (unused: FGSM is deterministic), lower / upper,
        amp_loss_scale: see :mod:`nnunet_adv.attacks.base`.
    Shapes: images ``(B, C, *S)`` -> ``(B, C, *S)``.
    """

    name = "fgsm"
    summary = "FGSM: one signed-gradient step (Goodfellow et al. 2015)"

    def perturb(self, ctx: AttackContext):
        g, _ = self.input_grad(ctx, ctx.x0)
        return self.project(ctx, ctx.x0 + ctx.eps * self.direction(ctx, g))
