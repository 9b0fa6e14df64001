"""The previous stage of an nnU-Net cascade (``3d_lowres`` before ``3d_cascade_fullres``), for attacks.

As deployed (``nnUNetv2_predict -c 3d_lowres``, then ``-c 3d_cascade_fullres -prev_stage_predictions``)
the low-resolution model segments the (adversarial) raw image; that segmentation, in the raw
geometry, is cropped and resampled with the image by the cascade's preprocessing and appended to
the network input as one one-hot channel per foreground label. :meth:`PreviousStage.network_input`
does exactly this for one raw image (nnU-Net's own predictor and preprocessor), so the attack engine
preprocesses clean and exported images as ``nnUNetv2_predict`` will.

The gradient goes exactly through the cascade network. Through the low-resolution stage's argmax it
cannot; :data:`GRADIENTS` are the two ways offered (``--previous_stage_gradient``):

``fixed``
    the previous stage's channels are held at the clean image's prediction during the attack (no
    gradient through the low-resolution stage); the exported image is then segmented by both stages.
``softmax``
    a differentiable surrogate replaces the one-hot channels: the attacked image channels (network
    units, full-resolution grid) are resampled trilinearly to the low-resolution network grid (nnU-Net
    normalises before it resamples, so both grids hold the same normalised image), the low-resolution
    networks' sliding window gives logits, their softmax is resampled trilinearly back to the
    full-resolution grid and its foreground-label channels replace the one-hot channels. The loss then
    also rises through the previous stage; the deployed prediction still takes its argmax.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

from nnunet_adv.errors import UserError
from nnunet_adv.network import probabilities_back, resample_linear
from nnunet_adv.volume.cascade_options import DEFAULT_GRADIENT, GRADIENTS
from nnunet_adv.volume.folders import configuration_of
from nnunet_adv.volume.sliding_window import SlidingWindowModel
from nnunet_adv.volume.trained_model import TrainedModel


def previous_stage_folder(model_folder: Path) -> Optional[Path]:
    """The model folder of a cascade stage's previous stage (None for a configuration without a
    ``previous_stage``): the same trainer and plans, the configuration the plans name as
    ``previous_stage`` (as nnU-Net's trainer finds it); one line when it is missing."""
    model_folder = Path(model_folder)
    if not (model_folder / "plans.json").is_file():
        return None  # not a model folder: its own check says so
    configuration = configuration_of(model_folder)  # one line for a folder not named as nnU-Net names them
    trainer, plans_name, _ = model_folder.resolve().name.split("__")
    plans = json.loads((model_folder / "plans.json").read_text())
    previous = plans["configurations"].get(configuration, {}).get("previous_stage")
    if not previous:
        return None
    folder = model_folder.parent / f"{trainer}__{plans_name}__{previous}"
    if not (folder / "plans.json").is_file():
        raise UserError(f"{configuration} needs the {previous} model of the same trainer and plans "
                        f"({folder} is missing; train it with nnUNetv2_train DATASET {previous} FOLD -tr {trainer} "
                        f"-p {plans_name})")
    return folder


def check_previous_folds(folder: Path, folds: Sequence, checkpoint: str, configuration: str) -> None:
    """Every fold of the cascade must exist in the previous stage's folder (nnUNetv2_predict of both
    stages takes the same ``-f``)."""
    missing = [str(f) for f in folds if not (Path(folder) / f"fold_{f}" / checkpoint).is_file()]
    if missing:
        raise UserError(f"{configuration} needs the previous stage's fold(s) {', '.join(missing)} with {checkpoint} "
                        f"in {folder}")


class PreviousStage:
    """The low-resolution stage of a cascade: its deployed segmentation and its gradient surrogate.

    Args:
        model: the previous stage (:func:`nnunet_adv.volume.trained_model.load_trained_model`).
        label_manager: the cascade stage's nnU-Net label manager (which labels become channels).
        gradient: one of :data:`GRADIENTS`.
        mirroring: predict the previous stage with nnU-Net's test-time mirroring (as ``nnUNetv2_predict``
            without ``--disable_tta``).
        tile_batch_size: tiles per network call of the surrogate's sliding window.
    """

    def __init__(self, model: TrainedModel, label_manager, gradient: str = DEFAULT_GRADIENT,
                 mirroring: bool = False, tile_batch_size: int = 1):
        if gradient not in GRADIENTS:
            raise UserError(f"previous_stage_gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        self.model, self.gradient = model, gradient
        self.foreground = list(label_manager.foreground_labels)
        self.predictor = model.predictor
        self.predictor.use_mirroring = bool(mirroring)
        self.window = SlidingWindowModel(model.networks, model.patch_size, tile_step_size=0.5, use_gaussian=True,
                                         mirror_axes=model.mirror_axes if mirroring else None,
                                         tile_batch_size=tile_batch_size)

    @property
    def configuration(self) -> str:
        return self.predictor.configuration_name if hasattr(self.predictor, "configuration_name") else "previous stage"

    def segmentation(self, raw: np.ndarray, props: dict) -> np.ndarray:
        """The previous stage's segmentation of a raw image (C, *S_raw) in the raw geometry (1, *S_raw),
        computed as ``nnUNetv2_predict`` computes it (nnU-Net's predictor: preprocessing, sliding window,
        export)."""
        seg = self.predictor.predict_single_npy_array(raw, copy.deepcopy(props), None, None, False)
        return np.asarray(seg, dtype=np.float32)[None]  # as nnU-Net's readers return the written file

    def one_hot(self, seg: np.ndarray, dtype=np.float32) -> np.ndarray:
        """The cascade's extra input channels from the previous stage's labels on the network grid:
        (1, *S) -> (n_foreground, *S), as nnU-Net's predictor builds them."""
        return convert_labelmap_to_one_hot(seg[0], self.foreground, dtype)

    def network_shape(self, raw: np.ndarray, props: dict) -> tuple:
        """Spatial shape of the previous stage's network input for this raw image (its preprocessing)."""
        p = self.predictor
        pre = p.configuration_manager.preprocessor_class(verbose=False)
        data, _, _ = pre.run_case_npy(raw, None, copy.deepcopy(props), p.plans_manager, p.configuration_manager,
                                      p.dataset_json)
        return tuple(data.shape[1:])

    def attacked_channels(self, fixed: torch.Tensor, low_shape: Sequence[int]):
        """What the attack sees as the previous stage's channels: ``fixed`` (1, n_fg, *S) itself, or the
        softmax surrogate, a callable of the image channels (1, C_img, *S) -> (1, n_fg, *S)."""
        if self.gradient == "fixed":
            return fixed
        return _SoftmaxSurrogate(self.window, tuple(low_shape), self.foreground)


class _SoftmaxSurrogate:
    """The ``softmax`` surrogate of the module docstring, as a callable of the image channels."""

    def __init__(self, window: Callable, low_shape: tuple, foreground: Sequence[int]):
        self.window, self.low_shape, self.foreground = window, low_shape, list(foreground)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        low = resample_linear(x.float(), self.low_shape)
        return probabilities_back(self.window, low, tuple(x.shape[2:]))[:, self.foreground]
