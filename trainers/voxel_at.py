"""Adversarial training with voxel-domain attacks: PGD-AT, FGSM-AT, Gaussian-noise augmentation.

Each recipe only sets class attributes of :class:`nnUNetTrainerAdversarial`.
"""
from nnunet_adv.training.adversarial_trainer import nnUNetTrainerAdversarial


class nnUNetTrainerPGDAT(nnUNetTrainerAdversarial):
    """Madry et al. (ICLR 2018) PGD adversarial training: loss on adversarial examples only.

    Published defaults: L-inf, eps = 4/255 of each channel's intensity window, 10 steps,
    step size alpha = 2.5 * eps / steps, uniform random start.
    """

    attack_name = "pgd"
    attack_kwargs = {"steps": 10, "random_start": True, "norm": "linf"}
    eps_frac = 4 / 255
    alpha_over_eps = 2.5 / 10
    clean_loss_weight = 0.0
    adversarial_loss_weight = 1.0


class nnUNetTrainerFGSMAT(nnUNetTrainerAdversarial):
    """FGSM adversarial training (Goodfellow et al., 2015): one signed-gradient step of size eps."""

    attack_name = "fgsm"
    attack_kwargs = {}
    alpha_over_eps = None
    val_attack_overrides = {}


class nnUNetTrainerGNAug(nnUNetTrainerAdversarial):
    """Gaussian-noise augmentation: train on x + N(0, sigma^2), sigma = 4/255 of the window."""

    attack_name = "gn"
    attack_kwargs = {}
    alpha_over_eps = None
    std_over_eps = 1.0
    val_attack_overrides = {}


class nnUNetTrainerClean(nnUNetTrainerAdversarial):
    """nnU-Net's clean training, with the robust pseudo-Dice of PGD-AT's attack logged in validation:
    the baseline that fine-tuned recipes are compared with (same schedule, same monitoring)."""

    clean_loss_weight = 1.0
    adversarial_loss_weight = 0.0
