"""Dual normalisation (Han et al., Nature Communications 2021).

Every normalisation layer becomes two: branch 0 sees clean inputs, branch 1 adversarial
inputs; convolution weights stay shared. Training loss is
``L(f(x, branch 0), y) + L(f(x_adv, branch 1), y)``; deployment uses branch 0.

What is separated depends on the norm type:

* BatchNorm{1,2,3}d: running mean/variance *and* affine weight/bias differ per branch, so
  the clean branch's statistics are never polluted by adversarial batches (the point of the
  paper). The reference BN momentum is 0.01 (PyTorch convention: weight of the new batch;
  TensorFlow writes the same as 0.99) and is set with ``momentum=0.01``.
* InstanceNorm{1,2,3}d (nnU-Net's default, ``affine=True, track_running_stats=False``) and
  GroupNorm: they normalise every sample by its own statistics and keep no running ones, so
  only the affine weight/bias differ between the branches. Separating statistics needs
  BatchNorm (nnU-Net's ``nnUNetTrainerBN`` family).

Typical use in a trainer::

    net = convert_to_dual_norm(net, momentum=0.01)      # after nnU-Net built + initialised it
    with norm_route(net, ADV):                         # craft the attack through branch 1
        x_adv = attack(net, x, y)
    out_clean, out_adv = DualRouteWrapper(net)(x, x_adv)  # one forward => DDP-safe

The branch is a plain Python attribute (``DualNorm.route``), not a buffer, so it never
enters the state dict and checkpoints do not depend on the route they were saved in.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Sequence, Tuple, Type

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

CLEAN = 0
"""Route index of the clean branch (also the deployment branch)."""
ADV = 1
"""Route index of the adversarial branch."""

DEFAULT_NORM_TYPES: Tuple[Type[nn.Module], ...] = (_BatchNorm, _InstanceNorm, nn.GroupNorm)
"""Norm classes replaced by :func:`convert_to_dual_norm` unless told otherwise."""


def _check_route(route: int) -> int:
    if route not in (CLEAN, ADV):
        raise ValueError(f"route must be {CLEAN} (clean) or {ADV} (adversarial), got {route!r}")
    return int(route)


class DualNorm(nn.Module):
    """Two copies of one norm module, selected by ``self.route``.

    Args:
        norm: the original norm module. Both branches are deep copies of it, so the
            initialisation of the original network (and, for BN, its running statistics)
            is kept in both.
        momentum: if given, overrides the momentum of both branches (BatchNorm only:
            modules without running statistics ignore it). Reference value 0.01.

    Shapes: ``forward(x)`` takes and returns what the wrapped norm does, e.g.
    (B, C, *spatial).

    State dict keys: ``norms.0.*`` (clean) and ``norms.1.*`` (adversarial). A state dict of
    the *plain* norm (keys ``weight``, ``bias``, ``running_mean``, ...) is also accepted by
    ``load_state_dict``: both branches then receive it, so a standard nnU-Net checkpoint can
    initialise a dual network (see :meth:`_load_plain_norm_into_both`).
    """

    def __init__(self, norm: nn.Module, momentum: Optional[float] = None):
        super().__init__()
        self.norms = nn.ModuleList([copy.deepcopy(norm), copy.deepcopy(norm)])
        if momentum is not None:
            for branch in self.norms:
                if getattr(branch, "track_running_stats", False):
                    branch.momentum = momentum
        self.route = CLEAN
        self.register_load_state_dict_pre_hook(DualNorm._load_plain_norm_into_both)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norms[self.route](x)

    def extra_repr(self) -> str:
        return f"route={self.route}"

    @staticmethod
    def _load_plain_norm_into_both(module, state_dict, prefix, local_metadata, strict,
                                   missing_keys, unexpected_keys, error_msgs):
        """Map ``prefix + k`` (plain-norm checkpoint) to ``prefix + norms.{0,1}.k``.

        Only rewrites when the dual keys are absent, so dual checkpoints load unchanged.
        Lets ``load_state_dict(plain_checkpoint, strict=True)`` start both branches from a
        network trained without dual norm (fine-tuning).
        """
        for key in module.norms[0].state_dict().keys():
            plain = prefix + key
            if plain in state_dict and prefix + f"norms.0.{key}" not in state_dict:
                value = state_dict.pop(plain)
                for branch in range(len(module.norms)):
                    state_dict[prefix + f"norms.{branch}.{key}"] = value


def _modules_inside_dual_norms(network: nn.Module) -> set:
    """ids of every module that already lives inside a DualNorm (never converted again)."""
    inside = set()
    for module in network.modules():
        if isinstance(module, DualNorm):
            inside.update(id(m) for m in module.modules())
    return inside


def convert_to_dual_norm(network: nn.Module, momentum: Optional[float] = None,
                         norm_types: Sequence[Type[nn.Module]] = DEFAULT_NORM_TYPES) -> nn.Module:
    """Replace every norm module of ``network`` by a :class:`DualNorm`, in place.

    dynamic_network_architectures registers the same norm object twice (e.g.
    ``ConvDropoutNormReLU.norm`` and ``ConvDropoutNormReLU.all_modules[i]``; the encoder is also
    reachable as ``decoder.encoder``). Each norm *object* is converted once and the same
    DualNorm is put at every place that referenced it, so forward paths and ``.norm``
    attributes agree and parameters are not duplicated.

    Call it after nnU-Net built and initialised the network (``network.initialize`` of
    ResidualEncoderUNet reads ``block.conv2.norm.weight``, which a DualNorm does not have).
    Norms already inside a DualNorm are left alone, so converting twice is a no-op.

    Args:
        network: any nn.Module, typically PlainConvUNet / ResidualEncoderUNet.
        momentum: BN momentum for both branches (None keeps the original; ref. 0.01).
        norm_types: classes to convert (default BatchNorm, InstanceNorm, GroupNorm).

    Returns:
        ``network`` itself (modified in place).
    """
    norm_types = tuple(norm_types)
    skip = _modules_inside_dual_norms(network)
    replacements: Dict[int, DualNorm] = {}  # id(original norm) -> its single DualNorm
    # Snapshot first: the DualNorms created below must not be visited again.
    for parent in list(network.modules()):
        if id(parent) in skip or isinstance(parent, DualNorm):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, DualNorm) or not isinstance(child, norm_types):
                continue
            if id(child) not in replacements:
                replacements[id(child)] = DualNorm(child, momentum)
            setattr(parent, name, replacements[id(child)])
    return network


def dual_norms(network: nn.Module) -> Iterator[DualNorm]:
    """Every DualNorm of ``network`` (each once)."""
    return (m for m in network.modules() if isinstance(m, DualNorm))


def set_norm_route(network: nn.Module, route: int) -> int:
    """Switch every DualNorm of ``network`` to ``route`` (0 clean/deployment, 1 adversarial).

    Returns:
        the number of DualNorms switched (0 means the network has none).
    """
    route = _check_route(route)
    count = 0
    for module in dual_norms(network):
        module.route = route
        count += 1
    return count


@contextmanager
def norm_route(network: nn.Module, route: int):
    """Context manager: run with every DualNorm on ``route``, then restore each one's own route.

    Restores per module (not to a global default), so nesting and exceptions are safe.
    """
    route = _check_route(route)
    previous = [(module, module.route) for module in dual_norms(network)]
    for module, _ in previous:
        module.route = route
    try:
        yield network
    finally:
        for module, old in previous:
            module.route = old


def forward_dual(network: nn.Module, x_clean: torch.Tensor, x_adv: torch.Tensor):
    """Run ``x_clean`` through the clean branch and ``x_adv`` through the adversarial one.

    Two forward passes with shared convolution weights; each returns what ``network`` does
    (a tensor, or nnU-Net's deep-supervision list, full resolution first).

    Under DDP, wrap the network in :class:`DualRouteWrapper` *before* DDP, so both passes
    happen inside one DDP forward and every parameter of both branches receives a gradient in
    that step. Calling this function on the DDP module itself means two DDP forwards before one
    backward: checked with 2 gloo ranks (torch 2.14), that works with nnU-Net's default
    ``find_unused_parameters=False`` but fails with ``find_unused_parameters=True`` ("Expected
    to mark a variable ready only once"), whereas the wrapper works with both. Calling it on the
    unwrapped module bypasses DDP's forward, which DDP does not support for a step it reduces.

    Returns:
        (output_clean, output_adv)
    """
    with norm_route(network, CLEAN):
        out_clean = network(x_clean)
    with norm_route(network, ADV):
        out_adv = network(x_adv)
    return out_clean, out_adv


class DualRouteWrapper(nn.Module):
    """Module whose one forward runs both branches: ``forward(x_clean, x_adv)``.

    Wrap before DDP: ``DDP(DualRouteWrapper(net))``. One DDP forward then uses every
    parameter of both branches, so ``find_unused_parameters=False`` stays valid for a step
    whose loss is ``L(out_clean) + L(out_adv)`` (and ``=True`` works too). A step that runs
    only one branch leaves the other branch's parameters without gradients, which DDP with
    ``find_unused_parameters=False`` rejects at the next step.

    ``forward(x)`` with ``x_adv=None`` is a single clean-branch pass (validation, deployment).
    Its state dict keys carry the prefix ``network.``: save ``wrapper.network`` in checkpoints.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x_clean: torch.Tensor, x_adv: Optional[torch.Tensor] = None):
        if x_adv is None:
            with norm_route(self.network, CLEAN):
                return self.network(x_clean)
        return forward_dual(self.network, x_clean, x_adv)


#: attribute of a BatchNorm whose running statistics start fresh: the momentum it takes after its warm-up
MOMENTUM_AFTER_WARM_UP = "nnunet_adv_momentum_after_warm_up"


def start_fresh_statistics(bn: _BatchNorm) -> None:
    """Estimate ``bn``'s running statistics from scratch, without the pull of their initial values.

    For a BatchNorm whose checkpoint had no statistics to give (a dual-BN network fine-tuned from an
    InstanceNorm model). At momentum m the initial mean 0 / variance 1 would still weigh (1 - m)^n after n
    training batches: 0.61 after the study's first 50 at the paper's 0.01, where nnU-Net's eval-mode
    validation pseudo Dice was 0.386 / 0.371 (0.860 / 0.834 with this warm-up; Dataset910, seed 0), so
    the first round(1 / m) batches are averaged with equal weights (``momentum=None``, PyTorch's
    cumulative average) and :func:`end_statistics_warm_ups` then gives the module its momentum back: the
    same exponential average as from then on, started from data instead of from 0 / 1.
    """
    bn.reset_running_stats()
    if bn.momentum is not None:  # None: a cumulative average throughout, nothing pulls it to the initial values
        setattr(bn, MOMENTUM_AFTER_WARM_UP, bn.momentum)
        bn.momentum = None


def end_statistics_warm_ups(network: nn.Module) -> int:
    """Give every BatchNorm of ``network`` in a warm-up (:func:`start_fresh_statistics`) that has averaged
    round(1 / momentum) batches its momentum back. Call before each training batch, outside a compiled
    graph (the change of momentum should then cost one recompilation; not measured on a GPU). Returns how
    many modules are still warming up."""
    warming = 0
    for module in network.modules():
        momentum = getattr(module, MOMENTUM_AFTER_WARM_UP, None)
        if momentum is None:
            continue
        if int(module.num_batches_tracked) >= round(1 / momentum):
            module.momentum = momentum
            delattr(module, MOMENTUM_AFTER_WARM_UP)
        else:
            warming += 1
    return warming
