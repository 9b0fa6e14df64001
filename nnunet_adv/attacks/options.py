"""Attack options: the defaults every attack shares and the checks of option values.

Units are those of the tensor an attack receives (see :mod:`nnunet_adv.attacks.base`).
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, Optional

import torch

Tensor = torch.Tensor

#: Options every attack accepts.
COMMON_DEFAULTS: Dict[str, Any] = {
    "loss": None,            # callable (model_output, labels) -> scalar; None: CE, full res, voxel mean
    "seed": None,            # int: private torch.Generator seed; None: drawn from torch's global RNG
    "lower": None,           # lower bound of the box (tensor units); None: unbounded
    "upper": None,           # upper bound of the box; None: unbounded
    "amp_loss_scale": None,  # None: 2**16 under CUDA autocast fp16, else 1
}
#: Options of attacks that can be targeted.
TARGET_DEFAULTS: Dict[str, Any] = {"targeted": False, "target": None}

#: Default loss scale under CUDA autocast fp16 (GradScaler's initial scale).
AMP_DEFAULT_SCALE = 2.0 ** 16


def canonical_name(name: str) -> str:
    """Attack names are case-insensitive and ``_`` may stand for ``-``: ``"VAFA_3D"`` -> ``"vafa-3d"``."""
    return name.strip().lower().replace("_", "-")


def check_param(name: str, value, *, allow_none: bool = False, nonneg: bool = True) -> None:
    """A float, a sequence of floats or a tensor, finite (and >= 0 if ``nonneg``)."""
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must be given (a float, a sequence of per-channel floats or a tensor)")
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a float, a sequence of per-channel floats or a tensor, got a bool")
    if isinstance(value, numbers.Real):
        vals = torch.tensor([float(value)])
    elif torch.is_tensor(value):
        vals = value.detach().float().flatten().cpu()
    elif isinstance(value, (list, tuple)) or hasattr(value, "__array__"):
        try:
            vals = torch.as_tensor(value, dtype=torch.float64).flatten()
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a float, a sequence of per-channel floats or a tensor, "
                             f"got {value!r}") from None
        if vals.numel() == 0:
            raise ValueError(f"{name} is an empty sequence")
    else:
        raise ValueError(f"{name} must be a float, a sequence of per-channel floats or a tensor, "
                         f"got {type(value).__name__}")
    if not torch.isfinite(vals).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    if nonneg and (vals < 0).any():
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def broadcast_param(name: str, value, images: Tensor) -> Optional[Tensor]:
    """float / C-sequence / tensor -> fp32 tensor on ``images.device`` broadcastable to ``images``."""
    if value is None:
        return None
    c, nsp = images.shape[1], images.dim() - 2
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        t = torch.tensor(float(value), dtype=torch.float32, device=images.device)
    elif torch.is_tensor(value):
        t = value.detach().to(device=images.device, dtype=torch.float32)
    else:
        t = torch.as_tensor(value, dtype=torch.float32).flatten().to(images.device)
        if t.numel() != c:
            raise ValueError(f"{name} has {t.numel()} per-channel values but images have {c} channel(s)")
        t = t.view(1, c, *([1] * nsp))
    try:
        shape = torch.broadcast_shapes(t.shape, images.shape)
    except RuntimeError:
        shape = None
    if shape != images.shape:
        raise ValueError(f"{name} of shape {tuple(t.shape)} is not broadcastable to images of shape "
                         f"{tuple(images.shape)} (use a float, C values, or e.g. (B, C, 1, ..., 1))")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return t
