"""nnunet_adv.attacks: budgets, strength, VAFA, determinism, hygiene and input validation.

Everything runs on the CPU with 16^2 / 16^3 images and a 3-layer conv net trained for 50
steps on a synthetic blob task (tests/attack_helpers.py).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from attack_helpers import CountingModel, TinySegNet, ce, dice, downsample_labels, fresh_copy, make_task, trained_model

from nnunet_adv.attacks import attack_defaults, available_attacks, build_attack, nlcen_iterations

LP_ATTACKS = ["fgsm", "bim", "pgd", "segpgd", "cospgd", "apgd-ce", "ifgsm-targeted"]
GRAD_ATTACKS = LP_ATTACKS + ["vafa-2d", "vafa-3d"]
FAST = {"bim": {"steps": 4}, "pgd": {"steps": 4}, "segpgd": {"steps": 4}, "cospgd": {"steps": 4},
        "apgd-ce": {"steps": 4, "select": "loss"},  # the Lp geometry; the Dice selection: test_apgd_*
        "vafa-2d": {"steps": 4}, "vafa-3d": {"steps": 4}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(nsp, ds, n=2, channels=1, seed=7):
    x, y = make_task(nsp, n=n, size=16, channels=channels, seed=seed)
    labels = downsample_labels(y, nsp) if ds else y
    return x, y, labels


def _supports(name, nsp):
    return not (name == "vafa-3d" and nsp == 2)


# ============================================================================ registry
def test_registry_lists_every_attack():
    assert available_attacks() == sorted(["fgsm", "bim", "pgd", "gn", "ifgsm-targeted", "vafa-3d", "vafa-2d",
                                           "segpgd", "cospgd", "apgd-ce", "apgd-rog", "vafa-3d-ref", "vafa-2d-ref",
                                           "vafa-3d-paper", "slice-rescale", "ensemble", "apgd-dlr", "fab", "square",
                                           "autoattack-rog"])
    assert type(build_attack("VAFA_3D")).__name__ == "VAFA3D"


def test_published_defaults_exact():
    assert attack_defaults("fgsm")["eps"] == 4 / 255
    for name in ("bim", "pgd", "segpgd", "cospgd"):
        d = attack_defaults(name)
        assert (d["eps"], d["alpha"], d["steps"], d["norm"]) == (4 / 255, 0.01, 20, "linf")
    assert "random_start" not in attack_defaults("bim")
    assert attack_defaults("pgd")["random_start"] is True and attack_defaults("pgd")["restarts"] == 1
    assert attack_defaults("gn")["std"] == 4 / 255
    d = attack_defaults("vafa-3d")
    assert (d["steps"], d["q_max"], d["q_min"], d["block_size"], d["use_ssim_loss"]) == (20, 20, 5, (8, 8, 8), True)
    assert d["temperature"] == (0.1, 1e-20) and d["q_step"] == 1 and d["renormalize_slices"] is False
    d = attack_defaults("vafa-2d")
    assert (d["steps"], d["q_max"], d["q_min"], d["block_size"], d["use_ssim_loss"]) == (10, 20, 5, (8, 8), False)
    d = attack_defaults("apgd-ce")
    assert (d["rho"], d["momentum"], d["initial_step"], d["eps"]) == (0.75, 0.75, 2.0, 4 / 255)
    d = attack_defaults("ifgsm-targeted")
    assert (d["eps"], d["alpha"], d["steps"], d["nlcen_schedule"]) == (4 / 255, 1 / 255, 5, False)
    # the built object carries them too
    a = build_attack("vafa-3d")
    assert a.q_max == 20 and a.block_size == (8, 8, 8) and a.steps == 20 and a.use_ssim_loss is True


# ============================================================================ budgets
@pytest.mark.parametrize("name", LP_ATTACKS)
@pytest.mark.parametrize("nsp,ds", [(2, False), (3, False), (3, True), (2, True)])
def test_linf_budget_per_channel_eps_and_bounds(name, nsp, ds):
    torch.manual_seed(0)
    net = TinySegNet(nsp, in_channels=2)
    if ds:
        from attack_helpers import DeepSupervision
        net = DeepSupervision(net)
    x, y, labels = _data(nsp, ds, channels=2)
    eps = [0.05, 0.01]
    lower, upper = [0.1, 0.0], [0.9, 1.0]
    xa = build_attack(name, eps=eps, lower=lower, upper=upper, seed=0, **FAST.get(name, {}))(net, x, labels)
    assert xa.shape == x.shape and xa.dtype == x.dtype and not xa.requires_grad
    d = (xa - x).abs()
    for c in range(2):
        assert float(d[:, c].max()) <= eps[c] + 1e-6
        # the box holds where the clean image is inside it
        inside = (x[:, c] >= lower[c]) & (x[:, c] <= upper[c])
        assert float(xa[:, c][inside].min()) >= lower[c] - 1e-7
        assert float(xa[:, c][inside].max()) <= upper[c] + 1e-7
    assert float(d.max()) > 0.5 * eps[1]          # it did move


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd-ce", "cospgd"])
def test_linf_budget_per_sample_per_channel_tensor(name):
    x, y, labels = _data(3, False, channels=2)
    net = TinySegNet(3, in_channels=2)
    eps = torch.tensor([[0.02, 0.0], [0.01, 0.03]]).view(2, 2, 1, 1, 1)
    lower = x.amin(dim=(2, 3, 4), keepdim=True)
    upper = x.amax(dim=(2, 3, 4), keepdim=True)
    xa = build_attack(name, eps=eps, lower=lower, upper=upper, seed=0, **FAST.get(name, {}))(net, x, labels)
    d = (xa - x).abs().amax(dim=(2, 3, 4))
    assert bool((d <= eps.view(2, 2) + 1e-6).all())
    assert float(d[0, 1]) == 0.0                     # eps 0 -> untouched channel
    assert bool((xa >= lower - 1e-7).all() and (xa <= upper + 1e-7).all())


@pytest.mark.parametrize("name", ["fgsm", "pgd", "bim", "apgd-ce", "segpgd"])
@pytest.mark.parametrize("nsp", [2, 3])
def test_l2_budget(name, nsp):
    net = trained_model(nsp)
    x, y, labels = _data(nsp, False)
    eps = 0.5
    kw = {} if name in ("fgsm", "apgd-ce") else {"alpha": 0.2}
    xa = build_attack(name, norm="l2", eps=eps, seed=0, **kw, **FAST.get(name, {}))(net, x, labels)
    norms = (xa - x).flatten(1).norm(dim=1)
    assert bool((norms <= eps + 1e-5).all())
    assert float(norms.min()) > 0.25 * eps
    assert bool((ce(net, xa, labels) > ce(net, x, labels)).all())


def test_gn_noise_statistics_and_box():
    x = torch.full((2, 2, 32, 32, 32), 0.5)
    y = torch.zeros(2, 1, 32, 32, 32, dtype=torch.long)
    xa = build_attack("gn", std=[0.1, 0.01], seed=3)(lambda t: t, x, y)
    assert abs(float((xa - x)[:, 0].std()) - 0.1) < 0.005
    assert abs(float((xa - x)[:, 1].std()) - 0.01) < 0.0005
    xb = build_attack("gn", std=0.5, lower=0.4, upper=0.6, seed=3)(lambda t: t, x, y)
    assert float(xb.min()) >= 0.4 - 1e-7 and float(xb.max()) <= 0.6 + 1e-7
    assert float((xb == torch.tensor(0.4)).float().mean()) > 0.2     # clipped mass at the bound


# ============================================================================ strength
@pytest.mark.parametrize("name,nsp,ds", [(n, nsp, ds) for n in GRAD_ATTACKS
                                         for nsp, ds in [(2, False), (3, False), (3, True), (2, True)]
                                         if _supports(n, nsp)])
def test_attack_raises_loss_of_trained_net(name, nsp, ds):
    net = trained_model(nsp, ds)
    x, y, labels = _data(nsp, ds)
    xa = build_attack(name, seed=0, **FAST.get(name, {}))(net, x, labels)
    clean, adv = ce(net, x, y), ce(net, xa, y)
    assert bool((adv > clean * 1.02).all()), (clean, adv)


@pytest.mark.parametrize("nsp", [2, 3])
def test_targeted_ifgsm_moves_towards_target(nsp):
    net = trained_model(nsp)
    x, y, labels = _data(nsp, False)
    target = 1 - y                                    # NLCEN: binary -> inverse mask
    xa = build_attack("ifgsm-targeted", eps=16 / 255, steps=nlcen_iterations(16), seed=0)(net, x, labels)
    assert bool((ce(net, xa, target) < ce(net, x, target)).all())
    assert bool((dice(net, xa, y) < dice(net, x, y)).all())


@pytest.mark.parametrize("name", ["pgd", "segpgd", "cospgd", "vafa-2d"])
def test_targeted_mode_of_other_attacks(name):
    net = trained_model(2)
    x, y, labels = _data(2, False)
    tgt = torch.zeros_like(y)                         # "all background"
    xa = build_attack(name, targeted=True, target=0, seed=0, **FAST.get(name, {}))(net, x, labels)
    assert bool((ce(net, xa, tgt) < ce(net, x, tgt)).all())


@pytest.mark.parametrize("nsp", [2, 3])
def test_pgd_at_least_as_strong_as_fgsm(nsp):
    net = trained_model(nsp)
    x, y, labels = _data(nsp, False)
    eps = 0.1                      # large enough for the net's non-linearity to matter
    xf = build_attack("fgsm", eps=eps)(net, x, labels)
    xp = build_attack("pgd", eps=eps, alpha=eps / 4, steps=10, seed=0)(net, x, labels)
    assert bool((ce(net, xp, y) >= ce(net, xf, y)).all())


@pytest.mark.parametrize("nsp,ds", [(2, False), (3, True)])
def test_ensemble_at_least_as_strong_as_each_member_per_sample(nsp, ds):
    net = trained_model(nsp, ds)
    x, y, labels = _data(nsp, ds, n=3)
    members = [("fgsm", {"eps": 0.05}), ("pgd", {"eps": 0.05, "steps": 3, "alpha": 0.02}),
               ("gn", {"std": 0.2}), ("vafa-2d", {"steps": 3})]
    ens = build_attack("ensemble", attacks=members, seed=5)
    xe = ens(net, x, labels)
    de = dice(net, xe, y)
    for name, opts in members:
        kw = {"seed": 5, **opts}
        dm = dice(net, build_attack(name, **kw)(net, x, labels), y)
        assert bool((de <= dm + 1e-6).all()), (name, de, dm)
    # the ensemble output is one of the members' outputs, sample by sample: budget holds
    assert float((xe - x).abs().max()) > 0


def test_ensemble_shared_options_and_errors():
    ens = build_attack("ensemble", attacks=["fgsm", ("pgd", {"steps": 2})], eps=0.03, lower=0.0)
    assert ens.members[0].eps == 0.03 and ens.members[1].eps == 0.03 and ens.members[1].steps == 2
    with pytest.raises(ValueError, match="accepted by no member"):
        build_attack("ensemble", attacks=["fgsm"], q_max=3)
    with pytest.raises(ValueError, match="unknown ensemble member"):
        build_attack("ensemble", attacks=["fgsmm"])
    with pytest.raises(ValueError, match="non-empty list"):
        build_attack("ensemble", attacks=[])


def test_pgd_restarts_keep_per_sample_worst_case():
    net = trained_model(3)
    x, y, labels = _data(3, False, n=3)
    kw = dict(eps=0.1, alpha=0.03, steps=2, seed=11)
    one = ce(net, build_attack("pgd", restarts=1, **kw)(net, x, labels), y)
    many = ce(net, build_attack("pgd", restarts=4, **kw)(net, x, labels), y)
    assert bool((many >= one - 1e-7).all())
    assert bool((many > one).any())


def test_apgd_loss_criterion_returns_best_iterate_and_beats_its_start():
    """select='loss' (AutoAttack's criterion): the largest-loss iterate."""
    net = trained_model(3)
    x, y, labels = _data(3, False)
    counting = CountingModel(net)
    xa = build_attack("apgd-ce", eps=0.05, steps=10, seed=0, select="loss")(counting, x, labels)
    assert counting.calls == 11                      # start + 10 iterations, no extra passes
    # the start point alone (random in the ball) is much weaker than the returned best point
    xs = build_attack("pgd", eps=0.05, steps=1, alpha=0.0, seed=0)(net, x, labels)
    assert bool((ce(net, xa, y) > ce(net, xs, y)).all())
    assert float((xa - x).abs().max()) <= 0.05 + 1e-6


class _RecordingModel(torch.nn.Module):
    """Records every input the attack evaluates (``calls``) and its Dice against ``y``."""

    def __init__(self, net, y):
        super().__init__()
        self.net, self.y, self.inputs, self.dice = net, y, [], []

    def forward(self, x):
        out = self.net(x)
        from nnunet_adv.losses import dice_per_sample

        self.inputs.append(x.detach().clone())
        self.dice.append(dice_per_sample(out.detach().argmax(1), self.y, out.shape[1]))
        return out


@pytest.mark.parametrize("restarts", [1, 3])
def test_apgd_keeps_the_lowest_dice_iterate_of_all_restarts_or_the_clean_image(restarts):
    """ROG (rog/autoattack/autopgd.py): per sample the iterate with the lowest Dice over every
    iterate of every restart, the clean image where none is below the clean Dice; one extra
    forward (the clean Dice), none per iterate."""
    net = trained_model(3)
    x, y, labels = _data(3, False, n=3)
    rec = _RecordingModel(net, y)
    xa = build_attack("apgd-ce", eps=0.05, steps=4, restarts=restarts, seed=0)(rec, x, labels)
    assert len(rec.inputs) == 1 + restarts * (1 + 4)
    dice = torch.stack(rec.dice)                      # (evaluations, B); evaluation 0: the clean image
    for b in range(x.shape[0]):
        i = int(torch.argmin(dice[:, b]))             # the first lowest (ties keep the earlier, clean first)
        assert torch.equal(xa[b], rec.inputs[i][b])
    assert bool((dice[1:].min(0).values < dice[0]).all()) and not torch.equal(xa, x)


def test_apgd_returns_the_clean_image_where_no_iterate_lowers_the_dice():
    net = trained_model(3)
    x, y, labels = _data(3, False)
    xa = build_attack("apgd-ce", eps=1e-6, steps=2, seed=0)(net, x, labels)  # too small to change a voxel
    assert torch.equal(xa, x)
    assert not torch.equal(build_attack("apgd-ce", eps=1e-6, steps=2, seed=0, select="loss")(net, x, labels), x)


def test_apgd_rog_preset():
    d = attack_defaults("apgd-rog")
    assert (d["steps"], d["restarts"], d["select"], d["rho"], d["initial_step"]) == (5, 5, "dice", 0.75, 2.0)
    assert attack_defaults("apgd-ce")["select"] == "dice" and attack_defaults("apgd-ce")["restarts"] == 1


@pytest.mark.parametrize("name,fn", [("segpgd", "segpgd_loss"), ("cospgd", "cospgd_loss")])
def test_segpgd_cospgd_are_pgd_with_their_step_loss(name, fn, monkeypatch):
    """Same loop as PGD (same random start, same projection); only the per-step loss differs,
    and SegPGD sees t = 1..T."""
    import importlib

    mod = importlib.import_module(f"nnunet_adv.attacks.{name}")
    calls = []
    real = getattr(mod, fn)

    def spy(*args, **kw):
        calls.append(args[2:4] if name == "segpgd" else None)
        return real(*args, **kw)

    monkeypatch.setattr(mod, fn, spy)
    net = trained_model(3)
    x, y, labels = _data(3, False)
    xa = build_attack(name, steps=3, seed=4)(net, x, labels)
    assert len(calls) == 3
    if name == "segpgd":
        assert calls == [(1, 3), (2, 3), (3, 3)]
    # with a loss whose weights are all 1 the loop is exactly PGD's
    monkeypatch.setattr(mod, fn, lambda logits, labels, *a, **k: F.cross_entropy(logits.float(), labels))
    same = build_attack(name, steps=3, seed=4)(net, x, labels)
    assert torch.equal(same, build_attack("pgd", steps=3, seed=4)(net, x, labels))
    assert not torch.equal(xa, same)


# ============================================================================ VAFA
@pytest.mark.parametrize("name,shape,bs", [
    ("vafa-3d", (2, 1, 16, 16, 16), (8, 8, 8)),
    ("vafa-3d", (1, 2, 12, 16, 10), (4, 8, 8)),      # padded: 12, 10 not multiples of 8
    ("vafa-2d", (2, 1, 16, 16), (8, 8)),
    ("vafa-2d", (1, 1, 5, 12, 16), (8, 8)),          # slice-wise on a volume, padded
])
def test_vafa_reconstruction_identity_with_unit_q_and_no_rounding(name, shape, bs):
    """The attack's own transform chain with q = 1 and no rounding gives the input back."""
    torch.manual_seed(0)
    x01 = torch.rand(shape)
    attack = build_attack(name, block_size=bs)
    coeffs, blocks, sizes = attack.frequency_coefficients(x01)
    rec, _ = attack.reconstruct(coeffs, torch.ones_like(coeffs), None, sizes)
    assert rec.shape == x01.shape
    assert float((rec - x01).abs().max()) < 1e-4
    # q = q_max without rounding also cancels exactly; with hard rounding it does not
    q20 = torch.full_like(coeffs, 20.0)
    assert float((attack.reconstruct(coeffs, q20, None, sizes)[0] - x01).abs().max()) < 1e-4
    rounded, _ = attack.reconstruct(coeffs, q20, 1e-20, sizes)
    assert float((rounded - x01).abs().max()) > 1e-2
    # q = 1 with hard rounding moves each coefficient by <= 0.5 (0-255 scale): RMS <= 0.5/255
    rec_r, _ = attack.reconstruct(coeffs, torch.ones_like(coeffs), 1e-20, sizes)
    assert 0 < float((rec_r - x01).pow(2).mean().sqrt()) <= 0.5 / 255 + 1e-7


def test_vafa_attack_with_qmax_1_stays_within_rounding_error():
    """q_min = q_max = 1: the table cannot move, so the whole attack is one quantisation with
    step 1 (RMS change <= 0.5/255 of the window): the budget q_max really bounds the attack."""
    net = trained_model(3)
    x, y, labels = _data(3, False)
    xa = build_attack("vafa-3d", q_max=1.0, q_min=1.0, steps=2, temperature=(1e-6, 1e-6),
                      lower=0.0, upper=1.0)(net, x, labels)
    assert xa.shape == x.shape
    assert 0 < float((xa - x).pow(2).mean().sqrt()) <= 0.5 / 255 + 1e-7


@pytest.mark.parametrize("name,shape,bs", [
    ("vafa-3d", (1, 1, 12, 16, 10), (8, 8, 8)),
    ("vafa-2d", (1, 1, 12, 10), (8, 8)),
    ("vafa-2d", (1, 1, 5, 12, 10), (8, 8)),
])
@pytest.mark.parametrize("pad_mode", ["replicate", "reflect"])
def test_vafa_block_padding_keeps_shape(name, shape, bs, pad_mode):
    nsp = len(shape) - 2
    net = TinySegNet(nsp)
    x = torch.rand(shape)
    y = (x > 0.5).long()
    xa = build_attack(name, block_size=bs, steps=2, pad_mode=pad_mode)(net, x, y)
    assert xa.shape == x.shape
    assert float(xa.min()) >= float(x.min()) - 1e-6 and float(xa.max()) <= float(x.max()) + 1e-6
    assert float((xa - x).abs().max()) > 0


def test_vafa_output_in_window_and_window_units():
    net = trained_model(3)
    x, y, labels = _data(3, False)
    # the same image in other units (a z-scored-like affine map): the attack is equivariant
    a, b = 3.0, -1.5
    xa01 = build_attack("vafa-3d", steps=3, lower=0.0, upper=1.0)(net, x, labels)

    class Affine(nn.Module):
        def forward(self, t):
            return net((t - b) / a)

    xz = build_attack("vafa-3d", steps=3, lower=b, upper=a + b)(Affine(), x * a + b, labels)
    assert torch.allclose((xz - b) / a, xa01, atol=1e-4)
    assert float(xa01.min()) >= 0 and float(xa01.max()) <= 1


@pytest.mark.filterwarnings("ignore:.*all-zero gradient")
def test_vafa_early_stop_when_every_voxel_wrong():
    class AlwaysWrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, t):          # predicts class 1 everywhere (+ a path to the input)
            self.calls += 1
            z = torch.cat([t * 0, t * 0 + 5.0], 1)
            return z

    m = AlwaysWrong()
    x = torch.rand(2, 1, 16, 16, 16)
    y = torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    build_attack("vafa-3d", steps=20, use_ssim_loss=False)(m, x, y)
    assert m.calls == 1
    m2 = AlwaysWrong()
    build_attack("vafa-3d", steps=3, use_ssim_loss=False, early_stop=False)(m2, x, y)
    assert m2.calls == 3


def test_vafa_ssim_term_keeps_image_closer():
    net = trained_model(3)
    x, y, labels = _data(3, False)
    with_ssim = build_attack("vafa-3d", steps=10, use_ssim_loss=True)(net, x, labels)
    without = build_attack("vafa-3d", steps=10, use_ssim_loss=False)(net, x, labels)
    assert float((with_ssim - x).pow(2).mean()) < float((without - x).pow(2).mean())


def test_vafa_renormalize_slices_option():
    net = trained_model(3)
    x, y, labels = _data(3, False)
    xa = build_attack("vafa-3d", steps=2, renormalize_slices=True, lower=0.0, upper=1.0)(net, x, labels)
    # every slice along the first spatial axis spans the full window
    mn, mx = xa.amin(dim=(3, 4)), xa.amax(dim=(3, 4))
    assert torch.allclose(mn, torch.zeros_like(mn), atol=1e-6) and torch.allclose(mx, torch.ones_like(mx), atol=1e-6)


def test_vafa_qtable_moves_with_sign_steps():
    """White-box check of one VAFA update: q starts at q_max and moves by exactly +-1 or 0."""
    attack = build_attack("vafa-3d", steps=2, use_ssim_loss=True)
    seen = {}
    orig = attack.grad_of

    def spy(ctx, value, wrt):
        g = orig(ctx, value, wrt)
        seen.setdefault("q", []).append(wrt.detach().clone())
        return g

    attack.grad_of = spy
    net = trained_model(3)
    x, y, labels = _data(3, False)
    attack(net, x, labels)
    q0, q1 = seen["q"]
    assert bool((q0 == 20).all())
    steps = (q0 - q1).unique().tolist()
    assert set(steps) <= {-1.0, 0.0, 1.0} and 1.0 in steps     # decreases (clamped at q_max above)
    assert float(q1.min()) >= 5


# ============================================================================ targets / I-FGSM rule
def test_nlcen_iteration_rule():
    table = {0.5: 1, 1: 2, 2: 3, 4: 5, 6: 8, 8: 10, 10: 13, 12: 15, 16: 20, 20: 24, 32: 36}
    for eps, n in table.items():
        assert nlcen_iterations(eps) == n == math.ceil(min(eps + 4, math.ceil(1.25 * eps)))
    with pytest.raises(ValueError):
        nlcen_iterations(0)


def test_ifgsm_nlcen_schedule_uses_window_scale_and_rule():
    net = trained_model(3)
    x, y, labels = _data(3, False)
    counting = CountingModel(net)
    lower, upper = -2.0, 6.0                            # window width 8
    xs = x * 8 - 2
    xa = build_attack("ifgsm-targeted", eps=8, nlcen_schedule=True, lower=lower, upper=upper)(
        lambda t: counting((t + 2) / 8), xs, labels)
    assert counting.calls == nlcen_iterations(8) == 10
    d = (xa - xs).abs()
    assert float(d.max()) <= 8 / 255 * 8 + 1e-5
    # alpha = 1/255 of the window: after 10 steps some voxels sit exactly at the budget
    assert float(d.max()) > 7.9 / 255 * 8
    with pytest.raises(ValueError, match="do not pass"):
        build_attack("ifgsm-targeted", eps=8, nlcen_schedule=True, steps=3)


def test_default_targets_binary_inverse_and_multiclass_background():
    seen = []

    def loss(out, labels):
        seen.append(labels)
        return F.cross_entropy(out[0] if isinstance(out, list) else out, labels[0][:, 0].long()
                               if isinstance(labels, list) else labels[:, 0].long())

    x, y, _ = _data(3, False)
    net2 = trained_model(3, True)
    labels = downsample_labels(y, 3)
    build_attack("ifgsm-targeted", loss=loss, steps=1)(net2, x, labels)
    tgt = seen[-1]
    assert isinstance(tgt, list) and len(tgt) == 2
    assert torch.equal(tgt[0], 1 - labels[0]) and tgt[1].shape == labels[1].shape
    assert torch.equal(tgt[1], 1 - labels[1])
    net3 = TinySegNet(3, num_classes=3)
    y3 = torch.randint(0, 3, y.shape)
    build_attack("ifgsm-targeted", loss=lambda o, t: (seen.append(t), F.cross_entropy(o, t[:, 0]))[1],
                 steps=1)(net3, x, y3)
    assert torch.equal(seen[-1], torch.zeros_like(y3))


def test_user_loss_receives_labels_unchanged():
    x, y, labels = _data(2, True)
    got = []

    def loss(out, lab):
        got.append((out, lab))
        return F.cross_entropy(out[0], lab[0][:, 0]) + 0.5 * F.cross_entropy(out[1], lab[1][:, 0])

    net = trained_model(2, True)
    xa = build_attack("pgd", loss=loss, steps=2, seed=0)(net, x, labels)
    assert all(lab is labels for _, lab in got) and len(got) == 2
    assert isinstance(got[0][0], list) and len(got[0][0]) == 2
    assert bool((ce(net, xa, y) > ce(net, x, y)).all())


def test_labels_without_channel_dim_and_float_dtype():
    net = trained_model(3)
    x, y, _ = _data(3, False)
    a = build_attack("pgd", steps=2, seed=1)(net, x, y)
    b = build_attack("pgd", steps=2, seed=1)(net, x, y[:, 0])
    c = build_attack("pgd", steps=2, seed=1)(net, x.double(), y.short())
    assert torch.equal(a, b)
    assert c.dtype == torch.float64 and torch.allclose(c.float(), a, atol=1e-6)


# ============================================================================ determinism / hygiene
@pytest.mark.parametrize("name", ["pgd", "gn", "apgd-ce", "vafa-2d", "segpgd"])
def test_same_seed_bit_identical(name):
    net = trained_model(3)
    x, y, labels = _data(3, False)
    a = build_attack(name, seed=42, **FAST.get(name, {}))(net, x, labels)
    b = build_attack(name, seed=42, **FAST.get(name, {}))(net, x, labels)
    assert torch.equal(a, b)
    if name in ("pgd", "gn", "apgd-ce", "segpgd"):
        c = build_attack(name, seed=43, **FAST.get(name, {}))(net, x, labels)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("name", GRAD_ATTACKS + ["ensemble"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mode_and_parameter_grads_untouched(name, mode):
    net = fresh_copy(trained_model(3))
    net.train(mode == "train")
    sentinels = {n: torch.full_like(p, 0.125) for n, p in net.named_parameters()}
    for n, p in net.named_parameters():
        p.grad = sentinels[n].clone()
    x, y, labels = _data(3, False)
    kw = {"attacks": ["fgsm", "vafa-2d"]} if name == "ensemble" else {"seed": 0, **FAST.get(name, {})}
    with torch.no_grad():                             # callers such as nnU-Net validation
        xa = build_attack(name, **kw)(net, x, labels)
    assert net.training == (mode == "train")
    assert all(m.training == (mode == "train") for m in net.modules())
    for n, p in net.named_parameters():
        assert torch.equal(p.grad, sentinels[n]), n
        assert p.requires_grad
    assert not xa.requires_grad and float((xa - x).abs().max()) > 0


def test_works_under_inference_mode():
    net = trained_model(3)
    x, y, labels = _data(3, False)
    ref = build_attack("pgd", steps=2, seed=0)(net, x, labels)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        out = build_attack("pgd", steps=2, seed=0)(net, xi, yi)
    assert torch.equal(out, ref)


def test_amp_loss_scale_and_zero_gradient_warning():
    net = trained_model(3)
    x, y, labels = _data(3, False)
    a = build_attack("bim", steps=3)(net, x, labels)
    b = build_attack("bim", steps=3, amp_loss_scale=1024.0)(net, x, labels)
    assert torch.equal(a, b)        # a power-of-two scale is exact in fp32

    class Flat(nn.Module):          # output independent of the input: zero input gradient
        def forward(self, t):
            return torch.cat([t * 0, t * 0 + 1], 1)

    with pytest.warns(RuntimeWarning, match="all-zero gradient"):
        out = build_attack("pgd", steps=2, random_start=False)(Flat(), x, labels)
    assert torch.equal(out, x)      # a zero gradient is no step


# ============================================================================ bad input
def test_bad_input_errors():
    net = trained_model(3)
    x, y, labels = _data(3, False)
    with pytest.raises(ValueError, match=r"unknown attack 'pgdd'.*valid attacks: \['apgd-ce'"):
        build_attack("pgdd")
    with pytest.raises(ValueError, match="eps must be >= 0"):
        build_attack("pgd", eps=-0.1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        build_attack("fgsm", eps=[0.1, -0.1])
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        build_attack("bim", steps=0)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        build_attack("vafa-3d", steps=2.5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['epsilon'\]"):
        build_attack("pgd", epsilon=0.1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['eps'\]"):
        build_attack("vafa-3d", eps=0.1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['loss'\]"):
        build_attack("segpgd", loss=lambda o, t: o.sum())
    with pytest.raises(ValueError, match="norm must be"):
        build_attack("pgd", norm="l1")
    with pytest.raises(ValueError, match="norm='l2' needs explicit"):
        build_attack("pgd", norm="l2", eps=1.0)
    with pytest.raises(ValueError, match="q_min"):
        build_attack("vafa-3d", q_min=30)
    with pytest.raises(ValueError, match="larger than"):
        build_attack("vafa-3d", block_size=32)(net, x, labels)
    with pytest.raises(ValueError, match="larger than"):
        build_attack("vafa-2d", block_size=(32, 8))(trained_model(2), *_data(2, False)[::2])
    with pytest.raises(ValueError, match="needs 3D images"):
        build_attack("vafa-3d")(trained_model(2), *_data(2, False)[::2])
    with pytest.raises(ValueError, match="labels shape mismatch"):
        build_attack("pgd")(net, x, y[..., :8])
    with pytest.raises(ValueError, match="labels shape mismatch"):
        build_attack("pgd")(net, x, y[:1])
    with pytest.raises(ValueError, match="labels shape mismatch"):
        build_attack("pgd")(net, x, [y[..., :8], y])
    bad = x.clone()
    bad[0, 0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        build_attack("fgsm")(net, bad, labels)
    bad[0, 0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        build_attack("vafa-3d")(net, bad, labels)
    with pytest.raises(ValueError, match="2 per-channel values but images have 1"):
        build_attack("pgd", eps=[0.1, 0.2])(net, x, labels)
    with pytest.raises(ValueError, match="not broadcastable"):
        build_attack("pgd", eps=torch.ones(3, 1, 1, 1, 1))(net, x, labels)
    with pytest.raises(ValueError, match="class indices"):
        build_attack("fgsm")(net, x, y + 5)
    with pytest.raises(ValueError, match="images must be"):
        build_attack("fgsm")(net, x[0, 0], labels)
    with pytest.raises(ValueError, match="one value per sample"):
        build_attack("pgd", norm="l2", eps=[0.1, 0.2], alpha=0.1)(TinySegNet(3, 2), x.repeat(1, 2, 1, 1, 1), labels)
    with pytest.raises(ValueError, match="lower"):
        build_attack("pgd", lower=1.0, upper=0.0)
