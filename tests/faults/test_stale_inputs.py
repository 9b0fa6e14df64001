"""Never a stale result: resumes check the inputs they were made from (SHA-256 of every image and label),
recompute exactly the cases whose inputs changed and say so; a cached metric that no longer matches
its checksum is recomputed, never read; a resumed folder holding files the run would not write is
refused; a second run into a folder in use is refused with one line naming the first, while a lock
left by a dead process does not block. The commands run through their main() in this process."""
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from fault_helpers import TRAINER, _digest, in_process

pytestmark = [pytest.mark.faults]


def _inputs(tree, folder):
    """Copies of the test images and labels (case_0006, case_0007) that a test may change."""
    images, labels = folder / "images", folder / "labels"
    shutil.copytree(tree.dataset / "imagesTs", images)
    shutil.copytree(tree.dataset / "labelsTs", labels)
    return images, labels


def _change_image(path):
    """The same file name and geometry, other intensities."""
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    changed = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) * 1.5 + 40.0)
    changed.CopyInformation(image)
    sitk.WriteImage(changed, str(path))


def _change_label(path, like):
    """``path``'s geometry with the label values of ``like`` (another case of the same size)."""
    seg = sitk.ReadImage(str(path))
    changed = sitk.GetImageFromArray(sitk.GetArrayFromImage(sitk.ReadImage(str(like))))
    changed.CopyInformation(seg)
    sitk.WriteImage(changed, str(path))
    assert _sha(path) != _sha(like)


def _sha(path):
    from nnunet_adv.files import file_digest

    return file_digest(path)


class _Holder:
    """Another process holding a folder's lock, as a running command does."""

    def __init__(self, folder):
        code = ("import sys, time; from nnunet_adv.locks import folder_lock\n"
                "with folder_lock(sys.argv[1], command='the other run'):\n"
                "    print('held', flush=True); time.sleep(120)")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def die(self):
        """SIGKILL: the process cannot clean up, its lock file stays behind."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def test_a_resumed_attack_redoes_exactly_the_changed_cases_and_refuses_leftovers(tree, tmp_path, capsys):
    from nnunet_adv.cli.attack import main

    images, labels = _inputs(tree, tmp_path)
    out = tmp_path / "out"
    args = ["-i", images, "-o", out, "-l", labels, "-m", tree.model_folder(TRAINER), "-f", 0, "-device", "cpu",
            "--disable_progress_bar", "--steps", 1]
    in_process(main, args, capsys, code=0)
    _change_image(images / "case_0006_0000.nii.gz")
    stdout, _ = in_process(main, args + ["--continue_prediction"], capsys, code=0)
    assert ("the inputs of 1 case(s) changed since they were attacked: case_0006 (case_0006_0000.nii.gz); "
            "attacking them again") in stdout
    cases = json.loads((out / "attack.json").read_text())["cases"]
    assert [c for c, r in cases.items() if r.get("skipped")] == ["case_0007"]
    assert cases["case_0006"]["inputs"] == {"images": {"case_0006_0000.nii.gz": _sha(images / "case_0006_0000.nii.gz")},
                                            "label": _sha(labels / "case_0006.nii.gz")}
    # the adversarial image lies within the budget of the image as it is now (not of the replaced one)
    adv, now = (sitk.GetArrayFromImage(sitk.ReadImage(str(f / "case_0006_0000.nii.gz"))) for f in (out, images))
    assert np.abs(adv.astype(np.float64) - now).max() <= cases["case_0006"]["eps_raw"][0] * (1 + 1e-5)

    # leftovers: a case no longer in the input, a file added since: refused, nothing changed
    (images / "case_0007_0000.nii.gz").rename(tmp_path / "case_0007_0000.nii.gz")
    (out / "notes.txt").write_text("mine")
    kept = _digest(out)
    in_process(main, args + ["--continue_prediction"], capsys,
               "case_0007_0000.nii.gz (its case is no longer in the input)", "notes.txt (not written by nnunet_adv)")
    assert _digest(out) == kept
    (tmp_path / "case_0007_0000.nii.gz").rename(images / "case_0007_0000.nii.gz")
    (out / "notes.txt").unlink()

    # a second run at once is refused naming the first; the lock file of a killed run does not block
    holder = _Holder(out)
    in_process(main, args + ["--continue_prediction"], capsys, f"{out} is in use by another run (PID "
                                                               f"{holder.proc.pid}: the other run, since ")
    holder.die()
    assert (out / ".nnunet_adv.lock").is_file()
    stdout, _ = in_process(main, args + ["--continue_prediction"], capsys, code=0)
    assert "nothing to attack" in stdout and not (out / ".nnunet_adv.lock").exists()

    # a record changed after it was written (the SSIM the report reads) is refused, never read
    record = json.loads((out / "attack.json").read_text())
    record["cases"]["case_0007"]["ssim"] = [0.5]
    (out / "attack.json").write_text(json.dumps(record))
    in_process(main, args + ["--continue_prediction"], capsys, "attack.json does not match its checksum (changed "
                                                               "after it was written): delete")


def test_a_resumed_evaluation_recomputes_what_changed_and_never_reads_a_damaged_cache(tree, tmp_path, capsys):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_adv.cli.evaluate import main
    from nnunet_adv.evaluation.case_metrics import case_metrics
    from nnunet_adv.evaluation.pipeline import _labels_or_regions

    images, labels = _inputs(tree, tmp_path)
    out = tmp_path / "report"
    # Gaussian noise: the cheapest attack through the same attack step (no gradient)
    args = ["-i", images, "-l", labels, "-o", out, "-m", tree.model_folder(TRAINER), "-f", 0, "--disable_tta",
            "-device", "cpu", "--disable_progress_bar", "--attacks", "gn:std=4", "--num_examples", 0]
    in_process(main, args, capsys, code=0)
    _change_image(images / "case_0006_0000.nii.gz")
    _change_label(labels / "case_0007.nii.gz", like=labels / "case_0006.nii.gz")
    stdout, _ = in_process(main, args + ["--continue"], capsys, code=0)
    assert ("--continue: the inputs of 2 case(s) changed since the last run: case_0006 (case_0006_0000.nii.gz), "
            "case_0007 (the label); recomputing what was made from them") in stdout
    model = tree.model_folder(TRAINER).name
    clean = json.loads((out / "predictions" / model / "clean" / "prediction.json").read_text())
    assert clean["inputs"]["case_0006.nii.gz"] == {"case_0006_0000.nii.gz": _sha(images / "case_0006_0000.nii.gz")}
    assert "predicting 1 case(s) of clean" in stdout  # case_0007's image did not change: its prediction is kept
    metrics = json.loads((out / "metrics" / model / "clean.json").read_text())
    entry = next(e for e in metrics["metric_per_case"] if e["reference_file"].endswith("case_0007.nii.gz"))
    classes = _labels_or_regions(json.loads((tree.model_folder(TRAINER) / "dataset.json").read_text()))
    fresh = case_metrics(str(labels / "case_0007.nii.gz"), str(out / "predictions" / model / "clean" /
                                                                   "case_0007.nii.gz"), SimpleITKIO(), classes)
    for c in classes:  # the Dice of the new label
        assert entry["metrics"][str(c)]["Dice"] == pytest.approx(fresh["metrics"][c]["Dice"], nan_ok=True)
    gn = json.loads((out / "adversarial" / model / next((out / "adversarial" / model).iterdir()).name /
                     "attack.json").read_text())["cases"]
    assert not any(r.get("skipped") for r in gn.values())  # an image and a label changed: both cases redone

    # one changed number in a cached result: recomputed with a warning, never read
    summary = json.loads((out / "summary.json").read_text())["results"][0]["foreground_mean"]["Dice"]
    metrics["foreground_mean"]["Dice"] = 0.517
    (out / "metrics" / model / "clean.json").write_text(json.dumps(metrics, indent=1))
    stdout, _ = in_process(main, args + ["--continue"], capsys, code=0)
    assert "clean.json does not match its checksum (changed after it was written); recomputing it" in stdout
    assert json.loads((out / "summary.json").read_text())["results"][0]["foreground_mean"]["Dice"] == summary

    holder = _Holder(out)
    kept = _digest(out)
    in_process(main, args + ["--continue"], capsys, f"{out} is in use by another run (PID {holder.proc.pid}")
    holder.die()
    assert {k: v for k, v in _digest(out).items() if k != ".nnunet_adv.lock"} == \
        {k: v for k, v in kept.items() if k != ".nnunet_adv.lock"}
