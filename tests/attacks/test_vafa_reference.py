"""VAFA as published and as the authors' code runs it (asif-hanif/vafa): the window that contains
the clean image (bug fix), the reference's per-slice rescale inside 96^3 tiles, its MONAI DiceCE
loss, the rescale-only control; 2D and 3D, with and without deep supervision."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from attack_helpers import make_task, trained_model

from nnunet_adv.attacks import attack_defaults, build_attack
from nnunet_adv.attacks.vafa import rescale_slices
from nnunet_adv.attacks.vafa_tiles import tile_starts
from nnunet_adv.losses import monai_dice_ce

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(nsp, ds, n=2, seed=7):
    x, y = make_task(nsp, n=n, size=16, seed=seed)
    labels = [y, F.interpolate(y.float(), scale_factor=0.5, mode="nearest").long()] if ds else y
    return x, y, labels


def test_clean_voxels_outside_the_window_are_not_clipped():
    """CT: the window is the dataset's [p0.5, p99.5] while nnU-Net's augmentation pushes voxels out
    of it. With the quantisation step fixed at 1/255 of the window (q_min = q_max = 1), VAFA can
    only round: every voxel, inside or outside the window, moves by at most about one step."""
    net = trained_model(3)
    x, y, labels = _data(3, False)
    x = x * 1.6 - 0.3                                   # ~20% of the voxels now lie outside [0, 1]
    outside = (x < 0) | (x > 1)
    assert 0.1 < float(outside.float().mean()) < 0.5
    xa = build_attack("vafa-3d", steps=2, q_min=1.0, q_max=1.0, lower=0.0, upper=1.0)(net, x, labels)
    width = float(x.max() - x.min())                    # the window widened to contain the clean image
    moved = (xa - x).abs()
    assert float(moved[outside].max()) <= 1.0 / 255 * width + 1e-6
    assert float(moved[~outside].max()) <= 1.0 / 255 * width + 1e-6
    # the reference's preprocessing clips to its window instead (the -ref variants)
    clipped = build_attack("vafa-3d", steps=2, q_min=1.0, q_max=1.0, lower=0.0, upper=1.0,
                           clip_to_window=True)(net, x, labels)
    assert float(clipped.min()) >= 0.0 and float(clipped.max()) <= 1.0


def test_reference_variants_defaults():
    for name, steps, ssim in (("vafa-3d-ref", 20, True), ("vafa-2d-ref", 10, False)):
        d = attack_defaults(name)
        assert (d["steps"], d["q_max"], d["q_min"], d["use_ssim_loss"]) == (steps, 20.0, 5.0, ssim)
        assert d["renormalize_slices"] is True and d["clip_to_window"] is True
        assert d["rescale_tile"] is None and build_attack(name).tile() == (96, 96, 96)  # no spacing: the reference's
    assert attack_defaults("vafa-3d")["renormalize_slices"] is False  # the paper's algorithm is unchanged
    assert build_attack("slice-rescale").tile() == (96, 96, 96)


def test_tiles_are_the_references_dense_patch_slices():
    assert tile_starts(40, 96) == [0]
    assert tile_starts(192, 96) == [0, 96]
    assert tile_starts(200, 96) == [0, 96, 104]          # the last tile moved back to end at the border


def test_rescale_slices_per_tile_and_gradient():
    x = torch.rand(1, 1, 6, 10, 4, dtype=torch.float64)
    out = rescale_slices(x, slice_axis=0, tile=(3, 4, 4))
    assert tile_starts(10, 4) == [0, 4, 6]               # the tile at 6 overwrites rows 6-7 of the one at 4
    for d0 in (0, 3):
        for h0 in (0, 6):
            tile = out[0, 0, d0:d0 + 3, h0:h0 + 4, 0:4]
            assert torch.allclose(tile.amin(dim=(1, 2)), torch.zeros(3, dtype=torch.float64))
            assert torch.allclose(tile.amax(dim=(1, 2)), torch.ones(3, dtype=torch.float64))
    whole = rescale_slices(x, slice_axis=0)
    assert torch.allclose(whole.amin(dim=(3, 4)), torch.zeros(1, 1, 6, dtype=torch.float64))
    xg = x[..., :3, :4, :4].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: rescale_slices(t, 0, (3, 2, 4)), (xg,))  # through min/max


def test_monai_dice_ce_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    labels = torch.randint(0, 3, (2, 1, 4, 5), generator=g)
    labels[1][labels[1] == 2] = 0                        # class 2 absent from sample 1: dice term 1
    p = torch.softmax(logits, 1).numpy()
    y = labels[:, 0].numpy()
    dice = []
    for b in range(2):
        for k in range(3):
            gk = (y[b] == k).astype(np.float64)
            dice.append(1 - (2 * (p[b, k] * gk).sum() + 0.0) / ((p[b, k] ** 2).sum() + (gk ** 2).sum() + 1e-6))
    ce = float(F.cross_entropy(logits, labels[:, 0]))
    assert float(monai_dice_ce(logits, labels)) == pytest.approx(np.mean(dice) + ce, rel=1e-6)
    assert dice[5] == pytest.approx(1.0)


@pytest.mark.parametrize("name,nsp", [("vafa-3d-ref", 3), ("vafa-2d-ref", 3), ("vafa-2d-ref", 2)])
@pytest.mark.parametrize("ds", [False, True])
def test_reference_variant_rescales_every_slice_and_raises_its_loss(name, nsp, ds, monkeypatch):
    import nnunet_adv.attacks.vafa as vafa

    calls = []
    monkeypatch.setattr(vafa, "monai_dice_ce", lambda out, y: calls.append(1) or monai_dice_ce(out, y))
    net = trained_model(nsp, deep_supervision=ds)
    x, y, labels = _data(nsp, ds)
    tile = {"rescale_tile": (8, 16, 16)} if nsp == 3 else {}
    xa = build_attack(name, steps=3, lower=0.0, upper=1.0, block_size=8, **tile)(net, x, labels)
    assert xa.shape == x.shape and calls  # the reference's DiceCE drove the steps
    slices = xa[:, :, :8] if nsp == 3 else xa           # one tile along the slice axis
    dims = (3, 4) if nsp == 3 else (2, 3)
    assert torch.allclose(slices.amin(dim=dims), torch.zeros(1), atol=1e-6)
    assert torch.allclose(slices.amax(dim=dims), torch.ones(1), atol=1e-6)
    with torch.no_grad():
        out = net(xa)
        loss_adv, loss_clean = monai_dice_ce(out, y), monai_dice_ce(net(x), y)
    assert float(loss_adv) > float(loss_clean)


def test_slice_rescale_control_is_the_rescale_alone():
    x, y, labels = _data(3, False)
    x = 0.2 + 0.5 * x                                    # slices do not span the window [0, 1]

    def no_model(_):
        raise AssertionError("the control calls no model")

    xa = build_attack("slice-rescale", lower=0.0, upper=1.0, rescale_tile=(8, 8, 8))(no_model, x, labels)
    assert torch.allclose(xa, rescale_slices(x, 0, (8, 8, 8)))
    assert float((xa - x).abs().max()) > 0.2             # the stretch alone moves voxels far
