"""Shim that nnU-Net imports by path when it looks up ``-tr NAME``.

nnU-Net imports the modules of an external trainer folder under top-level names and
drops them from sys.modules again; re-exporting from the installed package keeps one
canonical class per trainer (isinstance checks and pickling in worker processes work).
"""
from nnunet_adv.trainers import *  # noqa: F401,F403
from nnunet_adv.trainers import __all__  # noqa: F401


def __getattr__(name):
    # recipe settings by name (nnUNetTrainerPGDAT_eps-8_steps-5): made by nnunet_adv.trainers
    import nnunet_adv.trainers as _trainers

    return getattr(_trainers, name)
