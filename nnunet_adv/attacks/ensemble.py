"""Ensemble of attacks keeping the per-sample worst case (AutoAttack's composition, Croce &
Hein, ICML 2020), judged by the Dice of the full-resolution prediction."""
from __future__ import annotations

import warnings
from typing import Any, Dict, List

import torch

from .base import Attack, AttackContext
from .options import canonical_name
from .registry import attack_class, available_attacks, build_attack
from .selection import PerSampleBest


class Ensemble(Attack):
    """Run every member attack and keep, per sample, the adversarial image with the lowest Dice.

    Dice: :func:`nnunet_adv.losses.dice_per_sample` of ``argmax model(x_adv)`` (full
    resolution) against the full-resolution labels, mean over foreground classes. Ties keep
    the earlier member. Members run independently from the clean image (each with its own
    seed), so the result is at least as strong as every member, sample by sample.

    Options:
        attacks (required): a list whose items are attack names (``'pgd'``), ``(name,
            options)`` pairs, or built :class:`Attack` instances.
        any other option: forwarded to every member *given by name* that accepts it (e.g.
            ``eps``, ``lower``, ``upper`` tensors from the trainer); a member's own options take
            precedence; an option that no member accepts is an error. Built instances are used
            as they are.
    Shapes: images ``(B, C, *S)`` -> ``(B, C, *S)``.
    """

    name = "ensemble"
    summary = "per-case worst case (lowest Dice) over its member attacks"
    defaults = {"attacks": None}

    def __init__(self, attacks=None, **shared):
        if not isinstance(attacks, (list, tuple)) or len(attacks) == 0:
            raise ValueError("ensemble needs attacks=[...]: a non-empty list of names, (name, options) "
                             "pairs or Attack instances")
        super().__init__(attacks=list(attacks))
        self.members = self._build_members(attacks, shared)
        self.shared: Dict[str, Any] = dict(shared)

    @staticmethod
    def _build_members(attacks, shared: dict) -> List[Attack]:
        """The member attacks of ``attacks`` (names, ``(name, options)`` pairs or instances), each
        given the ``shared`` options it accepts (its own win)."""
        members: List[Attack] = []
        used = set()
        for item in attacks:
            if isinstance(item, Attack):
                members.append(item)
                continue
            if isinstance(item, str):
                name, opts = item, {}
            elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) \
                    and isinstance(item[1], dict):
                name, opts = item[0], dict(item[1])
            else:
                raise ValueError(f"ensemble member must be a name, a (name, options) pair or an Attack, "
                                 f"got {item!r}")
            cls = attack_class(name) if canonical_name(name) in available_attacks() else None
            if cls is None or issubclass(cls, Ensemble):
                valid = [n for n in available_attacks() if not issubclass(attack_class(n), Ensemble)]
                raise ValueError(f"unknown ensemble member {name!r}; valid: {valid}")
            accepted = {k: v for k, v in shared.items() if k in cls.defaults}
            used |= set(accepted)
            members.append(build_attack(name, **{**accepted, **opts}))
        unused = sorted(set(shared) - used)
        if unused:
            raise ValueError(f"ensemble: option(s) {unused} accepted by no member attack given by name")
        return members

    def __repr__(self) -> str:
        return f"Ensemble({self.members!r})"

    def perturb(self, ctx: AttackContext):
        best = PerSampleBest("min")  # lowest Dice wins; ties keep the earlier member
        if any(m.min_classes > 1 for m in self.members):
            with torch.no_grad():  # the number of classes decides which members can run
                self.forward(ctx, ctx.x0)
        k = ctx.num_classes
        self.skipped = [m.name for m in self.members if k is not None and m.min_classes > k]
        if len(self.skipped) == len(self.members):
            raise ValueError(f"ensemble: no member attack runs on a {k}-class model ({', '.join(self.skipped)})")
        if self.skipped:
            needs = ", ".join(f"{m.name} needs {m.min_classes}" for m in self.members if m.name in self.skipped)
            warnings.warn(f"ensemble: skipped on a {k}-class model: {needs} classes or more (as ROG runs "
                          f"APGD-DLR only on multi-class tasks)", RuntimeWarning, stacklevel=3)
        self.traces = {}
        for member in self.members:
            if member.name in self.skipped:
                continue
            x = member(ctx.model, ctx.x0, ctx.labels).float()
            self.traces[member.name] = list(member.trace)
            with torch.no_grad():
                # self.forward (not ctx.model): its first call checks the labels against the
                # model and, for region targets, splits off nnU-Net's ignore channel
                best.update(x, self.dice_per_sample(ctx, self.forward(ctx, x)))
        return best.x
