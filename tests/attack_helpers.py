"""Tiny networks and a synthetic segmentation task for the attack tests (CPU, fast).

``trained_model(nsp, ds)`` returns a 2-3 layer conv net "trained" for a few dozen Adam steps
on bright blobs (class 1) over a dark noisy background (class 0), so that the attacks have
something to break. Models are cached per process; tests that need a pristine model state
must not modify them (use :func:`fresh_copy`).
"""
from __future__ import annotations

import copy
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F


class TinySegNet(nn.Module):
    """conv3x3 -> ReLU -> conv3x3 -> ReLU -> conv1x1 to K classes, 2D or 3D.

    ``deep_supervision=True`` returns ``[logits, avgpool2(logits)]`` (full resolution first),
    like nnU-Net's networks.
    """

    def __init__(self, nsp: int = 3, in_channels: int = 1, num_classes: int = 2, width: int = 8,
                 deep_supervision: bool = False):
        super().__init__()
        conv = nn.Conv3d if nsp == 3 else nn.Conv2d
        self.nsp = nsp
        self.deep_supervision = deep_supervision
        self.body = nn.Sequential(conv(in_channels, width, 3, padding=1), nn.ReLU(),
                                  conv(width, width, 3, padding=1), nn.ReLU(),
                                  conv(width, num_classes, 1))

    def forward(self, x):
        z = self.body(x)
        if self.deep_supervision:
            pool = F.avg_pool3d if self.nsp == 3 else F.avg_pool2d
            return [z, pool(z, 2)]
        return z


def make_task(nsp: int = 3, n: int = 2, size: int = 16, channels: int = 1, seed: int = 0):
    """Images in [0, 1] ``(n, channels, *[size]*nsp)`` and labels ``(n, 1, *spatial)`` (0/1)."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1) + (size,) * nsp
    noise = torch.rand(shape, generator=g)
    pool = F.avg_pool3d if nsp == 3 else F.avg_pool2d
    smooth = pool(noise, 5, stride=1, padding=2, count_include_pad=False)
    thr = smooth.flatten(1).quantile(0.6, dim=1).view(-1, *([1] * (nsp + 1)))
    labels = (smooth > thr).long()
    img = 0.25 + 0.5 * labels.float() + 0.12 * torch.randn(shape, generator=g)
    img = img.clamp(0, 1).repeat(1, channels, *([1] * nsp))
    return img, labels


def downsample_labels(labels: torch.Tensor, nsp: int):
    """Deep-supervision targets: [full res, half res] (nearest)."""
    half = F.interpolate(labels.float(), scale_factor=0.5, mode="nearest").long()
    return [labels, half]


class DeepSupervision(nn.Module):
    """Wraps a plain net: returns ``[logits, avgpool2(logits)]`` (full resolution first)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        z = self.net(x)
        pool = F.avg_pool3d if z.dim() == 5 else F.avg_pool2d
        return [z, pool(z, 2)]


def fit(net: nn.Module, batches) -> nn.Module:
    """A few Adam steps (lr 0.02) of CE on ``(images, labels (B, 1, *S))`` batches; the net in eval mode,
    parameter gradients cleared."""
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for x, y in batches:
        loss = F.cross_entropy(net(x), y[:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in net.parameters():
        p.grad = None
    return net.eval()


@lru_cache(maxsize=None)
def _trained(nsp: int, channels: int) -> TinySegNet:
    torch.manual_seed(1234 + nsp)
    net = TinySegNet(nsp, in_channels=channels)
    return fit(net, (make_task(nsp, n=2, size=16, channels=channels, seed=100 + step) for step in range(50)))


def trained_model(nsp: int = 3, deep_supervision: bool = False, channels: int = 1) -> nn.Module:
    """The cached trained net (plain, or wrapped to return a deep-supervision list)."""
    net = _trained(nsp, channels)
    return DeepSupervision(net) if deep_supervision else net


def fresh_copy(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net)


def ce(model, x, labels) -> torch.Tensor:
    """Per-sample CE of the full-resolution output, ``(B,)``."""
    with torch.no_grad():
        out = model(x)
        z = out[0] if isinstance(out, (list, tuple)) else out
        y = labels[0] if isinstance(labels, (list, tuple)) else labels
        return F.cross_entropy(z, y[:, 0].long(), reduction="none").flatten(1).mean(1)


def dice(model, x, labels) -> torch.Tensor:
    from nnunet_adv.losses import dice_per_sample

    with torch.no_grad():
        out = model(x)
        z = out[0] if isinstance(out, (list, tuple)) else out
        y = labels[0] if isinstance(labels, (list, tuple)) else labels
        return dice_per_sample(z.argmax(1), y, z.shape[1])


class CountingModel(nn.Module):
    """Wraps a model and counts forward calls."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)
