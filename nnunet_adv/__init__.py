"""nnunet_adv: adversarial attacks, adversarial training and robustness evaluation for nnU-Net v2.

This file stays import-light on purpose: Python imports it at every start-up through
the ``nnunet_adv.pth`` hook (see :mod:`nnunet_adv.ext_trainer`), so it must not import
torch or nnU-Net.
"""
__version__ = "0.1.0"
