"""VAFT: Volumetric Adversarial Frequency Training (Hanif et al., MICCAI 2023), and "M_VAFA".

Per training batch, VAFA (the frequency-domain attack, :mod:`nnunet_adv.attacks.vafa`) is
crafted against the current network in eval mode, then::

    loss = L(f(x), y) + L(f(x_adv), y) + FC(f(x), f(x_adv))       (weights 1, 1, 1)
    FC(z, z') = sum |DCT(z) - DCT(z')| / sum |DCT(z)|               (full-resolution logits, fp32)

``nnUNetTrainerVAFA`` ("M_VAFA" in the paper) trains on the adversarial loss only.

Block size: VAFA splits the image into cubes (3D; squares of each slice in 2D) whose side must
fit the nnU-Net patch. The published block is 32; the trainer takes the largest of
``vafa_block_candidates`` (32, 16, 8) that divides *every* blocked patch axis (no padding,
e.g. 16 for a 80x192x160 patch); if none divides, the largest candidate not larger than the
smallest axis, and VAFA pads the far end of each axis (replicate) and crops back. With the
authors' table per tile (3D ``-ref``) the blocks divide a tile, so the rule applies to one tile of
the patch. An explicit ``"block_size"`` in ``attack_kwargs`` wins.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

from nnunet_adv.attack_config import attack_defaults
from nnunet_adv.attacks.vafa_tiles import reference_tile
from nnunet_adv.losses import frequency_consistency
from nnunet_adv.training.adversarial_trainer import RecipeError, nnUNetTrainerAdversarial


def vafa_block_size(patch_size: Sequence[int], candidates: Sequence[int] = (32, 16, 8)) -> int:
    """Block side for VAFA on a patch: the largest candidate dividing every axis, else the
    largest candidate not exceeding the smallest axis (VAFA then pads), else the smallest axis.

    >>> vafa_block_size((80, 192, 160))
    16
    >>> vafa_block_size((32, 32, 32))
    32
    >>> vafa_block_size((20, 40, 40))
    16
    """
    patch = [int(p) for p in patch_size]
    ordered = sorted({int(c) for c in candidates}, reverse=True)
    for c in ordered:
        if all(p % c == 0 for p in patch):
            return c
    fitting = [c for c in ordered if c <= min(patch)]
    return fitting[0] if fitting else min(patch)


class nnUNetTrainerVAFT(nnUNetTrainerAdversarial):
    """VAFT: clean + VAFA-adversarial + frequency-consistency loss, all weights 1.

    ``vafa_variant = "paper"`` (default) trains against the published VAFA; ``"ref"`` against VAFA
    as the authors' code runs it (``vafa-3d-ref`` / ``vafa-2d-ref``: the per-slice rescale inside
    96^3 tiles, clipped to the window; crafted with the trainer's own loss, as the reference's
    VAFT crafts with its training loss). E.g. ``class MyVAFT(nnUNetTrainerVAFT): vafa_variant = "ref"``.

    Published defaults (VAFA paper, UNETR on Synapse): q_max 20 (10 for ACDC), 20 steps,
    SSIM term on, q_min 5 (ref. code; paper 1), block 32^3 (see the module docstring for
    patches that 32 does not divide). ``vafa-3d`` for 3D configurations, ``vafa-2d`` (h x h
    blocks of the 2D input) for 2D ones, with the same options. Crafted in eval mode.
    Robust validation runs the same VAFA with 5 steps.
    """

    attack_name = "vafa-3d"            # vafa-2d is chosen for 2D configurations (configure_attack)
    vafa_variant: str = "paper"        # "paper": the published algorithm; "ref": as the authors' code runs it
    attack_kwargs = {"q_max": 20.0, "q_min": 5.0, "steps": 20, "use_ssim_loss": True}
    vafa_block_candidates: Tuple[int, ...] = (32, 16, 8)
    alpha_over_eps = None              # VAFA has no Lp budget: eps/alpha are not used
    attack_in_train_mode = False
    clean_loss_weight = 1.0
    adversarial_loss_weight = 1.0
    frequency_consistency_weight = 1.0
    val_attack_overrides = {"steps": 5}

    def configure_attack(self) -> None:
        if not self.frequency_consistency_weight >= 0:
            raise RecipeError(type(self).__name__, f"frequency_consistency_weight must be >= 0 "
                                                   f"(got {self.frequency_consistency_weight})")
        patch = tuple(self.configuration_manager.patch_size)
        if self.attack_name not in ("vafa-3d", "vafa-2d", "vafa-3d-ref", "vafa-2d-ref"):
            return  # a subclass chose another attack: leave it alone
        if self.vafa_variant not in ("paper", "ref"):
            raise RecipeError(type(self).__name__, f"vafa_variant must be 'paper' or 'ref', got {self.vafa_variant!r}")
        self.attack_name = (("vafa-3d" if len(patch) == 3 else "vafa-2d")
                            + ("-ref" if self.vafa_variant == "ref" else ""))
        if "block_size" not in self.attack_kwargs:
            side = vafa_block_size(self._blocked_extent(patch), self.vafa_block_candidates)
            self.attack_kwargs = {**self.attack_kwargs, "block_size": (side,) * len(patch)}

    def _blocked_extent(self, patch: Tuple[int, ...]) -> Tuple[int, ...]:
        """What VAFA's blocks must fit (voxels): the patch, or, with the authors' table per tile (3D
        ``-ref``), one tile of it, which on tiles smaller than the patch is what the blocks divide."""
        options = {**attack_defaults(self.attack_name), **self.attack_kwargs}
        if len(patch) != 3 or not self.attack_name.endswith("-ref") or not options["tile_tables"]:
            return patch
        try:
            tile = reference_tile(options["rescale_tile"], options["tile_mm"], self.configuration_manager.spacing)
        except ValueError:
            return patch  # a bad tile option: the recipe's validation reports it in one line
        return patch if tile is None else tuple(min(t, p) for t, p in zip(tile, patch))

    def extra_loss_terms(self, outputs: Dict[str, object], target) -> Dict[str, torch.Tensor]:
        if self.frequency_consistency_weight <= 0 or "clean" not in outputs or "adv" not in outputs:
            return {}
        return {"fc": self.frequency_consistency_weight * frequency_consistency(outputs["clean"], outputs["adv"])}


class nnUNetTrainerVAFA(nnUNetTrainerVAFT):
    """"M_VAFA" (VAFA paper ablation): train on VAFA examples only, no clean loss, no FC term."""

    clean_loss_weight = 0.0
    adversarial_loss_weight = 1.0
    frequency_consistency_weight = 0.0
