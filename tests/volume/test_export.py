"""Export of adversarial perturbations to the raw geometry (nnunet_adv.volume.export), on synthetic images.

Fast unit tests: synthetic NIfTI volumes, hand-made plans (non-trivial nonzero bounding box,
anisotropic spacing that needs resampling with separate z, a non-identity transpose), and a tiny
random-weight model folder for the in-process command-line runs (2 channels, 3d and 2d
configurations). nnU-Net's own preprocessing is the reference for every inverse step.
"""
import copy
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO, SimpleITKIOWithReorient
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_adv.volume.export import (
    ExportError,
    apply_raw_budget,
    perturbation_to_raw,
    raw_intensity_maps,
    supported_writer,
    write_image_like,
)

# ---------------------------------------------------------------------------------------------
# synthetic plans and images
# ---------------------------------------------------------------------------------------------
CT_PROPS = {"mean": 100.0, "std": 40.0, "percentile_00_5": -500.0, "percentile_99_5": 1500.0,
            "min": -1000.0, "max": 3000.0, "median": 100.0}
RESAMPLE = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}


def _architecture(ndim: int, channels_out_last: int = 8) -> dict:
    conv = "torch.nn.modules.conv.Conv3d" if ndim == 3 else "torch.nn.modules.conv.Conv2d"
    norm = ("torch.nn.modules.instancenorm.InstanceNorm3d" if ndim == 3
            else "torch.nn.modules.instancenorm.InstanceNorm2d")
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, channels_out_last], "conv_op": conv,
                            "kernel_sizes": [[3] * ndim, [3] * ndim], "strides": [[1] * ndim, [2] * ndim],
                            "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
                            "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def make_plans(schemes, target_spacing, transpose=(0, 1, 2), use_mask=None, patch=(8, 16, 16),
               target_spacing_2d=None, patch_2d=(16, 16)) -> dict:
    """nnU-Net plans with a 3d_fullres and a 2d configuration (spacings in transposed order)."""
    n = len(schemes)
    use_mask = list(use_mask) if use_mask is not None else [False] * n
    backward = [int(i) for i in np.argsort(transpose)]

    def cfg(spacing, patch_size, ndim):
        return {"data_identifier": f"synthetic_{ndim}d", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2, "patch_size": list(patch_size), "median_image_size_in_voxels": list(patch_size),
                "spacing": list(spacing), "normalization_schemes": list(schemes), "use_mask_for_norm": use_mask,
                "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": dict(RESAMPLE),
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_seg_kwargs": {**RESAMPLE, "is_seg": True, "order": 1},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**RESAMPLE, "order": 1},
                "batch_dice": False, "architecture": _architecture(ndim)}

    return {"dataset_name": "Dataset999_Synthetic", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": list(target_spacing),
            "original_median_shape_after_transp": list(patch), "image_reader_writer": "SimpleITKIO",
            "transpose_forward": list(transpose), "transpose_backward": backward,
            "configurations": {"3d_fullres": cfg(target_spacing, patch, 3),
                               "2d": cfg(target_spacing_2d or list(target_spacing)[1:], patch_2d, 2)},
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {str(c): dict(CT_PROPS) for c in range(n)}}


DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 1,
                "file_ending": ".nii.gz"}


def synthetic_image(shape_zyx=(10, 20, 24), border=((2, 1), (3, 4), (5, 2)), seed=0, dtype=np.float32,
                    offset=100.0, blob=False, noise=2.0) -> np.ndarray:
    """Positive smooth image with a zero border (a non-trivial nonzero bounding box)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(0, 1, s) for s in shape_zyx], indexing="ij")
    img = offset + 30 * np.sin(3 * z + 1) * np.cos(2 * y) + 20 * x + rng.normal(0, noise, shape_zyx)
    inner = tuple(slice(lo, s - hi) for (lo, hi), s in zip(border, shape_zyx))
    out = np.zeros(shape_zyx)
    out[inner] = img[inner]
    if blob:  # zero background inside the bounding box too (nnU-Net's use_mask_for_norm case)
        c = np.array(shape_zyx) / 2
        r = ((z * shape_zyx[0] - c[0]) / shape_zyx[0]) ** 2 + ((y * shape_zyx[1] - c[1]) / shape_zyx[1]) ** 2 \
            + ((x * shape_zyx[2] - c[2]) / shape_zyx[2]) ** 2
        out[r > 0.12] = 0
    return out.astype(dtype)


def write_nifti(path: Path, array_zyx: np.ndarray, spacing_xyz=(0.8, 0.7, 3.0), origin=(10.0, -20.0, 5.5),
                direction=(0, 1, 0, 1, 0, 0, 0, 0, -1)) -> Path:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), True)
    return path


def preprocess(raw, props, plans, configuration="3d_fullres"):
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    data, seg, properties = DefaultPreprocessor(verbose=False).run_case_npy(raw.copy(), None, copy.deepcopy(props),
                                                                            pm, cm, DATASET_JSON)
    return data, seg, properties, pm, cm


@pytest.fixture
def anisotropic_case(tmp_path):
    """One channel, sitk spacing (0.8, 0.7, 3.0) -> nnU-Net (3.0, 0.7, 0.8); transpose [2, 0, 1].

    Smooth (noise-free): nnU-Net's resampling (skimage ``resize``, ``clip=True``) clips the spline's
    overshoot to the input range, which is not linear; on a smooth image that hardly happens.
    """
    f = write_nifti(tmp_path / "case_0000.nii.gz", synthetic_image(noise=0.0))
    raw, props = SimpleITKIO().read_images([str(f)])
    # transposed original spacing: [0.8, 3.0, 0.7]; targets resample axes 1 (separate-z, 3.0 -> 1.5) and 2
    plans = make_plans(["CTNormalization"], target_spacing=[0.8, 1.5, 0.5], transpose=(2, 0, 1))
    return f, raw, props, plans


# ---------------------------------------------------------------------------------------------
# inverse steps
# ---------------------------------------------------------------------------------------------
def test_zero_perturbation_reproduces_the_input(anisotropic_case, tmp_path):
    f, raw, props, plans = anisotropic_case
    data, _, properties, pm, cm = preprocess(raw, props, plans)
    assert data.shape[1:] != tuple(properties["shape_after_cropping_and_before_resampling"])  # resampled
    maps = raw_intensity_maps(raw, pm, cm)
    delta_raw = perturbation_to_raw(np.zeros_like(data), properties, pm, cm, maps)
    assert delta_raw.shape == raw.shape and not delta_raw.any()
    adv = apply_raw_budget(raw, delta_raw, maps, eps_raw=[5.0])
    np.testing.assert_array_equal(adv, raw)
    out = tmp_path / "out" / f.name
    out.parent.mkdir()
    write_image_like(adv, [f], [out], SimpleITKIO, props)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(f))))


def test_exported_image_has_the_input_geometry(anisotropic_case, tmp_path):
    f, raw, props, plans = anisotropic_case
    data, _, properties, pm, cm = preprocess(raw, props, plans)
    maps = raw_intensity_maps(raw, pm, cm)
    rng = np.random.default_rng(1)
    delta_raw = perturbation_to_raw(rng.uniform(-1, 1, data.shape).astype(np.float32), properties, pm, cm, maps)
    adv = apply_raw_budget(raw, delta_raw, maps, eps_raw=[8.0])
    out = tmp_path / "adv_0000.nii.gz"
    write_image_like(adv, [f], [out], SimpleITKIO, props)
    a, b = sitk.ReadImage(str(f)), sitk.ReadImage(str(out))
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()
    assert b.GetPixelID() == sitk.sitkFloat32  # float output (documented)
    # nnU-Net's reader sees the same properties and exactly the exported values
    back, back_props = SimpleITKIO().read_images([str(out)])
    assert back_props == props
    np.testing.assert_array_equal(back, adv)


def test_max_perturbation_within_raw_budget(anisotropic_case):
    f, raw, props, plans = anisotropic_case
    data, _, properties, pm, cm = preprocess(raw, props, plans)
    maps = raw_intensity_maps(raw, pm, cm)
    rng = np.random.default_rng(2)
    eps_raw = 3.7
    big = rng.uniform(-1, 1, data.shape).astype(np.float32)  # up to 40 HU after scaling: far over budget
    adv = apply_raw_budget(raw, perturbation_to_raw(big, properties, pm, cm, maps), maps, eps_raw=[eps_raw])
    diff = np.abs(adv.astype(np.float64) - raw.astype(np.float64))
    assert diff.max() <= eps_raw  # exactly, in float32
    assert diff.max() > 0.9 * eps_raw


def test_ct_window_rule():
    """Box = [min(raw, p0.5), max(raw, p99.5)]: inside stays inside, outside never moves further out."""
    maps = raw_intensity_maps(np.full((1, 2, 2, 2), 100, np.float32),
                              PlansManager(make_plans(["CTNormalization"], [1, 1, 1])),
                              PlansManager(make_plans(["CTNormalization"], [1, 1, 1])).get_configuration("3d_fullres"))
    raw = np.array([-1000, -1000, -495, 1499, 1600, 1600, 0, 0], np.float32).reshape(1, 2, 2, 2)
    delta = np.array([-10, +10, -10, +10, +10, -10, +10, -10], np.float32).reshape(1, 2, 2, 2)
    adv = apply_raw_budget(raw, delta, maps, eps_raw=[10.0]).ravel()
    np.testing.assert_array_equal(adv, [-1000, -990, -500, 1500, 1600, 1590, 10, -10])


def test_inverse_steps_match_nnunet_preprocessing(anisotropic_case):
    """preprocess(raw + export(delta)) == preprocess(raw) + delta for a smooth delta: un-resample,
    un-crop and un-transpose are the inverse of nnU-Net's own steps (CT: a fixed affine map).

    Transposed axis 1 (3.0 mm -> 1.5 mm) is resampled separately with nearest neighbour
    (order_z=0, nnU-Net's default), which loses up to one neighbour difference along it; the
    in-plane axes (cubic spline) must round-trip to within 1 %.
    """
    f, raw, props, plans = anisotropic_case
    data, _, properties, pm, cm = preprocess(raw, props, plans)
    shape = data.shape[1:]
    g = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    in_plane = 0.3 * np.sin(2.0 * g[0] + 0.5) - 0.25 * np.cos(1.5 * g[2]) + 0.1 * g[0] * g[2]
    along_z = 0.2 * g[1] ** 2
    maps = raw_intensity_maps(raw, pm, cm)
    assert maps.scales[0] == CT_PROPS["std"]
    for field, z_varies in ((in_plane, False), (in_plane + along_z, True)):
        delta = field[None].astype(np.float32)
        delta_raw = perturbation_to_raw(delta, properties, pm, cm, maps)
        # zero outside nnU-Net's bounding box (the zero border), non-zero inside
        inside = raw[0] != 0
        assert not delta_raw[0][~inside].any() and np.abs(delta_raw[0][inside]).min() > 0
        adv = raw + delta_raw  # no budget: the window [-500, 1500] contains everything
        data_adv, _, properties_adv, _, _ = preprocess(adv, props, plans)
        assert properties_adv["bbox_used_for_cropping"] == properties["bbox_used_for_cropping"]
        err = np.abs(data_adv - data - delta)[0]
        # the spline's edge handling ('edge' mode, clip) costs a little at the first/last voxels of
        # the resampled in-plane axis (transposed axis 2); inside it the round trip is near exact
        edge, interior = 0.03 * np.abs(delta).max(), 0.005 * np.abs(delta).max()
        if z_varies:
            z_step = np.abs(np.diff(delta, axis=2)).max()  # one nearest-neighbour step along axis 1
            assert z_step < 0.25 * np.ptp(along_z)  # so that a misplaced axis 1 would fail
            edge, interior = edge + z_step, interior + z_step
        assert err.max() < edge, (z_varies, err.max(), edge)
        assert err[:, :, 2:-2].max() < interior, (z_varies, err[:, :, 2:-2].max(), interior)


@pytest.mark.parametrize("use_mask", [False, True])
def test_zscore_std_is_the_one_nnunet_divided_by(tmp_path, use_mask):
    img = synthetic_image(shape_zyx=(12, 18, 20), blob=use_mask, seed=3)
    f = write_nifti(tmp_path / "z_0000.nii.gz", img, spacing_xyz=(1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    raw, props = SimpleITKIO().read_images([str(f)])
    plans = make_plans(["ZScoreNormalization"], target_spacing=[1, 1, 1], use_mask=[use_mask])
    data, seg, properties, pm, cm = preprocess(raw, props, plans)  # no resampling: raw crop <-> data voxel-wise
    maps = raw_intensity_maps(raw, pm, cm)
    from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice
    crop = raw[(slice(None), *bounding_box_to_slice(properties["bbox_used_for_cropping"]))][0]
    m = seg[0] >= 0 if use_mask else np.ones_like(crop, bool)
    vals, net = crop[m].astype(np.float64), data[0][m].astype(np.float64)
    i, j = int(np.argmin(vals)), int(np.argmax(vals))
    implied = (vals[j] - vals[i]) / (net[j] - net[i])
    assert maps.scales[0] == pytest.approx(implied, rel=1e-5)
    assert maps.scales[0] == pytest.approx(float(crop[m].std()), rel=1e-6)
    if use_mask:
        assert maps.keep_mask is not None and (~maps.keep_mask).any()
        delta_raw = perturbation_to_raw(np.ones_like(data), properties, pm, cm, maps)
        # nnU-Net keeps voxels outside its nonzero mask at 0: nothing is exported there
        assert not delta_raw[0][raw[0] == 0].any()
        assert np.allclose(delta_raw[0][raw[0] != 0], maps.scales[0])
    else:
        assert maps.keep_mask is None


def test_l2_budget_is_the_network_unit_ball(anisotropic_case):
    f, raw, props, plans = anisotropic_case
    data, _, properties, pm, cm = preprocess(raw, props, plans)
    maps = raw_intensity_maps(raw, pm, cm)
    rng = np.random.default_rng(5)
    delta_raw = perturbation_to_raw(rng.normal(0, 1, data.shape).astype(np.float32), properties, pm, cm, maps)
    n_net = int(np.prod(data.shape[1:]))
    adv = apply_raw_budget(raw, delta_raw, maps, norm="l2", eps_net_l2=2.0, net_voxels=n_net)
    d = (adv.astype(np.float64) - raw) / maps.scales[0]
    assert np.sqrt((d ** 2).sum() * n_net / maps.crop_voxels) == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize("rw", [SimpleITKIO, SimpleITKIOWithReorient, NibabelIO, NibabelIOWithReorient])
def test_writers_keep_geometry_for_every_supported_reader(tmp_path, rw):
    img = synthetic_image(shape_zyx=(6, 9, 11), seed=4, dtype=np.int16, offset=300)
    f = write_nifti(tmp_path / "w_0000.nii.gz", img)  # oblique-ish direction: reorientation is exercised
    raw, props = rw().read_images([str(f)])
    adv = raw + np.linspace(-2, 2, raw.size, dtype=np.float32).reshape(raw.shape)
    out = tmp_path / "out_0000.nii.gz"
    write_image_like(adv, [f], [out], rw, props)
    back, back_props = rw().read_images([str(out)])
    np.testing.assert_array_equal(back, adv)
    a, b = sitk.ReadImage(str(f)), sitk.ReadImage(str(out))
    assert (a.GetSize(), a.GetSpacing(), a.GetOrigin()) == (b.GetSize(), b.GetSpacing(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    assert np.allclose(nib.load(f).affine, nib.load(out).affine, atol=1e-5)


def test_unsupported_writer_is_a_clear_error():
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    with pytest.raises(ExportError, match="NaturalImage2DIO is not supported"):
        supported_writer(NaturalImage2DIO)


# ---------------------------------------------------------------------------------------------
# the command line in-process on a tiny random-weight model: 2 channels, 3d and 2d
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory):
    """A model folder nnUNetPredictor loads (random weights), 2 channels (z-score + CT), and 2 cases."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    root = tmp_path_factory.mktemp("synthetic_model")
    plans = make_plans(["ZScoreNormalization", "CTNormalization"], target_spacing=[1.5, 0.7, 0.8],
                       use_mask=[False, False], patch=(8, 16, 16), target_spacing_2d=[0.7, 0.8])
    dataset_json = {**DATASET_JSON, "channel_names": {"0": "MRI", "1": "CT"}}
    images = root / "imagesTs"
    images.mkdir()
    for k in range(2):
        for c in range(2):
            img = synthetic_image(shape_zyx=(8, 22, 20), seed=10 * k + c, offset=100 + 200 * c)
            write_nifti(images / f"case{k}_{c:04d}.nii.gz", img)
    pm = PlansManager(plans)
    for configuration in ("3d_fullres", "2d"):
        folder = root / f"nnUNetTrainer__nnUNetPlans__{configuration}"
        (folder / "fold_0").mkdir(parents=True)
        (folder / "plans.json").write_text(json.dumps(plans))
        (folder / "dataset.json").write_text(json.dumps(dataset_json))
        torch.manual_seed(0)
        net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration(configuration), 2, 3,
                                                       enable_deep_supervision=False)
        torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": configuration}, "inference_allowed_mirroring_axes": (0, 1, 2)},
                   folder / "fold_0" / "checkpoint_final.pth")
    return root


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


PGD = ["--attack_name", "pgd", "--steps", "2", "--eps", "8"]
VAFA_EOT = ["--attack_name", "vafa-3d", "--steps", "2", "--block_size", "4", "8", "8", "--eot_mirroring"]


@pytest.mark.parametrize("configuration, attack", [("3d_fullres", PGD), ("2d", PGD), ("3d_fullres", VAFA_EOT)],
                         ids=["3d-pgd", "2d-pgd", "3d-vafa-eot"])
def test_cli_multichannel_and_2d_in_process(synthetic_model, tmp_path, configuration, attack, capsys):
    from nnunet_adv.cli.attack import main

    images = synthetic_model / "imagesTs"
    before = _digest(images)
    out = tmp_path / "adv"
    rc = main(["-i", str(images), "-o", str(out), "-m",
               str(synthetic_model / f"nnUNetTrainer__nnUNetPlans__{configuration}"),
               "-f", "0", *attack, "-device", "cpu", "--disable_progress_bar"])
    assert rc == 0, capsys.readouterr().err
    assert _digest(images) == before  # the input folder is byte-identical
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, "attack.json"])
    report = json.loads((out / "attack.json").read_text())
    assert report["attack"]["mirror_axes_attacked"] == ([0, 1, 2] if "--eot_mirroring" in attack else None)
    for case in ("case0", "case1"):
        rec = report["cases"][case]
        assert rec["status"] == "ok" and rec["target"] == "clean prediction"
        assert len(rec["linf_raw"]) == 2 and len(rec["ssim"]) == 2
        for c in range(2):
            src, dst = (sitk.ReadImage(str(images / f"{case}_{c:04d}.nii.gz")),
                        sitk.ReadImage(str(out / f"{case}_{c:04d}.nii.gz")))
            assert (src.GetSize(), src.GetSpacing(), src.GetOrigin(), src.GetDirection()) == \
                   (dst.GetSize(), dst.GetSpacing(), dst.GetOrigin(), dst.GetDirection())
            a, b = sitk.GetArrayFromImage(src).astype(np.float64), sitk.GetArrayFromImage(dst).astype(np.float64)
            d = np.abs(b - a)
            assert d.max() > 0 and d.max() == pytest.approx(rec["linf_raw"][c])
            lo, hi = rec["raw_box"][c]
            assert np.all((b >= np.minimum(a, lo) - 1e-3) & (b <= np.maximum(a, hi) + 1e-3))  # the box
            if rec["eps_raw"] is not None:
                assert d.max() <= rec["eps_raw"][c]
        if rec["eps_raw"] is not None:
            # CT channel: eps = 8/255 of the dataset window (p99.5 - p0.5) in HU
            assert rec["eps_raw"][1] == pytest.approx(8 / 255 * 2000.0, rel=1e-5)
