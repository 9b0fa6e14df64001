"""Targeted I-FGSM with the NLCEN protocol.

He et al., "Non-Local Context Encoder: Robust Biomedical Image Segmentation against
Adversarial Attacks", AAAI 2019, after Kurakin, Goodfellow, Bengio (ICLR-W 2017).
"""
from __future__ import annotations

import math
import numbers

from nnunet_adv.threat_model import from_x255

from .base import AttackContext
from .options import COMMON_DEFAULTS
from .pgd import BIM


def nlcen_iterations(eps_255: float) -> int:
    """Iterations of the NLCEN / Kurakin rule for a budget on the 0-255 scale.

    ``min(eps + 4, ceil(1.25 eps))``, rounded up to an integer (this only matters for a
    fractional ``eps + 4`` smaller than ``ceil(1.25 eps)``, e.g. eps = 16.5 -> 21) and at
    least 1. Examples: 0.5 -> 1, 1 -> 2, 4 -> 5, 8 -> 10, 16 -> 20, 32 -> 36.
    """
    if isinstance(eps_255, bool) or not isinstance(eps_255, numbers.Real) or not eps_255 > 0 \
            or not math.isfinite(eps_255):
        raise ValueError(f"eps on the 0-255 scale must be a positive finite number, got {eps_255!r}")
    return max(1, int(math.ceil(min(eps_255 + 4.0, math.ceil(1.25 * eps_255)))))


class TargetedIFGSM(BIM):
    """Targeted I-FGSM: BIM descending the loss towards a target map (NLCEN protocol).

    Target: the ``target`` option (class index, label map, deep-supervision list or callable
    ``(labels, num_classes) -> map``), or by default the NLCEN rule: the inverse of the
    ground-truth mask for binary tasks (K = 2: foreground and background swapped), all
    background for multi-class tasks.

    Step rule: NLCEN uses alpha = 1 and ``nlcen_iterations(eps)`` iterations on 0-255 images,
    eps swept over {0.5, 1, 2, 4, 6, 8, 10, 12, ..., 32}.
    * ``nlcen_schedule=False`` (default): ``eps`` / ``alpha`` are in tensor units;
      defaults eps = 4/255, alpha = 1/255 and steps = nlcen_iterations(4) = 5 (the rule at
      eps = 4 on [0, 1] images).
    * ``nlcen_schedule=True``: ``eps`` is on the 0-255 scale *relative to the intensity
      window* (``lower``/``upper``, else the clean sample's per-channel min/max): the budget
      is ``eps/255 * (hi - lo)``, the step ``1/255 * (hi - lo)`` and the number of steps
      ``nlcen_iterations(eps)``; ``eps`` must then be a single number, and ``alpha`` /
      ``steps`` must not be given.

    Other options: norm, loss, seed, lower / upper, amp_loss_scale (see the base).
    Shapes: images ``(B, C, *S)`` -> ``(B, C, *S)``.
    """

    name = "ifgsm-targeted"
    summary = "targeted I-FGSM towards the inverted mask (NLCEN protocol, He et al. 2019)"
    always_targeted = True
    defaults = {**COMMON_DEFAULTS, "target": None, "eps": 4 / 255, "alpha": 1 / 255,
                "steps": nlcen_iterations(4), "norm": "linf", "nlcen_schedule": False}

    def validate(self) -> None:
        o = self.options
        if not isinstance(o["nlcen_schedule"], bool):
            raise ValueError(f"nlcen_schedule must be True or False, got {o['nlcen_schedule']!r}")
        if o["nlcen_schedule"]:
            clash = sorted({"alpha", "steps"} & self.given)
            if clash:
                raise ValueError(f"nlcen_schedule=True derives alpha and steps from eps; do not pass {clash}")
            if o["norm"] != "linf":
                raise ValueError("nlcen_schedule=True is an L-inf protocol (norm='linf')")
            if "eps" not in self.given or isinstance(o["eps"], bool) or not isinstance(o["eps"], numbers.Real):
                raise ValueError("nlcen_schedule=True needs eps as one number on the 0-255 scale "
                                 "(e.g. eps=8)")
            o["steps"] = nlcen_iterations(float(o["eps"]))

    def prepare(self, ctx: AttackContext) -> None:
        if not self.options["nlcen_schedule"]:
            return super().prepare(ctx)
        lo, hi = self.window(ctx)
        width = hi - lo
        ctx.norm = "linf"
        ctx.eps = from_x255(self.options["eps"]) * width
        ctx.alpha = from_x255(1) * width
