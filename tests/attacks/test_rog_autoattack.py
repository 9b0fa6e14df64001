"""ROG's AutoAttack pieces: the DLR loss against a hand computation, APGD-DLR, Square (no gradient
at all, budget, it hurts), and the ``autoattack-rog`` preset (per case the lowest Dice, DLR skipped
on binary tasks)."""
import pytest
import torch
from attack_helpers import CountingModel, DeepSupervision, dice, make_task, trained_model

from nnunet_adv.attack_config import AttackConfig
from nnunet_adv.attacks import build_attack
from nnunet_adv.attacks.autoattack import rog_members
from nnunet_adv.losses import dlr_per_sample


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def test_dlr_equals_a_hand_computed_value():
    # two voxels of a 4-class model (B=1, K=4, 1x2)
    logits = torch.tensor([[[[3.0, 0.5]], [[1.0, 2.0]], [[-1.0, 1.5]], [[0.0, -2.0]]]])
    labels = torch.tensor([[[0, 0]]])
    # voxel 1: y=0 is the top class: z_y - z_pi2 = 3 - 1 = 2; z_pi1 - z_pi3 = 3 - 0 = 3 -> -2/3
    # voxel 2: top is class 1 (2.0): z_y - z_pi1 = 0.5 - 2.0 = -1.5; z_pi1 - z_pi3 = 2.0 - 0.5 = 1.5 -> +1
    expected = (-2.0 / 3.0 + 1.0) / 2.0
    assert dlr_per_sample(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # invariant to shifting and scaling the logits (why AutoAttack uses it)
    assert dlr_per_sample(5 * logits + 7, labels).item() == pytest.approx(expected, rel=1e-5)


def test_dlr_refuses_binary_tasks():
    with pytest.raises(ValueError, match="at least 3 classes"):
        dlr_per_sample(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long))
    x, y = make_task(3, n=1, size=12)
    with pytest.raises(ValueError, match="at least 3 classes"):
        build_attack("apgd-dlr", eps=0.1, steps=2, restarts=1)(trained_model(3), x, y)


class ThreeClass(torch.nn.Module):
    """A 3-class model from the trained binary one: a third logit between the two."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        z = self.net(x)
        return torch.cat([z, 0.5 * (z[:, :1] + z[:, 1:2]) - 0.1], 1)


@pytest.mark.parametrize("nsp", [2, 3])
def test_apgd_dlr_raises_its_loss_within_budget(nsp):
    model = ThreeClass(trained_model(nsp))
    x, y = make_task(nsp, n=2, size=16)
    attack = build_attack("apgd-dlr", eps=0.1, steps=6, restarts=1, seed=0, select="loss")
    x_adv = attack(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        assert (dlr_per_sample(model(x_adv), y) > dlr_per_sample(model(x), y)).all()
    assert len(attack.trace) == 7 and max(attack.trace[1:]) > attack.trace[0]  # one entry per gradient


@pytest.mark.parametrize("nsp,deep", [(2, False), (3, False), (3, True)])
def test_square_takes_no_gradient_and_lowers_the_dice(nsp, deep, monkeypatch):
    model = CountingModel(trained_model(nsp, deep_supervision=deep))
    x, y = make_task(nsp, n=2, size=16)
    calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real_grad(*a, **k))
    seen_grad_mode = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda v: seen_grad_mode.append(torch.is_grad_enabled() or v.requires_grad)
                        or real_forward(v))
    eps = 0.15
    x_adv = build_attack("square", eps=eps, queries=30, seed=0)(model, x, y)
    assert calls == [] and not any(seen_grad_mode)  # not one gradient, not one graph
    assert model.calls == 31  # the start and one forward per query
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert (dice(model, x_adv, y) < dice(model, x, y)).all()


def test_square_budgets_are_per_channel():
    model = trained_model(3, channels=2)
    x, y = make_task(3, n=1, size=12, channels=2)
    eps = torch.tensor([0.02, 0.2]).view(1, 2, 1, 1, 1)
    x_adv = build_attack("square", eps=eps, queries=5, seed=1)(model, x, y)
    d = (x_adv - x).abs().flatten(2).amax(2)[0]
    assert d[0] <= 0.02 + 1e-6 and d[1] <= 0.2 + 1e-6 and d[1] > 0.1


def test_square_is_reproducible_with_a_seed():
    model = trained_model(2)
    x, y = make_task(2, n=1, size=16)
    a = build_attack("square", eps=0.1, queries=8, seed=3)(model, x, y)
    b = build_attack("square", eps=0.1, queries=8, seed=3)(model, x, y)
    assert torch.equal(a, b)


def test_the_rog_preset_is_rogs_set_with_rogs_settings():
    members = {name: options for name, options in rog_members(5, 5, 100, 0.3)}
    assert list(members) == ["apgd-ce", "apgd-dlr", "fab", "square", "pgd"]
    assert members["pgd"]["alpha"] == pytest.approx(0.1)  # ROG's attack_pgd: eps / 3
    attack = build_attack("autoattack-rog", eps=0.1)
    assert attack.options["steps"] == 5 and attack.options["restarts"] == 5
    assert [m.name for m in attack.members] == list(members)
    assert AttackConfig.parse("autoattack-rog:eps=8,steps=2,restarts=1,queries=5").eps == 8


def test_the_rog_preset_keeps_the_lowest_dice_and_skips_dlr_on_binary_tasks():
    model = DeepSupervision(trained_model(3))
    x, y = make_task(3, n=2, size=12)
    attack = build_attack("autoattack-rog", eps=0.15, steps=2, restarts=1, queries=4, seed=0)
    with pytest.warns(RuntimeWarning, match="skipped on a 2-class model: apgd-dlr needs 3 classes or more"):
        x_adv = attack(model, x, y)
    assert attack.skipped == ["apgd-dlr"]
    assert (x_adv - x).abs().max() <= 0.15 + 1e-6
    worst = dice(model, x_adv, y)
    for member in attack.members:
        if member.name != "apgd-dlr":
            assert (worst <= dice(model, member(model, x, y), y) + 1e-6).all(), member.name
