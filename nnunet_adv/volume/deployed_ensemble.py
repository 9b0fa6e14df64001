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
The members must preprocess a case to the same network grid (the same spacing and normalisation, e.g.
``2d`` and ``3d_fullres`` of isotropic data): the one perturbation is then every member's. Postprocessing
(connected components) is not differentiable: the attack targets the averaged probabilities; the
evaluation applies the postprocessing as deployed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import nn

from nnunet_adv.errors import UserError

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
        windows: one whole-volume model per member, each (B, C, *S) -> logits (B, K, *S) on the same grid.
    Shapes: (B, C, *S) -> (B, K, *S) ``log(mean_k softmax(windows[k](x)))`` (its softmax is the average).
    """

    def __init__(self, windows: Sequence[nn.Module]):
        super().__init__()
        self.windows = nn.ModuleList(windows)

    def forward(self, x):
        mean = sum(torch.softmax(w(x).float(), 1) for w in self.windows) / len(self.windows)
        return torch.log(mean.clamp_min(torch.finfo(mean.dtype).tiny))
