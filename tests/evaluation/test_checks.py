"""The checks that say when a worst case cannot be trusted, on real attack results of a tiny model
and of its gradient-masked twin (same weights, a non-differentiable input quantisation in front)."""
import math

import pytest
import torch
import torch.nn.functional as F
from attack_helpers import dice, make_task, trained_model

from nnunet_adv.attacks import build_attack
from nnunet_adv.evaluation import checks
from nnunet_adv.evaluation.checks import Evidence, per_case_worst, run_checks, trustworthy
from nnunet_adv.metrics import input_gradient_stats

EPS = 0.15
PGD = dict(eps=EPS, alpha=2.5 * EPS / 20, steps=20)


class Quantised(torch.nn.Module):
    """The twin's network behind ``round(64 x) / 64``: the same predictions to within a 1/128 change of
    the input, and an input gradient that is exactly zero everywhere (a defence that only hides its
    gradient)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 64) / 64)


@pytest.fixture(scope="module")
def task(one_thread):
    x, y = make_task(3, n=4, size=16, seed=7)
    twin = trained_model(3)
    return x, y, twin, Quantised(twin)


def _per_case(model, x, y, attack_name, **options):
    """(per-case Dice, per-case objective traces, first-gradient stats per case) of one attack run
    case by case, as the whole-volume engine runs it."""
    dices, traces, grads = [], [], []
    for b in range(x.shape[0]):
        xb, yb = x[b:b + 1], y[b:b + 1]
        attack = build_attack(attack_name, seed=b, **options)
        x_adv = attack(model, xb, yb)
        dices.append(float(dice(model, x_adv, yb)[0]))
        traces.append(list(attack.trace))
        start = xb.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(start), yb[:, 0]), start)
        grads.append(input_gradient_stats(g, None, [EPS]))
    return dices, traces, grads


def _evidence(model, x, y, transfer_from=None) -> Evidence:
    wb, traces, grads = _per_case(model, x, y, "pgd", **PGD)
    e = Evidence(white_box={"pgd": wb}, gradients=grads, traces={"pgd": traces})
    e.other["square"] = _per_case(model, x, y, "square", eps=EPS, queries=100)[0]
    if transfer_from is not None:
        crafted = [build_attack("pgd", seed=b, **PGD)(transfer_from, x[b:b + 1], y[b:b + 1]) for b in range(len(x))]
        e.other["pgd from twin"] = [float(dice(model, c, y[b:b + 1])[0]) for b, c in enumerate(crafted)]
    e.convergence = ("pgd x5 steps", _per_case(model, x, y, "pgd", eps=EPS, alpha=PGD["alpha"], steps=100)[0])
    # the whole window (the images are in [0, 1]): the tiny model separates classes 0.5 apart in
    # brightness, so the 64/255 of the evaluation would not saturate it
    e.saturation = _per_case(model, x, y, "pgd", eps=1.0, alpha=0.25, steps=10)[0]
    return e


def _worst(e: Evidence) -> float:
    return checks.mean(per_case_worst(list(e.white_box.values()) + list(e.other.values()) + [e.convergence[1]]))


@pytest.fixture(scope="module")
def results(task):
    x, y, twin, masked = task
    twin_e, masked_e = _evidence(twin, x, y), _evidence(masked, x, y, transfer_from=twin)
    return twin_e, masked_e, run_checks(twin_e), run_checks(masked_e)


def test_the_masked_model_is_flagged(results):
    _, masked_e, _, found = results
    assert found["gradient"]["status"] == "warn" and found["gradient"]["numbers"]["zero_fraction"] == 1.0
    assert found["loss rises"]["status"] == "warn"
    assert found["gradient-free or transfer"]["status"] == "warn"
    assert not trustworthy(found)
    # the white-box attack alone would have called it robust
    assert checks.mean(masked_e.white_box["pgd"]) > checks.mean(per_case_worst(list(masked_e.other.values()))) + 0.1


def test_the_masked_worst_case_falls_to_its_twins_through_transfer_and_gradient_free(results):
    twin_e, masked_e, _, _ = results
    assert abs(_worst(masked_e) - _worst(twin_e)) <= 0.05, (_worst(masked_e), _worst(twin_e))


def test_a_converged_unmasked_model_passes_every_check(results):
    _, _, found, _ = results
    assert {c["status"] for c in found.values()} == {"pass"}, found
    assert trustworthy(found)


def test_each_check_warns_on_its_own_failure():
    assert checks.check_saturation([0.3, 0.25])["status"] == "warn"
    assert checks.check_saturation([0.01, 0.0])["status"] == "pass"
    assert checks.check_convergence({"pgd": [0.5, 0.6]}, {}, ("pgd x5", [0.4, 0.6]))["status"] == "warn"
    assert checks.check_convergence({"pgd": [0.5, 0.6]}, {}, ("pgd x5", [0.49, 0.6]))["status"] == "pass"
    assert checks.check_other({"pgd": [0.5]}, {"square": [0.47]})["status"] == "warn"
    assert checks.check_other({"pgd": [0.5]}, {"square": [0.49]})["status"] == "pass"
    vanishing = [{"l1": 1e-6, "zero_fraction": 0.0, "linear_gain": 1e-7}]
    assert checks.check_gradient(vanishing)["status"] == "warn"
    assert checks.check_loss_rises({"pgd": [[1.0, 0.9, 0.8], [1.0, 1.0, 1.0]]})["status"] == "warn"
    assert checks.check_loss_rises({"pgd": [[1.0, 1.2], [1.0, 0.9]]})["status"] == "pass"
    assert checks.check_gradient([])["status"] == "not run"
    assert checks.check_other({}, {"square": [0.1]})["status"] == "not run"


def test_the_worst_case_keeps_a_number_over_nan():
    assert per_case_worst([[float("nan"), 0.5], [0.3, float("nan")]]) == [0.3, 0.5]
    assert math.isnan(per_case_worst([[float("nan")], [float("nan")]])[0])


def test_the_convergence_check_reruns_the_strongest_single_attack_before_a_preset():
    """The preset (autoattack-rog: APGD-CE, APGD-DLR, FAB, Square, PGD) is the minimum over its members and
    so always the strongest; re-running it at 5x its steps costs several evaluations. The check re-runs the
    strongest single white-box attack, and the preset only when nothing else qualifies; never a
    gradient-free attack, a control, the sweep or the checks' own attacks."""
    from nnunet_adv.evaluation.plan import attack_settings, convergence_candidate

    settings = attack_settings(["autoattack-rog:eps=4", "pgd:eps=4,steps=10", "cospgd:eps=4,steps=10",
                                "square:eps=4,queries=100", "gn:std=4"], seed=0)
    dice = {"autoattack-rog": 0.1, "pgd": 0.5, "cospgd": 0.4, "square": 0.05, "gn": 0.0}
    by_name = lambda s: dice[s.attack.name]  # noqa: E731
    assert convergence_candidate(settings, by_name).attack.name == "cospgd"
    assert convergence_candidate([settings[0], settings[3]], by_name).attack.name == "autoattack-rog"
    assert convergence_candidate(settings[3:], by_name) is None
