"""NLCE networks (He et al., "Non-Local Context Encoder: Robust Biomedical Image Segmentation
against Adversarial Attacks", AAAI 2019), alone and combined with VAFT.

A recipe is attack + loss terms + network change; here the network change is
``network_changes = (InsertNLCE(stages),)`` and the rest comes from the recipe it is combined
with:

* ``nnUNetTrainerNLCE``: nnU-Net's network with an NLCE module after the chosen encoder
  stages, trained on clean data (the paper's defence is architectural); robust validation is
  kept (PGD, 5 steps) so robustness is monitored.
* ``nnUNetTrainerNLCE_VAFT``: the same network trained with VAFT (attack and loss terms of
  :class:`~nnunet_adv.trainers.vaft.nnUNetTrainerVAFT`, untouched).

NLCEN puts an NLCE after each of conv2..conv5 of a ResNet-FPN on 256x256 images; non-local
attention over N positions costs N^2, so on 3D nnU-Net patches the default is the two
coarsest encoder stages, ``(-2, -1)`` (keys/values max-pooled by 2). Other stages or NLCE
options: a subclass sets e.g. ``network_changes = (InsertNLCE(stages=(1, 2, 3), options=(("subsample", 4),)),)``.

Every NLCE is the identity at initialisation, so fine-tuning from a clean checkpoint
(``nnUNetv2_train ... -pretrained_weights clean.pth``) starts from the clean network's
function; nnunet_adv's loader keeps the NLCE parameters the checkpoint lacks
(:mod:`nnunet_adv.training.pretrained`).
"""
from __future__ import annotations

from nnunet_adv.training.adversarial_trainer import nnUNetTrainerAdversarial
from nnunet_adv.training.network_changes import InsertNLCE

from .vaft import nnUNetTrainerVAFT

NLCE_COARSE_STAGES = InsertNLCE(stages=(-2, -1))


class nnUNetTrainerNLCE(nnUNetTrainerAdversarial):
    """Clean training of nnU-Net's network with NLCE after the two coarsest encoder stages."""

    network_changes = (NLCE_COARSE_STAGES,)
    clean_loss_weight = 1.0
    adversarial_loss_weight = 0.0
    # used by robust validation only (no attack in the training step): PGD 4/255, 5 steps
    attack_name = "pgd"
    attack_kwargs = {"steps": 5, "random_start": True, "norm": "linf"}
    eps_frac = 4 / 255
    alpha_over_eps = 2.5 / 5
    val_attack_overrides = {}


class nnUNetTrainerNLCE_VAFT(nnUNetTrainerVAFT):
    """VAFT (attack, loss terms, defaults) on the NLCE network of :class:`nnUNetTrainerNLCE`."""

    network_changes = nnUNetTrainerNLCE.network_changes
