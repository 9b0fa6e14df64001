"""Short schedules of the recipes, for tests and the demo. NOT for real training.

``*_TestShort``: a couple of iterations, few attack steps (CI and smoke tests).
``*_AdvDemoCPU`` / ``*_AdvDemoGPU``: the schedules ``nnUNetv2_adv_demo`` uses.
``nnUNetTrainer_AdvDemo*`` is the clean baseline: standard training, same schedule,
with the robust pseudo-Dice logged in validation so both models are monitored alike.

Each is a recipe-settings name (:mod:`nnunet_adv.training.names`: what ``-tr
nnUNetTrainerPGDAT_ep-1_its-2`` would train) kept under the name users and earlier runs know.
"""
from nnunet_adv.training.adversarial_trainer import nnUNetTrainerAdversarial
from nnunet_adv.training.names import trainer_from_name

from .dual_norm import nnUNetTrainerDualBN, nnUNetTrainerDualNorm
from .nlce import nnUNetTrainerNLCE, nnUNetTrainerNLCE_VAFT
from .saat import nnUNetTrainerSAAT
from .vaft import nnUNetTrainerVAFA, nnUNetTrainerVAFT
from .voxel_at import nnUNetTrainerFGSMAT, nnUNetTrainerGNAug, nnUNetTrainerPGDAT

#: one epoch of two iterations and one validation iteration, with a one-step robust validation
TEST = "ep-1_its-2_valits-1_valsteps-1"


def _short(name: str, base: type, settings: str) -> type:
    """``name``: ``base`` with the name-grammar ``settings`` (``ep-1_its-2``), a class of this module."""
    cls = trainer_from_name(f"{base.__name__}_{settings}", {base.__name__: base})
    return type(name, (cls,), {"__module__": __name__, "__qualname__": name,
                               "__doc__": f"{base.__name__} with {settings} (nnunet_adv.training.names)."})


nnUNetTrainerPGDAT_TestShort = _short("nnUNetTrainerPGDAT_TestShort", nnUNetTrainerPGDAT,
                                      f"{TEST}_steps-2_alphaeps-1.25")
nnUNetTrainerFGSMAT_TestShort = _short("nnUNetTrainerFGSMAT_TestShort", nnUNetTrainerFGSMAT, "ep-1_its-2_valits-1")
nnUNetTrainerGNAug_TestShort = _short("nnUNetTrainerGNAug_TestShort", nnUNetTrainerGNAug, "ep-1_its-2_valits-1")
nnUNetTrainerVAFT_TestShort = _short("nnUNetTrainerVAFT_TestShort", nnUNetTrainerVAFT, f"{TEST}_steps-2")
nnUNetTrainerVAFA_TestShort = _short("nnUNetTrainerVAFA_TestShort", nnUNetTrainerVAFA, f"{TEST}_steps-2")
# three short epochs, a decision every epoch (epoch 1: m <- 2), checkpoint_latest every epoch (so that
# --c can be tested on a run that stopped before its last epoch)
nnUNetTrainerSAAT_TestShort = _short("nnUNetTrainerSAAT_TestShort", nnUNetTrainerSAAT,
                                     "ep-3_its-2_valits-1_valsteps-1_save-1_period-1")
nnUNetTrainerDualBN_TestShort = _short("nnUNetTrainerDualBN_TestShort", nnUNetTrainerDualBN, f"{TEST}_steps-2")
nnUNetTrainerDualNorm_TestShort = _short("nnUNetTrainerDualNorm_TestShort", nnUNetTrainerDualNorm, f"{TEST}_steps-2")
nnUNetTrainerNLCE_TestShort = _short("nnUNetTrainerNLCE_TestShort", nnUNetTrainerNLCE, TEST)
nnUNetTrainerNLCE_VAFT_TestShort = _short("nnUNetTrainerNLCE_VAFT_TestShort", nnUNetTrainerNLCE_VAFT,
                                          f"{TEST}_steps-2")

# The demo trains the clean model, then fine-tunes PGD-AT from it (as the papers do). On a CPU: the 2d
# configuration (the demo dataset's 40 x 40 slices), 700 clean iterations, then 150 of PGD-AT with 3
# attack steps instead of 10, step 2.5 eps / 3 (issue 11's investigation: where the robustness gap
# shows, in 20 minutes). The clean baseline is standard training (loss on clean inputs only).
nnUNetTrainer_AdvDemoCPU = _short("nnUNetTrainer_AdvDemoCPU", nnUNetTrainerAdversarial,
                                  "clean-1_adv-0_ep-14_its-50_valits-2_valsteps-2")
nnUNetTrainer_AdvDemoGPU = _short("nnUNetTrainer_AdvDemoGPU", nnUNetTrainerAdversarial,
                                  "clean-1_adv-0_ep-50_its-100_valits-20_valsteps-2")
nnUNetTrainerPGDAT_AdvDemoCPU = _short("nnUNetTrainerPGDAT_AdvDemoCPU", nnUNetTrainerPGDAT,
                                       f"ep-3_its-50_valits-2_valsteps-2_steps-3_alphaeps-{2.5 / 3!r}")
nnUNetTrainerPGDAT_AdvDemoGPU = _short("nnUNetTrainerPGDAT_AdvDemoGPU", nnUNetTrainerPGDAT,
                                       "ep-25_its-100_valits-20")
