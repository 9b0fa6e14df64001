"""Labels and targets of an attack: full-resolution labels, targeted-attack targets.

Pure PyTorch. ``labels`` are what an attack receives (an integer map ``(B, [1,] *S)``, region
targets ``(B, R, *S)``, or a deep-supervision list of either, full resolution first).
"""
from __future__ import annotations

import numbers
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..losses import as_label_map

Tensor = torch.Tensor
LabelsLike = Union[Tensor, Sequence[Tensor]]


def full_res_labels(labels: LabelsLike, images: Tensor) -> Tensor:
    """The full-resolution labels: an integer map ``(B, *S)``, or region targets ``(B, R, *S)`` fp32
    (recognised by R > 1 channels; see :mod:`nnunet_adv.attacks.base`)."""
    first = labels
    if isinstance(labels, (list, tuple)):
        if len(labels) == 0:
            raise ValueError("labels is an empty list")
        first = labels[0]
    if not torch.is_tensor(first):
        raise ValueError(f"labels must be a tensor or a list of tensors, got {type(first).__name__}")
    if first.dim() == images.dim() and first.shape[1] > 1 and first.shape[2:] == images.shape[2:]:
        # nnU-Net region targets (B, R, *S), one binary channel per region: a label map
        # never has more than one channel. Checked against the model in forward().
        y = first.float()
        if y.shape[0] != images.shape[0]:
            raise ValueError(f"labels shape mismatch: batch size {y.shape[0]} != images batch size "
                             f"{images.shape[0]}")
        return y
    try:
        y = as_label_map(first, images.shape[2:])
    except ValueError as e:
        raise ValueError(f"labels shape mismatch: {e} (images {tuple(images.shape)})") from None
    if y.shape[0] != images.shape[0]:
        raise ValueError(f"labels shape mismatch: batch size {y.shape[0]} != images batch size {images.shape[0]}")
    return y


def resolve_target(spec, y: Tensor, k: int, spatial, labels) -> Tuple[Tensor, object]:
    """The target of a targeted attack from the ``target`` option ``spec``.

    Args:
        spec: None (NLCEN rule: binary -> swap fg/bg, multi-class -> all background), a class
            index, a label map tensor (or a deep-supervision list), or a callable
            ``(labels (B, *S), num_classes) -> map``.
        y: ``(B, *S)`` full-resolution labels; k: number of classes; spatial: ``S``;
        labels: the labels as the attack received them (structure for the loss).
    Returns:
        ``(target (B, *S) int64, target in the structure of labels)``.
    """
    struct = None
    if spec is None:
        # NLCEN protocol (He et al., AAAI 2019, after Kurakin et al.): binary -> swap fg/bg;
        # multi-class -> all background.
        t = (1 - y) if k == 2 else torch.zeros_like(y)
    elif isinstance(spec, numbers.Integral):
        if not 0 <= int(spec) < k:
            raise ValueError(f"target class {spec} out of range for a {k}-class model")
        t = torch.full_like(y, int(spec))
    elif torch.is_tensor(spec) or isinstance(spec, (list, tuple)):
        first = spec[0] if isinstance(spec, (list, tuple)) else spec
        try:
            t = as_label_map(first.to(y.device), spatial)
        except (ValueError, AttributeError) as e:
            raise ValueError(f"target shape mismatch: {e}") from None
        if t.shape[0] != y.shape[0]:
            raise ValueError(f"target batch size {t.shape[0]} != images batch size {y.shape[0]}")
        if isinstance(spec, (list, tuple)):
            struct = type(spec)(s.to(y.device) for s in spec)
    else:  # callable
        t = spec(y, k)
        try:
            t = as_label_map(t, spatial)
        except ValueError as e:
            raise ValueError(f"target callable returned a bad map: {e}") from None
    if int(t.min()) < 0 or int(t.max()) >= k:
        raise ValueError(f"target classes must be in [0, {k - 1}]")
    return t, (struct if struct is not None else _like_labels(t, labels))


def _like_labels(t_full: Tensor, labels):
    """Put a full-res target ``(B, *S)`` into the structure and layout of ``labels``:
    same dims (channel or not) and dtype; deep-supervision scales by nearest resampling."""
    def one(ref: Tensor) -> Tensor:
        nsp = t_full.dim() - 1
        has_channel = ref.dim() == nsp + 2
        size = tuple(ref.shape[2:]) if has_channel else tuple(ref.shape[1:])
        t = t_full
        if tuple(t.shape[1:]) != size:
            t = F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0].round().long()
        if has_channel:
            t = t[:, None]
        return t.to(dtype=ref.dtype)

    if isinstance(labels, (list, tuple)):
        return type(labels)(one(r) for r in labels)
    return one(labels)
