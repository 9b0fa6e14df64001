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

Placement: NLCEN puts an NLCE after each of conv2..conv5 of a ResNet-FPN on 256x256 images and,
adding NLCE to other networks (U-Net among them), **one module between the last downsampling
and the first upsampling layer**: ``nnUNetTrainerNLCE`` follows that rule (the bottleneck stage,
keys not subsampled while the attention matrix has at most
:data:`nnunet_adv.modules.nlce.ATTENTION_LIMIT` entries per sample; an nnU-Net bottleneck is
far below it). ``nnUNetTrainerNLCE_MultiStage`` is this project's earlier choice, kept as a named
option: the two coarsest stages with keys max-pooled by 2. Other stages or options: a subclass
sets e.g. ``network_changes = (InsertNLCE(stages=(1, 2, 3), options=(("subsample", 4),)),)``.
Remaining deviations from the paper (unverified against code: none was released): the gate is
``2 sigmoid`` with an identity initialisation (paper: ``sigmoid``), codeword residuals are averaged
over positions (EncNet sums), see :mod:`nnunet_adv.modules.nlce`.

Every NLCE is the identity at initialisation, so fine-tuning from a clean checkpoint
(``nnUNetv2_train ... -pretrained_weights clean.pth``) starts from the clean network's
function; nnunet_adv's loader keeps the NLCE parameters the checkpoint lacks
(:mod:`nnunet_adv.training.pretrained`).
"""
from __future__ import annotations

from nnunet_adv.training.adversarial_trainer import nnUNetTrainerAdversarial
from nnunet_adv.training.network_changes import InsertNLCE

from .vaft import nnUNetTrainerVAFT

NLCE_BOTTLENECK = InsertNLCE(stages=(-1,), options=(("subsample", "auto"),))
NLCE_COARSE_STAGES = InsertNLCE(stages=(-2, -1), options=(("subsample", 2),))


class nnUNetTrainerNLCE(nnUNetTrainerAdversarial):
    """Clean training of nnU-Net's network with one NLCE at the bottleneck (NLCEN's U-Net rule)."""

    network_changes = (NLCE_BOTTLENECK,)
    clean_loss_weight = 1.0
    adversarial_loss_weight = 0.0
    # used by robust validation only (no attack in the training step): PGD 4/255, 5 steps
    attack_name = "pgd"
    attack_kwargs = {"steps": 5, "random_start": True, "norm": "linf"}
    eps_frac = 4 / 255
    alpha_over_eps = 2.5 / 5
    val_attack_overrides = {}


class nnUNetTrainerNLCE_MultiStage(nnUNetTrainerNLCE):
    """NLCE after the two coarsest encoder stages, keys max-pooled by 2 (not the paper's U-Net rule)."""

    network_changes = (NLCE_COARSE_STAGES,)


class nnUNetTrainerNLCE_VAFT(nnUNetTrainerVAFT):
    """VAFT (attack, loss terms, defaults) on the NLCE network of :class:`nnUNetTrainerNLCE`."""

    network_changes = nnUNetTrainerNLCE.network_changes
