"""nnunet_adv.attacks.fab: the targeted L-inf FAB as ROG adapts it (budget, box, strength, the exact
hyperplane projection, cost, errors).

A 3-class, 2-channel version of the blob task of tests/attack_helpers.py (classes 0, 1, 2: ranks
2 and 3 exist), CPU, 16^2 / 16^3 images, one thread.
"""
import math
from functools import lru_cache

import pytest
import torch
import torch.nn as nn
from attack_helpers import DeepSupervision, TinySegNet, dice, downsample_labels, fit, make_task

from nnunet_adv.attacks.fab import FAB, projection_linf
from nnunet_adv.losses import dice_per_sample


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def task3(nsp, n=3, seed=7, channels=2):
    """Images in [0, 1] ``(n, channels, *[16]*nsp)`` and labels ``(n, 1, *S)`` in {0, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    _, y1 = make_task(nsp, n=n, size=16, channels=1, seed=seed)
    _, y2 = make_task(nsp, n=n, size=16, channels=1, seed=seed + 1000)
    labels = y1.clone()
    labels[(y2 == 1) & (y1 == 0)] = 2
    img = 0.2 + 0.3 * (labels == 1).float() + 0.6 * (labels == 2).float() + 0.1 * torch.randn(labels.shape,
                                                                                                generator=g)
    return img.clamp(0, 1).repeat(1, channels, *([1] * nsp)), labels


@lru_cache(maxsize=None)
def _trained3(nsp):
    torch.manual_seed(5)
    net = TinySegNet(nsp, in_channels=2, num_classes=3)
    return fit(net, (task3(nsp, n=2, seed=100 + step) for step in range(60)))


def model3(nsp, ds=False):
    net = _trained3(nsp)
    return DeepSupervision(net) if ds else net


dice3 = dice  # the helpers' per-sample Dice of the full-resolution prediction (any K)


class Counting(nn.Module):
    """Counts forward calls, the samples they carry and the backward passes through the input."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = self.samples = self.backwards = 0
        self.grad_calls = 0

    def forward(self, x):
        self.calls += 1
        self.samples += x.shape[0]
        if x.requires_grad:
            self.grad_calls += 1
            x.register_hook(self._count_backward)
        return self.net(x)

    def _count_backward(self, g):
        self.backwards += 1
        return g


# ============================================================================ budget and box
@pytest.mark.parametrize("nsp,ds", [(2, False), (2, True), (3, False), (3, True)])
def test_per_channel_budget_and_box(nsp, ds):
    x, y = task3(nsp)
    labels = downsample_labels(y, nsp) if ds else y
    eps = [0.45, 0.4]
    lower, upper = [0.0, 0.1], [1.0, 0.9]
    xa = FAB(eps=eps, lower=lower, upper=upper, seed=0, steps=3, restarts=2)(model3(nsp, ds), x, labels)
    assert xa.shape == x.shape and xa.dtype == x.dtype and not xa.requires_grad
    d = (xa - x).abs()
    for c in range(2):
        assert float(d[:, c].max()) <= eps[c] + 1e-6
        lo = torch.minimum(torch.full_like(x[:, c], lower[c]), x[:, c])   # the box contains the clean image
        hi = torch.maximum(torch.full_like(x[:, c], upper[c]), x[:, c])
        assert bool((xa[:, c] >= lo - 1e-6).all()) and bool((xa[:, c] <= hi + 1e-6).all())
    moved = d.flatten(1).amax(1) > 0
    assert bool(moved.any()), "FAB found no adversarial point: the budget check is vacuous"
    # each sample is either the clean image or adversarial (Dice below half its clean Dice)
    net = model3(nsp)
    d0, da = dice3(net, x, y), dice3(net, xa, y)
    assert bool(torch.where(moved, da < 0.5 * d0, torch.ones_like(moved)).all())


def test_tight_channel_budget_rejects_points_outside_it():
    """FAB's point is uniform in normalised units; a channel with a tiny budget rules it out: the clean image."""
    nsp = 2
    x, y = task3(nsp)
    xa = FAB(eps=[0.45, 1e-3], lower=0.0, upper=1.0, seed=0, steps=3, restarts=1)(model3(nsp), x, y)
    assert torch.equal(xa, x)
    xb = FAB(eps=torch.tensor([0.45, 1e-3]).view(1, 2, 1, 1), lower=0.0, upper=1.0, seed=0, steps=3,
             restarts=1)(model3(nsp), x, y)
    assert torch.equal(xa, xb)


def test_points_outside_the_budget_give_the_clean_image():
    """ROG: a sample takes its FAB point only where it lies within eps; otherwise the clean image."""
    nsp = 2
    x, y = task3(nsp)
    net = model3(nsp)
    free = FAB(eps=1.0, lower=0.0, upper=1.0, seed=0, steps=3, restarts=1)(net, x, y)
    norms = (free - x).flatten(1).abs().amax(1)
    assert bool((norms > 0).all()) and float(norms.max() - norms.min()) > 1e-3
    eps = float(norms.min() + norms.max()) / 2
    xa = FAB(eps=eps, lower=0.0, upper=1.0, seed=0, steps=3, restarts=1)(net, x, y)
    for i in range(x.shape[0]):
        if norms[i] <= eps:
            assert torch.allclose(xa[i], free[i], atol=1e-6)
        else:
            assert torch.equal(xa[i], x[i])


class _Affine(nn.Module):
    """The model on images in other units: ``net((x - shift) / scale)``."""

    def __init__(self, net, shift, scale):
        super().__init__()
        self.net, self.shift, self.scale = net, shift, scale

    def forward(self, x):
        return self.net((x - self.shift) / self.scale)


@pytest.mark.parametrize("nsp", [2, 3])
def test_invariant_to_the_units_of_the_images(nsp):
    """Normalised coordinates: the attack in HU-like units (x' = shift + scale x, budget and box scaled
    per channel) is the attack in [0, 1] units, mapped."""
    x, y = task3(nsp)
    net = model3(nsp)
    shift = torch.tensor([-500.0, 3.0]).view(1, 2, *([1] * nsp))
    scale = torch.tensor([1500.0, 0.25]).view(1, 2, *([1] * nsp))
    opts = dict(seed=0, steps=3, restarts=2)
    xa = FAB(eps=0.3, lower=0.0, upper=1.0, **opts)(net, x, y)
    xb = FAB(eps=(0.3 * scale).flatten().tolist(), lower=shift.flatten().tolist(),
             upper=(shift + scale).flatten().tolist(), **opts)(_Affine(net, shift, scale), shift + scale * x, y)
    assert bool(((xa - x).flatten(1).abs().amax(1) > 0).any())
    assert torch.allclose((xb - shift) / scale, xa, atol=1e-4)


def test_per_sample_eps_tensor():
    nsp = 2
    x, y = task3(nsp)
    eps = torch.tensor([0.0, 0.45, 0.45]).view(3, 1, 1, 1).expand(3, 2, 1, 1)
    xa = FAB(eps=eps, lower=0.0, upper=1.0, seed=0, steps=3, restarts=1)(model3(nsp), x, y)
    assert torch.equal(xa[0], x[0])
    assert bool(((xa - x).abs() <= eps + 1e-6).all())
    assert bool(((xa[1:] - x[1:]).flatten(1).abs().amax(1) > 0).any())


# ============================================================================ strength
@pytest.mark.parametrize("nsp", [2, 3])
def test_lowers_dice_below_threshold_on_undefended_model(nsp):
    x, y = task3(nsp)
    net = model3(nsp)
    d0 = dice3(net, x, y)
    assert bool((d0 > 0.7).all())
    xa = FAB(eps=0.5, lower=0.0, upper=1.0, seed=0)(net, x, y)
    da = dice3(net, xa, y)
    fooled = da < 0.5 * d0
    assert bool(fooled.any())
    # samples not fooled come back clean
    unchanged = (xa == x).flatten(1).all(1)
    assert bool((fooled | unchanged).all())
    # FAB is minimum-norm: its points use much less than the budget
    assert float((xa - x).abs().max()) < 0.45


def test_threshold_one_any_dice_drop_succeeds():
    nsp = 2
    x, y = task3(nsp)
    net = model3(nsp)
    xa = FAB(eps=0.5, lower=0.0, upper=1.0, seed=0, steps=3, restarts=1, dice_threshold=1.0)(net, x, y)
    moved = (xa != x).flatten(1).any(1)
    assert bool(moved.any())
    assert bool((dice3(net, xa, y)[moved] < dice3(net, x, y)[moved]).all())


def test_same_seed_bit_identical_and_hygiene():
    nsp = 3
    x, y = task3(nsp, n=2)
    net = model3(nsp)
    net.train()
    try:
        a = FAB(eps=0.5, lower=0.0, upper=1.0, seed=3, steps=2, restarts=3)(net, x, y)
        b = FAB(eps=0.5, lower=0.0, upper=1.0, seed=3, steps=2, restarts=3)(net, x, y)
        assert net.training
    finally:
        net.eval()
    assert torch.equal(a, b)
    assert all(p.grad is None for p in net.parameters())


def test_works_under_inference_mode_and_unbounded_box():
    nsp = 2
    x, y = task3(nsp, n=2)
    with torch.inference_mode():
        xa = FAB(eps=0.5, seed=0, steps=3, restarts=1)(model3(nsp), x, y)
    # without lower/upper the window is the clean sample's per-channel range (ROG's [0, 1] box)
    dims = (2, 3)
    assert bool((xa >= x.amin(dims, keepdim=True) - 1e-6).all())
    assert bool((xa <= x.amax(dims, keepdim=True) + 1e-6).all())
    assert bool(((xa - x).flatten(1).abs().amax(1) > 0).any())


def test_clean_dice_zero_returned_unchanged():
    nsp = 2
    x, y = task3(nsp, n=2)
    y0 = torch.zeros_like(y)       # no foreground in the reference: clean Dice 0 wherever foreground is predicted
    net = Counting(model3(nsp))
    xa = FAB(eps=0.5, lower=0.0, upper=1.0, seed=0)(net, x, y0)
    assert torch.equal(xa, x)
    assert net.calls == 1          # the clean pass only


# ============================================================================ ROG's loop
def _rog_fab(model, x, y, eps, steps, restarts, seed, share=0.5, alpha_max=0.1, eta=1.05, beta=0.9):
    """ROG's ``FABAttack.perturb`` / ``attack_single_run`` written out as ROG writes them (images in
    [0, 1], scalar eps, per-index updates, the returned point re-predicted), with the per-case
    threshold and the attack's generator for the random starts."""
    g = torch.Generator().manual_seed(seed)
    nd = x.dim()

    def view(v):
        return v.view(-1, *([1] * (nd - 1)))

    with torch.no_grad():
        logits = model(x)
    k = logits.shape[1]

    def dice(z, yy):
        return dice_per_sample(z.argmax(1), yy, k)

    d0 = dice(logits, y[:, 0])
    thr_all, acc, adv = share * d0, d0 > 0, x.clone()
    for r in range(2, k + 1):
        for restart in range(restarts):
            ind = acc.nonzero().flatten()
            if ind.numel() == 0:
                return adv
            im, la, thr, bs = x[ind], y[ind, 0], thr_all[ind], ind.numel()
            tgt = logits[ind].sort(dim=1, stable=True)[1][:, -r]
            res2 = torch.full((bs,), 1e10)
            best, x1 = im.clone(), im.clone()
            if restart > 0:
                t = torch.rand(x1.shape, generator=g) * 2 - 1
                x1 = (im + view(res2.clamp(max=eps)) * t / view(t.flatten(1).abs().amax(1)) * 0.5).clamp(0, 1)
            for _ in range(steps):
                xg = x1.clone().requires_grad_(True)
                z = model(xg)
                diffy = -(z.gather(1, la[:, None]) - z.gather(1, tgt[:, None])).flatten(1).mean(1)
                (dg,) = torch.autograd.grad(diffy.sum(), xg)
                w = dg.flatten(1)
                b = -diffy.detach() + (w * x1.flatten(1)).sum(1)
                d3 = projection_linf(torch.cat((x1.flatten(1), im.flatten(1))), torch.cat((w, w)), torch.cat((b, b)))
                d1, d2 = d3[:bs].view_as(x1), d3[bs:].view_as(x1)
                a0 = view(d3.abs().amax(1).clamp_min(1e-8))
                alpha = (a0[:bs] / (a0[:bs] + a0[bs:])).clamp(0, alpha_max)
                x1 = ((x1 + eta * d1) * (1 - alpha) + (im + d2 * eta) * alpha).clamp(0, 1)
                with torch.no_grad():
                    is_adv = dice(model(x1), la) < thr
                for i in is_adv.nonzero().flatten().tolist():
                    t = (x1[i] - im[i]).abs().max()
                    if t < res2[i]:
                        best[i], res2[i] = x1[i], t
                    x1[i] = im[i] + (x1[i] - im[i]) * beta
            adv_curr = torch.where(view(res2 < 1e10), best, im)
            with torch.no_grad():
                acc_curr = dice(model(adv_curr), la) > thr
            acc_curr = acc_curr | ((im - adv_curr).flatten(1).abs().amax(1) > eps)
            fooled = ind[~acc_curr]
            acc[fooled] = False
            adv[fooled] = adv_curr[~acc_curr]
    return adv


@pytest.mark.parametrize("nsp,eps,extra", [(2, 0.13, {}), (2, 0.3, {}), (3, 0.273, {}),
                                           (2, 0.3, {"alpha_max": 0.02, "eta": 1.2, "beta": 0.7})])
def test_matches_rog_loop(nsp, eps, extra):
    x, y = task3(nsp)
    net = model3(nsp)
    opts = dict(steps=3, restarts=3, seed=11, **extra)
    ref = _rog_fab(net, x, y, eps, **opts)
    xa = FAB(eps=eps, lower=0.0, upper=1.0, **opts)(net, x, y)
    assert bool((ref != x).flatten(1).any(1).any())
    assert torch.allclose(xa, ref, atol=1e-5)


class _Recording(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.inputs = net, []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.net(x)


def test_random_start_is_half_the_budget_per_channel():
    """ROG's random start: ``x0 + min(best, eps) * v / max|v| * 0.5``, ``best`` infinite at a run's start."""
    nsp = 2
    x, y = task3(nsp, n=2)
    x = x.clamp(0.2, 0.8)                      # away from the box: no clipping of the start
    net = _Recording(model3(nsp))
    eps = [0.2, 0.1]
    FAB(eps=eps, lower=0.0, upper=1.0, seed=0, steps=1, restarts=2, target_ranks=[2], dice_threshold=0.0)(net, x, y)
    assert len(net.inputs) == 4                # restart 0: gradient at x0, test; restart 1: gradient, test
    assert torch.equal(net.inputs[0], x)
    dev = (net.inputs[2] - x).abs().amax(dim=(2, 3))           # (B, C)
    half = 0.5 * torch.tensor(eps)
    assert bool((dev <= half + 1e-6).all()) and bool((dev >= 0.9 * half).all())
    assert bool(((dev / half).amax(1) >= 1 - 1e-5).all())      # max|v| = 1 somewhere: that voxel is at eps / 2


# ============================================================================ projection
def _lam_star(t, w, b):
    """Reference: the smallest L-inf radius reaching the plane inside [0, 1], by bisection (float64)."""
    need = ((w * t).sum(1) - b).abs()
    sign = torch.where((w * t).sum(1) - b >= 0, 1.0, -1.0)[:, None]
    ws = w * sign                                   # orient: decrease <ws, t>
    p = torch.where(ws < 0, 1 - t, t)
    lo = torch.zeros(t.shape[0], dtype=t.dtype)
    hi = torch.ones(t.shape[0], dtype=t.dtype)
    for _ in range(80):
        mid = (lo + hi) / 2
        reach = (ws.abs() * torch.minimum(mid[:, None], p)).sum(1)
        lo, hi = torch.where(reach >= need, lo, mid), torch.where(reach >= need, mid, hi)
    return hi


@pytest.mark.parametrize("dim", [1, 2, 3, 7, 16, 100])
def test_projection_linf_exact_on_random_problems(dim):
    g = torch.Generator().manual_seed(dim)
    n = 200
    t = torch.rand(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w = w * (torch.rand(n, dim, generator=g, dtype=torch.float64) > 0.2)   # some zero weights
    w[0] = 0.0
    q = torch.rand(n, dim, generator=g, dtype=torch.float64)               # a feasible point of the plane
    b = (w * q).sum(1)
    t[1] = q[1]                                                             # already on the plane
    d = projection_linf(t, w, b)
    z = t + d
    scale = 1.0 + w.abs().sum(1)
    assert bool((((w * z).sum(1) - b).abs() <= 1e-9 * scale).all()), "not on the hyperplane"
    assert bool((z >= -1e-12).all()) and bool((z <= 1 + 1e-12).all()), "outside the box"
    assert bool((d[w == 0] == 0).all())
    norm = d.abs().amax(1)
    assert bool((norm <= (q - t).abs().amax(1) + 1e-9).all()), "longer than a feasible point"
    assert torch.allclose(norm, _lam_star(t, w, b), atol=1e-9, rtol=1e-7), "not the minimum L-inf step"
    assert float(norm[1]) <= 1e-12


def test_projection_linf_against_random_feasible_points_and_lp():
    g = torch.Generator().manual_seed(0)
    n, dim = 20, 6
    t = torch.rand(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(n, dim, generator=g, dtype=torch.float64)
    b = (w * torch.rand(n, dim, generator=g, dtype=torch.float64)).sum(1)
    norm = projection_linf(t, w, b).abs().amax(1)
    # many random points of the box on the plane: none is closer in L-inf
    for _ in range(50):
        q = torch.rand(n, dim, generator=g, dtype=torch.float64)
        j = torch.randint(0, dim, (n,), generator=g)
        wj = w.gather(1, j[:, None])[:, 0]
        qj = (b - (w * q).sum(1) + wj * q.gather(1, j[:, None])[:, 0]) / wj   # solve the plane for coordinate j
        ok = (qj >= 0) & (qj <= 1)
        q.scatter_(1, j[:, None], qj[:, None].clamp(0, 1))
        assert bool((norm[ok] <= (q - t).abs().amax(1)[ok] + 1e-9).all())
    linprog = pytest.importorskip("scipy.optimize").linprog
    for i in range(n):
        # variables (d_1..d_D, s): min s, -s <= d_j <= s, 0 <= t + d <= 1, <w, t + d> = b
        c = [0.0] * dim + [1.0]
        a_ub, b_ub = [], []
        for j in range(dim):
            row = [0.0] * (dim + 1)
            row[j], row[dim] = 1.0, -1.0
            a_ub.append(row)
            row = [0.0] * (dim + 1)
            row[j], row[dim] = -1.0, -1.0
            a_ub.append(row)
            b_ub += [0.0, 0.0]
        bounds = [(-float(t[i, j]), 1 - float(t[i, j])) for j in range(dim)] + [(0, None)]
        a_eq = [w[i].tolist() + [0.0]]
        b_eq = [float(b[i] - (w[i] * t[i]).sum())]
        res = linprog(c, A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
        assert res.status == 0
        assert abs(float(norm[i]) - res.fun) <= 1e-7


def test_projection_linf_unreachable_plane_moves_to_the_corner():
    t = torch.tensor([[0.5, 0.5], [0.2, 0.9]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([3.0, -5.0], dtype=torch.float64)      # beyond the box: <w, z> <= 2, >= -1
    d = projection_linf(t, w, b)
    assert torch.allclose(t + d, torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64))


def test_projection_linf_float32():
    g = torch.Generator().manual_seed(1)
    t = torch.rand(64, 500, generator=g)
    w = torch.randn(64, 500, generator=g)
    b = (w * torch.rand(64, 500, generator=g)).sum(1)
    d = projection_linf(t, w, b)
    ref = _lam_star(t.double(), w.double(), b.double())
    assert torch.allclose(d.abs().amax(1).double(), ref, rtol=1e-4, atol=1e-6)
    assert bool((((w * (t + d)).sum(1) - b).abs() <= 1e-4 * (1 + w.abs().sum(1))).all())


# ============================================================================ eps = 0, errors
@pytest.mark.parametrize("nsp", [2, 3])
def test_eps_zero_returns_input(nsp):
    x, y = task3(nsp, n=2)
    xa = FAB(eps=0.0, lower=0.0, upper=1.0, seed=0, steps=2, restarts=2)(model3(nsp), x, y)
    assert torch.equal(xa, x)


def test_errors():
    x, y = task3(2, n=2)
    regions = torch.cat([(y == 1), (y == 2), (y > 0)], 1).float()     # (B, 3, *S) binary regions
    with pytest.raises(ValueError, match="region"):
        FAB(eps=0.1)(model3(2), x, regions)
    with pytest.raises(ValueError, match="region"):
        FAB(eps=0.1)(nn.Conv2d(2, 1, 1), x, (y > 0).long())              # one sigmoid output
    with pytest.raises(ValueError, match="linf"):
        FAB(norm="l2", eps=0.5)
    with pytest.raises(ValueError):
        FAB(norm="l2")
    with pytest.raises(ValueError, match="exceed"):
        FAB(target_ranks=[2, 4])(model3(2), x, y)
    for bad in ({"target_ranks": [1]}, {"target_ranks": 2}, {"target_ranks": []}, {"dice_threshold": 1.5},
                {"beta": -0.1}, {"alpha_max": 2.0}, {"eta": 0.0}, {"loss": lambda o, t: o.sum()},
                {"targeted": True}, {"steps": 0}, {"restarts": 0}):
        with pytest.raises(ValueError):
            FAB(**bad)


def test_defaults():
    d = FAB.defaults
    assert (d["eps"], d["norm"], d["steps"], d["restarts"], d["target_ranks"]) == (4 / 255, "linf", 5, 5, None)
    assert (d["alpha_max"], d["eta"], d["beta"], d["dice_threshold"]) == (0.1, 1.05, 0.9, 0.5)
    assert "targeted" not in d and "target" not in d
    assert FAB.name == "fab" and FAB.summary and not FAB.supports_regions


# ============================================================================ cost
@pytest.mark.parametrize("nsp,ds,ranks", [(2, False, None), (3, True, None), (2, False, [3])])
def test_forward_backward_count(nsp, ds, ranks):
    """No sample succeeds (dice_threshold 0): exactly steps * restarts * ranks forward + backward passes
    and as many forward-only passes, the clean forward being the first gradient pass."""
    x, y = task3(nsp, n=2)
    steps, restarts = 3, 2
    n_ranks = 2 if ranks is None else len(ranks)
    net = Counting(model3(nsp, ds))
    xa = FAB(eps=0.5, lower=0.0, upper=1.0, seed=0, steps=steps, restarts=restarts, target_ranks=ranks,
             dice_threshold=0.0)(net, x, y)
    assert torch.equal(xa, x)
    n = steps * restarts * n_ranks
    assert (net.grad_calls, net.backwards, net.calls - net.grad_calls) == (n, n, n)
    assert net.samples == 2 * n * x.shape[0]


def test_count_is_an_upper_bound_when_samples_succeed():
    nsp = 2
    x, y = task3(nsp)
    net = Counting(model3(nsp))
    steps, restarts = 5, 5
    xa = FAB(eps=0.5, lower=0.0, upper=1.0, seed=0, steps=steps, restarts=restarts)(net, x, y)
    n = steps * restarts * 2
    assert net.backwards == net.grad_calls <= n and net.calls - net.grad_calls <= n
    assert net.samples <= 2 * n * x.shape[0]
    fooled = int((xa != x).flatten(1).any(1).sum())
    assert fooled >= 1 and net.samples < 2 * n * x.shape[0]     # fooled samples drop out
    assert math.isfinite(float(xa.sum()))
