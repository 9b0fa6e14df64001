"""The whole-volume attack engine on its own (no command line): one real-MRI case of the test
dataset, a small untrained network that nnU-Net's predictor holds; the written image has the
input's geometry, the raw budget holds, the loss rises, VAFA keeps to the box."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunet_tree import DATASET_NAME
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_adv.attack_config import AttackConfig
from nnunet_adv.volume.engine import CaseError, VolumeAttack
from nnunet_adv.volume.trained_model import TrainedModel


@pytest.fixture(scope="module")
def model(nnunet_tree):
    folder = nnunet_tree.preprocessed / DATASET_NAME
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [4, 8, 16, 16, 16, 16][:arch["n_stages"]]
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(plans_manager, configuration, 1, 3, enable_deep_supervision=False)
    net.eval()
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.manual_initialization(net, plans_manager, configuration, [net.state_dict()], dataset_json,
                                    "nnUNetTrainer", (0, 1, 2))
    return TrainedModel(networks=[net], predictor=predictor, patch_size=tuple(configuration.patch_size),
                        mirror_axes=(0, 1, 2))


def _case(tree):
    images = tree.dataset / "imagesTs"
    image = sorted(images.glob("*_0000.nii.gz"))[0]
    label = tree.dataset / "labelsTs" / image.name.replace("_0000.nii.gz", ".nii.gz")
    return [str(image)], str(label)


def test_pgd_on_a_whole_volume_keeps_the_raw_budget_and_the_geometry(nnunet_tree, model, tmp_path):
    images, label = _case(nnunet_tree)
    engine = VolumeAttack(model, AttackConfig("pgd", {"steps": 2}, eps_frac=8 / 255, seed=0), progress=False)
    out = [str(tmp_path / "adv_0000.nii.gz")]
    record = engine.run_case(images, label, out, out)
    clean, adv = sitk.ReadImage(images[0]), sitk.ReadImage(out[0])
    assert adv.GetSize() == clean.GetSize() and adv.GetSpacing() == clean.GetSpacing()
    assert adv.GetOrigin() == clean.GetOrigin() and adv.GetDirection() == clean.GetDirection()
    delta = sitk.GetArrayFromImage(adv).astype(np.float64) - sitk.GetArrayFromImage(clean).astype(np.float64)
    eps_raw = record["eps_raw"][0]
    assert eps_raw == pytest.approx(record["eps_network"][0] * record["raw_scale"][0])
    assert np.abs(delta).max() <= eps_raw + 1e-6 and np.abs(delta).max() > 0.5 * eps_raw
    assert record["loss_adv"] > record["loss_clean"] and record["target"] == "labels"
    assert record["attack_forwards"] == 2


def test_vafa_has_no_eps_and_keeps_to_the_box(nnunet_tree, model, tmp_path):
    images, _ = _case(nnunet_tree)
    engine = VolumeAttack(model, AttackConfig("vafa-3d", {"steps": 1, "block_size": (8, 8, 8)}, seed=0),
                          progress=False)
    out = [str(tmp_path / "vafa_0000.nii.gz")]
    record = engine.run_case(images, None, out, out)
    assert record["eps_raw"] is None and record["target"] == "clean prediction"
    raw = sitk.GetArrayFromImage(sitk.ReadImage(images[0]))
    adv = sitk.GetArrayFromImage(sitk.ReadImage(out[0]))
    lo, hi = record["raw_box"][0]
    assert adv.min() >= min(lo, raw.min()) - 1e-4 and adv.max() <= max(hi, raw.max()) + 1e-4


def test_a_label_with_unknown_values_is_a_case_error(nnunet_tree, model, tmp_path):
    images, label = _case(nnunet_tree)
    seg = sitk.ReadImage(label)
    array = sitk.GetArrayFromImage(seg)
    array[0, 0, 0] = 7
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(seg)
    sitk.WriteImage(bad, str(tmp_path / "bad.nii.gz"))
    engine = VolumeAttack(model, AttackConfig("fgsm"), progress=False)
    with pytest.raises(CaseError, match=r"label values \[7\] are not labels of the dataset"):
        engine.run_case(images, str(tmp_path / "bad.nii.gz"), [str(tmp_path / "x_0000.nii.gz")],
                        [str(tmp_path / "x_0000.nii.gz")])


def test_a_mostly_constant_image_gets_a_warning(nnunet_tree, model, tmp_path):
    """A truncated .nii.gz decodes to zeros after the break: more than 90% of one value is worth a line."""
    images, _ = _case(nnunet_tree)
    image = sitk.ReadImage(images[0])
    array = sitk.GetArrayFromImage(image)
    array[2:] = 0
    flat = sitk.GetImageFromArray(array)
    flat.CopyInformation(image)
    sitk.WriteImage(flat, str(tmp_path / "flat_0000.nii.gz"))
    lines = []
    engine = VolumeAttack(model, AttackConfig("fgsm"), progress=False, log=lines.append)
    engine.read([str(tmp_path / "flat_0000.nii.gz")])
    assert len(lines) == 1 and lines[0].startswith("warning: flat_0000.nii.gz:") and "one value" in lines[0]
    engine.read(images)
    assert len(lines) == 1


def test_ensemble_keeps_the_member_with_the_lowest_dice_on_a_whole_volume(nnunet_tree, model, tmp_path):
    """nnUNetv2_adv_attack --attack_name ensemble: per case the member image with the lowest Dice
    (AutoAttack's composition), each member run as it runs alone (same seed)."""
    images, label = _case(nnunet_tree)
    members = "fgsm+pgd(steps=2)+bim(steps=2)"
    ensemble = AttackConfig.parse(f"ensemble:members={members},eps=8,seed=0")
    record = VolumeAttack(model, ensemble, progress=False).run_case(images, label, [str(tmp_path / "e_0000.nii.gz")],
                                                                    [str(tmp_path / "e_0000.nii.gz")])
    alone = []
    for i, member in enumerate(ensemble.members):
        config = AttackConfig(member.name, member.options, eps_frac=8 / 255, seed=0)
        out = [str(tmp_path / f"m{i}_0000.nii.gz")]
        alone.append(VolumeAttack(model, config, progress=False).run_case(images, label, out, out)["dice_adv"])
    assert record["dice_adv"] == pytest.approx(min(alone))
    assert record["attack_forwards"] == (1 + 2 + 2) + 3  # every member's steps, then one Dice check per member
    assert record["eps_raw"] is not None                 # the shared budget still bounds the exported image
