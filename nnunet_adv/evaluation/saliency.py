"""Input-gradient saliency of a trained nnU-Net model on one case (the dual-BN paper's comparison).

The saliency of voxel v is |dL/dx_v| (maximum over input channels), with L the cross-entropy of
the whole-volume, Gaussian-stitched logits against the reference labels, taken through the exact
sliding-window gradient of :class:`nnunet_adv.volume.sliding_window.SlidingWindowModel`, in nnU-Net's
preprocessed network space (resampled, normalised; the same space the attacks work in).

Its quality number (:func:`inside_share`) is the share of the saliency's mass that lies inside the
labelled structures, against the structures' share of the voxels (what a map spread evenly would
give): the dual-BN paper's "more interpretable saliency" as one number a reader can check.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_adv.evaluation.figures import central_slice
from nnunet_adv.volume.sliding_window import SlidingWindowModel

_IGNORE = -100


@dataclass(frozen=True)
class CaseSaliency:
    """One case's saliency: the central slices drawn in saliency.png and the whole volume's numbers.

    image, saliency: 2D float32 (Y, X) central slices (first axis) of the preprocessed image (channel 0)
    and of max_c |dL/dx_c|. inside_share: the saliency's mass inside the labelled structures over its
    mass in the case's labelled region (nnU-Net's nonzero mask, ignore label left out), in [0, 1].
    structure_fraction: the structures' voxels over that region's voxels, in [0, 1]."""
    image: np.ndarray
    saliency: np.ndarray
    inside_share: float
    structure_fraction: float


def input_gradient_saliency(model, image_files: Sequence[str], label_file: str,
                            device: torch.device) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, saliency, target): channel 0 of the preprocessed image, max_c |dL/dx_c| (float32) and the
    labels with -100 where no loss is taken (outside nnU-Net's nonzero mask, the ignore label; int64),
    each (Z, Y, X) numpy on nnU-Net's preprocessed grid (voxels)."""
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
    return data[0], grad.abs().amax(1)[0].cpu().numpy(), target[0].cpu().numpy()


def inside_share(saliency: np.ndarray, target: np.ndarray) -> Tuple[float, float]:
    """(share of the saliency's mass inside the structures, the structures' share of the voxels), over the
    voxels where ``target`` >= 0 (``target``: labels, negative where no loss is taken; same shape as
    ``saliency``). NaN where the region holds no saliency or no structure."""
    region = target >= 0
    structure = region & (target > 0)
    mass = float(np.abs(saliency[region]).sum(dtype=np.float64))
    if mass == 0 or not structure.any():
        return float("nan"), float(structure.sum() / max(region.sum(), 1))
    return float(np.abs(saliency[structure]).sum(dtype=np.float64)) / mass, float(structure.sum() / region.sum())


def case_saliency(model, image_files: Sequence[str], label_file: str, device: torch.device) -> CaseSaliency:
    """:class:`CaseSaliency` of one case: one forward and one backward pass of the whole volume."""
    image, saliency, target = input_gradient_saliency(model, image_files, label_file, device)
    share, fraction = inside_share(saliency, target)
    return CaseSaliency(central_slice(image), central_slice(saliency), share, fraction)
