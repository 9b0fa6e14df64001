"""Short schedules of the recipes, for tests and the demo. NOT for real training.

``*_TestShort``: a couple of iterations, few attack steps (CI and smoke tests).
``*_AdvDemoCPU`` / ``*_AdvDemoGPU``: the schedules ``nnUNetv2_adv_demo`` uses.
``nnUNetTrainer_AdvDemo*`` is the clean baseline: standard training, same schedule,
with the robust pseudo-Dice logged in validation so both models are monitored alike.
"""
from nnunet_adv.training.adversarial_trainer import nnUNetTrainerAdversarial
from .voxel_at import nnUNetTrainerFGSMAT, nnUNetTrainerGNAug, nnUNetTrainerPGDAT

TEST_SCHEDULE = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}
# The demo trains the clean model, then fine-tunes PGD-AT from it (as the papers do). On a CPU: the 2d
# configuration (the demo dataset's 40 x 40 slices), CLEAN_ITERATIONS clean iterations, then 150 of PGD-AT
# with 3 attack steps instead of 10 (issue 11's investigation: where the robustness gap shows, in 20 minutes).
DEMO_SCHEDULE_CPU = {"num_epochs": 14, "num_iterations_per_epoch": 50, "num_val_iterations_per_epoch": 2}
DEMO_FINETUNE_CPU = {"num_epochs": 3, "num_iterations_per_epoch": 50, "num_val_iterations_per_epoch": 2}
DEMO_SCHEDULE_GPU = {"num_epochs": 50, "num_iterations_per_epoch": 100, "num_val_iterations_per_epoch": 20}
DEMO_FINETUNE_GPU = {"num_epochs": 25, "num_iterations_per_epoch": 100, "num_val_iterations_per_epoch": 20}
_SHORT_PGD = {"steps": 2, "random_start": True, "norm": "linf"}


class nnUNetTrainerPGDAT_TestShort(nnUNetTrainerPGDAT):
    training_schedule = TEST_SCHEDULE
    attack_kwargs = _SHORT_PGD
    alpha_over_eps = 2.5 / 2
    val_attack_overrides = {"steps": 1}


class nnUNetTrainerFGSMAT_TestShort(nnUNetTrainerFGSMAT):
    training_schedule = TEST_SCHEDULE


class nnUNetTrainerGNAug_TestShort(nnUNetTrainerGNAug):
    training_schedule = TEST_SCHEDULE


class nnUNetTrainer_AdvDemoCPU(nnUNetTrainerAdversarial):
    """Clean training (no attack in the step) with the demo's CPU schedule."""

    training_schedule = DEMO_SCHEDULE_CPU
    clean_loss_weight = 1.0
    adversarial_loss_weight = 0.0
    val_attack_overrides = {"steps": 2}


class nnUNetTrainer_AdvDemoGPU(nnUNetTrainer_AdvDemoCPU):
    training_schedule = DEMO_SCHEDULE_GPU


class nnUNetTrainerPGDAT_AdvDemoCPU(nnUNetTrainerPGDAT):
    """PGD-AT at 4/255 with 3 steps of 2.5 eps / 3 (Madry's ratio), fine-tuned for the demo's CPU schedule."""

    training_schedule = DEMO_FINETUNE_CPU
    attack_kwargs = {"steps": 3, "random_start": True, "norm": "linf"}
    alpha_over_eps = 2.5 / 3
    val_attack_overrides = {"steps": 2}


class nnUNetTrainerPGDAT_AdvDemoGPU(nnUNetTrainerPGDAT):
    training_schedule = DEMO_FINETUNE_GPU


# ---- the published recipes (issue 6): a couple of iterations, few attack steps ----
from .dual_norm import nnUNetTrainerDualBN, nnUNetTrainerDualNorm  # noqa: E402
from .nlce import nnUNetTrainerNLCE, nnUNetTrainerNLCE_VAFT  # noqa: E402
from .saat import nnUNetTrainerSAAT  # noqa: E402
from .vaft import nnUNetTrainerVAFA, nnUNetTrainerVAFT  # noqa: E402

_SHORT_VAFA = {"q_max": 20.0, "q_min": 5.0, "steps": 2, "use_ssim_loss": True}


class nnUNetTrainerVAFT_TestShort(nnUNetTrainerVAFT):
    training_schedule = TEST_SCHEDULE
    attack_kwargs = _SHORT_VAFA
    val_attack_overrides = {"steps": 1}


class nnUNetTrainerVAFA_TestShort(nnUNetTrainerVAFA):
    training_schedule = TEST_SCHEDULE
    attack_kwargs = _SHORT_VAFA
    val_attack_overrides = {"steps": 1}


class nnUNetTrainerSAAT_TestShort(nnUNetTrainerSAAT):
    """Three short epochs, a decision every epoch (epoch 1: m <- 2), checkpoint_latest every
    epoch (so that ``--c`` can be tested on a run that stopped before its last epoch)."""

    training_schedule = {**TEST_SCHEDULE, "num_epochs": 3, "save_every": 1}
    saat_check_period = 1
    val_attack_overrides = {"steps": 1}


class nnUNetTrainerDualBN_TestShort(nnUNetTrainerDualBN):
    training_schedule = TEST_SCHEDULE
    attack_kwargs = _SHORT_PGD
    val_attack_overrides = {"steps": 1}


class nnUNetTrainerDualNorm_TestShort(nnUNetTrainerDualNorm):
    training_schedule = TEST_SCHEDULE
    attack_kwargs = _SHORT_PGD
    val_attack_overrides = {"steps": 1}


class nnUNetTrainerNLCE_TestShort(nnUNetTrainerNLCE):
    training_schedule = TEST_SCHEDULE
    val_attack_overrides = {"steps": 1}


class nnUNetTrainerNLCE_VAFT_TestShort(nnUNetTrainerNLCE_VAFT):
    training_schedule = TEST_SCHEDULE
    attack_kwargs = _SHORT_VAFA
    val_attack_overrides = {"steps": 1}
