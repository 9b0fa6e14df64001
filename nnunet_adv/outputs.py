"""Network outputs under deep supervision: one place for the list-or-tensor rules.

nnU-Net's networks return logits ``(B, K, *spatial)``, or under deep supervision a list of
them, full resolution first. Attacks, losses, the sliding window and the trainers all use
these helpers (pure PyTorch, no nnU-Net import).
"""
from __future__ import annotations

from typing import List, Sequence, Union

import torch

Tensor = torch.Tensor
Output = Union[Tensor, Sequence[Tensor]]


def full_res(output: Output) -> Tensor:
    """First (full-resolution) element of a deep-supervision list, or the tensor itself."""
    return output[0] if isinstance(output, (list, tuple)) else output


def detach_output(output: Output) -> Output:
    """The output detached, same structure."""
    if isinstance(output, (list, tuple)):
        return type(output)(o.detach() for o in output)
    return output.detach()


def slice_batch(output: Output, b: int) -> Output:
    """Sample ``b`` (keeping the batch dim) of a tensor or a list/tuple of tensors."""
    if isinstance(output, (list, tuple)):
        return type(output)(o[b:b + 1] for o in output)
    return output[b:b + 1]


def split_batch(output: Output, sizes: Sequence[int]) -> List[Output]:
    """Split a (possibly deep-supervision list) output along the batch dimension.

    Used when clean and adversarial inputs go through the network in one concatenated
    forward pass (one DDP forward per step, required for a single backward).
    """
    if isinstance(output, (list, tuple)):
        parts = [torch.split(o, list(sizes)) for o in output]
        return [list(p) for p in zip(*parts)]
    return list(torch.split(output, list(sizes)))
