"""What nnU-Net users expect (issue 14), end to end: recipe settings in the trainer name with the
stock nnU-Net commands, corruptions and NSD in the report, and -num_parts/-part_id splits whose
merge is exactly the single run."""
import csv
import json
import subprocess

import pytest
import SimpleITK as sitk
from nnunet_tree import BIN, DATASET_ID, SHARED_TRAINER, predict_and_check

pytestmark = pytest.mark.e2e

TRAINER = SHARED_TRAINER
NAMED = f"{TRAINER}_eps-8_steps-1_its-3"


@pytest.fixture(scope="module")
def tree(shared_model):
    return shared_model


# ----------------------------------------------------------------------------------- settings by name
def test_recipe_settings_in_the_trainer_name(tree, tmp_path):
    tree.run("nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", NAMED, "-device", "cpu")
    folder = tree.model_folder(NAMED)
    assert folder.name == f"{NAMED}__nnUNetPlans__3d_fullres" and (folder / "fold_0" / "checkpoint_final.pth").is_file()
    debug = json.loads((folder / "fold_0" / "debug.json").read_text())
    assert float(debug["eps_frac"]) == pytest.approx(8 / 255) and "'steps': 1" in debug["attack_kwargs"]
    assert debug["num_iterations_per_epoch"] == "3" and "'eps': '8'" in debug["name_settings"]
    predict_and_check(tree, NAMED, "3d_fullres", tmp_path / "pred")  # the stock nnUNetv2_predict finds it
    tree.run("nnUNetv2_predict_from_modelfolder", "-i", tree.dataset / "imagesTs", "-o", tmp_path / "pred_mf",
             "-m", folder, "-f", 0, "-device", "cpu", "--disable_tta", "-npp", 1, "-nps", 1)
    assert len(list((tmp_path / "pred_mf").glob("*.nii.gz"))) == 2
    listing = tree.run("nnUNetv2_adv_trainer_settings", "nnUNetTrainerPGDAT").stdout
    assert "  eps " in listing and "x/255" in listing and "steps" in listing and "default 10" in listing


@pytest.mark.parametrize("name, message", [
    (f"{TRAINER}_epz-8", "unknown setting 'epz' for nnUNetTrainerPGDAT_TestShort; valid keys: "),
    (f"{TRAINER}_steps-two", "steps-two: steps takes int values"),
])
def test_a_bad_setting_in_the_name_is_one_line(tree, name, message):
    proc = tree.run("nnUNetv2_train", DATASET_ID, "3d_fullres", 0, "-tr", name, "-device", "cpu", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]
    assert not tree.model_folder(name).exists()


# ----------------------------------------------------------------------------------- parts, corruptions, NSD
def _evaluate(tree, out, *extra):
    return ["nnUNetv2_adv_evaluate", "-i", tree.dataset / "imagesTs", "-l", tree.dataset / "labelsTs", "-o", out,
            "-m", tree.model_folder(TRAINER), "-f", 0, "--disable_tta", "-device", "cpu", "--disable_progress_bar",
            "--attacks", "pgd:eps=8,steps=1", "fgsm:eps=8", "--corruptions", "noise:2", "blur:3", "--no_checks",
            *extra]


def _concurrently(tree, commands):
    procs = [subprocess.Popen([str(BIN / c[0]), *map(str, c[1:])], env=tree.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]


def test_two_parts_at_once_then_the_merge_give_the_single_run_report(tree, tmp_path):
    split, single = tmp_path / "split", tmp_path / "single"
    _concurrently(tree, [_evaluate(tree, split, "-num_parts", 2, "-part_id", i) for i in (0, 1)])
    assert not (split / "report.md").exists()  # parts compute, the merge reports
    merged = tree.run(*_evaluate(tree, split, "--continue"))
    computed = next(line for line in merged.stdout.splitlines() if "computed this run:" in line)
    assert "attack" not in computed and "prediction" not in computed and "corruption" not in computed  # only metrics
    tree.run(*_evaluate(tree, single))
    strip = lambda text: [line for line in text.splitlines() if not line.startswith("Command:")]  # noqa: E731
    assert strip((split / "report.md").read_text()) == strip((single / "report.md").read_text())
    assert (split / "metrics.csv").read_text() == (single / "metrics.csv").read_text()
    results = lambda p: json.loads((p / "summary.json").read_text().replace(str(p), "REPORT"))["results"]  # noqa: E731
    assert results(split) == results(single)  # every number; the files' paths name their own report folder

    # corruptions and NSD are in the report
    text = (single / "report.md").read_text()
    assert "## Natural corruptions (TorchIO): mean foreground Dice" in text and "Mean corruption Dice" in text
    assert "## Mean foreground normalised surface Dice" in text and (single / "corruption_curve.png").is_file()
    rows = list(csv.DictReader(open(single / "metrics.csv")))
    assert {r["attack"] for r in rows} >= {"noise:2", "blur:3", "worst case"} and all(r["nsd"] != "" for r in rows
                                                                                     if r["dice"] not in ("", "nan"))
    corrupted = single / "corrupted" / "corruption_noise-2"
    record = json.loads((corrupted / "corruption.json").read_text())
    assert record["settings"]["corruption"] == "noise" and set(record["cases"]) == {"case_0006", "case_0007"}
    clean = sitk.ReadImage(str(tree.dataset / "imagesTs" / "case_0006_0000.nii.gz"))
    noisy = sitk.ReadImage(str(corrupted / "case_0006_0000.nii.gz"))
    assert noisy.GetSize() == clean.GetSize() and noisy.GetSpacing() == clean.GetSpacing()


def test_attack_parts_merge_into_the_single_run(tree, tmp_path):
    def attack(out, *extra):
        return ["nnUNetv2_adv_attack", "-i", tree.dataset / "imagesTs", "-o", out, "-l", tree.dataset / "labelsTs",
                "-m", tree.model_folder(TRAINER), "-f", 0, "-device", "cpu", "--disable_progress_bar",
                "--attack_name", "pgd", "--steps", 2, *extra]

    split, single = tmp_path / "split", tmp_path / "single"
    _concurrently(tree, [attack(split, "-num_parts", 2, "-part_id", i) for i in (0, 1)])
    parts = sorted(p.name for p in split.glob("attack.part*.json"))
    assert parts == ["attack.part0-of-2.json", "attack.part1-of-2.json"] and not (split / "attack.json").exists()
    proc = tree.run(*attack(split, "--continue_prediction"))
    assert "nothing to attack" in proc.stdout
    tree.run(*attack(single))
    for name in ("case_0006_0000.nii.gz", "case_0007_0000.nii.gz"):
        assert (split / name).read_bytes() == (single / name).read_bytes()
    merged, alone = (json.loads((p / "attack.json").read_text())["cases"] for p in (split, single))
    assert {c: r["files"] for c, r in merged.items()} == {c: r["files"] for c, r in alone.items()}
    bad = tree.run(*attack(tmp_path / "bad", "-num_parts", 2, "-part_id", 2), check=False)
    assert bad.returncode == 2 and "-part_id must be 0..1 for -num_parts 2, got 2" in bad.stderr
    assert "Traceback" not in bad.stderr
