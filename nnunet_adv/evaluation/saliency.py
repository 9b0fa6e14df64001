"""Input-gradient saliency of a trained nnU-Net model on one case (the dual-BN paper's comparison).

The saliency of voxel v is |dL/dx_v| (maximum over input channels), with L the cross-entropy of
the whole-volume, Gaussian-stitched logits against the reference labels, taken through the exact
sliding-window gradient of :class:`nnunet_adv.volume.sliding_window.SlidingWindowModel`, in nnU-Net's
preprocessed network space (resampled, normalised; the same space the attacks work in).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_adv.evaluation.figures import central_slice
from nnunet_adv.volume.sliding_window import SlidingWindowModel

_IGNORE = -100


def input_gradient_saliency(model, image_files: Sequence[str], label_file: str,
                            device: torch.device) -> Tuple[np.ndarray, np.ndarray]:
    """(image, saliency): channel 0 of the preprocessed image and max_c |dL/dx_c|, both
    (Z, Y, X) float32 numpy arrays on nnU-Net's preprocessed grid (voxels)."""
    data, seg, _ = model.preprocess(image_files, label_file)
    x = torch.from_numpy(data)[None].to(device).requires_grad_(True)
    target = torch.from_numpy(np.asarray(seg[0], dtype=np.int64))[None].to(device)
    ignore = model.predictor.label_manager.ignore_label
    invalid = target < 0  # nnU-Net marks voxels outside the nonzero mask with -1
    if ignore is not None:
        invalid |= target == ignore
    target = target.masked_fill(invalid, _IGNORE)
    window = SlidingWindowModel(model.networks, model.patch_size)
    loss = F.cross_entropy(window(x), target, ignore_index=_IGNORE)
    grad, = torch.autograd.grad(loss, x)
    return data[0], grad.abs().amax(1)[0].cpu().numpy()


def saliency_slices(model, image_files: Sequence[str], label_file: str,
                    device: torch.device) -> Tuple[np.ndarray, np.ndarray]:
    """Central slices (first axis) of :func:`input_gradient_saliency`: two 2D arrays."""
    image, saliency = input_gradient_saliency(model, image_files, label_file, device)
    return central_slice(image), central_slice(saliency)
