"""Adversarial attacks for segmentation networks (pure PyTorch, no nnU-Net import).

Usage::

    from nnunet_adv.attacks import build_attack, available_attacks
    attack = build_attack("vafa-3d", q_max=20, steps=20, block_size=(32, 32, 32), use_ssim_loss=True)
    x_adv = attack(model, images, labels)   # same shape, dtype and device as images, detached

``images`` ``(B, C, *spatial)`` float (2 or 3 spatial dims); ``labels`` an integer map
``(B, [1,] *spatial)`` or a deep-supervision list of them (full resolution first); ``model(x)``
returns logits ``(B, K, *spatial)`` or a list of them (full resolution first). Budgets are in
the units of the tensor received (see :mod:`nnunet_adv.attacks.base` and ``docs/attacks.md``).

==================  ==========================================================  ============
name                what                                                        file
==================  ==========================================================  ============
``fgsm``            one signed-gradient step (Goodfellow et al. 2015)            fgsm.py
``bim``             iterated FGSM, no random start (Kurakin et al. 2017)         pgd.py
``pgd``             L-inf / L2 PGD, random start, restarts (Madry et al. 2018)   pgd.py
``gn``              Gaussian noise baseline (VAFA paper)                         noise.py
``ifgsm-targeted``  targeted I-FGSM, NLCEN protocol (He et al. 2019)             targeted.py
``segpgd``          SegPGD (Gu et al. 2022)                                      segpgd.py
``cospgd``          CosPGD (Agnihotri et al. 2024)                               cospgd.py
``apgd-ce``         APGD-CE, AutoAttack schedule, lowest-Dice iterate (ROG)     apgd.py
``apgd-rog``        APGD-CE with ROG's evaluation settings (5 steps, 5 restarts) apgd.py
``apgd-dlr``        APGD with ROG's DLR loss (multi-class tasks)                apgd.py
``fab``             targeted FAB, minimum-norm, as ROG adapts it                fab.py
``square``          Square: gradient-free random search (ROG)                   square.py
``autoattack-rog``  ROG's complete AutoAttack, per case the lowest Dice         autoattack.py
``vafa-3d``         VAFA, 3D DCT quantisation attack (Hanif et al. 2023): the    vafa.py
                    authors' q schedule (from q_max, q_min 5) with CE
``vafa-2d``         VAFA on 2D slices                                           vafa.py
``vafa-3d-paper``   VAFA-3D as the paper writes it (q from 1, Dice loss)        vafa.py
``vafa-3d-ref``     VAFA-3D as the authors' code runs it (their tiles in mm,    vafa.py
                    a table per tile, block 32, per-slice rescale, DiceCE
                    loss, clip to the window)
``vafa-2d-ref``     VAFA-2D likewise                                            vafa.py
``slice-rescale``   control: the authors' per-slice rescale alone, no attack    vafa.py
``ensemble``        per-sample worst case (lowest Dice) over attacks            ensemble.py
==================  ==========================================================  ============
"""
from __future__ import annotations

from .apgd import APGDCE, APGDDLR, APGDROG
from .autoattack import AutoAttackROG
from .base import Attack
from .cospgd import CosPGD
from .ensemble import Ensemble
from .fab import FAB
from .fgsm import FGSM
from .noise import GaussianNoise
from .options import canonical_name
from .pgd import BIM, PGD
from .registry import attack_class, attack_defaults, available_attacks, build_attack, register
from .segpgd import SegPGD
from .square import Square
from .targeted import TargetedIFGSM, nlcen_iterations
from .vafa import VAFA2D, VAFA3D, SliceRescale, VAFA2DRef, VAFA3DPaper, VAFA3DRef

register(FGSM, BIM, PGD, GaussianNoise, TargetedIFGSM, SegPGD, CosPGD, APGDCE, APGDROG, APGDDLR, FAB, Square, VAFA3D,
         VAFA2D, VAFA3DPaper, VAFA3DRef, VAFA2DRef, SliceRescale, Ensemble, AutoAttackROG)

__all__ = [
    "Attack", "FGSM", "BIM", "PGD", "GaussianNoise", "TargetedIFGSM", "SegPGD", "CosPGD", "APGDCE", "APGDROG",
    "APGDDLR", "FAB", "Square", "AutoAttackROG",
    "VAFA3D", "VAFA2D", "VAFA3DPaper", "VAFA3DRef", "VAFA2DRef", "SliceRescale", "Ensemble", "build_attack",
    "available_attacks", "attack_defaults", "attack_class", "canonical_name", "nlcen_iterations", "register",
]
