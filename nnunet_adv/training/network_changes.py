"""Network changes of the training recipes, applied where nnU-Net builds the network.

A recipe lists its changes in the class attribute ``network_changes`` of
:class:`nnunet_adv.training.adversarial_trainer.nnUNetTrainerAdversarial`; the trainer's
``build_network_architecture`` (which nnU-Net's predictor also calls to rebuild a trained
network) applies them in order, so training, ``nnUNetv2_predict`` and our attack tools all
see the same architecture and checkpoints load strictly.

Each change has two phases:

* :meth:`NetworkChange.update_arch_kwargs`: edit a *copy* of the plans' ``arch_kwargs`` before
  the network is built (e.g. BatchNorm instead of InstanceNorm, as nnU-Net's ``nnUNetTrainerBN``);
* :meth:`NetworkChange.apply`: modify the built and initialised network in place (insert NLCE
  modules, double every norm).

Changes are small frozen dataclasses, so ``debug.json`` records them readably.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pydoc import locate
from typing import Optional, Sequence, Tuple

import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_batchnorm
from torch import nn

from nnunet_adv.modules.dual_norm import ADV, CLEAN, DualNorm, _check_route, convert_to_dual_norm, dual_norms
from nnunet_adv.modules.nlce import insert_nlce


class NetworkChange:
    """Base: no change. Subclasses override one or both phases."""

    def update_arch_kwargs(self, arch_kwargs: dict) -> dict:
        """Return the (possibly edited) ``arch_kwargs``; receives a deep copy of the plans' dict."""
        return arch_kwargs

    def apply(self, network: nn.Module) -> nn.Module:
        """Modify the built, initialised network in place and return it."""
        return network


@dataclass(frozen=True)
class BatchNormArchitecture(NetworkChange):
    """BatchNorm instead of the planned norm, exactly as nnU-Net's ``nnUNetTrainerBN``
    (``BatchNorm{2,3}d``, ``eps=1e-5, affine=True``)."""

    eps: float = 1e-5

    def update_arch_kwargs(self, arch_kwargs: dict) -> dict:

        if "norm_op" not in arch_kwargs:
            raise RuntimeError("'norm_op' not found in arch_kwargs: BatchNorm can only be put into nnU-Net's "
                               "default architectures (PlainConvUNet / ResidualEncoderUNet)")
        conv_op = arch_kwargs["conv_op"]
        conv_op = locate(conv_op) if isinstance(conv_op, str) else conv_op
        bn_class = get_matching_batchnorm(conv_op)
        arch_kwargs["norm_op"] = bn_class.__module__ + "." + bn_class.__name__
        arch_kwargs["norm_op_kwargs"] = {"eps": self.eps, "affine": True}
        return arch_kwargs


class BatchRoutedDualNorm(DualNorm):
    """A :class:`~nnunet_adv.modules.dual_norm.DualNorm` that can also route *parts of one
    batch* to different branches.

    ``segments = ((CLEAN, n0), (ADV, n1))`` sends the first ``n0`` samples through branch 0
    and the next ``n1`` through branch 1, in one forward call. This is exactly two separate
    passes (BatchNorm statistics are computed per segment; instance norms are per sample
    anyway), but it lets the trainer keep *one* network forward (and so one DDP forward) per
    backward with a concatenated clean + adversarial batch, in which every parameter of both
    branches takes part. ``segments = None`` (default) is plain DualNorm behaviour
    (``self.route``). Same state-dict keys as DualNorm.
    """

    segments: Optional[Tuple[Tuple[int, int], ...]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segments = self.segments
        if segments is None:
            return super().forward(x)
        sizes = [n for _, n in segments]
        if sum(sizes) != x.shape[0]:
            raise RuntimeError(f"batch routing expects {sum(sizes)} samples ({segments}), got {x.shape[0]}")
        parts = torch.split(x, sizes)
        return torch.cat([self.norms[route](part) for (route, _), part in zip(segments, parts)])


def enable_batch_routing(network: nn.Module) -> nn.Module:
    """Turn every DualNorm of ``network`` into a :class:`BatchRoutedDualNorm`, in place.

    Changes only the Python class of each module (no new state; identical state-dict keys),
    so shared references inside dynamic_network_architectures blocks stay shared.
    """
    for module in dual_norms(network):
        if type(module) is DualNorm:
            module.__class__ = BatchRoutedDualNorm
    return network


@contextmanager
def batch_routes(network: nn.Module, segments: Sequence[Tuple[int, int]]):
    """Within the context, every BatchRoutedDualNorm of ``network`` routes batch segments:
    ``segments = [(route, size), ...]`` in batch order (route 0 clean, 1 adversarial)."""
    segments = tuple((_check_route(r), int(n)) for r, n in segments)
    modules = [m for m in dual_norms(network) if isinstance(m, BatchRoutedDualNorm)]
    previous = [m.segments for m in modules]
    for m in modules:
        m.segments = segments
    try:
        yield network
    finally:
        for m, old in zip(modules, previous):
            m.segments = old


@dataclass(frozen=True)
class DualNormConversion(NetworkChange):
    """Every norm becomes two (clean branch 0, adversarial branch 1; Han et al. 2021).

    Attributes:
        momentum: BatchNorm momentum of both branches (PyTorch convention; ref. 0.01).
            Ignored by norms without running statistics (nnU-Net's InstanceNorm).
    """

    momentum: Optional[float] = 0.01

    def apply(self, network: nn.Module) -> nn.Module:
        convert_to_dual_norm(network, momentum=self.momentum)
        return enable_batch_routing(network)


@dataclass(frozen=True)
class InsertNLCE(NetworkChange):
    """NLCE modules at the end of the given encoder stages (He et al. 2019).

    Attributes:
        stages: encoder stage indices (negative allowed); default the bottleneck (NLCEN's U-Net rule).
        options: keyword options of :class:`nnunet_adv.modules.nlce.NLCE` (as a tuple of
            (name, value) pairs so that the change stays hashable), e.g.
            ``(("subsample", 2), ("num_codewords", 32))``.
    """

    stages: Tuple[int, ...] = (-1,)
    options: Tuple[Tuple[str, object], ...] = field(default=())

    def apply(self, network: nn.Module) -> nn.Module:
        return insert_nlce(network, stages=self.stages, **dict(self.options))


__all__ = ["NetworkChange", "BatchNormArchitecture", "DualNormConversion", "InsertNLCE",
           "BatchRoutedDualNorm", "enable_batch_routing", "batch_routes", "CLEAN", "ADV"]
