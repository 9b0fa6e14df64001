"""Trainers nnU-Net loads by name (``nnUNetv2_train ... -tr NAME``).

Installed as the package ``nnunet_adv.trainers``; nnU-Net reaches them through the
shim in ``nnunet_adv/_ext`` (see nnunet_adv.ext_trainer).
"""
__all__ = []
