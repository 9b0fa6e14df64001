"""CosPGD (Agnihotri, Jung, Keuper, "CosPGD: an efficient white-box adversarial attack for
pixel-wise prediction tasks", ICML 2024): PGD with a cosine-weighted per-voxel loss."""
from __future__ import annotations

from ..losses import cospgd_loss
from ..outputs import full_res
from .base import AttackContext
from .pgd import PGD


class CosPGD(PGD):
    """PGD whose loss is :func:`nnunet_adv.losses.cospgd_loss` on the full-res logits.

    Untargeted: maximise ``mean_i cos_i CE_i``; targeted: descend ``mean_i (1-cos_i) CE_i``
    towards the target, ``cos_i = cosine(softmax(f(x)_i), onehot(y_i))`` (detached).
    Restarts keep the per-sample worst case by plain CE.

    Options: as :class:`PGD` (eps 4/255, alpha 0.01, steps 20, random start, on [0, 1]
    images), without ``loss``: CosPGD defines its own voxel weighting.
    """

    name = "cospgd"
    summary = "CosPGD (Agnihotri et al. 2024)"
    defaults = {k: v for k, v in PGD.defaults.items() if k != "loss"}
    supports_regions = False  # a softmax-CE weighting of class labels: no sigmoid-region analogue

    def objective(self, ctx: AttackContext, output, t: int = 1, T: int = 1):
        return ctx.sign * cospgd_loss(full_res(output), self.voxel_labels(ctx), targeted=self.is_targeted())
