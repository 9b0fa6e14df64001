"""Bad input refused up front with one line in the user's units and words: before any model loads,
nothing written. The commands run through their main() in this process (no interpreter start-up)."""
import pytest
from fault_helpers import TRAINER, in_process

pytestmark = [pytest.mark.faults]


def _attack(tree, out, *extra):
    return ["-i", tree.dataset / "imagesTs", "-o", out, "-l", tree.dataset / "labelsTs", "-m",
            tree.model_folder(TRAINER), "-f", 0, "-device", "cpu", "--disable_progress_bar", "--steps", 1, *extra]


def _evaluate(tree, out, *extra, images=None):
    return ["-i", images or tree.dataset / "imagesTs", "-l", tree.dataset / "labelsTs", "-o", out,
            "-m", tree.model_folder(TRAINER), "-f", 0, "--disable_tta", "-device", "cpu", "--disable_progress_bar",
            *extra]


@pytest.mark.parametrize("case", ["eps", "alpha", "num_parts", "part_id", "input_file", "labels_file", "model_file",
                                  "target", "attack_option_twice"])
def test_attack_refusals_say_what_is_wrong_before_the_model_loads(tree, tmp_path, capsys, case):
    from nnunet_adv.cli.attack import main

    a_file = tmp_path / "a_file.nii.gz"
    a_file.write_text("not a folder")
    out = tmp_path / "out"
    args = _attack(tree, out)
    extra, expected = {
        "eps": (["--eps", -1], "eps must be a finite number >= 0 (x/255 of the window), got eps -1 (x/255)"),
        "alpha": (["--alpha", -2], "got alpha -2 (x/255)"),
        "num_parts": (["-num_parts", 0], "-num_parts must be >= 1, got 0"),
        "part_id": (["-num_parts", 2, "-part_id", 2], "-part_id must be 0..1 for -num_parts 2, got 2"),
        "input_file": ([], f"input folder {a_file} is a file, not a folder"),
        "labels_file": ([], f"labels folder {a_file} is a file, not a folder"),
        "model_file": ([], f"model folder {a_file} is a file, not a folder"),
        "target": (["--targeted", "--attack_option", "target=99"], "target=99 is not a class of the model: its "
                                                                    "classes are 0..2"),
        "attack_option_twice": (["--targeted", "--attack_option", "target=1", "--attack_option", "target=2"],
                                "--attack_option target is given twice"),
    }[case]
    flag = {"input_file": "-i", "labels_file": "-l", "model_file": "-m"}.get(case)
    if flag:
        args[args.index(flag) + 1] = a_file
    stdout, line = in_process(main, args + extra, capsys, expected)
    assert "model " not in stdout and "eps_frac" not in line and not out.exists()


def test_label_files_among_the_images_name_nnunets_naming(tree, tmp_path, capsys):
    """case_0006.nii.gz in the images folder was read as case 'case', channel 6, without saying why."""
    from nnunet_adv.cli.evaluate import main

    out = tmp_path / "report"
    in_process(main, _evaluate(tree, out, "--attacks", "pgd:steps=1", images=tree.dataset / "labelsTs"), capsys,
               "case_0006.nii.gz: nnU-Net's image naming CASE_XXXX.nii.gz (XXXX: the 4-digit channel) reads it as "
               "case 'case', channel 6", "name images case_0006_0000.nii.gz")
    assert not out.exists()


@pytest.mark.parametrize("attacks, expected", [
    (["pgd:eps=4,eps=8"], "'eps=4' and 'eps=8' set the same option; give it once"),
    (["pgd:eps=4", "pgd:eps=4.0"], "attacks 'pgd:eps=4' and 'pgd:eps=4.0' are the same setting; give it once"),
    (["pgd:eps=4,steps=1,targeted,target=99"], "target=99 is not a class of the model"),
])
def test_evaluate_refuses_duplicate_attacks_and_bad_targets_up_front(tree, tmp_path, capsys, attacks, expected):
    from nnunet_adv.cli.evaluate import main

    out = tmp_path / "report"
    stdout, _ = in_process(main, _evaluate(tree, out, "--attacks", *attacks), capsys, expected)
    assert not out.exists() and "predicting" not in stdout


def test_negative_seeds_are_one_line_and_leave_nothing(tmp_path, capsys):
    from nnunet_adv.cli.demo import main as demo
    from nnunet_adv.cli.make_demo_dataset import main as make_dataset

    raw = tmp_path / "raw"
    raw.mkdir()
    in_process(make_dataset, ["-o", raw, "--seed", -5], capsys, "--seed must be an integer in 0..4294967295, got -5")
    assert not any(raw.iterdir())
    out = tmp_path / "demo"
    in_process(demo, ["-o", out, "-device", "cpu", "--seed", -1], capsys, "--seed must be an integer in 0..")
    assert not out.exists()


def test_a_study_with_an_eps_twice_is_refused_before_training(nnunet_env, tmp_path):
    """--eps_sweep 4 4 trained and evaluated for minutes, then crashed in the figures."""
    from nnunet_tree import DATASET_ID

    from nnunet_adv.errors import UserError
    from nnunet_adv.evaluation.study import Study, StudyRun

    study = Study(StudyRun(dataset=str(DATASET_ID), output=tmp_path / "study", eps_sweep=[4.0, 4.0]))
    with pytest.raises(UserError, match="--eps_sweep gives eps 4 twice; give each eps once"):
        study.validate()
    assert not (tmp_path / "study").exists()


def test_a_study_takes_any_plans_and_refuses_missing_ones(nnunet_env, tmp_path, monkeypatch):
    """``nnUNetv2_adv_study -p``: every model trains with the plans (nnUNetv2_train -p, folders
    TRAINER__PLANS__CONFIG); plans that were never made are one line before anything trains."""
    import subprocess

    from nnunet_tree import DATASET_ID

    from nnunet_adv.errors import UserError
    from nnunet_adv.evaluation.study import Study, StudyRun

    with pytest.raises(UserError, match="no plans 'nnUNetPlansMissing' for"):
        Study(StudyRun(dataset=str(DATASET_ID), output=tmp_path / "missing", plans="nnUNetPlansMissing")).validate()
    assert not (tmp_path / "missing").exists()
    study = Study(StudyRun(dataset=str(DATASET_ID), output=tmp_path / "study", plans="nnUNetPlans"))
    study.validate()
    study.run.plans = "nnUNetResEncUNetMPlans"  # as -p gives it (the command run is captured, not executed)
    commands = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: commands.append(cmd) or subprocess.CompletedProcess(
        cmd, 1))
    with pytest.raises(UserError, match="failed with exit code 1"):
        study.train("nnUNetTrainerClean_ep-1_its-1_seed-0", None)
    assert commands and commands[0][commands[0].index("-p") + 1] == "nnUNetResEncUNetMPlans"
    assert study.model_folder("T").name == f"T__nnUNetResEncUNetMPlans__{study.configuration}"
