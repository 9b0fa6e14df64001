"""Trainers nnU-Net loads by name (``nnUNetv2_train ... -tr NAME``).

Installed as the package ``nnunet_adv.trainers``; nnU-Net reaches them through the
shim in ``nnunet_adv/_ext`` (see nnunet_adv.ext_trainer), so every class exists once.
"""
from nnunet_adv.training import integration
from nnunet_adv.training.adversarial_trainer import nnUNetTrainerAdversarial
from nnunet_adv.training.names import trainer_from_name

from .dual_norm import nnUNetTrainerDualBN, nnUNetTrainerDualNorm
from .nlce import nnUNetTrainerNLCE, nnUNetTrainerNLCE_MultiStage, nnUNetTrainerNLCE_VAFT
from .saat import nnUNetTrainerSAAT, nnUNetTrainerSAAT_SEAT
from .short import (
    nnUNetTrainer_AdvDemoCPU,
    nnUNetTrainer_AdvDemoGPU,
    nnUNetTrainerDualBN_TestShort,
    nnUNetTrainerDualNorm_TestShort,
    nnUNetTrainerFGSMAT_TestShort,
    nnUNetTrainerGNAug_TestShort,
    nnUNetTrainerNLCE_TestShort,
    nnUNetTrainerNLCE_VAFT_TestShort,
    nnUNetTrainerPGDAT_AdvDemoCPU,
    nnUNetTrainerPGDAT_AdvDemoGPU,
    nnUNetTrainerPGDAT_TestShort,
    nnUNetTrainerSAAT_TestShort,
    nnUNetTrainerVAFA_TestShort,
    nnUNetTrainerVAFT_TestShort,
)
from .vaft import nnUNetTrainerVAFA, nnUNetTrainerVAFT
from .voxel_at import nnUNetTrainerClean, nnUNetTrainerFGSMAT, nnUNetTrainerGNAug, nnUNetTrainerPGDAT

# nnU-Net's -pretrained_weights mapping and one-line trainer errors (see nnunet_adv.training.integration)
integration.install()

__all__ = [
    "nnUNetTrainerAdversarial",
    "nnUNetTrainerClean",
    "nnUNetTrainerPGDAT",
    "nnUNetTrainerFGSMAT",
    "nnUNetTrainerGNAug",
    "nnUNetTrainerPGDAT_TestShort",
    "nnUNetTrainerFGSMAT_TestShort",
    "nnUNetTrainerGNAug_TestShort",
    "nnUNetTrainer_AdvDemoCPU",
    "nnUNetTrainer_AdvDemoGPU",
    "nnUNetTrainerPGDAT_AdvDemoCPU",
    "nnUNetTrainerPGDAT_AdvDemoGPU",
    # the published recipes (docs/recipes.md)
    "nnUNetTrainerVAFT",
    "nnUNetTrainerVAFA",
    "nnUNetTrainerSAAT",
    "nnUNetTrainerSAAT_SEAT",
    "nnUNetTrainerDualBN",
    "nnUNetTrainerDualNorm",
    "nnUNetTrainerNLCE",
    "nnUNetTrainerNLCE_MultiStage",
    "nnUNetTrainerNLCE_VAFT",
    "nnUNetTrainerVAFT_TestShort",
    "nnUNetTrainerVAFA_TestShort",
    "nnUNetTrainerSAAT_TestShort",
    "nnUNetTrainerDualBN_TestShort",
    "nnUNetTrainerDualNorm_TestShort",
    "nnUNetTrainerNLCE_TestShort",
    "nnUNetTrainerNLCE_VAFT_TestShort",
]


def __getattr__(name: str):
    """Recipe settings by name (``nnUNetTrainerPGDAT_eps-8_steps-5``, nnunet_adv.training.names):
    the class is made on first use and kept here, so nnU-Net's lookup, its predictor and pickle
    find it by name."""
    bases = {n: globals()[n] for n in __all__ if isinstance(globals().get(n), type)
             and issubclass(globals()[n], nnUNetTrainerAdversarial) and n != "nnUNetTrainerAdversarial"}
    cls = trainer_from_name(name, bases)
    globals()[name] = cls
    return cls
