"""Segmentation losses and metrics used by the attacks and by VAFT (pure PyTorch).

Shapes: ``logits`` are ``(B, K, *spatial)`` (2 or 3 spatial dims, K classes, raw scores);
label maps are integer ``(B, *spatial)`` or ``(B, 1, *spatial)``. Losses are computed in
fp32 whatever the dtype of the logits (autocast fp16 logits are upcast), because an fp16
cross-entropy or DCT loses the small differences that adversarial steps live on.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .frequency import dctn
from .outputs import full_res

Tensor = torch.Tensor


def as_label_map(labels: Tensor, spatial_shape: Sequence[int]) -> Tensor:
    """``(B, 1, *S)`` or ``(B, *S)`` integer map -> ``(B, *S)`` int64; ``ValueError`` otherwise."""
    s = tuple(int(v) for v in spatial_shape)
    if not torch.is_tensor(labels):
        raise ValueError(f"labels must be a tensor, got {type(labels).__name__}")
    if tuple(labels.shape[1:]) == s:
        return labels.long()
    if labels.dim() == len(s) + 2 and labels.shape[1] == 1 and tuple(labels.shape[2:]) == s:
        return labels[:, 0].long()
    raise ValueError(f"label map shape {tuple(labels.shape)} does not match spatial shape {s}: "
                     f"expected (B, 1, *{s}) or (B, *{s})")


def _prep(logits: Tensor, labels: Tensor):
    logits = full_res(logits)
    if logits.dim() not in (4, 5):
        raise ValueError(f"logits must be (B, K, *spatial) with 2 or 3 spatial dims, got {tuple(logits.shape)}")
    y = as_label_map(full_res(labels), logits.shape[2:])
    if y.shape[0] != logits.shape[0]:
        raise ValueError(f"batch size of labels ({y.shape[0]}) != batch size of logits ({logits.shape[0]})")
    return logits.float(), y


def cross_entropy_map(logits: Tensor, labels: Tensor) -> Tensor:
    """Voxel-wise cross-entropy ``(B, *S)`` in fp32."""
    logits, y = _prep(logits, labels)
    return F.cross_entropy(logits, y, reduction="none")


def monai_dice_loss(logits: Tensor, labels: Tensor, smooth_nr: float = 0.0, smooth_dr: float = 1e-6,
                    squared_pred: bool = True, include_background: bool = True) -> Tensor:
    """The Dice term of :func:`monai_dice_ce` alone (MONAI ``DiceLoss`` with the VAFA reference
    code's settings): ``1 - (2 sum_i p_ik g_ik + smooth_nr) / (sum_i p_ik^2 + sum_i g_ik^2 +
    smooth_dr)`` per sample b and class k (p = softmax, g = one-hot; squared denominators),
    averaged over b and k. The VAFA paper's attack objective is "the Dice loss" (Eq. 2, Alg. 1).

    Args / Returns: as :func:`monai_dice_ce` (a scalar in [0, 1], fp32).
    """
    logits, y = _prep(logits, labels)
    return _soft_dice(logits, y, smooth_nr, smooth_dr, squared_pred, include_background)


def _soft_dice(logits: Tensor, y: Tensor, smooth_nr: float, smooth_dr: float, squared_pred: bool,
               include_background: bool) -> Tensor:
    k = logits.shape[1]
    p = torch.softmax(logits, 1)
    g = F.one_hot(y, k).movedim(-1, 1).to(p.dtype)
    if not include_background:
        p, g = p[:, 1:], g[:, 1:]
    dims = tuple(range(2, p.dim()))
    intersection = (p * g).sum(dims)
    denominator = ((p * p).sum(dims) + (g * g).sum(dims)) if squared_pred else (p.sum(dims) + g.sum(dims))
    return (1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)).mean()


def monai_dice_ce(logits: Tensor, labels: Tensor, smooth_nr: float = 0.0, smooth_dr: float = 1e-6,
                  squared_pred: bool = True, include_background: bool = True) -> Tensor:
    """The loss of the VAFA reference code: MONAI ``DiceCELoss(to_onehot_y=True, softmax=True,
    squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)`` (MONAI 0.7 defaults otherwise:
    background included, mean reduction, weights 1 and 1).

    ``dice_bk = 1 - (2 sum_i p_ik g_ik + smooth_nr) / (sum_i p_ik^2 + sum_i g_ik^2 + smooth_dr)``
    per sample b and class k (p = softmax, g = one-hot; squared denominators), averaged over b and
    k, plus the cross-entropy averaged over voxels. With ``smooth_nr = 0`` a class absent from a
    sample contributes a constant 1 (no gradient), as in the reference.

    Args:
        logits: ``(B, K, *S)`` or a deep-supervision list (full resolution used).
        labels: ``(B, [1,] *S)`` class indices (or a list, full resolution used).
    Returns:
        Scalar fp32.
    """
    logits, y = _prep(logits, labels)
    return _soft_dice(logits, y, smooth_nr, smooth_dr, squared_pred, include_background) + F.cross_entropy(logits, y)


def segpgd_loss(logits: Tensor, labels: Tensor, t: int, T: int, targeted: bool = False) -> Tensor:
    """SegPGD loss (Gu et al., "SegPGD: An Effective and Efficient Adversarial Attack for
    Evaluating and Boosting Segmentation Robustness", ECCV 2022).

    At step ``t`` of ``T`` (``t = 1..T``), ``lambda_t = (t-1) / (2T)`` and, with
    ``c_i = [argmax_k logits_i == y_i]`` (detached),
    ``loss = mean_i[(1 - lambda_t) c_i CE_i + lambda_t (1 - c_i) CE_i]``: early steps push the
    still-correct voxels, later steps weight the already-wrong ones more.
    Targeted (``labels`` = target map, the attack descends this loss): the weights swap,
    ``mean_i[lambda_t c_i CE_i + (1 - lambda_t)(1 - c_i) CE_i]`` (CosPGD authors' code).

    Args: logits ``(B, K, *S)``; labels ``(B, [1,] *S)``; mean over batch and voxels. Scalar fp32.
    """
    if int(T) < 1 or not 1 <= int(t) <= int(T):
        raise ValueError(f"SegPGD step t must satisfy 1 <= t <= T, got t={t}, T={T}")
    logits, y = _prep(logits, labels)
    lam = (int(t) - 1) / (2.0 * int(T))
    ce = F.cross_entropy(logits, y, reduction="none")
    correct = (logits.detach().argmax(1) == y).to(ce.dtype)
    if targeted:
        w = lam * correct + (1.0 - lam) * (1.0 - correct)
    else:
        w = (1.0 - lam) * correct + lam * (1.0 - correct)
    return (w * ce).mean()


def dlr_per_sample(logits: Tensor, labels: Tensor) -> Tensor:
    """ROG's DLR loss for segmentation (``rog/autoattack/autopgd.py``, after Croce & Hein 2020), ``(B,)``.

    Per voxel ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` with ``z`` the logits sorted
    descending as ``z_pi1 >= z_pi2 >= z_pi3``, then the mean over voxels: shift- and scale-invariant
    in the logits, so a network that only rescales its logits cannot shrink it. Needs K >= 3
    classes (``ValueError`` otherwise: ROG runs it only on multi-class tasks).
    """
    logits, y = _prep(logits, labels)
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes (it divides by z_pi1 - z_pi3); the model has "
                         f"{logits.shape[1]}: use the CE loss (apgd-ce) on binary tasks, as ROG does")
    z_sorted, order = logits.sort(dim=1)
    z_y = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    top_is_y = (order[:, -1] == y).float()
    other = z_sorted[:, -2] * top_is_y + z_sorted[:, -1] * (1.0 - top_is_y)
    loss = -(z_y - other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)
    return loss.flatten(1).mean(1)


def cospgd_weights(logits: Tensor, labels: Tensor) -> Tensor:
    """CosPGD voxel weights ``cos_i = cosine(softmax(logits_i), onehot(y_i))``, ``(B, *S)``, detached."""
    logits, y = _prep(logits, labels)
    k = logits.shape[1]
    p = torch.softmax(logits.detach(), dim=1)
    onehot = F.one_hot(y.clamp(0, k - 1), k).movedim(-1, 1).to(p.dtype)
    return F.cosine_similarity(p, onehot, dim=1)


def cospgd_loss(logits: Tensor, labels: Tensor, targeted: bool = False) -> Tensor:
    """CosPGD loss (Agnihotri, Jung, Keuper, "CosPGD: an efficient white-box adversarial attack
    for pixel-wise prediction tasks", ICML 2024).

    Untargeted: ``mean_i cos_i CE_i`` (maximised); targeted (labels = target, descended):
    ``mean_i (1 - cos_i) CE_i``, with ``cos_i`` from :func:`cospgd_weights` (detached).
    Args: logits ``(B, K, *S)``; labels ``(B, [1,] *S)``. Scalar fp32.
    """
    cos = cospgd_weights(logits, labels)
    ce = cross_entropy_map(logits, labels)
    w = (1.0 - cos) if targeted else cos
    return (w * ce).mean()


def _drop_channel(t: Tensor) -> Tensor:
    """``(B, 1, *S)`` -> ``(B, *S)``; 5-D maps must have the singleton channel, 4-D maps with
    ``shape[1] == 1`` are read as 2D ``(B, 1, H, W)``; 3-D maps are ``(B, H, W)``."""
    if t.dim() == 5 or (t.dim() == 4 and t.shape[1] == 1):
        if t.shape[1] != 1:
            raise ValueError(f"a 5-D label map must be (B, 1, D, H, W), got {tuple(t.shape)}")
        return t[:, 0]
    if t.dim() in (3, 4):
        return t
    raise ValueError(f"label map must be (B, [1,] *spatial) with 2 or 3 spatial dims, got {tuple(t.shape)}")


def dice_per_sample(pred_labels: Tensor, labels: Tensor, num_classes: int,
                    include_background: bool = False) -> Tensor:
    """Mean Dice over classes, per sample.

    Args:
        pred_labels, labels: integer maps ``(B, [1,] *S)`` of the same spatial shape.
        num_classes: K; classes ``1..K-1`` are scored (``0..K-1`` with include_background).
    Returns:
        ``(B,)`` float: per sample, the mean Dice over the scored classes present in the
        prediction or the reference (a class absent from both is skipped, as nnU-Net does);
        1.0 when no scored class is present in either.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    y, p = _drop_channel(labels).long(), _drop_channel(pred_labels).long()
    if p.shape != y.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != label shape {tuple(y.shape)}")
    b = y.shape[0]
    p = p.reshape(b, -1)
    y = y.reshape(b, -1)
    total = torch.zeros(b, dtype=torch.float64, device=y.device)
    count = torch.zeros(b, dtype=torch.float64, device=y.device)
    for c in range(0 if include_background else 1, num_classes):
        pc, yc = p == c, y == c
        inter = (pc & yc).sum(1).double()
        denom = (pc.sum(1) + yc.sum(1)).double()
        present = denom > 0
        total += torch.where(present, 2.0 * inter / denom.clamp_min(1), torch.zeros_like(denom))
        count += present.double()
    return torch.where(count > 0, total / count.clamp_min(1), torch.ones_like(total)).float()


def region_dice_per_sample(pred_regions: Tensor, regions: Tensor, mask: Tensor = None) -> Tensor:
    """Mean Dice over regions, per sample (nnU-Net region-based training: sigmoid outputs).

    Args:
        pred_regions, regions: binary ``(B, R, *S)`` (bool or 0/1), one channel per region.
        mask: optional ``(B, 1, *S)``, 0 on voxels to ignore.
    Returns:
        ``(B,)`` float: per sample, the mean Dice over the regions present in the prediction or
        the reference (absent from both: skipped); 1.0 when no region is present in either.
    """
    if pred_regions.shape != regions.shape:
        raise ValueError(f"prediction shape {tuple(pred_regions.shape)} != region shape {tuple(regions.shape)}")
    p, y = pred_regions.bool(), regions.bool()
    if mask is not None:
        keep = mask.bool().expand_as(p)
        p, y = p & keep, y & keep
    b, r = p.shape[:2]
    p, y = p.reshape(b, r, -1), y.reshape(b, r, -1)
    inter = (p & y).sum(2).double()
    denom = (p.sum(2) + y.sum(2)).double()
    present = denom > 0
    dice = torch.where(present, 2.0 * inter / denom.clamp_min(1), torch.zeros_like(denom))
    count = present.sum(1).double()
    return torch.where(count > 0, dice.sum(1) / count.clamp_min(1), torch.ones_like(count)).float()


def frequency_consistency(logits_clean, logits_adv) -> Tensor:
    """VAFT frequency-consistency loss (Hanif et al., MICCAI 2023; ref. code normalisation).

    ``FC = sum |DCT(z) - DCT(z')| / sum |DCT(z)|`` where the orthonormal DCT runs over all
    spatial dims of the whole patch, separately for every sample and class channel, and the
    sums run over everything (batch, classes, coefficients). Paper Eq. 4 is the unnormalised
    L1; the released code divides by ``sum |DCT(z)|``, which keeps the term O(1) whatever the
    patch size.

    Args:
        logits_clean, logits_adv: ``(B, K, *S)`` (2 or 3 spatial dims) or deep-supervision
            lists (the full-resolution first elements are used).
    Returns:
        Scalar fp32, differentiable w.r.t. both inputs; computed with autocast disabled.
    """
    z, za = full_res(logits_clean), full_res(logits_adv)
    if z.shape != za.shape:
        raise ValueError(f"clean and adversarial logits differ in shape: {tuple(z.shape)} vs {tuple(za.shape)}")
    if z.dim() not in (4, 5):
        raise ValueError(f"logits must be (B, K, *spatial) with 2 or 3 spatial dims, got {tuple(z.shape)}")
    nsp = z.dim() - 2
    with torch.autocast(device_type=z.device.type, enabled=False):
        dz = dctn(z.float(), nsp)
        dza = dctn(za.float(), nsp)
        return (dz - dza).abs().sum() / dz.abs().sum().clamp_min(torch.finfo(torch.float32).tiny)
