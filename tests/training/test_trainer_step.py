"""The adversarial training step of nnUNetTrainerAdversarial, in-process, 2D and 3D,
with and without deep supervision, on a tiny version of the planned network."""
import copy

import pytest
import torch
from in_process_trainer import make_trainer
from trainer_batch import make_batch

from nnunet_adv.trainers import nnUNetTrainerPGDAT_TestShort


class _Trainer(nnUNetTrainerPGDAT_TestShort):
    # a seeded attack so that a reference computation can reproduce x_adv exactly
    attack_kwargs = {**nnUNetTrainerPGDAT_TestShort.attack_kwargs, "steps": 3, "seed": 0}
    alpha_over_eps = 2.5 / 3


def _clean_train(trainer, batch, steps=40):
    """Make the tiny network fit the batch, so an attack has something to break."""
    trainer.network.train()
    for _ in range(steps):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.loss(trainer.network(batch["data"]), batch["target"]).backward()
        trainer.optimizer.step()


CASES = [("3d_fullres", True), ("3d_fullres", False), ("2d", True), ("2d", False)]


@pytest.mark.parametrize("configuration, deep_supervision", CASES)
def test_adversarial_training_step(nnunet_tree, monkeypatch, configuration, deep_supervision):
    trainer = make_trainer(_Trainer, nnunet_tree, configuration, deep_supervision, monkeypatch)
    batch = make_batch(trainer)
    _clean_train(trainer, batch)
    net, x, target = trainer.network, batch["data"], batch["target"]

    # 1. the attack leaves parameter gradients and the train/eval mode alone
    net.train()
    sentinels = {n: torch.full_like(p, 7.0) for n, p in net.named_parameters()}
    for n, p in net.named_parameters():
        p.grad = sentinels[n].clone()
    x_adv = trainer.craft_adversarial(x, target)
    assert net.training
    assert all(torch.equal(p.grad, sentinels[n]) for n, p in net.named_parameters())

    # 2. the budget holds (z-scored data: eps = 4/255 of each patch's range, box = its range)
    budget = trainer.threat_model.budget(x, eps_frac=4 / 255)
    assert ((x_adv - x).abs() <= budget.eps + 1e-6).all()
    assert (x_adv >= budget.lower - 1e-6).all() and (x_adv <= budget.upper + 1e-6).all()
    assert (x_adv - x).abs().max() > 0.5 * budget.eps.min()  # it moved

    # 3. the adversarial loss exceeds the clean loss of the trained network
    with torch.no_grad():
        net.eval()
        clean_loss = trainer.loss(net(x), target).item()
        adv_loss = trainer.loss(net(x_adv), target).item()
    assert adv_loss > clean_loss * 1.05, (clean_loss, adv_loss)

    # 4. the step's parameter gradients are exactly those of the adversarial loss
    #    (seeded attack -> the step crafts the same x_adv), and parameters change
    reference = copy.deepcopy(net)
    reference.train()
    reference.zero_grad(set_to_none=True)
    trainer.loss(reference(x_adv), target).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 12)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.train()
    trainer.train_step(batch)
    compared = 0
    for (n, p), (_, r) in zip(net.named_parameters(), reference.named_parameters()):
        # the coarsest deep-supervision head has loss weight 0 in nnU-Net: no gradient in both
        assert (p.grad is None) == (r.grad is None), n
        if p.grad is not None:
            assert torch.allclose(p.grad, r.grad, rtol=1e-4, atol=1e-6), n
            compared += 1
    assert compared > 0.9 * len(list(net.parameters()))
    assert any(not torch.equal(before[n], p) for n, p in net.named_parameters())


def test_validation_step_reports_clean_and_robust_counts(nnunet_tree, monkeypatch):
    trainer = make_trainer(_Trainer, nnunet_tree, "3d_fullres", True, monkeypatch)
    batch = make_batch(trainer)
    _clean_train(trainer, batch, steps=80)
    trainer.network.eval()
    with torch.no_grad():  # nnU-Net validates under no_grad: the attack must enable gradients itself
        out = trainer.validation_step(batch)
    for key in ("tp_hard", "fp_hard", "fn_hard", "loss"):
        assert f"robust_{key}" in out
    clean_dice = 2 * out["tp_hard"] / (2 * out["tp_hard"] + out["fp_hard"] + out["fn_hard"])
    robust_dice = 2 * out["robust_tp_hard"] / (2 * out["robust_tp_hard"] + out["robust_fp_hard"]
                                               + out["robust_fn_hard"])
    assert clean_dice.mean() > 0.3  # the network has learnt the task ...
    assert robust_dice.mean() < clean_dice.mean()  # ... and the attack degrades it
    assert out["robust_loss"] > out["loss"]


# Few-step settings of every attack for the check below (the published defaults are tested
# in test_attacks.py; here we check that a trainer can use each one in nnU-Net space).
FAST_OPTIONS = {
    "apgd-ce": {"steps": 2}, "bim": {"steps": 2}, "cospgd": {"steps": 2}, "fgsm": {}, "gn": {},
    "ifgsm-targeted": {"steps": 2}, "pgd": {"steps": 2}, "segpgd": {"steps": 2},
    "vafa-2d": {"steps": 2}, "vafa-3d": {"steps": 2, "block_size": (8, 8, 8)},
    "ensemble": {"attacks": [("fgsm", {}), ("pgd", {"steps": 2})]},
    "apgd-rog": {"steps": 2, "restarts": 2}, "vafa-3d-ref": {"steps": 2, "block_size": (8, 8, 8)},
    "vafa-3d-paper": {"steps": 2, "block_size": (8, 8, 8)},
    "vafa-2d-ref": {"steps": 2}, "slice-rescale": {},
    "apgd-dlr": {"steps": 2, "restarts": 1}, "fab": {"steps": 2, "restarts": 1}, "square": {"queries": 3},
    "autoattack-rog": {"steps": 1, "restarts": 1, "queries": 2},
}
LP_ATTACKS = {"apgd-ce", "apgd-rog", "bim", "cospgd", "fgsm", "ifgsm-targeted", "pgd", "segpgd", "ensemble",
              "apgd-dlr", "fab", "square", "autoattack-rog"}
#: FAB keeps a point only where it pushed the Dice below its threshold within the budget (ROG), else
#: the clean image: on a barely trained network at 4/255 that may be every sample
MAY_RETURN_CLEAN = {"fab"}


def test_every_attack_is_usable_by_a_trainer(nnunet_tree, monkeypatch):
    from nnunet_adv.attacks import attack_defaults, available_attacks

    assert set(FAST_OPTIONS) == set(available_attacks())
    trainer = make_trainer(_Trainer, nnunet_tree, "3d_fullres", True, monkeypatch)
    batch = make_batch(trainer)
    x, target = batch["data"], batch["target"]
    budget = trainer.threat_model.budget(x, eps_frac=4 / 255)
    for name, options in FAST_OPTIONS.items():
        if name in ("vafa-2d", "vafa-2d-ref"):
            continue  # needs a 2D configuration: covered by test_attacks.py / test_vafa_reference.py
        trainer.attack_name, trainer.attack_kwargs = name, options
        trainer.std_over_eps = 1.0 if name == "gn" else None
        trainer.alpha_over_eps = 0.5 if "alpha" in attack_defaults(name) else None
        x_adv = trainer.craft_adversarial(x, target)
        assert x_adv.shape == x.shape and torch.isfinite(x_adv).all(), name
        assert name in MAY_RETURN_CLEAN or not torch.equal(x_adv, x), name
        if name in LP_ATTACKS:
            assert ((x_adv - x).abs() <= budget.eps + 1e-6).all(), name
        # the trainer passes the projection box to every attack that takes one (gn included)
        assert (x_adv >= budget.lower - 1e-5).all() and (x_adv <= budget.upper + 1e-5).all(), name


def test_the_attack_configuration_is_made_once_and_again_only_when_the_recipe_changes(nnunet_tree, monkeypatch):
    """Every batch builds its attack (the budget depends on the batch), but not the configuration."""
    from nnunet_adv.training import adversarial_trainer

    trainer = make_trainer(_Trainer, nnunet_tree, "3d_fullres", True, monkeypatch)
    made = []
    real = adversarial_trainer.AttackConfig
    monkeypatch.setattr(adversarial_trainer, "AttackConfig", lambda *a, **k: made.append(a) or real(*a, **k))
    batch = make_batch(trainer)
    trainer.attack_kwargs = {**trainer.attack_kwargs, "steps": 1}
    for _ in range(3):
        trainer.craft_adversarial(batch["data"], batch["target"])
    assert len(made) == 1
    trainer.attack_kwargs = {**trainer.attack_kwargs, "steps": 2}  # a recipe hook changed the attack
    trainer.craft_adversarial(batch["data"], batch["target"])
    assert len(made) == 2 and made[-1][1]["steps"] == 2
