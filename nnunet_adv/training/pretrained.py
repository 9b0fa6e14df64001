"""Fine-tuning from a clean nnU-Net checkpoint (``nnUNetv2_train ... -pretrained_weights``)
for networks changed by a recipe (NLCE modules, dual norms).

nnU-Net's ``load_pretrained_weights`` requires every key of the new network (except the
``.seg_layers.``) to exist in the checkpoint with the same shape. A network with NLCE modules
has keys that a clean checkpoint lacks, and a dual-norm network stores each norm twice
(``...norm.norms.0.weight`` / ``...norm.norms.1.weight`` instead of ``...norm.weight``), so the
stock function stops with "Key ... is missing in the pretrained model weights".

:func:`load_pretrained_weights` keeps nnU-Net's rules (same keys and shapes required,
segmentation layers not transferred, strict ``load_state_dict``) and adds two mappings:

* a dual norm missing from the checkpoint takes the plain norm's tensors in *both* branches;
  BatchNorm running statistics that the checkpoint's norm never had (a clean model trained with
  nnU-Net's InstanceNorm, fine-tuned by ``nnUNetTrainerDualBN``, as ``nnUNetv2_adv_study`` does)
  start fresh: estimated from the fine-tuning's batches, a cumulative average over the first
  1/momentum of them, then the network's momentum
  (:func:`nnunet_adv.modules.dual_norm.start_fresh_statistics`);
* NLCE parameters missing from the checkpoint keep their initialisation, which is the
  identity (:mod:`nnunet_adv.modules.nlce`), so the fine-tuned network starts from the clean
  network's function;
* the segmentation heads are kept when the network comes from one of our trainers with
  ``keep_segmentation_heads`` (default) and the checkpoint's heads have the same shapes: the papers
  fine-tune the clean model of the same task, and nnU-Net's re-initialised heads (its rule, meant for
  transfer to another task) cost the first fine-tuning epochs (measured: pseudo Dice of the second
  class 0.386 after the first 50 iterations with new heads, 0.843 with the clean model's heads).

Networks without those modules go to nnU-Net's own function unchanged.
``nnUNetv2_train`` calls the name ``load_pretrained_weights`` of ``nnunetv2.run.run_training``;
:func:`install` points that name at ours. It is called once, in one visible place:
:func:`nnunet_adv.training.integration.install`, when :mod:`nnunet_adv.trainers` is imported.
"""
from __future__ import annotations

import re
from typing import Dict, List, Set

import torch
from nnunetv2.run import load_pretrained_weights as nnunet_module, run_training
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nnunet_adv.errors import UserError
from nnunet_adv.modules.dual_norm import MOMENTUM_AFTER_WARM_UP, DualNorm, start_fresh_statistics
from nnunet_adv.modules.nlce import NLCE
from nnunet_adv.network import unwrap_network

_SKIP_IN_PRETRAINED = (".seg_layers.",)
#: set on networks built by our trainers with ``keep_segmentation_heads`` (see :func:`keeps_heads`)
KEEP_HEADS_ATTRIBUTE = "nnunet_adv_keep_segmentation_heads"


class PretrainedWeightsError(UserError, AssertionError):
    """A checkpoint that does not fit the network. Also an ``AssertionError``: nnU-Net's own
    ``load_pretrained_weights`` signals the same problems with ``assert``, and callers catch that."""
_DUAL_KEY = re.compile(r"^(?P<prefix>.*)norms\.(?P<branch>\d+)\.(?P<name>[^.]+)$")
#: buffers of a BatchNorm that an InstanceNorm (affine, no running statistics) lacks
_RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _module_prefixes(module: nn.Module, cls) -> Set[str]:
    """Every name prefix ("a.b.") under which a module of type ``cls`` is registered
    (dynamic_network_architectures registers norms twice: all aliases are returned)."""
    return {(name + ".") if name else "" for name, m in module.named_modules(remove_duplicate=False)
            if isinstance(m, cls)}


def has_changed_modules(network: nn.Module) -> bool:
    """Whether ``network`` holds NLCE or DualNorm modules (needs the key mapping)."""
    return any(isinstance(m, (NLCE, DualNorm)) for m in unwrap_network(network).modules())


def keeps_heads(network: nn.Module) -> bool:
    """Whether ``network`` was built by one of our trainers that fine-tunes the same task
    (``keep_segmentation_heads``): then the checkpoint's segmentation heads are kept."""
    return bool(getattr(unwrap_network(network), KEEP_HEADS_ATTRIBUTE, False))


def map_pretrained_state_dict(network: nn.Module, pretrained: Dict[str, torch.Tensor],
                              keep_heads: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict to load into ``network`` from a (possibly plain) ``pretrained`` one.

    Applies nnU-Net's rules plus the two mappings of the module docstring; with ``keep_heads`` the
    segmentation layers are transferred too (same shapes required).

    Raises:
        PretrainedWeightsError: a key of the network is neither in ``pretrained`` nor covered by a
            mapping, or a shape differs (nnU-Net's messages).
    """
    mod = unwrap_network(network)
    model_dict = mod.state_dict()
    dual_prefixes = _module_prefixes(mod, DualNorm)
    nlce_prefixes = tuple(_module_prefixes(mod, NLCE))
    merged = dict(model_dict)
    for key, value in model_dict.items():
        if any(s in key for s in _SKIP_IN_PRETRAINED) and not keep_heads:
            continue  # nnU-Net does not transfer segmentation layers
        source = key
        if key not in pretrained:
            match = _DUAL_KEY.match(key)
            if match and match["prefix"] in dual_prefixes and match["prefix"] + match["name"] in pretrained:
                source = match["prefix"] + match["name"]   # plain norm -> both branches
            elif (match and match["prefix"] in dual_prefixes and match["name"] in _RUNNING_STATISTICS
                  and match["prefix"] + "weight" in pretrained):
                continue                                    # InstanceNorm -> BatchNorm: statistics start fresh
            elif nlce_prefixes and key.startswith(nlce_prefixes):
                continue                                    # new NLCE module: keep its identity init
            else:
                raise PretrainedWeightsError(f"Key {key} is missing in the pretrained model weights. The pretrained "
                                             f"weights do not seem to be compatible with your network.")
        if pretrained[source].shape != value.shape:
            raise PretrainedWeightsError(f"The shape of the parameters of key {key} is not the same. Pretrained "
                                         f"model: {tuple(pretrained[source].shape)}; your network: "
                                         f"{tuple(value.shape)}.")
        merged[key] = pretrained[source]
    return merged


def _norms_without_statistics(network: nn.Module, pretrained: Dict[str, torch.Tensor]) -> List[_BatchNorm]:
    """The BatchNorm branches of ``network``'s dual norms whose running statistics ``pretrained`` lacks in
    both its plain and its dual form (an InstanceNorm checkpoint)."""
    mod = unwrap_network(network)
    found = {}
    for prefix in _module_prefixes(mod, DualNorm):
        dual = mod.get_submodule(prefix[:-1])
        for branch, bn in enumerate(dual.norms):
            if (isinstance(bn, _BatchNorm) and prefix + "running_mean" not in pretrained
                    and f"{prefix}norms.{branch}.running_mean" not in pretrained):
                found[id(bn)] = bn
    return list(found.values())


def load_pretrained_weights(network: nn.Module, fname, verbose: bool = False) -> None:
    """Drop-in replacement of nnU-Net's ``load_pretrained_weights`` (see module docstring)."""
    keep = keeps_heads(network)
    if not has_changed_modules(network) and not keep:
        return nnunet_module.load_pretrained_weights(network, fname, verbose=verbose)
    saved = torch.load(fname, map_location="cpu", weights_only=False)
    pretrained = saved["network_weights"]
    heads = [k for k in unwrap_network(network).state_dict() if any(s in k for s in _SKIP_IN_PRETRAINED)]
    keep = keep and all(k in pretrained and pretrained[k].shape == unwrap_network(network).state_dict()[k].shape
                        for k in heads)
    merged = map_pretrained_state_dict(network, pretrained, keep_heads=keep)
    print("################### Loading pretrained weights from file ", fname, "###################")
    if has_changed_modules(network):
        print("nnunet_adv: plain norms copied into both dual-norm branches and NLCE modules kept at their identity "
              "initialisation where the checkpoint lacks them")
    print("nnunet_adv: segmentation heads " + ("kept (fine-tuning the same task)" if keep else
                                                "re-initialised (nnU-Net's rule: the checkpoint's heads differ)"))
    unwrap_network(network).load_state_dict(merged, strict=True)
    fresh = _norms_without_statistics(network, pretrained)
    for bn in fresh:
        start_fresh_statistics(bn)
    if fresh:
        momentum = getattr(fresh[0], MOMENTUM_AFTER_WARM_UP, None)
        how = "over every training batch" if momentum is None else \
            f"over the first {round(1 / momentum)} training batches, then at momentum {momentum}"
        print(f"nnunet_adv: {len(fresh)} BatchNorm branches have no running statistics in the checkpoint (an "
              f"InstanceNorm model): estimated afresh, averaged {how}")


def install() -> None:
    """Make ``nnUNetv2_train -pretrained_weights`` use :func:`load_pretrained_weights`.

    Idempotent; networks without NLCE/DualNorm still take nnU-Net's own code path.
    """
    if getattr(run_training, "load_pretrained_weights", None) is not load_pretrained_weights:
        run_training.load_pretrained_weights = load_pretrained_weights
