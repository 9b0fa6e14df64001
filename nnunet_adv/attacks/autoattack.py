"""ROG's complete AutoAttack for segmentation as one attack (Daza et al., MICCAI 2021,
``rog/autoattack/autoattack.py``; Croce & Hein, ICML 2020): every attack of the set, per case the
image with the lowest Dice."""
from __future__ import annotations

from typing import List, Tuple

from .base import Attack
from .ensemble import Ensemble
from .options import COMMON_DEFAULTS, check_int


def rog_members(steps: int, restarts: int, queries: int, eps) -> List[Tuple[str, dict]]:
    """ROG's attack set (its ``main.py``: APGD-CE, PGD, FAB, Square, plus APGD-DLR on multi-class
    tasks), each with ROG's settings: ``steps`` iterations (ROG's ``--adv_iters``, 5) and
    ``restarts`` restarts (5) for APGD, FAB and PGD (ROG's ``attack_pgd``: step eps / 3); Square
    ``queries`` queries. ``eps`` in the units of the images (PGD's step is eps / 3)."""
    return [("apgd-ce", {"steps": steps, "restarts": restarts}),
            ("apgd-dlr", {"steps": steps, "restarts": restarts}),
            ("fab", {"steps": steps, "restarts": restarts}),
            ("square", {"queries": queries}),
            ("pgd", {"steps": steps, "restarts": restarts, "alpha": eps / 3})]


class AutoAttackROG(Ensemble):
    """ROG's complete AutoAttack: APGD-CE, APGD-DLR (skipped on binary tasks, as ROG does), targeted
    FAB, Square (gradient-free) and PGD, each from the clean image; per case the adversarial image
    with the lowest foreground Dice (:class:`Ensemble`).

    Options (units of the tensor received): eps 4/255 (ROG's default is 8/255; the other attacks
    here use 4); steps 5 and restarts 5 (ROG's); queries 100 (Square; ROG's is its ``steps``, 5:
    see :class:`~nnunet_adv.attacks.square.Square`); seed, lower / upper, amp_loss_scale.
    Differences from ROG: each attack runs once on every case (ROG runs the next attack only on
    the cases still above its Dice threshold, and lists PGD, FAB and Square twice on multi-class
    tasks); the per-case lowest Dice is kept (ROG keeps the last successful image and reports
    its robust fraction).
    Shapes: images ``(B, C, *S)`` -> ``(B, C, *S)``.
    """

    name = "autoattack-rog"
    summary = "ROG's complete AutoAttack: APGD-CE, APGD-DLR, FAB, Square, PGD; per case the lowest Dice"
    defaults = {**{k: v for k, v in COMMON_DEFAULTS.items() if k != "loss"}, "eps": 4 / 255, "steps": 5,
                "restarts": 5, "queries": 100}

    def __init__(self, **options):
        Attack.__init__(self, **options)
        o = self.options
        for key in ("steps", "restarts", "queries"):
            check_int(key, o[key], 1)
        members = rog_members(int(o["steps"]), int(o["restarts"]), int(o["queries"]), o["eps"])
        shared = {k: o[k] for k in ("eps", "seed", "lower", "upper", "amp_loss_scale") if o[k] is not None}
        self.members = self._build_members(members, shared)
        self.shared = shared

    def __repr__(self) -> str:
        return Attack.__repr__(self)
