"""Per-case robustness metrics (nnU-Net's compute_metrics plus HD95, ASR, foreground Dice) and their
nnU-Net-style summary, on hand-made label files."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_adv.evaluation.case_metrics import case_metrics, jsonable_summary, summarize


def _write(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return str(path)


@pytest.fixture()
def files(tmp_path):
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[1:4, 1:4, 1:4] = 1           # 27 voxels of class 1
    ref[5:7, 5:7, 5:7] = 2           # 8 voxels of class 2
    pred = ref.copy()
    pred[1, 1:4, 1:4] = 0            # class 1: 18 of 27 found
    pred[pred == 2] = 0              # class 2 vanished
    clean = ref.copy()
    clean[0, 0, :4] = 1              # clean prediction differs from pred in ... voxels
    for d in ("ref", "pred", "clean"):
        (tmp_path / d).mkdir()
    return {"ref": _write(tmp_path / "ref" / "a.nii.gz", ref), "pred": _write(tmp_path / "pred" / "a.nii.gz", pred),
            "clean": _write(tmp_path / "clean" / "a.nii.gz", clean), "arrays": (ref, pred, clean), "root": tmp_path}


def test_case_metrics_hand_computed(files):
    ref, pred, clean = files["arrays"]
    entry = case_metrics(files["ref"], files["pred"], SimpleITKIO(), [1, 2], None, files["clean"])
    m1, m2 = entry["metrics"][1], entry["metrics"][2]
    assert m1["Dice"] == pytest.approx(2 * 18 / (27 + 18)) and m1["IoU"] == pytest.approx(18 / 27)
    assert (m1["TP"], m1["FP"], m1["FN"]) == (18, 0, 9)
    assert m2["Dice"] == 0.0 and m2["HD95"] == pytest.approx(np.sqrt(3 * 8.0 ** 2))  # vanished: the diagonal
    assert m1["HD95"] == pytest.approx(1.0)  # the missing first slab is one voxel away
    assert entry["ASR"] == pytest.approx(float(np.mean(pred != clean)))
    assert entry["foreground_dice"] == pytest.approx((m1["Dice"] + 0.0) / 2)


def test_summary_averages_as_nnunets_own_evaluation(files):
    entry = case_metrics(files["ref"], files["pred"], SimpleITKIO(), [1, 2], None)
    assert entry["ASR"] is None  # the clean setting has no ASR
    ours = jsonable_summary(summarize([entry], [1, 2]))
    out = files["root"] / "nnunet_summary.json"
    compute_metrics_on_folder(str(files["root"] / "ref"), str(files["root"] / "pred"), str(out), SimpleITKIO(),
                              ".nii.gz", [1, 2], None, 1)
    theirs = json.loads(out.read_text())
    for metric in ("Dice", "IoU", "TP", "FP", "FN"):
        assert ours["foreground_mean"][metric] == pytest.approx(theirs["foreground_mean"][metric])
        for label in ("1", "2"):
            assert ours["mean"][label][metric] == pytest.approx(theirs["mean"][label][metric])
