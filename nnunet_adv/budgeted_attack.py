"""Attacks configured in user units: the bridge between the threat model and the attacks.

Users (trainer recipes, command lines) state budgets as a fraction of the intensity
window (``eps_frac = 4/255``) or in raw units (``eps_raw``, HU); step sizes and noise
levels as multiples of eps. The attacks in :mod:`nnunet_adv.attacks` take everything in
the units of the tensor they receive. :func:`build_budgeted_attack` converts, per batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from nnunet_adv.attacks import attack_defaults, build_attack
from nnunet_adv.threat_model import ThreatModel


@dataclass
class AttackRecipe:
    """An attack with its budget in user units.

    Attributes:
        name: attack name (``nnunet_adv.attacks.available_attacks()``).
        options: options passed unchanged (steps, random_start, q_max, block_size, ...). For
            ``ensemble``: ``{"attacks": [(name, options), ...]}``, each member budgeted alike.
        eps_frac: L-inf radius as a fraction of each channel's intensity window, or None.
        eps_raw: radius in raw intensity units (HU), or None. Exactly one is set.
        alpha_over_eps: step size as a multiple of eps (None: the attack's default).
        std_over_eps: Gaussian-noise std as a multiple of eps (gn only).
    """

    name: str
    options: dict = field(default_factory=dict)
    eps_frac: Optional[float] = 4 / 255
    eps_raw: Optional[float] = None
    alpha_over_eps: Optional[float] = None
    std_over_eps: Optional[float] = None


def accepted_options(name: str) -> set:
    """Names of the options the attack takes."""
    return set(attack_defaults(name))


def build_budgeted_attack(recipe: AttackRecipe, threat_model: ThreatModel, data: torch.Tensor,
                          loss: Optional[Callable] = None, raw_std: Optional[torch.Tensor] = None,
                          **overrides):
    """The attack for the batch ``data`` (B, C, *spatial), budget in network units.

    eps, the projection box (lower/upper), alpha and std are computed from the threat
    model for ``data`` and passed only to attacks that take them; explicit ``options``
    and ``overrides`` win over computed values.
    """
    budget = threat_model.budget(data, eps_frac=recipe.eps_frac, eps_raw=recipe.eps_raw, raw_std=raw_std)
    computed = {"eps": budget.eps, "lower": budget.lower, "upper": budget.upper}
    if recipe.alpha_over_eps is not None:
        computed["alpha"] = budget.scaled(recipe.alpha_over_eps)
    if recipe.std_over_eps is not None:
        computed["std"] = budget.scaled(recipe.std_over_eps)
    if loss is not None:
        computed["loss"] = loss
    options = {**recipe.options, **overrides}
    if recipe.name == "ensemble":
        # every member gets the same budget, converted for this batch
        options["attacks"] = [
            build_budgeted_attack(replace(recipe, name=member, options=dict(member_options)), threat_model,
                                  data, loss=loss, raw_std=raw_std)
            for member, member_options in options.get("attacks") or []]
    accepted = accepted_options(recipe.name)
    options.update({k: v for k, v in computed.items() if k in accepted and k not in options})
    return build_attack(recipe.name, **options)
