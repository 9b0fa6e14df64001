"""The published training recipes (VAFT / M_VAFA, SAAT, dual norm, NLCE), in-process on tiny
versions of the planned networks (2D and 3D, deep supervision on and off)."""
import copy

import numpy as np
import pytest
import torch
from in_process_trainer import build_network, make_trainer
from nnunetv2.run import run_training
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights as nnunet_load_pretrained_weights
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerBN import nnUNetTrainerBN
from torch import nn
from trainer_batch import make_batch

import nnunet_adv.trainers as trainers
from nnunet_adv.attacks.vafa import VAFA2D, VAFA3D
from nnunet_adv.losses import frequency_consistency
from nnunet_adv.modules.dual_norm import ADV, CLEAN, dual_norms, norm_route
from nnunet_adv.modules.nlce import NLCE
from nnunet_adv.trainers import (
    nnUNetTrainerDualBN,
    nnUNetTrainerDualBN_TestShort,
    nnUNetTrainerDualNorm,
    nnUNetTrainerDualNorm_TestShort,
    nnUNetTrainerNLCE,
    nnUNetTrainerNLCE_MultiStage,
    nnUNetTrainerNLCE_TestShort,
    nnUNetTrainerNLCE_VAFT,
    nnUNetTrainerNLCE_VAFT_TestShort,
    nnUNetTrainerSAAT,
    nnUNetTrainerSAAT_TestShort,
    nnUNetTrainerVAFA,
    nnUNetTrainerVAFA_TestShort,
    nnUNetTrainerVAFT,
    nnUNetTrainerVAFT_TestShort,
)
from nnunet_adv.trainers.vaft import vafa_block_size
from nnunet_adv.training.adversarial_trainer import RecipeError
from nnunet_adv.training.network_changes import (
    BatchNormArchitecture,
    BatchRoutedDualNorm,
    DualNormConversion,
    InsertNLCE,
)
from nnunet_adv.training.pretrained import load_pretrained_weights
from nnunet_adv.training.saat_schedule import SAATSchedule, replay


# ----------------------------------------------------------------------------- helpers
def _unused_head(trainer, name):
    """Segmentation heads that get no gradient in nnU-Net's step: with deep supervision the
    coarsest (decoder.seg_layers[0]; loss weight 0), without it all but the last."""
    if not name.startswith("decoder.seg_layers."):
        return False
    index = int(name.split(".")[2])
    return index == 0 if trainer.enable_deep_supervision else index < len(trainer.network.decoder.seg_layers) - 1


def _count_optimizer_steps(trainer, monkeypatch):
    calls = []
    original = trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    return calls


# ----------------------------------------------------------------------------- defaults
def test_published_defaults_of_every_recipe():
    # VAFT (Hanif et al. 2023): q_max 20, 20 steps, SSIM on, q_min 5 (ref. code), block 32, weights 1/1/1
    assert nnUNetTrainerVAFT.attack_name == "vafa-3d"
    assert nnUNetTrainerVAFT.attack_kwargs == {"q_max": 20.0, "q_min": 5.0, "steps": 20, "use_ssim_loss": True}
    assert nnUNetTrainerVAFT.vafa_block_candidates[0] == 32
    assert (nnUNetTrainerVAFT.clean_loss_weight, nnUNetTrainerVAFT.adversarial_loss_weight,
            nnUNetTrainerVAFT.frequency_consistency_weight) == (1.0, 1.0, 1.0)
    assert nnUNetTrainerVAFT.attack_in_train_mode is False
    # M_VAFA: adversarial loss only
    assert (nnUNetTrainerVAFA.clean_loss_weight, nnUNetTrainerVAFA.adversarial_loss_weight,
            nnUNetTrainerVAFA.frequency_consistency_weight) == (0.0, 1.0, 0.0)
    # SAAT: Free-AT, eps 8/255 of the range, step eps/2, gamma 1.1, m_max 5, decisions every 3 epochs
    s = nnUNetTrainerSAAT
    assert (s.saat_inner_attack, s.eps_frac, s.alpha_over_eps) == ("free", 8 / 255, 0.5)
    assert (s.saat_check_period, s.saat_gamma, s.saat_m_max, s.saat_m_init, s.saat_m_start) == (3, 1.1, 5, 1, 2)
    assert set(s.progress_panel_keys) == {"saat_m", "saat_grad_magnitude", "saat_threshold"}
    # dual BN (Han et al. 2021): PGD eps 0.005, alpha 0.0025, 10 steps, random start, BN momentum 0.01
    for cls in (nnUNetTrainerDualBN, nnUNetTrainerDualNorm):
        assert cls.attack_name == "pgd" and cls.eps_frac == 0.005 and cls.eps_frac * cls.alpha_over_eps == 0.0025
        assert cls.attack_kwargs == {"steps": 10, "random_start": True, "norm": "linf"}
        assert (cls.clean_loss_weight, cls.adversarial_loss_weight) == (1.0, 1.0)
        assert (cls.train_attack_route, cls.validation_attack_route) == (ADV, CLEAN)
    assert nnUNetTrainerDualBN.network_changes == (BatchNormArchitecture(), DualNormConversion(momentum=0.01))
    assert nnUNetTrainerDualNorm.network_changes == (DualNormConversion(momentum=0.01),)
    # NLCE: NLCEN's U-Net rule (one module at the bottleneck, keys not subsampled while the attention
    # fits), clean training; the two-stage variant by name; NLCE_VAFT = VAFT + the NLCE network change
    assert nnUNetTrainerNLCE.network_changes == (InsertNLCE(stages=(-1,), options=(("subsample", "auto"),)),)
    assert nnUNetTrainerNLCE_MultiStage.network_changes == (InsertNLCE(stages=(-2, -1), options=(("subsample", 2),)),)
    assert (nnUNetTrainerNLCE.clean_loss_weight, nnUNetTrainerNLCE.adversarial_loss_weight) == (1.0, 0.0)
    assert issubclass(nnUNetTrainerNLCE_VAFT, nnUNetTrainerVAFT)
    assert nnUNetTrainerNLCE_VAFT.network_changes == nnUNetTrainerNLCE.network_changes
    assert "train_step" not in vars(nnUNetTrainerNLCE_VAFT) and "extra_loss_terms" not in vars(nnUNetTrainerNLCE_VAFT)


def test_vafa_block_size_rule():
    assert vafa_block_size((32, 32, 32)) == 32
    assert vafa_block_size((64, 128, 96)) == 32
    assert vafa_block_size((80, 192, 160)) == 16       # nnU-Net-like patch: 32 does not divide 80
    assert vafa_block_size((40, 56, 72)) == 8
    assert vafa_block_size((20, 40, 40)) == 16         # nothing divides: largest that fits, padded
    assert vafa_block_size((6, 6)) == 6


@pytest.mark.parametrize("configuration, patch, attack_cls, block", [
    ("3d_fullres", None, VAFA3D, (32, 32, 32)),        # the planned 32^3 patch: the published block
    ("3d_fullres", (16, 16, 16), VAFA3D, (16, 16, 16)),
    ("2d", None, VAFA2D, (32, 32)),
])
def test_vaft_builds_vafa_for_the_configuration(nnunet_tree, monkeypatch, configuration, patch, attack_cls, block):
    trainer = make_trainer(nnUNetTrainerVAFT, nnunet_tree, configuration, True, monkeypatch, initialize=False,
                            patch_3d=patch)
    x = torch.zeros((1, 1) + tuple(trainer.configuration_manager.patch_size))
    attack = trainer._build_attack(x, {})
    assert isinstance(attack, attack_cls)
    o = attack.options
    assert (o["q_max"], o["q_min"], o["steps"], o["use_ssim_loss"], tuple(o["block_size"])) == (20, 5, 20, True, block)
    assert trainer._build_attack(x, trainer.val_attack_overrides).options["steps"] == 5


# ----------------------------------------------------------------------------- VAFT
@pytest.mark.parametrize("configuration, deep_supervision", [("3d_fullres", True), ("2d", False)])
def test_vaft_loss_has_clean_adversarial_and_frequency_terms(nnunet_tree, monkeypatch, configuration,
                                                              deep_supervision):
    trainer = make_trainer(nnUNetTrainerVAFT_TestShort, nnunet_tree, configuration, deep_supervision, monkeypatch)
    batch = make_batch(trainer)
    net, x, target = trainer.network, batch["data"], batch["target"]
    net.train()

    modes = []
    hook = net.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    x_adv = trainer.craft_adversarial(x, target)
    hook.remove()
    assert modes and not any(modes) and net.training      # VAFA crafted in eval mode, mode restored
    assert (x_adv - x).abs().max() > 1e-3

    terms = trainer.compute_loss_terms(x, x_adv, target)
    assert set(terms) == {"clean", "adv", "fc"}
    with torch.no_grad():
        out_clean, out_adv = net(x), net(x_adv)
        assert torch.allclose(terms["clean"], trainer.loss(out_clean, target), rtol=1e-4, atol=1e-5)
        assert torch.allclose(terms["adv"], trainer.loss(out_adv, target), rtol=1e-4, atol=1e-5)
        assert torch.allclose(terms["fc"], frequency_consistency(out_clean, out_adv), rtol=1e-4, atol=1e-6)
    assert terms["fc"] > 1e-4
    assert trainer.compute_loss_terms(x, x.clone(), target)["fc"] < 1e-5   # zero when adv == clean

    before = [p.detach().clone() for p in net.parameters()]
    out = trainer.train_step(batch)
    assert set(out) == {"loss", "loss_clean", "loss_adv", "loss_fc"}
    assert out["loss"] == pytest.approx(out["loss_clean"] + out["loss_adv"] + out["loss_fc"], rel=1e-5)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


@pytest.mark.parametrize("configuration, attack_cls", [("3d_fullres", "VAFA3DRef"), ("2d", "VAFA2DRef")])
def test_vaft_can_train_against_the_authors_vafa(nnunet_tree, monkeypatch, configuration, attack_cls):
    class _VAFTRef(nnUNetTrainerVAFT_TestShort):
        vafa_variant = "ref"

    trainer = make_trainer(_VAFTRef, nnunet_tree, configuration, True, monkeypatch)
    assert type(trainer._build_attack(make_batch(trainer)["data"], {})).__name__ == attack_cls
    assert trainer.attack_name.endswith("-ref")
    assert set(trainer.train_step(make_batch(trainer))) == {"loss", "loss_clean", "loss_adv", "loss_fc"}

    class _Bad(nnUNetTrainerVAFT_TestShort):
        vafa_variant = "authors"

    with pytest.raises(RecipeError, match="vafa_variant must be 'paper' or 'ref'"):
        make_trainer(_Bad, nnunet_tree, configuration, True, monkeypatch, initialize=False)


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_vaft_by_name_trains_against_the_authors_vafa_on_tiles_smaller_than_a_slice(nnunet_tree, monkeypatch,
                                                                                  configuration):
    """Issue 18 item 2 trains VAFT against the VAFA that hurts nnU-Net models: the authors' per-tile
    rescale on tiles smaller than a slice, set in the name (``rescaletile-8``: 8 voxels on every axis)."""
    cls = getattr(trainers, "nnUNetTrainerVAFT_TestShort_variant-ref_rescaletile-8")
    trainer = make_trainer(cls, nnunet_tree, configuration, True, monkeypatch)
    batch = make_batch(trainer)
    attack = trainer._build_attack(batch["data"], {})
    assert type(attack).__name__ == ("VAFA3DRef" if configuration == "3d_fullres" else "VAFA2DRef")
    assert attack.tile() == (8, 8, 8)
    assert set(trainer.train_step(batch)) == {"loss", "loss_clean", "loss_adv", "loss_fc"}

    class _BadTile(nnUNetTrainerVAFT_TestShort):  # a subclass's bad tile: the recipe's one line
        vafa_variant = "ref"
        attack_kwargs = {**nnUNetTrainerVAFT_TestShort.attack_kwargs, "rescale_tile": 0}

    with pytest.raises(RecipeError, match="rescale_tile"):
        make_trainer(_BadTile, nnunet_tree, configuration, True, monkeypatch, initialize=False)


def test_m_vafa_trains_on_the_adversarial_loss_only(nnunet_tree, monkeypatch):
    trainer = make_trainer(nnUNetTrainerVAFA_TestShort, nnunet_tree, "2d", True, monkeypatch)
    batch = make_batch(trainer)
    x_adv = trainer.craft_adversarial(batch["data"], batch["target"])
    assert set(trainer.compute_loss_terms(batch["data"], x_adv, batch["target"])) == {"adv"}


def test_nlce_vaft_is_vaft_on_the_nlce_network(nnunet_tree, monkeypatch):
    trainer = make_trainer(nnUNetTrainerNLCE_VAFT_TestShort, nnunet_tree, "2d", True, monkeypatch)
    assert sum(isinstance(m, NLCE) for m in trainer.network.modules()) == 1  # NLCE's network: the bottleneck
    assert isinstance(trainer._build_attack(make_batch(trainer)["data"], {}), VAFA2D)
    assert set(trainer.train_step(make_batch(trainer))) == {"loss", "loss_clean", "loss_adv", "loss_fc"}


# ----------------------------------------------------------------------------- SAAT rule
# (epoch, magnitude of that epoch, m for the next epoch, threshold after the epoch); period 3
SAAT_SEQUENCE = [
    (0, 5.0, 1, 0.0), (1, 4.0, 1, 0.0), (2, 3.0, 1, 0.0),
    (3, 1.0, 2, 0.0),                  # epoch == P: m <- 2
    (4, 2.0, 2, 2.2),                  # epoch == P + 1: thr <- 1.1 * mag
    (5, 9.0, 2, 2.2),                  # not a check epoch
    (6, 3.0, 3, 3.3),                  # 3 > 2.2: m + 1, thr <- 3.3
    (7, 0.1, 3, 3.3), (8, 0.1, 3, 3.3),
    (9, 3.4, 4, 3.74),                 # 3.4 > 3.3
    (12, 3.5, 4, 3.74),                # 3.4 <= 3.5 <= 3.74: unchanged
    (15, 3.0, 3, 3.3),                 # 3.0 < 3.74 / 1.1: m - 1
    (18, 10.0, 4, 11.0), (21, 20.0, 5, 22.0),
    (24, 30.0, 5, 22.0),               # m == m_max: no increase; 30 > 20: no decrease
    (27, 1.0, 4, 1.1), (30, 0.5, 3, 0.55), (33, 0.1, 2, 0.11),
    (36, 0.01, 2, 0.11),               # m == 2: no decrease below m_start
    (39, float("nan"), 2, 0.11),       # nothing measured: no decision
]


def test_saat_rule_against_a_hand_written_sequence_with_save_and_restore():
    schedule = SAATSchedule()
    restored = None
    for epoch, magnitude, m, threshold in SAAT_SEQUENCE:
        for s in (schedule, restored) if restored is not None else (schedule,):
            assert s.update(epoch, magnitude) == m, (epoch, s)
            assert s.threshold == pytest.approx(threshold), (epoch, s)
        if epoch == 9:  # save into a checkpoint-like dict and continue in a fresh schedule
            checkpoint = {"saat_state": copy.deepcopy(schedule.state_dict())}
            restored = SAATSchedule()
            assert (restored.m, restored.threshold) == (1, 0.0)
            restored.load_state_dict(checkpoint["saat_state"])
            assert (restored.m, restored.threshold) == (4, pytest.approx(3.74))


def test_saat_rule_with_a_configurable_period():
    s = SAATSchedule(check_period=1, m_max=3)
    got = [s.update(e, mag) for e, mag in enumerate([1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.0])]
    # epoch 1: m <- 2; epoch 2: thr <- 2.2; epochs 3, 4 increase (m_max 3 stops at 3); epoch 6 decreases
    assert got == [1, 2, 2, 3, 3, 3, 2]
    with pytest.raises(ValueError):
        SAATSchedule(check_period=0)


# ----------------------------------------------------------------------------- SAAT trainer
class _SAATm2(nnUNetTrainerSAAT_TestShort):
    saat_m_init = 2


def test_saat_free_at_step_replays_m_times_with_a_persistent_buffer(nnunet_tree, monkeypatch):
    trainer = make_trainer(_SAATm2, nnunet_tree, "3d_fullres", True, monkeypatch)
    net = trainer.network
    net.train()
    batch1, batch2 = make_batch(trainer, seed=0), make_batch(trainer, seed=1)
    x1 = batch1["data"]
    eps1 = trainer.threat_model.budget(x1, eps_frac=8 / 255).eps

    steps = _count_optimizer_steps(trainer, monkeypatch)
    seen = []
    original = trainer.compute_loss_terms
    monkeypatch.setattr(trainer, "compute_loss_terms",
                        lambda d, xa, t: (seen.append(xa.detach().clone()), original(d, xa, t))[1])
    out = trainer.train_step(batch1)
    assert len(steps) == 2 and len(seen) == 2                    # m = 2 replays, 2 optimiser steps
    assert torch.equal(seen[0], x1)                               # zero buffer at the start
    delta = trainer.free_delta
    assert (delta.abs() <= eps1 + 1e-7).all()
    # two sign steps of eps/2 (not the reference's eps // 2 == 0): multiples of eps/2, some reach eps
    assert torch.allclose(torch.remainder(delta.abs() / (eps1 / 2) + 0.5, 1.0), torch.full_like(delta, 0.5), atol=1e-3)
    assert (delta.abs() > 0.99 * eps1).any()
    assert out["saat_mag_count"] == 2 * x1.shape[0] and out["saat_mag_sum"] > 0

    # the buffer persists: the next batch starts from it, projected onto that batch's eps-ball and box
    x2 = batch2["data"]
    budget2 = trainer.threat_model.budget(x2, eps_frac=8 / 255)
    expected = torch.minimum(torch.maximum(x2 + torch.maximum(torch.minimum(delta, budget2.eps), -budget2.eps),
                                           budget2.lower), budget2.upper)
    seen.clear()
    trainer.train_step(batch2)
    assert torch.allclose(seen[0], expected, atol=1e-6)


def test_saat_seat_measures_the_perturbations_gradient_on_each_patchs_range(nnunet_tree, monkeypatch):
    """nnUNetTrainerSAAT_SEAT: the magnitude is SEAT's delta.grad (0 where the box clamp is active,
    x_in.grad elsewhere) and eps is a share of each patch's range (SEAT's b_eps)."""
    from nnunet_adv.trainers import nnUNetTrainerSAAT_SEAT

    class _Short(nnUNetTrainerSAAT_SEAT):
        num_iterations_per_epoch, num_val_iterations_per_epoch, num_epochs = 1, 1, 1

    trainer = make_trainer(_Short, nnunet_tree, "3d_fullres", True, monkeypatch)
    trainer.network.train()
    batch = make_batch(trainer, seed=0)
    x = batch["data"]
    windows = []
    real_with = type(trainer.threat_model).with_patch_windows
    monkeypatch.setattr(type(trainer.threat_model), "with_patch_windows",
                        lambda self: windows.append(1) or real_with(self))
    eps = real_with(trainer.threat_model).budget(x, eps_frac=8 / 255).eps
    trainer.free_delta = eps.expand_as(x).clone()  # +eps everywhere: the patch's maximum is clamped
    measured, inputs = [], []
    real_magnitude = trainer._magnitude
    monkeypatch.setattr(trainer, "_magnitude", lambda g, scale: measured.append(g.detach().clone())
                        or real_magnitude(g, scale))
    real_optimise = trainer._optimise
    monkeypatch.setattr(trainer, "_optimise", lambda d, x_in, t: inputs.append(x_in) or real_optimise(d, x_in, t))
    out = trainer.train_step(batch)
    assert windows and len(measured) == 2  # both measures of the one backward
    clamped = x + eps > x.flatten(2).amax(2)[..., None, None, None]
    g = inputs[0].grad
    assert clamped.any() and (g[clamped] != 0).any()  # the input gradient ("input", ours) is not 0 there
    (perturbation,) = [m for m in measured if (m[clamped] == 0).all()]
    assert torch.equal(perturbation[~clamped], g[~clamped])
    # the measure in use drives m; ours is logged beside it, from the same backward
    assert out["saat_mag_sum"] == pytest.approx(float(g[~clamped].abs().sum()), rel=1e-5)
    assert out["saat_other_mag_sum"] == pytest.approx(float(g.abs().sum()), rel=1e-5)
    assert out["saat_other_mag_sum"] > out["saat_mag_sum"]
    logged = []
    monkeypatch.setattr(trainer, "print_to_log_file", lambda *args, **kwargs: logged.append(" ".join(map(str, args))))
    trainer.saat_decide(0.5, 0.75)
    # the log names the measure it reports, and the other one's value
    assert "perturbation-gradient magnitude 0.5 (input-gradient: 0.75)" in logged[-1]
    with pytest.raises(RecipeError, match="saat_grad_measure"):
        make_trainer(type("_Bad", (_Short,), {"saat_grad_measure": "delta"}), nnunet_tree, "3d_fullres", True,
                      monkeypatch)


# SEAT (TrustAI/SEAT at_main.py): epochs 1..15, the m each epoch trains with, check_mag 3, gamma 1.1,
# adv_iters 5, under a magnitude rising 1.2x per epoch and one falling 0.8x per epoch
SEAT_M_RISING = [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
SEAT_M_FALLING = [1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]


@pytest.mark.parametrize("factor, expected", [(1.2, SEAT_M_RISING), (0.8, SEAT_M_FALLING)])
def test_saat_trainer_takes_seats_decisions_in_seats_epochs(nnunet_tree, monkeypatch, factor, expected):
    """nnU-Net's current_epoch is 0-based, SEAT's epochs are 1-based: the decision after SEAT's
    epoch 3 is the one after nnU-Net's epoch 2 (a test of the one-epoch-late bug)."""
    class _SAATPeriod3(nnUNetTrainerSAAT_TestShort):
        saat_check_period = 3

    trainer = make_trainer(_SAATPeriod3, nnunet_tree, "2d", False, monkeypatch, initialize=False)
    used = []
    for epoch in range(15):
        trainer.current_epoch = epoch
        used.append(trainer.saat.m)
        trainer.saat_decide(1.0 * factor ** epoch)
    assert used == expected
    assert replay([1.0 * factor ** epoch for epoch in range(15)]) == expected


def test_saat_free_at_keeps_clean_voxels_outside_the_ct_window(nnunet_tree, monkeypatch):
    """The Free-AT input is clipped to the box that contains the clean voxel: a CT patch voxel outside
    the dataset window (nnU-Net's augmentation puts some there) is not pulled into it."""
    from nnunet_adv.threat_model import ThreatModel

    trainer = make_trainer(nnUNetTrainerSAAT_TestShort, nnunet_tree, "2d", False, monkeypatch)
    trainer.threat_model = ThreatModel(["CTNormalization"], {"0": {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0,
                                                                   "percentile_99_5": 1.0}})
    batch = make_batch(trainer)
    assert bool((batch["data"].abs() > 1).any())        # voxels outside the window [-1, 1]
    seen = []
    original = trainer.compute_loss_terms
    monkeypatch.setattr(trainer, "compute_loss_terms",
                        lambda d, xa, t: (seen.append(xa.detach().clone()), original(d, xa, t))[1])
    trainer.train_step(batch)                            # m = 1, zero buffer: the clean batch itself
    assert torch.equal(seen[0], batch["data"])


def test_saat_free_at_magnitude_is_the_input_gradient_of_the_training_loss(nnunet_tree, monkeypatch):
    trainer = make_trainer(nnUNetTrainerSAAT_TestShort, nnunet_tree, "2d", False, monkeypatch)
    net = trainer.network
    net.train()
    batch = make_batch(trainer)
    reference = copy.deepcopy(net)
    x = batch["data"].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(trainer.loss(reference(x), batch["target"]), x)
    out = trainer.train_step(batch)  # m = 1, zero buffer: trains on the clean batch itself
    assert out["saat_mag_count"] == x.shape[0]
    assert out["saat_mag_sum"] == pytest.approx(float(g.abs().flatten(1).sum(1).sum()), rel=1e-4)


def test_saat_pgd_inner_attack_uses_m_steps(nnunet_tree, monkeypatch):
    class _SAATPGD(nnUNetTrainerSAAT_TestShort):
        saat_inner_attack = "pgd"
        saat_m_init = 3

    trainer = make_trainer(_SAATPGD, nnunet_tree, "2d", True, monkeypatch)
    recorded = []
    original = trainer.craft_adversarial
    monkeypatch.setattr(trainer, "craft_adversarial",
                        lambda d, t, o=None, for_training=True: (recorded.append(dict(o or {})),
                                                                 original(d, t, o, for_training))[1])
    steps = _count_optimizer_steps(trainer, monkeypatch)
    out = trainer.train_step(make_batch(trainer))
    assert recorded == [{"steps": 3}] and len(steps) == 1
    assert out["saat_mag_sum"] > 0 and out["saat_mag_count"] == 2
    assert out["saat_other_mag_count"] == 0  # PGD has no perturbation buffer: no other measure


def test_saat_logs_every_epoch_and_restores_its_state_from_a_checkpoint(nnunet_tree, monkeypatch, tmp_path):
    trainer = make_trainer(nnUNetTrainerSAAT_TestShort, nnunet_tree, "2d", False, monkeypatch)  # period 1
    magnitudes = [1.0, 2.0, 3.0, 5.0]
    for epoch, mag in enumerate(magnitudes):
        trainer.current_epoch = epoch
        outputs = [{"loss": np.float32(1.0), "saat_mag_sum": 2 * mag, "saat_mag_count": 2.0,
                    "saat_other_mag_sum": 2 * (4 - epoch), "saat_other_mag_count": 2.0},
                   {"loss": np.float32(1.0), "saat_mag_sum": 6 * mag, "saat_mag_count": 6.0,
                    "saat_other_mag_sum": 6 * (4 - epoch), "saat_other_mag_count": 6.0}]
        trainer.on_train_epoch_end(outputs)
    log = trainer.logger.local_logger.my_fantastic_logging
    # SEAT's 1-based epochs, period 1: after epoch 1 m <- 2, after 2 thr <- 1.1 mag, then decisions
    assert log["saat_m"] == [1, 2, 2, 3]                     # m used in each epoch
    assert log["saat_grad_magnitude"] == pytest.approx(magnitudes)
    assert log["saat_threshold"] == pytest.approx([0.0, 2.2, 3.3, 5.5])
    assert log["saat_other_grad_magnitude"] == pytest.approx([4.0, 3.0, 2.0, 1.0])
    # the logged magnitudes replay to the logged m; the other measure, falling, would have stayed at 2
    assert replay(log["saat_grad_magnitude"], check_period=1) == log["saat_m"]
    assert replay(log["saat_other_grad_magnitude"], check_period=1) == [1, 2, 2, 2]
    assert trainer.saat.m == 4
    assert set(trainer.logger.local_logger.extra_panel_keys) >= {"saat_m", "saat_grad_magnitude", "saat_threshold"}

    path = tmp_path / "checkpoint.pth"
    trainer.save_checkpoint(str(path))
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema", "current_epoch",
                "init_args", "trainer_name", "inference_allowed_mirroring_axes"):
        assert key in checkpoint, key
    assert checkpoint["saat_state"]["m"] == 4 and checkpoint["saat_state"]["threshold"] == pytest.approx(5.5)

    fresh = make_trainer(nnUNetTrainerSAAT_TestShort, nnunet_tree, "2d", False, monkeypatch)
    assert fresh.saat.m == 1
    fresh.load_checkpoint(str(path))
    assert (fresh.saat.m, fresh.saat.threshold) == (4, pytest.approx(5.5))
    assert fresh.logger.local_logger.my_fantastic_logging["saat_m"] == [1, 2, 2, 3]


# ----------------------------------------------------------------------------- dual norm
class _DualBNSeeded(nnUNetTrainerDualBN_TestShort):
    attack_kwargs = {**nnUNetTrainerDualBN_TestShort.attack_kwargs, "seed": 0}


class _DualINSeeded(nnUNetTrainerDualNorm_TestShort):
    attack_kwargs = {**nnUNetTrainerDualNorm_TestShort.attack_kwargs, "seed": 0}


@pytest.mark.parametrize("cls, configuration, deep_supervision", [
    (_DualBNSeeded, "3d_fullres", True), (_DualINSeeded, "2d", False), (_DualBNSeeded, "2d", False)])
def test_dual_norm_step(nnunet_tree, monkeypatch, cls, configuration, deep_supervision):
    trainer = make_trainer(cls, nnunet_tree, configuration, deep_supervision, monkeypatch)
    net = trainer.network
    duals = list(dual_norms(net))
    assert duals and all(isinstance(d, BatchRoutedDualNorm) for d in duals)
    bn = cls is _DualBNSeeded
    inner = nn.modules.batchnorm._BatchNorm if bn else nn.modules.instancenorm._InstanceNorm
    assert all(isinstance(b, inner) for d in duals for b in d.norms)
    if bn:
        assert all(b.momentum == 0.01 for d in duals for b in d.norms)
    batch = make_batch(trainer)
    x, target = batch["data"], batch["target"]
    net.train()

    # the training attack goes through the adversarial branch in eval mode; validation's through the clean one
    seen = []
    hook = duals[0].register_forward_pre_hook(lambda m, i: seen.append((m.route, m.training)))
    x_adv = trainer.craft_adversarial(x, target)
    assert seen and set(seen) == {(ADV, False)}
    seen.clear()
    trainer.craft_adversarial(x, target, {"steps": 1}, for_training=False)
    assert seen and set(seen) == {(CLEAN, False)}
    hook.remove()
    assert all(d.route == CLEAN and d.segments is None for d in duals) and net.training

    # one step's gradients == those of L(f(x; clean branch)) + L(f(x_adv; adversarial branch))
    reference = copy.deepcopy(net)
    reference.train()
    with norm_route(reference, CLEAN):
        loss = trainer.loss(reference(x), target)
    with norm_route(reference, ADV):
        loss = loss + trainer.loss(reference(x_adv), target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 12)
    out = trainer.train_step(batch)
    assert set(out) == {"loss", "loss_clean", "loss_adv"}
    for (name, p), r in zip(net.named_parameters(), reference.parameters()):
        if _unused_head(trainer, name):
            continue
        assert p.grad is not None and r.grad is not None, name   # every parameter of both branches
        assert torch.allclose(p.grad, r.grad, rtol=1e-3, atol=1e-6), name
    if bn:  # running statistics are per branch (clean batch vs adversarial batch)
        for d, rd in zip(duals, dual_norms(reference)):
            for b, rb in zip(d.norms, rd.norms):
                assert torch.allclose(b.running_mean, rb.running_mean, atol=1e-6)

    for seed in (1, 2):
        trainer.train_step(make_batch(trainer, seed=seed))
    for d in duals:  # the two branches now hold different parameters
        assert not torch.allclose(d.norms[0].weight, d.norms[1].weight)
        if bn:
            assert not torch.allclose(d.norms[0].running_mean, d.norms[1].running_mean)

    # prediction: the network nnU-Net's predictor builds routes clean and loads the checkpoint strictly
    deployed = build_network(cls, trainer)
    assert all(d.route == CLEAN for d in dual_norms(deployed))
    state = net.state_dict()
    assert any(".norms.0." in k for k in state) and any(".norms.1." in k for k in state)
    deployed.load_state_dict(state, strict=True)
    deployed.eval()
    net.eval()
    trainer.set_deep_supervision_enabled(False)
    with torch.no_grad():
        with norm_route(net, CLEAN):
            clean_out = net(x)
        with norm_route(net, ADV):
            adv_out = net(x)
        assert torch.allclose(deployed(x), clean_out, atol=1e-5)
        assert not torch.allclose(deployed(x), adv_out, atol=1e-3)


# ----------------------------------------------------------------------------- NLCE
@pytest.mark.parametrize("configuration, deep_supervision", [("3d_fullres", True), ("2d", False)])
def test_nlce_network_is_identity_like_and_trains_every_parameter(nnunet_tree, monkeypatch, configuration,
                                                                  deep_supervision):
    # the planned patch (32^3 / 32^2): coarsest stage 4^3, so the max-pooled keys are more than one
    # (at a 2^3 stage they collapse to a single key and theta/phi get exactly zero gradients)
    trainer = make_trainer(nnUNetTrainerNLCE_TestShort, nnunet_tree, configuration, deep_supervision, monkeypatch,
                            patch_3d=None)
    built = build_network(nnUNetTrainerNLCE_TestShort, trainer)
    nlces = [m for m in built.modules() if isinstance(m, NLCE)]
    n_stages = len(built.encoder.stages)
    assert len(nlces) == 1 and any(isinstance(m, NLCE) for m in built.encoder.stages[n_stages - 1].modules())
    assert nlces[0].non_local.subsample == "auto"
    multi = build_network(nnUNetTrainerNLCE_MultiStage, trainer)
    assert [i for i in range(n_stages) if any(isinstance(m, NLCE) for m in multi.encoder.stages[i].modules())] \
        == [n_stages - 2, n_stages - 1]

    # identity at initialisation: the plain network with the same weights computes the same function
    torch.manual_seed(1)
    plain = build_network(nnUNetTrainer, trainer)
    missing, unexpected = built.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".nlce." in k for k in missing)
    x = make_batch(trainer)["data"]
    built.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(built(x), plain(x), atol=1e-5)

    # gradients reach every parameter (those behind the zero-initialised outputs after one step)
    net = trainer.network
    net.train()
    trainer.train_step(make_batch(trainer, seed=0))
    trainer.train_step(make_batch(trainer, seed=1))
    for name, p in net.named_parameters():
        if not _unused_head(trainer, name):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("keep", [True, False])
def test_finetuning_keeps_the_segmentation_heads_of_the_same_task(nnunet_tree, monkeypatch, tmp_path, keep):
    """-pretrained_weights into a recipe without network changes: nnU-Net's rules, but the clean model's
    segmentation heads are kept (keep_segmentation_heads, default); off: nnU-Net's re-initialised heads."""
    from nnunet_adv.trainers import nnUNetTrainerPGDAT_TestShort

    cls = type("_PGDATHeads", (nnUNetTrainerPGDAT_TestShort,), {"keep_segmentation_heads": keep})
    trainer = make_trainer(cls, nnunet_tree, "2d", True, monkeypatch)
    torch.manual_seed(5)
    plain = build_network(nnUNetTrainer, trainer, deep_supervision=True)
    path = tmp_path / "clean.pth"
    torch.save({"network_weights": plain.state_dict()}, path)
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    run_training.load_pretrained_weights(trainer.network, str(path))
    for key, value in trainer.network.state_dict().items():
        expected = plain.state_dict()[key] if keep or ".seg_layers." not in key else before[key]
        assert torch.equal(value, expected), key


def test_dual_bn_from_an_instancenorm_model_estimates_its_statistics_from_the_batches(nnunet_tree, monkeypatch,
                                                                                        tmp_path):
    """Fine-tuned from nnU-Net's InstanceNorm clean model (the study's path), DualBN's running statistics are
    the training batches' average from the first batch on (no pull towards mean 0 / variance 1, which left
    nnU-Net's validation pseudo Dice at 0.38 after 50 iterations of the study's fine-tune), and each branch
    takes its momentum back after 1/momentum batches."""
    cls = type("_DualBNFastMomentum", (nnUNetTrainerDualBN_TestShort,),
               {"network_changes": (BatchNormArchitecture(), DualNormConversion(momentum=0.5))})  # warm-up: 2
    trainer = make_trainer(cls, nnunet_tree, "2d", True, monkeypatch)
    torch.manual_seed(3)
    path = tmp_path / "clean.pth"
    torch.save({"network_weights": build_network(nnUNetTrainer, trainer, deep_supervision=True).state_dict()}, path)
    run_training.load_pretrained_weights(trainer.network, str(path))
    branches = [bn for m in dual_norms(trainer.network) for bn in m.norms]
    assert branches and all(bn.momentum is None and int(bn.num_batches_tracked) == 0 for bn in branches)

    first = dual_norms(trainer.network).__next__().norms[CLEAN]
    seen = []
    hook = first.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()) if m.training else None)
    trainer.train_step(make_batch(trainer, seed=0))
    hook.remove()
    assert len(seen) == 1   # the clean half of the one training forward (the attack runs in eval mode)
    torch.testing.assert_close(first.running_mean, seen[0].mean(dim=(0, 2, 3)))
    trainer.train_step(make_batch(trainer, seed=1))
    assert all(bn.momentum is None for bn in branches)
    trainer.train_step(make_batch(trainer, seed=2))   # 2 batches averaged: the momentum is back
    assert all(bn.momentum == 0.5 for bn in branches)


@pytest.mark.parametrize("cls, plain_cls", [(nnUNetTrainerNLCE_TestShort, nnUNetTrainer),
                                            (nnUNetTrainerDualBN_TestShort, nnUNetTrainerBN),
                                            (nnUNetTrainerDualBN_TestShort, nnUNetTrainer),
                                            (nnUNetTrainerDualNorm_TestShort, nnUNetTrainer)])
def test_finetuning_from_a_clean_checkpoint(nnunet_tree, monkeypatch, tmp_path, cls, plain_cls):
    """Every recipe that changes the network fine-tunes from a clean checkpoint; (DualBN, nnUNetTrainer) is
    what nnUNetv2_adv_study does: an InstanceNorm clean model, whose norms have no running statistics."""
    trainer = make_trainer(cls, nnunet_tree, "2d", True, monkeypatch)
    fresh = copy.deepcopy(trainer.network.state_dict())
    torch.manual_seed(3)
    plain = build_network(plain_cls, trainer, deep_supervision=True)
    if plain_cls is nnUNetTrainerBN:  # non-trivial running statistics to copy
        plain.train()
        with torch.no_grad():
            plain(make_batch(trainer)["data"])
    path = tmp_path / "clean.pth"
    torch.save({"network_weights": plain.state_dict()}, path)

    # nnU-Net's own loader needs identical keys; nnUNetv2_train now calls ours (installed by the trainer)
    with pytest.raises(AssertionError, match="missing in the pretrained"):
        nnunet_load_pretrained_weights(copy.deepcopy(trainer.network), str(path))
    assert run_training.load_pretrained_weights is load_pretrained_weights
    run_training.load_pretrained_weights(trainer.network, str(path))

    net_state, plain_state = trainer.network.state_dict(), plain.state_dict()
    for key, value in plain_state.items():
        if ".seg_layers." in key:  # the same task: the clean model's heads are kept (nnU-Net's rule drops them)
            assert torch.equal(net_state[key], value), key
            continue
        if key in net_state:
            assert torch.equal(net_state[key], value), key
        else:  # a plain norm: copied into both dual branches
            prefix, name = key.rsplit(".", 1)
            for branch in (0, 1):
                assert torch.equal(net_state[f"{prefix}.norms.{branch}.{name}"], value), key
    # BatchNorm statistics an InstanceNorm checkpoint lacks start fresh (mean 0, variance 1), in both branches
    fresh_statistics = [k for k in net_state if k.rsplit(".", 1)[1] in ("running_mean", "running_var")
                        and ".norms." in k and k.replace(".norms.0.", ".").replace(".norms.1.", ".") not in plain_state]
    assert bool(fresh_statistics) == (cls is nnUNetTrainerDualBN_TestShort and plain_cls is nnUNetTrainer)
    for key in fresh_statistics:
        assert torch.equal(net_state[key], fresh[key]), key
        assert torch.all(net_state[key] == (1.0 if key.endswith("running_var") else 0.0)), key
    if cls is nnUNetTrainerNLCE_TestShort:  # fine-tuning starts from the clean network's function
        for key, value in plain_state.items():
            if ".seg_layers." in key:
                net_state[key].copy_(value)
        trainer.network.eval()
        plain.eval()
        x = make_batch(trainer)["data"]
        with torch.no_grad():
            assert torch.allclose(trainer.network(x)[0], plain(x)[0], atol=1e-5)
