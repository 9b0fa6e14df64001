"""Adversarial training with dual normalisation (Han et al., Nature Communications 2021).

Every norm layer of nnU-Net's network becomes two (:mod:`nnunet_adv.modules.dual_norm`):
branch 0 for clean inputs, branch 1 for adversarial ones; convolutions are shared.

Per training batch:
  1. PGD is crafted through the *adversarial* branch, in eval mode, on the unwrapped network;
  2. ``loss = L(f(x; branch 0), y) + L(f(x_adv; branch 1), y)``, computed in ONE forward pass
     of the concatenated batch ``[x, x_adv]`` whose norms route the first half through branch 0
     and the second through branch 1 (:class:`nnunet_adv.training.network_changes.BatchRoutedDualNorm`;
     BatchNorm statistics are per branch, exactly as two passes). Under DDP that is one DDP
     forward per backward in which every parameter of both branches gets a gradient.

Deployment uses the clean branch: the network that ``build_network_architecture`` returns (which
nnU-Net's predictor uses) starts on branch 0, and checkpoints hold both branches (keys
``...norms.0.*`` / ``...norms.1.*``) and load strictly. Robust validation attacks the clean
branch (the deployed model). To predict or attack through the adversarial branch::

    from nnunet_adv.modules import ADV, set_norm_route, norm_route
    set_norm_route(predictor.network, ADV)           # nnUNetPredictor, after initialize_from_trained_model_folder
    with norm_route(model.networks[0], ADV): ...     # nnunet_adv.volume.trained_model.load_trained_model

``nnUNetTrainerDualBN`` is the paper's setting (BatchNorm, as nnU-Net's ``nnUNetTrainerBN``,
momentum 0.01); ``nnUNetTrainerDualNorm`` keeps nnU-Net's InstanceNorm, whose branches then
differ only in their affine parameters (instance norm has no running statistics).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Sequence, Tuple

from torch import nn

from nnunet_adv.modules.dual_norm import end_statistics_warm_ups, norm_route
from nnunet_adv.training.adversarial_trainer import RecipeError, nnUNetTrainerAdversarial
from nnunet_adv.training.network_changes import ADV, CLEAN, BatchNormArchitecture, DualNormConversion, batch_routes

_ROUTES = {"clean": CLEAN, "adv": ADV}


class nnUNetTrainerDualNorm(nnUNetTrainerAdversarial):
    """Dual normalisation on nnU-Net's default norm (InstanceNorm): L(x, clean) + L(x_adv, adv).

    Published attack (on [0, 1] images): L-inf PGD, eps 0.005, alpha 0.0025, 10 steps, random
    start, crafted in eval mode through the adversarial branch. Here eps is 0.005 of each
    channel's intensity window (the threat model's [0, 1] equivalent), alpha = eps / 2.
    """

    attack_name = "pgd"
    attack_kwargs = {"steps": 10, "random_start": True, "norm": "linf"}
    eps_frac = 0.005
    alpha_over_eps = 0.5
    attack_in_train_mode = False
    clean_loss_weight = 1.0
    adversarial_loss_weight = 1.0
    network_changes = (DualNormConversion(momentum=0.01),)
    # branch the training attack is crafted through / the robust-validation attack attacks
    train_attack_route: int = ADV
    validation_attack_route: int = CLEAN

    # True until no BatchNorm is left in a warm-up of fresh statistics (fine-tuning from an InstanceNorm model)
    _statistics_warming_up = True

    def configure_attack(self) -> None:
        if self.clean_loss_weight <= 0 or self.adversarial_loss_weight <= 0:
            raise RecipeError(type(self).__name__, "dual normalisation trains both branches: clean_loss_weight and "
                                                   "adversarial_loss_weight must both be > 0")

    def attack_context(self, network: nn.Module, for_training: bool) -> ContextManager:
        return norm_route(network, self.train_attack_route if for_training else self.validation_attack_route)

    def train_step(self, batch: dict) -> dict:
        # BatchNorm statistics that started fresh (nnunet_adv.training.pretrained) take their momentum back
        # after their cumulative warm-up: checked before each batch, outside the (possibly compiled) forward
        if self._statistics_warming_up:
            self._statistics_warming_up = end_statistics_warm_ups(self.network) > 0
        return super().train_step(batch)

    def forward_context(self, parts: Sequence[Tuple[str, int]]) -> ContextManager:
        if not parts:
            return nullcontext()
        return batch_routes(self.network, [(_ROUTES[name], size) for name, size in parts])


class nnUNetTrainerDualBN(nnUNetTrainerDualNorm):
    """Dual BatchNorm (the paper's setting): nnU-Net's ``nnUNetTrainerBN`` network with every
    BatchNorm doubled, BN momentum 0.01 (ref.; PyTorch convention), clean/adversarial running
    statistics kept apart."""

    network_changes = (BatchNormArchitecture(), DualNormConversion(momentum=0.01))
