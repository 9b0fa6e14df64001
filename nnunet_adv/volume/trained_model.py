"""Load a trained nnU-Net model folder for attacks (networks we can differentiate).

nnU-Net's ``nnUNetPredictor`` loads a model folder (plans, dataset.json, one checkpoint
per fold) and rebuilds the network through the trainer's ``build_network_architecture``;
it then predicts under ``torch.inference_mode()``. We reuse its loading and keep one
network per fold in eval mode, without deep supervision, so that attacks can take
input gradients through them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch import nn

from nnunet_adv.network import unwrap_network


@dataclass
class TrainedModel:
    """A trained nnU-Net model ready for attacks.

    Attributes:
        networks: one eval-mode network per fold (full-resolution logits output).
        predictor: the initialised nnUNetPredictor (plans, configuration, label manager, ...).
        patch_size: network patch size in voxels, from the plans.
        mirror_axes: nnU-Net's ``inference_allowed_mirroring_axes`` (test-time mirroring).
        folder: the model folder (``TRAINER__PLANS__CONFIGURATION``) it was loaded from, if any.
    """

    networks: List[nn.Module]
    predictor: object
    patch_size: Tuple[int, ...]
    mirror_axes: Optional[Tuple[int, ...]]
    folder: Optional[Path] = None

    @property
    def trainer_name(self) -> str:
        return self.predictor.trainer_name

    def preprocess(self, image_files: Sequence[str], seg_file: Optional[str] = None):
        """nnU-Net's own preprocessing of one case.

        Returns:
            data: (C, *spatial) float32 normalised network input (numpy),
            seg: (1, *spatial) int label map or None, properties: nnU-Net's case properties.
        """
        p = self.predictor
        preprocessor = p.configuration_manager.preprocessor_class(verbose=False)
        data, seg, props = preprocessor.run_case(list(map(str, image_files)),
                                                 None if seg_file is None else str(seg_file),
                                                 p.plans_manager, p.configuration_manager, p.dataset_json)
        return data.astype(np.float32), seg, props


def load_trained_model(model_folder, folds: Sequence = (0,), checkpoint_name: str = "checkpoint_final.pth",
                       device: torch.device = torch.device("cpu")) -> TrainedModel:
    """Load ``model_folder`` (``.../TRAINER__PLANS__CONFIG``) for the given folds."""
    model_folder = Path(model_folder)
    if not (model_folder / "plans.json").is_file():
        raise FileNotFoundError(f"{model_folder} is not a trained nnU-Net model folder (no plans.json)")
    for f in folds:
        ckpt = model_folder / f"fold_{f}" / checkpoint_name
        if not ckpt.is_file():
            raise FileNotFoundError(f"missing checkpoint {ckpt}")
    predictor = nnUNetPredictor(device=device, perform_everything_on_device=device.type != "cpu",
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=tuple(folds),
                                                   checkpoint_name=checkpoint_name)
    networks = []
    for params in predictor.list_of_parameters:
        net = copy.deepcopy(unwrap_network(predictor.network))
        net.load_state_dict(params)
        networks.append(net.to(device).eval())
    axes = predictor.allowed_mirroring_axes
    return TrainedModel(networks=networks, predictor=predictor,
                        patch_size=tuple(predictor.configuration_manager.patch_size),
                        mirror_axes=tuple(axes) if axes else None, folder=model_folder)
