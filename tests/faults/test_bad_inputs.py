"""Input files that read without an error but are wrong: a .nii.gz cut to half its bytes (ITK reads the
rest as zeros), a label with a fractional value (cast to a class), a label of another shape. The attack
fails each such case with its reason before the model loads; the evaluation refuses it up front."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from fault_helpers import TRAINER, in_process

pytestmark = [pytest.mark.faults]

REASONS = {"truncated": "case_0008_0000.nii.gz is truncated or damaged",
           "fractional": "case_0007.nii.gz: label values must be whole numbers (class ids), got 1.5",
           "shape": "case_0006.nii.gz: shape"}


def _bad_inputs(tree, folder, faults):
    """Images and labels of the test cases plus case_0008 (a copy of case_0006), with ``faults`` applied:
    truncated -> case_0008's image cut to half its bytes; fractional -> a 1.5 in case_0007's label;
    shape -> case_0006's label one slice short."""
    images, labels = folder / "images", folder / "labels"
    shutil.copytree(tree.dataset / "imagesTs", images)
    shutil.copytree(tree.dataset / "labelsTs", labels)
    shutil.copy(images / "case_0006_0000.nii.gz", images / "case_0008_0000.nii.gz")
    shutil.copy(labels / "case_0006.nii.gz", labels / "case_0008.nii.gz")
    if "truncated" in faults:
        data = (images / "case_0008_0000.nii.gz").read_bytes()
        (images / "case_0008_0000.nii.gz").write_bytes(data[: len(data) // 2])
    if "fractional" in faults:
        seg = sitk.ReadImage(str(labels / "case_0007.nii.gz"), sitk.sitkFloat32)
        values = sitk.GetArrayFromImage(seg)
        values[tuple(s // 2 for s in values.shape)] = 1.5
        bad = sitk.GetImageFromArray(values)
        bad.CopyInformation(seg)
        sitk.WriteImage(bad, str(labels / "case_0007.nii.gz"))
    if "shape" in faults:
        seg = sitk.ReadImage(str(labels / "case_0006.nii.gz"))
        sitk.WriteImage(seg[:, :, :-1], str(labels / "case_0006.nii.gz"))
    return images, labels


def test_the_attack_fails_each_bad_case_before_the_model_loads(tree, tmp_path, capsys):
    from nnunet_adv.cli.attack import main

    images, labels = _bad_inputs(tree, tmp_path, REASONS)
    out = tmp_path / "out"
    stdout, _ = in_process(main, ["-i", images, "-o", out, "-l", labels, "-m", tree.model_folder(TRAINER), "-f", 0,
                                  "-device", "cpu", "--disable_progress_bar", "--steps", 1], capsys, code=1)
    assert "model " not in stdout  # every case failed before the model loaded
    cases = json.loads((out / "attack.json").read_text())["cases"]
    reasons = {case: record["reason"] for case, record in cases.items() if record["status"] == "failed"}
    assert sorted(reasons) == ["case_0006", "case_0007", "case_0008"]
    assert REASONS["shape"] in reasons["case_0006"] and REASONS["fractional"] in reasons["case_0007"]
    assert REASONS["truncated"] in reasons["case_0008"]
    assert not list(out.glob("*.nii.gz"))


@pytest.mark.parametrize("fault", sorted(REASONS))
def test_the_evaluation_refuses_a_bad_case_up_front(tree, tmp_path, capsys, fault):
    from nnunet_adv.cli.evaluate import main

    images, labels = _bad_inputs(tree, tmp_path, [fault])
    out = tmp_path / "report"
    stdout, _ = in_process(main, ["-i", images, "-l", labels, "-o", out, "-m", tree.model_folder(TRAINER), "-f", 0,
                                  "--disable_tta", "-device", "cpu", "--disable_progress_bar", "--attacks",
                                  "pgd:steps=1"], capsys, REASONS[fault])
    assert not out.exists() and "predicting" not in stdout


def test_a_truncated_file_is_named_by_the_check_itself(tmp_path):
    """Cut anywhere, not only in half: the gzip stream's end is missing, or an uncompressed NIfTI holds
    fewer data bytes than its header says."""
    from nnunet_adv.volume.inputs import CaseError, check_complete

    image = sitk.GetImageFromArray(np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8))
    for name in ("a.nii.gz", "a.nii"):
        path = tmp_path / name
        sitk.WriteImage(image, str(path))
        check_complete(path)  # whole: accepted
        data = path.read_bytes()
        path.write_bytes(data[:-10])
        with pytest.raises(CaseError, match="truncated"):
            check_complete(path)
