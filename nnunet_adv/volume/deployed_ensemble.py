"""An ensemble of nnU-Net configurations as ``nnUNetv2_find_best_configuration`` tells the user to deploy it.

``nnUNetv2_find_best_configuration`` writes ``$nnUNet_results/DATASET/inference_information.json`` (and
``inference_instructions.txt``): the selected model or models (``trainer``, ``plans_identifier``,
``configuration`` each), the folds, and the postprocessing file. With several models the user runs
``nnUNetv2_predict ... --save_probabilities`` per member, ``nnUNetv2_ensemble`` (the members' softmax
probabilities averaged in the raw geometry, then argmax) and ``nnUNetv2_apply_postprocessing``.

Not to be confused with the attack ``ensemble`` (:mod:`nnunet_adv.attacks.ensemble`: a worst case over
attacks on one model). Here one attack runs on the average of the members' probabilities
(:class:`AveragedProbabilities`): its logits are ``log(mean_k softmax(member_k(x)))``, so that the
attacks' cross-entropy is the ensemble's, and the gradient goes exactly through every member at once.
Postprocessing (connected components) is not differentiable: the attack targets the averaged
probabilities; the evaluation applies the postprocessing as deployed.

Grids. The attack runs on the first member's network grid (the attack grid: its preprocessed image
``x0_A``, the perturbation and the budget live there). A member that preprocesses the case to the same
grid sees the attacked image itself. A member B with another grid (on anisotropic data ``2d`` keeps the
case's through-plane spacing, ``3d_fullres`` resamples it to the plans' spacing) is reached through
linear resampling (:class:`OnAnotherGrid`): it sees ``x0_B + resample(x - x0_A)`` on its grid, and its
softmax probabilities are resampled back to the attack grid before the average. This is exact up to
the resampling: nnU-Net's preprocessing (``DefaultPreprocessor.run_case_npy``: transpose, crop to the
nonzero box, normalise, resample) normalises before it resamples, so with the same transpose,
normalisation schemes and intensity properties (checked, :func:`normalisation_differs`) both members
hold the same normalised image before resampling and a perturbation in network units maps to B by
resampling alone. The resampling is ``F.interpolate`` (trilinear, ``align_corners=False``), a
differentiable surrogate of nnU-Net's order-3 spline resampling of the image (order 1 for the
probabilities, as nnU-Net resamples them). The attack.json records per case which member was reached
how, with both grids' shapes; the evaluation predicts the exported images with the stock commands, so
its numbers are the deployed ensemble's whatever the surrogate.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from nnunet_adv.errors import UserError
from nnunet_adv.network import at_least_float32, probabilities_back, resample_linear

INFERENCE_INFORMATION = "inference_information.json"


@dataclass
class DeployedEnsemble:
    """The models ``nnUNetv2_find_best_configuration`` selected.

    Attributes:
        members: the members' model folders (``TRAINER__PLANS__CONFIGURATION``), in the file's order.
        folds: the folds it evaluated (``nnUNetv2_predict -f``).
        postprocessing_file: its ``postprocessing.pkl`` (``nnUNetv2_apply_postprocessing -pp_pkl_file``).
        source: the inference_information.json read.
    """

    members: List[Path]
    folds: list
    postprocessing_file: Optional[Path]
    source: Path

    @property
    def name(self) -> str:
        """``ensemble_2d+3d_fullres``: the configurations (trainer and plans where they differ)."""
        parts = [m.name.split("__") for m in self.members]
        keep = [i for i in range(3) if len({p[i] for p in parts}) > 1] or [2]
        return "ensemble_" + "+".join("__".join(p[i] for i in keep) for p in parts)

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1


def read_inference_information(path=None, dataset=None) -> DeployedEnsemble:
    """``path`` (the json, or the folder holding it), or ``$nnUNet_results/DATASET/inference_information.json``
    for ``dataset`` (name or id); every member's model folder must be there (one line naming what is not)."""
    from nnunet_adv.volume.folders import dataset_results_folder  # nnU-Net: only when an ensemble is asked for

    if path is None:
        if dataset is None:
            raise UserError("--inference_information without a file needs -d DATASET (it reads "
                            "$nnUNet_results/DATASET/inference_information.json)")
        path = dataset_results_folder(dataset) / INFERENCE_INFORMATION
    path = Path(path)
    if path.is_dir():
        path = path / INFERENCE_INFORMATION
    if not path.is_file():
        raise UserError(f"{path} does not exist: run nnUNetv2_find_best_configuration first (it writes it)")
    try:
        info = json.loads(path.read_text())
        best = info["best_model_or_ensemble"]
        selected = best["selected_model_or_models"]
        members = [path.parent / f"{m['trainer']}__{m['plans_identifier']}__{m['configuration']}" for m in selected]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not an inference_information.json of nnUNetv2_find_best_configuration "
                        f"({type(e).__name__}: {e})") from None
    missing = [m.name for m in members if not (m / "plans.json").is_file()]
    if missing:
        raise UserError(f"the ensemble in {path.name} needs the model(s) {', '.join(missing)} in {path.parent}")
    pp = best.get("postprocessing_file")
    postprocessing = None
    if pp:
        postprocessing = Path(pp)
        if not postprocessing.is_file():  # a moved results folder: the same path below the dataset's folder
            parts = postprocessing.parts
            below = parts[parts.index(path.parent.name) + 1:] if path.parent.name in parts else ()
            postprocessing = path.parent.joinpath(*below) if below else postprocessing
            if not postprocessing.is_file():
                raise UserError(f"the postprocessing file {pp} named in {path} does not exist")
    return DeployedEnsemble(members=members, folds=[f if f == "all" else int(f) for f in info.get("folds", [0])],
                            postprocessing_file=postprocessing, source=path)


class AveragedProbabilities(nn.Module):
    """Members' sliding windows, their softmax probabilities averaged, returned as log-probabilities.

    Args:
        windows: one whole-volume model per member on the attack grid: (B, C, *S) -> logits (B, K, *S), or
            an :class:`OnAnotherGrid` (-> probabilities (B, K, *S), already softmax).
    Shapes: (B, C, *S) -> (B, K, *S) ``log(mean_k softmax(windows[k](x)))`` (its softmax is the average).
    """

    def __init__(self, windows: Sequence[nn.Module]):
        super().__init__()
        self.windows = nn.ModuleList(windows)

    def forward(self, x):
        mean = sum(w(x) if isinstance(w, OnAnotherGrid) else torch.softmax(at_least_float32(w(x)), 1)
                   for w in self.windows) / len(self.windows)
        return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))


class OnAnotherGrid(nn.Module):
    """A member whose network grid is not the attack grid, seen from the attack grid (module docstring).

    Args:
        window: the member's whole-volume model, (1, C, *S_B) -> logits (1, K, *S_B).
        x0: the attack grid's clean network image x0_A, (1, C, *S_A) (network units).
        x0_other: the member's own preprocessing of the same case x0_B, (1, C, *S_B).
        mask: the member's nnU-Net nonzero mask (1, 1, *S_B) where its normalisation uses one (voxels nnU-Net
            keeps at 0 whatever the image), else None.
    Shapes: (1, C, *S_A) -> probabilities (1, K, *S_A): ``resample_A(softmax(window(x0_B + mask *
    resample_B(x - x0_A))))``; at ``x = x0_A`` the member sees exactly its own preprocessing.
    """

    def __init__(self, window: nn.Module, x0: torch.Tensor, x0_other: torch.Tensor,
                 mask: Optional[torch.Tensor] = None):
        super().__init__()
        self.window, self.x0, self.x0_other, self.mask = window, x0, x0_other, mask

    def forward(self, x):
        moved = resample_linear(x - self.x0, self.x0_other.shape[2:])
        if self.mask is not None:
            moved = moved * self.mask
        return probabilities_back(self.window, self.x0_other + moved, x.shape[2:])


def normalisation_differs(first, other) -> Optional[str]:
    """What keeps one perturbation in network units from meaning the same for two members (nnU-Net's
    ``PlansManager``, ``ConfigurationManager`` pairs): their transpose, normalisation schemes, masks or
    intensity properties; None where they agree (module docstring)."""
    (plans_a, cfg_a), (plans_b, cfg_b) = first, other
    for what, a, b in (("transpose", plans_a.transpose_forward, plans_b.transpose_forward),
                       ("normalisation", cfg_a.normalization_schemes, cfg_b.normalization_schemes),
                       ("use_mask_for_norm", cfg_a.use_mask_for_norm, cfg_b.use_mask_for_norm)):
        if list(a) != list(b):
            return f"{what} {list(a)} vs {list(b)}"
    if plans_a.foreground_intensity_properties_per_channel != plans_b.foreground_intensity_properties_per_channel:
        return "foreground intensity properties"
    return None


#: attack.json's per-case key: the network grid of every member and how the attack reached it
GRIDS_KEY = "ensemble_grids"


def grid_record(member: str, shape: Sequence[int], attack_grid: Optional[Sequence[int]] = None) -> dict:
    """One member's entry of :data:`GRIDS_KEY`: its network shape and how the attack reached it (the attack
    grid itself, the same grid, or linear resampling from the attack grid ``attack_grid``)."""
    if attack_grid is None:
        how = "attack grid"
    elif tuple(attack_grid) == tuple(shape):
        how = "same grid"
    else:
        how = f"linear resampling from the attack grid {list(attack_grid)}"
    return {"member": member, "network_shape": list(shape), "reached_through": how}


def resampling_note(name: str, cases: Dict[str, dict]) -> Optional[str]:
    """A line for the report where the attack reached a member through linear resampling (``cases``:
    attack.json's per-case records); None where every member shares the attack grid."""
    resampled = {}
    for case, record in sorted(cases.items()):
        grids = record.get(GRIDS_KEY) or []
        for entry in grids[1:]:
            if entry["reached_through"].startswith("linear"):
                resampled.setdefault(entry["member"], []).append(
                    f"{case}: {grids[0]['network_shape']} -> {entry['network_shape']}")
    if not resampled:
        return None
    first = next(r[GRIDS_KEY][0]["member"] for r in cases.values() if r.get(GRIDS_KEY))
    members = "; ".join(f"`{m}` in {len(v)} case(s) ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                        for m, v in resampled.items())
    return (f"`{name}`: the attack runs on the network grid of `{first}`; members preprocessing a case to another "
            f"grid were reached through linear resampling (the perturbation resampled onto their grid, their "
            f"probabilities back; a differentiable surrogate of nnU-Net's order-3 resampling): {members}. The "
            f"numbers are still the deployed ensemble's (stock prediction of the exported images).")
