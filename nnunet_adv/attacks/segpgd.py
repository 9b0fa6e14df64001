"""SegPGD (Gu, Zhao, Tresp, Torr, "SegPGD: An Effective and Efficient Adversarial Attack for
Evaluating and Boosting Segmentation Robustness", ECCV 2022): PGD with a per-step loss."""
from __future__ import annotations

from ..losses import segpgd_loss
from ..outputs import full_res
from .base import AttackContext
from .pgd import PGD


class SegPGD(PGD):
    """PGD whose step-``t`` loss is :func:`nnunet_adv.losses.segpgd_loss` on the full-res logits.

    ``lambda_t = (t-1)/(2T)``, ``t = 1..T``; loss
    ``mean_i[(1-lambda_t) c_i CE_i + lambda_t (1-c_i) CE_i]``, ``c_i`` = voxel currently correct.
    Targeted: the weights swap and the step descends (see the loss). Restarts keep the
    per-sample worst case by plain CE.

    Options: as :class:`PGD` (eps 4/255, alpha 0.01, steps 20, random start, on [0, 1] images;
    the SegPGD paper used eps 8/255 on Cityscapes/VOC), without ``loss``: SegPGD defines its
    own voxel weighting, which a scalar user loss cannot carry.
    """

    name = "segpgd"
    summary = "SegPGD (Gu et al. 2022)"
    defaults = {k: v for k, v in PGD.defaults.items() if k != "loss"}
    supports_regions = False  # a softmax-CE weighting of class labels: no sigmoid-region analogue

    def objective(self, ctx: AttackContext, output, t: int = 1, T: int = 1):
        return ctx.sign * segpgd_loss(full_res(output), self.voxel_labels(ctx), t, T,
                                      targeted=self.is_targeted())
