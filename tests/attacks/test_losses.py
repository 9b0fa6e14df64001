"""Losses and metrics (nnunet_adv.losses, nnunet_adv.ssim) against hand-computed values."""
import math

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F

from nnunet_adv.losses import cospgd_loss, cospgd_weights, dice_per_sample, frequency_consistency, segpgd_loss
from nnunet_adv.ssim import block_ssim, ssim, ssim_per_channel

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny():
    """Two voxels (1x1x2 2D image), 2 classes. Voxel 0 correct, voxel 1 wrong."""
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])      # (B=1, K=2, H=1, W=2)
    labels = torch.tensor([[[0, 0]]])                           # (B=1, H=1, W=2)
    ce0 = math.log(1 + math.exp(-2.0))                          # -log softmax(2, 0)[0]
    ce1 = math.log(1 + math.exp(1.0))                           # -log softmax(0, 1)[0]
    return logits, labels, ce0, ce1


@pytest.mark.parametrize("t,T", [(1, 10), (5, 10), (10, 10), (1, 1)])
def test_segpgd_lambda_schedule(t, T):
    logits, labels, ce0, ce1 = _tiny()
    lam = (t - 1) / (2 * T)
    expect = ((1 - lam) * ce0 + lam * ce1) / 2        # voxel 0 correct, voxel 1 wrong
    assert abs(float(segpgd_loss(logits, labels, t, T)) - expect) < 1e-6
    expect_t = (lam * ce0 + (1 - lam) * ce1) / 2      # targeted: weights swap
    assert abs(float(segpgd_loss(logits, labels, t, T, targeted=True)) - expect_t) < 1e-6


def test_segpgd_first_step_is_ce_on_correct_voxels_and_last_is_near_half():
    logits, labels, ce0, ce1 = _tiny()
    assert abs(float(segpgd_loss(logits, labels, 1, 20)) - ce0 / 2) < 1e-6   # lambda_1 = 0
    lam = 19 / 40
    assert abs(float(segpgd_loss(logits, labels, 20, 20)) - ((1 - lam) * ce0 + lam * ce1) / 2) < 1e-6
    with pytest.raises(ValueError):
        segpgd_loss(logits, labels, 0, 20)
    with pytest.raises(ValueError):
        segpgd_loss(logits, labels, 21, 20)


def test_cospgd_weights_and_loss():
    logits, labels, ce0, ce1 = _tiny()
    p0 = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    p1 = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    cos0 = float(p0[0] / p0.norm())       # cosine(p, e_0) = p_0 / ||p||
    cos1 = float(p1[0] / p1.norm())
    w = cospgd_weights(logits, labels)
    assert w.shape == (1, 1, 2)
    assert torch.allclose(w, torch.tensor([[[cos0, cos1]]]), atol=1e-6)
    assert abs(float(cospgd_loss(logits, labels)) - (cos0 * ce0 + cos1 * ce1) / 2) < 1e-6
    expect_t = ((1 - cos0) * ce0 + (1 - cos1) * ce1) / 2
    assert abs(float(cospgd_loss(logits, labels, targeted=True)) - expect_t) < 1e-6


def test_cospgd_weights_are_detached():
    logits, labels, _, _ = _tiny()
    z = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(cospgd_loss(z, labels), z)
    # with detached weights the gradient is sum_i w_i dCE_i / N
    w = cospgd_weights(logits, labels)
    z2 = logits.clone().requires_grad_(True)
    ce = F.cross_entropy(z2, labels, reduction="none")
    (g2,) = torch.autograd.grad((w * ce).mean(), z2)
    assert torch.allclose(g, g2, atol=1e-7)


def test_losses_accept_channel_labels_and_ds_lists():
    logits, labels, _, _ = _tiny()
    a = segpgd_loss(logits, labels, 3, 5)
    b = segpgd_loss([logits, logits[..., :1]], [labels[:, None], labels[:, None, :, :1]], 3, 5)
    assert torch.allclose(a, b)
    with pytest.raises(ValueError, match="does not match"):
        cospgd_loss(logits, torch.zeros(1, 1, 3, dtype=torch.long))


def test_dice_per_sample_hand_values():
    pred = torch.tensor([[[0, 1, 1, 2]], [[0, 0, 0, 0]], [[1, 1, 0, 0]]])   # (B=3, 1, 4) -> 2D (1x4)
    ref = torch.tensor([[[0, 1, 2, 2]], [[0, 0, 0, 0]], [[1, 1, 0, 0]]])
    d = dice_per_sample(pred, ref, num_classes=3)
    # sample 0: class 1: 2*1/(2+1) = 2/3; class 2: 2*1/(1+2) = 2/3 -> 2/3
    # sample 1: no foreground anywhere -> 1; sample 2: perfect class 1, class 2 absent -> 1
    assert torch.allclose(d, torch.tensor([2 / 3, 1.0, 1.0]), atol=1e-6)
    d2 = dice_per_sample(torch.tensor([[[0, 0, 0, 0]]]), torch.tensor([[[1, 1, 0, 0]]]), 2)
    assert float(d2) == 0.0
    # with background: sample 0 class 0 Dice 1
    dbg = dice_per_sample(pred[:1], ref[:1], 3, include_background=True)
    assert abs(float(dbg) - (1 + 2 / 3 + 2 / 3) / 3) < 1e-6


@pytest.mark.parametrize("shape", [(2, 3, 6, 5), (2, 3, 4, 6, 5)])
def test_frequency_consistency_matches_scipy(shape):
    torch.manual_seed(0)
    z = torch.randn(shape, dtype=torch.float64)
    za = z + 0.3 * torch.randn(shape, dtype=torch.float64)
    axes = tuple(range(2, len(shape)))
    dz = scipy.fft.dctn(z.numpy(), axes=axes, norm="ortho")
    dza = scipy.fft.dctn(za.numpy(), axes=axes, norm="ortho")
    expect = np.abs(dz - dza).sum() / np.abs(dz).sum()
    got = frequency_consistency(z, za)
    assert got.dtype == torch.float32
    assert abs(float(got) - expect) < 1e-5
    assert float(frequency_consistency(z, z)) == 0.0
    # deep-supervision lists: the full-resolution outputs are used
    assert torch.allclose(frequency_consistency([z, z[..., :2]], [za, z[..., :2]]), got)


def test_frequency_consistency_gradient_and_shape_check():
    z = torch.randn(1, 2, 4, 4, 4)
    za = torch.randn(1, 2, 4, 4, 4, requires_grad=True)
    (g,) = torch.autograd.grad(frequency_consistency(z, za), za)
    assert g.abs().sum() > 0
    with pytest.raises(ValueError, match="differ in shape"):
        frequency_consistency(z, torch.randn(1, 2, 4, 4, 2))


def _ssim_bruteforce(x, y, win=3, sigma=1.5, data_range=1.0):
    """Full (non-separable) Gaussian window, valid positions, numpy loops."""
    c = np.arange(win) - win // 2
    g = np.exp(-(c ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    nsp = x.ndim
    if nsp == 2:
        kern = g[:, None] * g[None, :]
    else:
        kern = g[:, None, None] * g[None, :, None] * g[None, None, :]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for idx in np.ndindex(*[s - win + 1 for s in x.shape]):
        sl = tuple(slice(i, i + win) for i in idx)
        a, b = x[sl], y[sl]
        mx, my = (kern * a).sum(), (kern * b).sum()
        sxx = (kern * a * a).sum() - mx * mx
        syy = (kern * b * b).sum() - my * my
        sxy = (kern * a * b).sum() - mx * my
        vals.append((2 * mx * my + c1) * (2 * sxy + c2) / ((mx * mx + my * my + c1) * (sxx + syy + c2)))
    return float(np.mean(vals))


@pytest.mark.parametrize("shape", [(6, 7), (5, 6, 4)])
def test_ssim_matches_bruteforce(shape):
    torch.manual_seed(1)
    x = torch.rand((1, 1) + shape, dtype=torch.float64)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    expect = _ssim_bruteforce(x[0, 0].numpy(), y[0, 0].numpy())
    assert abs(float(ssim_per_channel(x, y)[0, 0]) - expect) < 1e-10
    assert abs(float(ssim(x, x)) - 1.0) < 1e-12


def test_block_ssim_is_mean_of_nonnegative_block_ssims():
    torch.manual_seed(2)
    xb = torch.rand(2, 3, 4, 4, 4)                    # 6 blocks of 4^3
    yb = xb.clone()
    yb[0, 0] = 1 - xb[0, 0]                           # anti-correlated block: SSIM < 0 -> 0
    per = ssim_per_channel(xb.reshape(-1, 1, 4, 4, 4), yb.reshape(-1, 1, 4, 4, 4))[:, 0]
    assert per[0] < 0
    assert abs(float(block_ssim(xb, yb, 3)) - float(per.clamp_min(0).mean())) < 1e-6
    assert abs(float(block_ssim(xb, yb, 3)) - 5 / 6) < 1e-5       # 5 identical blocks, one clipped to 0
