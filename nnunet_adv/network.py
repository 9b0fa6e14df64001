"""Small helpers for nnU-Net's (possibly wrapped) networks, used by training/ and volume/ alike."""
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP (``.module``) and torch.compile (``._orig_mod``).

    Attacks run on the plain module: a forward through the DDP wrapper would arm its
    gradient reducer, and one through the compiled wrapper could trigger recompiles.
    Parameters are shared, so the unwrapped module sees the current weights.
    """
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    return getattr(network, "_orig_mod", network)


@contextmanager
def network_mode(network: nn.Module, train: bool):
    """Temporarily put ``network`` into train (True) or eval (False) mode, then restore it."""
    was_training = network.training
    network.train(train)
    try:
        yield network
    finally:
        network.train(was_training)


class WithPreviousStage(nn.Module):
    """A cascade stage's network seen by an attack: it takes the image channels only and appends the
    previous stage's channels itself, so that no attack can change them.

    Args:
        network: the cascade network; input (B, C_img + C_prev, *S), as nnU-Net feeds it.
        previous_stage: the previous stage's channels (B, C_prev, *S): a tensor held fixed, or a callable
            of the image channels (B, C_img, *S) that computes them (a differentiable surrogate).
    Shapes: ``forward`` (B, C_img, *S) -> the network's output.
    """

    def __init__(self, network: nn.Module, previous_stage):
        super().__init__()
        self.network = network
        self.previous_stage = previous_stage

    def forward(self, x):
        previous = self.previous_stage(x) if callable(self.previous_stage) else self.previous_stage
        return self.network(torch.cat([x, previous.to(x.dtype)], 1))


def resample_linear(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(B, C, *S) -> (B, C, *shape): linear interpolation (trilinear for a volume, bilinear for an image),
    differentiable. Voxel centres map as in nnU-Net's resampling (skimage ``resize``: ``align_corners=False``);
    the order is 1 where nnU-Net resamples images with order 3 and probabilities with order 1."""
    if tuple(x.shape[2:]) == tuple(shape):
        return x
    mode = "trilinear" if x.ndim == 5 else "bilinear"
    return F.interpolate(x, size=tuple(shape), mode=mode, align_corners=False)


def probabilities_back(window: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       shape: Sequence[int]) -> torch.Tensor:
    """A model on another grid, seen from this one: ``window`` (B, C, *S_other) -> logits (B, K, *S_other) on
    ``x`` (its grid); its softmax probabilities resampled linearly to this grid: (B, K, *shape)."""
    return resample_linear(torch.softmax(at_least_float32(window(x)), 1), shape)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits as float32 before a softmax; float32 and float64 as they are (a gradient check
    runs in float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
