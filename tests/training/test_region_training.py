"""Adversarial trainers on nnU-Net region-based datasets (sigmoid outputs, DC_and_BCE_loss).

The real-MRI tree (labels 0, 1, 2) is turned into a region-based dataset by giving the trainer a
dataset.json with ``{"background": 0, "whole": [1, 2], "core": 2}`` and ``regions_class_order``;
the batch target is what nnU-Net's loader produces for it: one binary (bool) channel per region
(ConvertSegmentationToRegionsTransform), a list per scale under deep supervision
(DownsampleSegForDSTransform), collated as nnU-Net's data loader does.

The attacks must maximise a loss meant for sigmoid regions (nnU-Net's own region loss, or
BCE-with-logits on the regions), never a softmax CE against integer labels.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from in_process_trainer import make_trainer
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from trainer_batch import make_batch

from nnunet_adv.attacks import build_attack
from nnunet_adv.losses import region_dice_per_sample
from nnunet_adv.network import network_mode, unwrap_network
from nnunet_adv.trainers import (
    nnUNetTrainerDualNorm_TestShort,
    nnUNetTrainerNLCE_VAFT_TestShort,
    nnUNetTrainerPGDAT_TestShort,
    nnUNetTrainerSAAT_TestShort,
    nnUNetTrainerVAFT_TestShort,
)

REGIONS = {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "regions_class_order": [1, 2]}
REGION_LABELS = [(1, 2), (2,)]   # label values of each region, in channel order


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one intra-op thread (conftest's module fixture)."""


# ----------------------------------------------------------------------------- helpers
def _make_region_trainer(cls, tree, configuration, deep_supervision, monkeypatch):
    """make_trainer with the region-based dataset.json."""
    trainer = make_trainer(cls, tree, configuration, deep_supervision, monkeypatch, dataset_json_update=REGIONS)
    assert trainer.label_manager.has_regions and trainer.label_manager.num_segmentation_heads == 2
    return trainer


def make_region_batch(trainer, batch_size=2, seed=0):
    """make_batch's images and label map, the target encoded by nnU-Net's own transforms (the
    last two of its training pipeline), per sample, then collated like nnU-Net's data loader."""
    batch = make_batch(trainer, batch_size, seed)
    target = batch["target"]
    labels = (target[0] if isinstance(target, list) else target).to(torch.int16)  # (B, 1, *S), as loaded
    to_regions = ConvertSegmentationToRegionsTransform(regions=trainer.label_manager.foreground_regions)
    downsample = DownsampleSegForDSTransform(trainer._get_deep_supervision_scales()) \
        if trainer.enable_deep_supervision else None
    samples = []
    for sample in labels:
        seg = to_regions(segmentation=sample)["segmentation"]
        samples.append(downsample(segmentation=seg)["segmentation"] if downsample else seg)
    if downsample:
        batch["target"] = [torch.stack([s[i] for s in samples]) for i in range(len(samples[0]))]
    else:
        batch["target"] = torch.stack(samples)
    batch["labels"] = labels
    return batch


def _full(target):
    return target[0] if isinstance(target, list) else target


def _attack_loss(trainer, x, target, loss=None, for_training=True):
    """``loss`` (default: the trainer's region loss) of the network as the attack sees it
    (unwrapped, in the attack's mode and context)."""
    net = unwrap_network(trainer.network)
    loss = loss or trainer.loss
    with torch.no_grad(), network_mode(net, trainer.attack_in_train_mode), trainer.attack_context(net, for_training):
        return float(loss(net(x), target))


def _region_bce(output, target):
    return F.binary_cross_entropy_with_logits(_full(output).float(), _full(target).float())


def _check_lp_budget(trainer, x, x_adv, eps_frac):
    budget = trainer.threat_model.budget(x, eps_frac=eps_frac)
    assert ((x_adv - x).abs() <= budget.eps + 1e-6).all()
    assert (x_adv >= torch.minimum(budget.lower, x) - 1e-6).all()
    assert (x_adv <= torch.maximum(budget.upper, x) + 1e-6).all()
    assert (x_adv - x).abs().max() > 0.5 * float(budget.eps.min())   # it moved (about eps)
    return budget


# ----------------------------------------------------------------------------- the set-up
def test_region_batch_is_nnunets_region_encoding(nnunet_tree, monkeypatch):
    trainer = _make_region_trainer(nnUNetTrainerPGDAT_TestShort, nnunet_tree, "3d_fullres", True, monkeypatch)
    assert isinstance(trainer.loss, DeepSupervisionWrapper) and isinstance(trainer.loss.loss, DC_and_BCE_loss)
    batch = make_region_batch(trainer)
    target, labels = batch["target"], batch["labels"][:, 0]
    scales = trainer._get_deep_supervision_scales()
    assert isinstance(target, list) and len(target) == len(scales)
    patch = list(trainer.configuration_manager.patch_size)
    for t, scale in zip(target, scales):
        assert t.dtype == torch.bool and list(t.shape) == [2, 2] + [round(p * s) for p, s in zip(patch, scale)]
    for channel, values in enumerate(REGION_LABELS):
        assert torch.equal(target[0][:, channel], torch.isin(labels, torch.tensor(values, dtype=labels.dtype)))
    assert target[0][:, 0].any() and target[0][:, 1].any() and not target[0].all()


# ----------------------------------------------------------------------------- the trainers
class _SAATPGD(nnUNetTrainerSAAT_TestShort):
    saat_inner_attack = "pgd"
    saat_m_init = 2


# (trainer, eps_frac of the training attack or None for VAFA, expected loss terms)
TRAINERS = [
    (nnUNetTrainerPGDAT_TestShort, 4 / 255, {"adv"}),
    (nnUNetTrainerVAFT_TestShort, None, {"clean", "adv", "fc"}),
    (_SAATPGD, 8 / 255, {"adv"}),
    (nnUNetTrainerDualNorm_TestShort, 0.005, {"clean", "adv"}),
    (nnUNetTrainerNLCE_VAFT_TestShort, None, {"clean", "adv", "fc"}),
]


@pytest.mark.parametrize("cls, eps_frac, terms", TRAINERS, ids=[c[0].__name__ for c in TRAINERS])
def test_adversarial_trainer_on_regions_3d_deep_supervision(nnunet_tree, monkeypatch, cls, eps_frac, terms):
    trainer = _make_region_trainer(cls, nnunet_tree, "3d_fullres", True, monkeypatch)
    batch = make_region_batch(trainer)
    x, target = batch["data"], batch["target"]
    trainer.network.train()

    # the training attack: inside its budget, moved, and it raises nnU-Net's region loss (and its BCE)
    steps = {"steps": _SAATPGD.saat_m_init} if cls is _SAATPGD else None
    x_adv = trainer.craft_adversarial(x, target, steps)
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    if eps_frac is not None:
        budget = _check_lp_budget(trainer, x, x_adv, eps_frac)
        # more than a random perturbation of the same L-inf size: the gradient of the right loss
        g = torch.Generator().manual_seed(1)
        x_rand = x + budget.eps * (torch.randint(0, 2, x.shape, generator=g) * 2 - 1)
        assert _attack_loss(trainer, x_adv, target) > _attack_loss(trainer, x_rand, target)
    else:  # VAFA: no Lp budget; the output stays in the clean sample's intensity window
        lo = x.amin(dim=(2, 3, 4), keepdim=True)
        hi = x.amax(dim=(2, 3, 4), keepdim=True)
        assert (x_adv >= lo - 1e-5).all() and (x_adv <= hi + 1e-5).all()
        assert (x_adv - x).abs().max() > 1e-3
    clean_loss, adv_loss = _attack_loss(trainer, x, target), _attack_loss(trainer, x_adv, target)
    assert adv_loss > clean_loss
    assert _attack_loss(trainer, x_adv, target, _region_bce) > _attack_loss(trainer, x, target, _region_bce)

    # the training step
    before = [p.detach().clone() for p in trainer.network.parameters()]
    out = trainer.train_step(batch)
    assert {k[5:] for k in out if k.startswith("loss_")} == terms
    assert all(torch.isfinite(torch.as_tensor(v)).all() for k, v in out.items() if k.startswith("loss"))
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.network.parameters()))

    # robust validation: pseudo-Dice per region (nnU-Net keeps every region: no background to drop)
    trainer.network.eval()
    with torch.no_grad():
        val = trainer.validation_step(make_region_batch(trainer, seed=1))
    for key in ("tp_hard", "fp_hard", "fn_hard"):
        assert val[f"robust_{key}"].shape == val[key].shape == (2,)
    assert torch.isfinite(torch.as_tensor(val["robust_loss"])) and val["robust_loss"] > 0
    trainer.on_validation_epoch_end([val])
    per_region = trainer.logger.get_value("robust_dice_per_class_or_region", step=-1)
    assert len(per_region) == 2 and all(0 <= d <= 1 for d in per_region)


def test_saat_free_at_on_regions_moves_up_the_region_loss(nnunet_tree, monkeypatch):
    """SAAT's default inner attack (Free-AT): the buffer steps along the sign of the input
    gradient of the trainer's region loss, inside the eps-ball; the robust validation is PGD."""
    trainer = _make_region_trainer(nnUNetTrainerSAAT_TestShort, nnunet_tree, "3d_fullres", True, monkeypatch)
    batch = make_region_batch(trainer)
    x, target = batch["data"], batch["target"]
    trainer.network.train()
    reference = copy.deepcopy(trainer.network)   # the weights the step's input gradient is taken at
    out = trainer.train_step(batch)              # m = 1: trains on x, then delta <- eps/2 * sign(grad)
    assert torch.isfinite(torch.as_tensor(out["loss"])) and out["saat_mag_sum"] > 0
    budget = trainer.threat_model.budget(x, eps_frac=trainer.eps_frac)
    delta = trainer.free_delta
    assert (delta.abs() <= budget.eps + 1e-7).all() and delta.abs().max() > 0.49 * float(budget.eps.min())
    x_free = torch.minimum(torch.maximum(x + delta, budget.lower), budget.upper)
    with torch.no_grad():
        assert trainer.loss(reference(x_free), target) > trainer.loss(reference(x), target)
    trainer.network.eval()
    with torch.no_grad():
        val = trainer.validation_step(make_region_batch(trainer, seed=1))
    assert val["robust_tp_hard"].shape == (2,)


def test_vaft_on_regions_2d_without_deep_supervision(nnunet_tree, monkeypatch):
    trainer = _make_region_trainer(nnUNetTrainerVAFT_TestShort, nnunet_tree, "2d", False, monkeypatch)
    batch = make_region_batch(trainer)
    x, target = batch["data"], batch["target"]
    assert torch.is_tensor(target) and target.dtype == torch.bool and target.shape[1] == 2
    trainer.network.train()
    x_adv = trainer.craft_adversarial(x, target)
    assert (x_adv - x).abs().max() > 1e-3
    assert _attack_loss(trainer, x_adv, target) > _attack_loss(trainer, x, target)
    out = trainer.train_step(batch)
    assert set(out) == {"loss", "loss_clean", "loss_adv", "loss_fc"} and torch.isfinite(torch.as_tensor(out["loss"]))
    trainer.network.eval()
    with torch.no_grad():
        assert trainer.validation_step(make_region_batch(trainer, seed=1))["robust_tp_hard"].shape == (2,)


class _PGDATOwnLoss(nnUNetTrainerPGDAT_TestShort):
    """The attack's own loss instead of the trainer's (on regions: BCE, not CE)."""
    attack_uses_training_loss = False
    attack_kwargs = {**nnUNetTrainerPGDAT_TestShort.attack_kwargs, "seed": 0}


def test_attack_without_the_training_loss_uses_bce_on_regions(nnunet_tree, monkeypatch):
    """After a few training steps, the attack's default loss on regions is BCE-with-logits on the
    full-resolution regions: the same example as PGD with that loss given explicitly, and it
    raises nnU-Net's region loss of the trained network."""
    trainer = _make_region_trainer(_PGDATOwnLoss, nnunet_tree, "3d_fullres", True, monkeypatch)
    batch = make_region_batch(trainer)
    x, target = batch["data"], batch["target"]
    trainer.network.train()
    for _ in range(3):
        trainer.train_step(batch)
    x_adv = trainer.craft_adversarial(x, target)
    _check_lp_budget(trainer, x, x_adv, trainer.eps_frac)
    explicit = trainer.attack_config.build(trainer.threat_model, x, loss=_region_bce)
    net = unwrap_network(trainer.network)
    with network_mode(net, False):
        assert torch.allclose(explicit(net, x, target), x_adv, atol=1e-6)
    assert _attack_loss(trainer, x_adv, target) > _attack_loss(trainer, x, target)
    assert _attack_loss(trainer, x_adv, target, _region_bce) > _attack_loss(trainer, x, target, _region_bce)


# ----------------------------------------------------------------------------- the attacks alone
class _Sigmoid3(torch.nn.Module):
    """A tiny conv net with K outputs (sigmoid regions) and a deep-supervision list."""

    def __init__(self, k=2):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, k, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return [y, F.avg_pool3d(y, 2)]


def _toy(k=2, r=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, 8, generator=g)
    regions = torch.rand(2, r or k, 8, 8, 8, generator=g) > 0.5
    return _Sigmoid3(k), x, [regions, regions[:, :, ::2, ::2, ::2]]


@pytest.mark.parametrize("name", ["pgd", "fgsm", "apgd-ce", "bim", "gn"])
def test_lp_attacks_default_to_bce_on_region_targets(name):
    model, x, target = _toy()
    opts = {"eps": 0.1, "seed": 0} if name != "gn" else {"std": 0.1, "seed": 0}
    if name in ("pgd", "bim", "apgd-ce"):
        opts["steps"] = 3
    x_adv = build_attack(name, **opts)(model, x, target)
    assert torch.isfinite(x_adv).all() and (x_adv - x).abs().max() > 0
    if name != "gn":
        assert (x_adv - x).abs().max() <= 0.1 + 1e-6
        same = build_attack(name, loss=_region_bce, **opts)(model, x, target)
        assert torch.allclose(same, x_adv, atol=1e-6)
        with torch.no_grad():
            assert _region_bce(model(x_adv), target) > _region_bce(model(x), target)


def test_region_targets_single_region_ignore_channel_and_unsupported_attacks():
    # one region: a one-output model is a sigmoid; a (B, 1, *S) target is its binary region
    model, x, target = _toy(k=1)
    x_adv = build_attack("pgd", eps=0.1, steps=2, seed=0)(model, x, target)
    with torch.no_grad():
        assert _region_bce(model(x_adv), target) > _region_bce(model(x), target)
    # nnU-Net's ignore label: an extra last channel; the default BCE masks those voxels
    model, x, target = _toy(k=2, r=3)
    attack = build_attack("fgsm", eps=0.1)
    x_adv = attack(model, x, target)
    mask = ~target[0][:, -1:]

    def masked_bce(output, t):
        bce = F.binary_cross_entropy_with_logits(_full(output), _full(t)[:, :-1].float(), reduction="none")
        m = mask.expand_as(bce).float()
        return ((bce * m).flatten(1).sum(1) / m.flatten(1).sum(1)).mean()

    assert torch.allclose(build_attack("fgsm", eps=0.1, loss=masked_bce)(model, x, target), x_adv)
    # VAFA early stop and the ensemble's per-sample Dice work on regions
    assert build_attack("ensemble", attacks=[("fgsm", {"eps": 0.1}),
                                             ("gn", {"std": 0.1})])(model, x, target).shape == x.shape
    # softmax-CE weightings, targeted attacks and a wrong region count are refused, clearly
    model, x, target = _toy()
    for name, opts in (("segpgd", {}), ("cospgd", {}), ("pgd", {"targeted": True}), ("ifgsm-targeted", {})):
        with pytest.raises(ValueError, match="region|targeted"):
            build_attack(name, steps=1, **opts)(model, x, target)
    with pytest.raises(ValueError, match="channels"):
        build_attack("fgsm")(_Sigmoid3(k=4), x, target)


def test_vafa_on_region_targets():
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1))
    torch.manual_seed(0)
    _, x, target = _toy()
    x_adv = build_attack("vafa-3d", steps=2, block_size=(4, 4, 4), q_max=30.0)(model, x, target[0])
    assert (x_adv - x).abs().max() > 0
    with torch.no_grad():
        assert _region_bce(model(x_adv), target) > _region_bce(model(x), target)


def test_region_dice_per_sample():
    p = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.bool)
    y = torch.tensor([[[1, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.bool)
    assert region_dice_per_sample(p, y).tolist() == pytest.approx([2 / 3, 1.0])
    mask = torch.tensor([[[1, 0, 1, 1]], [[1, 1, 1, 1]]])
    assert region_dice_per_sample(p, y, mask).tolist() == pytest.approx([1.0, 1.0])
