"""The folder nnU-Net scans for external trainers (see nnunet_adv.ext_trainer).

Its only module, nnunet_adv_trainers, re-exports nnunet_adv.trainers.
"""
