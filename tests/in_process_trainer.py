"""Trainers made in this process from the test tree's plans, with an even smaller network: the one factory
of the in-process training tests (tests/training)."""
import copy
import json
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from nnunet_tree import DATASET_NAME

#: features per stage of the in-process trainers' networks (the tree's planned networks are already tiny)
SMALL_FEATURES = [4, 8, 16, 16, 16, 16, 16, 16]


def small_plans(preprocessed: Path, configuration: str, patch_3d: Optional[Sequence[int]] = (16, 16, 16),
                batch_dice: Optional[bool] = None) -> Tuple[dict, dict]:
    """(plans, dataset.json) of the tree's dataset under ``preprocessed``: the same topology with
    :data:`SMALL_FEATURES`, a 3D patch of ``patch_3d`` voxels (None keeps the planned one) and
    ``continue_training`` as nnUNetv2_train sets it."""
    folder = Path(preprocessed) / DATASET_NAME
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    config = plans["configurations"][configuration]
    arch = config["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = SMALL_FEATURES[:arch["n_stages"]]
    if configuration == "3d_fullres" and patch_3d is not None:
        config["patch_size"] = list(patch_3d)
    if batch_dice is not None:
        config["batch_dice"] = batch_dice
    plans["continue_training"] = False
    return plans, json.loads((folder / "dataset.json").read_text())


def make_trainer(cls, tree, configuration: str = "2d", deep_supervision: Optional[bool] = None, monkeypatch=None,
                 initialize: bool = True, patch_3d: Optional[Sequence[int]] = (16, 16, 16), seed: Optional[int] = 0,
                 dataset_json_update: Optional[dict] = None):
    """``cls`` made as nnUNetv2_train makes it, on the CPU, with the tree's nnU-Net folders set in this
    process (undone by ``monkeypatch``).

    Args:
        deep_supervision: set ``enable_deep_supervision`` (None keeps the trainer's own).
        seed: ``torch.manual_seed`` before the network is made (None: the global state, for tests of
            a trainer's own seeding).
        dataset_json_update: keys replaced in dataset.json (e.g. region-based labels).
    """
    tree.set_in_process(monkeypatch)
    plans, dataset_json = small_plans(tree.preprocessed, configuration, patch_3d)
    dataset_json.update(copy.deepcopy(dataset_json_update or {}))
    if seed is not None:
        torch.manual_seed(seed)
    trainer = cls(plans, configuration, 0, dataset_json, torch.device("cpu"))
    if deep_supervision is not None:
        trainer.enable_deep_supervision = deep_supervision
    if initialize:
        trainer.initialize()
    return trainer


def build_network(cls, trainer, deep_supervision: bool = False) -> torch.nn.Module:
    """The network as nnU-Net's predictor builds it: ``cls``'s static method, with ``trainer``'s plans."""
    return cls.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                          trainer.num_input_channels, trainer.label_manager.num_segmentation_heads,
                                          enable_deep_supervision=deep_supervision)
