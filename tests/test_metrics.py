"""Metrics against hand-computed values on tiny arrays."""
import math

import numpy as np
import pytest
import torch

from nnunet_adv.metrics import (
    attack_success_rate,
    dice_per_class,
    hd95,
    hd95_per_class,
    iou_per_class,
    lpips_available,
    nnunet_metrics,
    normalized_surface_dice,
    nsd_per_class,
    psnr,
    robust_fraction,
    ssim,
)

# 4x4 example. class 1: pred {(0,1),(0,2),(1,1),(1,2)}, ref {(0,1),(0,2),(0,3),(1,1)}: TP 3, FP 1, FN 1.
# class 2: only in pred. class 3: absent from both. class 0: pred 10, ref 12, both 9.
PRED = np.array([[0, 1, 1, 0],
                 [0, 1, 1, 0],
                 [0, 0, 2, 2],
                 [0, 0, 0, 0]])
REF = np.array([[0, 1, 1, 1],
                [0, 1, 0, 0],
                [0, 0, 0, 0],
                [0, 0, 0, 0]])


def _assert_vals(got, expected):
    np.testing.assert_allclose(got, np.array(expected, dtype=float), rtol=0, atol=1e-12)


def test_dice_hand_computed():
    _assert_vals(dice_per_class(PRED, REF, [0, 1, 2, 3]), [18 / 22, 6 / 8, 0.0, np.nan])
    # a region (union of labels 1 and 2): pred 6, ref 4, both 3
    _assert_vals(dice_per_class(PRED, REF, [(1, 2)]), [6 / 10])
    # torch tensors are accepted
    _assert_vals(dice_per_class(torch.from_numpy(PRED), torch.from_numpy(REF), [1]), [0.75])
    with pytest.raises(ValueError):
        dice_per_class(PRED, REF[:3], [1])


def test_iou_hand_computed():
    _assert_vals(iou_per_class(PRED, REF, [0, 1, 2, 3]), [9 / 13, 3 / 5, 0.0, np.nan])
    _assert_vals(iou_per_class(PRED, REF, [(1, 2)]), [3 / 7])
    # ignoring voxel (0,3) removes the FN of class 1: TP 3, FP 1 -> 3/4
    ign = np.zeros_like(REF, dtype=bool)
    ign[0, 3] = True
    _assert_vals(iou_per_class(PRED, REF, [1], ignore_mask=ign), [3 / 4])
    # IoU = Dice / (2 - Dice) wherever defined
    d = dice_per_class(PRED, REF, [0, 1, 2])
    _assert_vals(iou_per_class(PRED, REF, [0, 1, 2]), d / (2 - d))


def _cube(shape, start, size=4):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(s, s + size) for s in start)] = True
    return m


def _brute_force_hd(p, r, spacing, q=95, mode="union"):
    """Pairwise distances between surface-voxel coordinates (independent of the EDT path)."""
    from scipy.ndimage import binary_erosion, generate_binary_structure
    st = generate_binary_structure(p.ndim, 1)
    sp = np.argwhere(p & ~binary_erosion(p, st)) * np.asarray(spacing, float)
    sr = np.argwhere(r & ~binary_erosion(r, st)) * np.asarray(spacing, float)
    d = np.linalg.norm(sp[:, None, :] - sr[None, :, :], axis=-1)
    d_pr, d_rp = d.min(1), d.min(0)
    if mode == "union":
        return np.percentile(np.concatenate([d_pr, d_rp]), q)
    return max(np.percentile(d_pr, q), np.percentile(d_rp, q))


def test_hd95_offset_cubes_anisotropic():
    shape = (12, 12, 12)
    ref = _cube(shape, (2, 2, 2))
    # shift of 2 voxels along axis 0 with 3 mm slices -> 6 mm. Per direction the 56 surface
    # distances are 24 x 0, 4 x 1, 12 x 3, 16 x 6 mm: > 5 % are 6 mm, so HD95 = HD = 6 mm.
    pred = _cube(shape, (4, 2, 2))
    assert hd95(pred, ref, (3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(pred, ref, (3.0, 1.0, 1.0), mode="max") == pytest.approx(6.0)
    assert hd95(pred, ref, (3.0, 1.0, 1.0), percentile=100) == pytest.approx(6.0)
    # same shift is 2 mm with isotropic 1 mm voxels: spacing is really used
    assert hd95(pred, ref, (1.0, 1.0, 1.0)) == pytest.approx(2.0)
    # shift of 2 voxels along axis 2 with 2 mm spacing on that axis -> 4 mm (the 3 mm axis 0 unused)
    pred2 = _cube(shape, (2, 2, 4))
    assert hd95(pred2, ref, (3.0, 1.0, 2.0)) == pytest.approx(4.0)
    # 3 voxels along axis 1 (1 mm) -> 3 mm
    pred3 = _cube(shape, (2, 5, 2))
    assert hd95(pred3, ref, (3.0, 1.0, 2.0)) == pytest.approx(3.0)
    # identical masks -> 0
    assert hd95(ref, ref, (3.0, 1.0, 1.0)) == 0.0
    # symmetric
    assert hd95(ref, pred, (3.0, 1.0, 1.0)) == pytest.approx(6.0)


def test_hd95_union_vs_max_hand_computed():
    # ref: one pixel at (5, 5); pred: the same pixel plus one 10 voxels away along axis 1 (2 mm).
    # directed pred->ref {0, 20}, ref->pred {0} mm.
    ref = np.zeros((11, 21), dtype=bool)
    ref[5, 5] = True
    pred = ref.copy()
    pred[5, 15] = True
    sp = (1.0, 2.0)
    # union {0, 0, 20}: 95th percentile at index 1.9 -> 0.9 * 20 = 18
    assert hd95(pred, ref, sp) == pytest.approx(18.0)
    # max(P95{0, 20} = 19, P95{0} = 0) = 19
    assert hd95(pred, ref, sp, mode="max") == pytest.approx(19.0)
    assert hd95(pred, ref, sp, percentile=100) == pytest.approx(20.0)


def test_hd95_matches_brute_force_on_blobs():
    rng = np.random.default_rng(0)
    from scipy.ndimage import binary_opening
    spacing = (2.5, 0.7, 1.3)
    for _ in range(3):
        p = binary_opening(rng.random((10, 14, 12)) > 0.45)
        r = binary_opening(rng.random((10, 14, 12)) > 0.45)
        assert p.any() and r.any()
        for mode in ("union", "max"):
            assert hd95(p, r, spacing, mode=mode) == pytest.approx(
                _brute_force_hd(p, r, spacing, mode=mode), abs=1e-9)


def test_hd95_empty_conventions():
    empty = np.zeros((6, 6, 6), dtype=bool)
    cube = _cube((6, 6, 6), (1, 1, 1), size=3)
    assert math.isnan(hd95(empty, empty, (3, 1, 1)))
    assert hd95(empty, cube, (3, 1, 1)) == math.inf
    assert hd95(cube, empty, (3, 1, 1)) == math.inf
    with pytest.raises(ValueError):
        hd95(cube, cube, (1, 1))  # spacing of the wrong length


def test_hd95_per_class():
    shape = (12, 12, 12)
    ref = np.zeros(shape, dtype=np.int64)
    pred = np.zeros(shape, dtype=np.int64)
    ref[_cube(shape, (2, 2, 2))] = 1
    pred[_cube(shape, (4, 2, 2))] = 1
    pred[0, 0, 0] = 2  # class 2 only in pred
    got = hd95_per_class(pred, ref, [1, 2, 3], spacing=(3, 1, 1))
    assert got[0] == pytest.approx(6.0)
    assert got[1] == math.inf
    assert math.isnan(got[2])


def test_attack_success_rate():
    adv = PRED.copy()
    adv[0, 0] = 1
    adv[2, 2] = 0
    adv[3, 3] = 2
    assert attack_success_rate(PRED, adv) == pytest.approx(3 / 16)
    assert attack_success_rate(PRED, PRED) == 0.0
    # restricted to the first row: 1 of 4 changed
    m = np.zeros_like(PRED, dtype=bool)
    m[0] = True
    assert attack_success_rate(PRED, adv, m) == pytest.approx(1 / 4)
    assert math.isnan(attack_success_rate(PRED, adv, np.zeros_like(m)))


def test_psnr_known_mse():
    clean = np.zeros((5, 6, 7))
    adv = clean + 0.1  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert psnr(clean, adv, data_range=1.0) == pytest.approx(20.0)
    # data_range 2 -> 10 log10(4 / 0.01)
    assert psnr(clean, adv, data_range=2.0) == pytest.approx(10 * math.log10(400))
    # 2D, MSE = 0.25 * 1 (a quarter of the pixels off by 1) -> 10 log10(4 / 0.25)
    a = np.zeros((4, 4))
    b = a.copy()
    b[:2, :2] = 1
    assert psnr(a, b, data_range=2.0) == pytest.approx(10 * math.log10(16))
    assert psnr(a, a, data_range=1.0) == math.inf


def test_ssim():
    rng = np.random.default_rng(0)
    img2d = rng.random((32, 32))
    img3d = rng.random((12, 16, 16))
    for img in (img2d, img3d):
        assert ssim(img, img, data_range=1.0) == pytest.approx(1.0)
        assert ssim(img, img, data_range=1.0, gaussian=True, win_size=7 if img.ndim == 3 else None) \
            == pytest.approx(1.0)
        small = np.clip(img + 0.02 * rng.standard_normal(img.shape), 0, 1)
        big = np.clip(img + 0.3 * rng.standard_normal(img.shape), 0, 1)
        s_small, s_big = ssim(img, small, 1.0), ssim(img, big, 1.0)
        assert s_big < s_small < 1.0
    # constant images a, b: variances and covariance are 0, so
    # SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * R)^2 -- in 2D and 3D
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1)
    for shape in ((9, 9), (7, 8, 9)):
        a, b = np.full(shape, 0.5), np.full(shape, 0.25)
        assert ssim(a, b, data_range=1.0) == pytest.approx(expected, rel=1e-9)
    # channel axis: nnU-Net layout (C, Z, Y, X); mean over channels
    two = np.stack([img3d, img3d])
    assert ssim(two, two, 1.0, channel_axis=0) == pytest.approx(1.0)
    # thin volume: clear error, and win_size=3 works
    thin = rng.random((3, 16, 16))
    with pytest.raises(ValueError):
        ssim(thin, thin, 1.0)
    assert ssim(thin, thin, 1.0, win_size=3) == pytest.approx(1.0)


def test_robust_fraction():
    case_dice = [0.9, 0.4, 0.3, np.nan, 0.2]
    # threshold 0.5 * 0.6 = 0.3, strict: 0.9 and 0.4 pass; NaN dropped -> 2 / 4
    assert robust_fraction(case_dice, 0.6) == pytest.approx(0.5)
    assert robust_fraction(case_dice, 0.6, factor=0.0) == pytest.approx(1.0)
    assert robust_fraction(case_dice, 0.6, factor=1.0) == pytest.approx(0.25)
    assert math.isnan(robust_fraction([np.nan], 0.6))


def test_lpips_available_never_crashes():
    assert isinstance(lpips_available(), bool)


def test_nnunet_metrics_agrees_with_dice_per_class(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 3, size=(6, 7, 5)).astype(np.uint8)
    pred = ref.copy()
    flip = rng.random(ref.shape) < 0.3
    pred[flip] = rng.integers(0, 3, size=flip.sum())
    pred[pred == 2] = 1  # class 2 only in ref -> Dice 0
    ref[0, 0, 0] = 4  # ignore label
    affine = np.diag([3.0, 1.0, 1.5, 1.0])
    f_ref, f_pred = str(tmp_path / "ref.nii.gz"), str(tmp_path / "pred.nii.gz")
    nib.save(nib.Nifti1Image(ref, affine), f_ref)
    nib.save(nib.Nifti1Image(pred, affine), f_pred)

    labels = [1, 2, 3]
    res = nnunet_metrics(f_ref, f_pred, labels)
    ours = dice_per_class(pred, ref, labels)
    ours_iou = iou_per_class(pred, ref, labels)
    assert res["metrics"][2]["Dice"] == 0.0
    for i, lab in enumerate(labels):
        np.testing.assert_allclose(res["metrics"][lab]["Dice"], ours[i], rtol=1e-12)
        np.testing.assert_allclose(res["metrics"][lab]["IoU"], ours_iou[i], rtol=1e-12)
    assert math.isnan(res["metrics"][3]["Dice"])  # absent from both

    # regions and the ignore label agree with iou_per_class(ignore_mask=ref == ignore)
    res_r = nnunet_metrics(f_ref, f_pred, [(1, 2)], ignore_label=4)
    np.testing.assert_allclose(res_r["metrics"][(1, 2)]["IoU"],
                               iou_per_class(pred, ref, [(1, 2)], ignore_mask=ref == 4)[0],
                               rtol=1e-12)


class _FakeLPIPS:
    """Stand-in for lpips.LPIPS (not installed here): distance = mean |a - b| per image."""

    def __init__(self, net, verbose):
        assert net == "alex"

    def eval(self):
        return self

    def __call__(self, a, b):
        assert a.shape[1] == 3 and a.min() >= -1 and a.max() <= 1  # LPIPS's input convention
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture
def fake_lpips(monkeypatch):
    import sys
    import types

    import nnunet_adv.metrics as metrics
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=_FakeLPIPS))
    monkeypatch.setattr(metrics, "lpips_available", lambda: True)
    monkeypatch.setattr(metrics, "_LPIPS_NET", None)
    return metrics


def test_lpips_distance_slice_wise_on_lpips_scale(fake_lpips):
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 100, (4, 8, 8))
    adv = clean.copy()
    adv[1] += 10  # one slice of four changed by 10 of a range of 100 = 0.2 on LPIPS's [-1, 1] scale
    assert fake_lpips.lpips_distance(clean, adv, data_range=100.0) == pytest.approx(0.2 / 4, rel=1e-5)
    assert fake_lpips.lpips_distance(clean, clean, data_range=100.0) == 0.0
    assert fake_lpips.lpips_distance(clean[0], adv[0], data_range=100.0) == 0.0  # 2D: one picture
    assert fake_lpips.lpips_distance(clean[1], adv[1], data_range=100.0) == pytest.approx(0.2, rel=1e-5)


def test_lpips_distance_is_none_when_unavailable_or_rejected(fake_lpips, monkeypatch):
    x = np.zeros((2, 8, 8))
    monkeypatch.setattr(fake_lpips, "_LPIPS_NET", lambda a, b: (_ for _ in ()).throw(RuntimeError("too small")))
    assert fake_lpips.lpips_distance(x, x, data_range=1.0) is None  # the network failed: None, no crash
    monkeypatch.setattr(fake_lpips, "lpips_available", lambda: False)
    assert fake_lpips.lpips_distance(x, x, data_range=1.0) is None


def test_evaluate_lpips_per_channel_from_image_files(fake_lpips, tmp_path):
    """nnUNetv2_adv_evaluate's per-case LPIPS: read both images with the dataset's reader/writer,
    slice-wise LPIPS per channel with the clean channel's range, mean over channels."""
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_adv.evaluation.pipeline import image_lpips

    rng = np.random.default_rng(1)
    clean = [rng.uniform(0, 50, (3, 8, 8)), rng.uniform(0, 200, (3, 8, 8))]
    adv = [clean[0] + 5, clean[1].copy()]  # channel 0 shifted by 5 everywhere, channel 1 unchanged
    files = {}
    for kind, volumes in (("clean", clean), ("adv", adv)):
        files[kind] = []
        for c, v in enumerate(volumes):
            path = tmp_path / f"{kind}_{c:04d}.nii.gz"
            sitk.WriteImage(sitk.GetImageFromArray(v.astype(np.float32)), str(path))
            files[kind].append(str(path))
    value = image_lpips(files["clean"], files["adv"], SimpleITKIO())
    range0 = float(clean[0].astype(np.float32).max() - clean[0].astype(np.float32).min())
    assert value == pytest.approx((2 * 5 / range0 + 0.0) / 2, rel=1e-4)


# ------------------------------------------------------------------------------ normalised surface Dice
def _slab(shift=0, shape=(20, 20, 20)):
    """A 2-voxel-thick slab across the volume (its surfaces: two planes and thin side walls)."""
    m = np.zeros(shape, bool)
    m[(slice(5 + shift, 7 + shift),) + (slice(2, shape[1] - 2),) * (len(shape) - 1)] = True
    return m


@pytest.mark.parametrize("ndim", [2, 3])
def test_nsd_hand_computed_cases(ndim):
    shape = (20,) * ndim
    a = _slab(0, shape)
    assert normalized_surface_dice(a, a, 1.0) == 1.0                                 # identical
    assert normalized_surface_dice(a, _slab(5, shape), 1.0) == 0.0                   # 5 mm apart > 1 mm: no surface
    assert normalized_surface_dice(a, _slab(1, shape), 1.0) == pytest.approx(1.0)    # 1 mm apart <= 1 mm
    empty = np.zeros(shape, bool)
    assert np.isnan(normalized_surface_dice(empty, empty, 1.0))                      # nnU-Net's NaN rule
    assert normalized_surface_dice(a, empty, 1.0) == 0.0


def test_nsd_is_spacing_aware_and_takes_a_tolerance_per_class():
    a, b = _slab(0), _slab(4)                                # 4 voxels apart along axis 0
    assert normalized_surface_dice(a, b, 1.5, spacing=(0.25, 1, 1)) == pytest.approx(1.0)  # 1 mm
    assert normalized_surface_dice(a, b, 1.5, spacing=(1, 1, 1)) == 0.0                    # 4 mm
    labels_a, labels_b = a.astype(int), b.astype(int) * 2 + a.astype(int) * 0
    labels_b[a] = 1                                          # class 1 identical, class 2 = the shifted slab
    labels_a[b] = 2
    nsd = nsd_per_class(labels_b, labels_a, [1, 2], [1.0, 1.0])
    assert nsd[0] == pytest.approx(1.0) and nsd[1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        normalized_surface_dice(a, b, 0.0)
