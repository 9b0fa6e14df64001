"""Fault injection: the real commands under a full disk, a read-only output, an output that is a
file, an interruption and resumes with changed settings. For each: the exit code, exactly one line
on stderr naming the problem, no traceback, the input folders byte-identical, and nothing in the
output that a later resume would accept unless it is complete and correct.

Run alone with ``python -m pytest -m faults``. The tmpfs tests mount a small tmpfs (root in a
sandbox can); where mounting is not permitted they are skipped and the in-process fault-injecting
writer below still covers the full disk.
"""
import importlib
import json
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from fault_helpers import TRAINER, _attack_args, _digest, _evaluate_args, _one_error_line, in_process
from nnunet_tree import BIN

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


def _inputs_unchanged(tree, before):
    assert _digest(tree.dataset) == before


def _accepted_cases_are_correct(out: Path, tree):
    """Whatever a resume would accept (images recorded in attack.json with their SHA-256) reads back
    as a complete image with the input's size."""
    from nnunet_adv.records import ATTACK_JSON
    from nnunet_adv.volume.folders import find_cases
    from nnunet_adv.volume.runner import verified_cases

    if not (out / ATTACK_JSON).is_file():
        return set()
    cases = find_cases(tree.dataset / "imagesTs", ".nii.gz", 1)
    accepted = verified_cases(out, json.loads((out / ATTACK_JSON).read_text()), cases)
    for case in accepted:
        for name in cases[case]["names"]:
            adv = sitk.ReadImage(str(out / name))
            clean = sitk.ReadImage(str(tree.dataset / "imagesTs" / name))
            assert adv.GetSize() == clean.GetSize()
            assert np.isfinite(sitk.GetArrayFromImage(adv)).all()
    return accepted


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:100]}); the in-process "
                    f"fault-injecting writer covers the full disk")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ----------------------------------------------------------------------------------- full disk
def test_full_disk_stops_with_one_line_and_a_resume_redoes_only_what_is_missing(tree, tmp_path):
    before = _digest(tree.dataset)
    with tmpfs(tmp_path / "disk", "150k") as disk:
        out = disk / "out"
        proc = tree.run(*_attack_args(tree, out), check=False)
        _one_error_line(proc, "error: cannot write", "is the disk full?")
        _inputs_unchanged(tree, before)
        accepted = _accepted_cases_are_correct(out, tree)
        assert len(accepted) < 2  # the 150 KiB disk cannot hold two images
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        proc = tree.run(*_attack_args(tree, out, "--continue_prediction"))
        report = json.loads((out / "attack.json").read_text())
        assert report["summary"]["ok"] == 2 and report["summary"]["skipped"] == len(accepted)
        assert _accepted_cases_are_correct(out, tree) == {"case_0006", "case_0007"}


def test_a_writer_that_silently_truncates_is_caught_in_process(tree, tmp_path, monkeypatch, capsys):
    """SimpleITK's NIfTI writer reported a full disk on the C stderr and returned normally; a writer
    that silently truncates must not leave a file a resume would accept."""
    import SimpleITK

    from nnunet_adv.cli.attack import main

    tree.set_in_process(monkeypatch)
    real = SimpleITK.WriteImage

    def truncating(image, path, *args):
        real(image, path, *args)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(SimpleITK, "WriteImage", truncating)
    out = tmp_path / "out"
    argv = [str(a) for a in _attack_args(tree, out)[1:]]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "does not read back as written" in err[0]
    assert not list(out.glob("*.nii.gz"))  # no truncated image under a final name
    assert _accepted_cases_are_correct(out, tree) == set()
    monkeypatch.setattr(SimpleITK, "WriteImage", real)
    assert main(argv + ["--continue_prediction"]) == 0
    assert _accepted_cases_are_correct(out, tree) == {"case_0006", "case_0007"}


def test_an_interruption_between_the_first_image_and_its_record_resumes(tree, tmp_path, monkeypatch, capsys):
    """Ctrl-C after the first case's image is in place but before attack.json records it (a race the
    subprocess interrupt test met in CI): the folder must still be recognised by --continue_prediction."""
    import nnunet_adv.volume.runner as runner
    from nnunet_adv.cli.attack import main

    tree.set_in_process(monkeypatch)
    real = runner._attack_one

    def then_interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_attack_one", then_interrupted)
    out = tmp_path / "out"
    argv = [str(a) for a in _attack_args(tree, out)[1:]]
    assert main(argv) == 130
    assert (out / "case_0006_0000.nii.gz").is_file() and _accepted_cases_are_correct(out, tree) == set()
    monkeypatch.setattr(runner, "_attack_one", real)
    capsys.readouterr()
    assert main(argv + ["--continue_prediction"]) == 0, capsys.readouterr().err
    assert _accepted_cases_are_correct(out, tree) == {"case_0006", "case_0007"}


# ----------------------------------------------------------------------------------- read-only, a file
#: the attack runs as the user runs it (a subprocess: the interpreter's own error handling is part of what
#: is tested); the other commands' main() in this process, the same refusal without the start-up
IN_PROCESS = {"evaluate": "nnunet_adv.cli.evaluate", "demo": "nnunet_adv.cli.demo"}


def _refusal(tree, capsys, args, *expected):
    """Run a command that must refuse ``args`` with one line holding ``expected``; returns its stdout."""
    module = next((m for c, m in IN_PROCESS.items() if args[0] == f"nnUNetv2_adv_{c}"), None)
    if module is None:
        proc = tree.run(*args, check=False)
        _one_error_line(proc, *expected)
        return proc.stdout
    stdout, _ = in_process(importlib.import_module(module).main, args[1:], capsys, *expected)
    return stdout


def _command_args(tree, command, out):
    return {"attack": _attack_args(tree, out), "evaluate": _evaluate_args(tree, out),
            "demo": ["nnUNetv2_adv_demo", "-o", out, "-device", "cpu"]}[command]


@pytest.mark.parametrize("command", ["attack", "evaluate", "demo"])
def test_read_only_output_is_one_line_before_anything_loads(tree, tmp_path, capsys, command):
    before = _digest(tree.dataset)
    with tmpfs(tmp_path / "ro", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        stdout = _refusal(tree, capsys, _command_args(tree, command, disk / "out"), "Read-only file system")
        assert "model " not in stdout  # refused before the model was loaded
    _inputs_unchanged(tree, before)


@pytest.mark.parametrize("command", ["attack", "evaluate", "demo"])
def test_an_output_path_that_is_a_file_is_one_line(tree, tmp_path, capsys, command):
    path = tmp_path / "a_file"
    path.write_text("keep me")
    _refusal(tree, capsys, _command_args(tree, command, path), str(path))
    assert path.read_text() == "keep me"


def test_a_folder_of_other_files_is_not_written_into(tree, tmp_path, capsys):
    from nnunet_adv.cli.attack import main

    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("a user's file")
    in_process(main, _attack_args(tree, out)[1:], capsys, "holds files that nnUNetv2_adv_attack did not write")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------------- interruption
def _interrupt_when(args, env, ready, timeout=300):
    """Start a command, SIGINT it once ``ready()`` holds, return (returncode, stderr). The command gets
    SIGINT's default disposition, as in a terminal: a test run started in the background of a
    non-interactive shell (``cmd &``) ignores SIGINT, children inherit that, and Python then never
    raises KeyboardInterrupt."""
    proc = subprocess.Popen([str(BIN / args[0]), *map(str, args[1:])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started = time.time()
    while not ready() and proc.poll() is None and time.time() - started < timeout:
        time.sleep(0.2)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_an_interrupted_attack_says_so_and_resumes(tree, tmp_path):
    out = tmp_path / "out"
    args = _attack_args(tree, out, "--steps", 10)  # ~7 s a case here: time to interrupt after the first
    code, err = _interrupt_when(args, tree.env, lambda: (out / "case_0006_0000.nii.gz").is_file())
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("interrupted; re-run the same command with --continue_prediction to "
                                            "resume (finished cases are kept)")
    assert _accepted_cases_are_correct(out, tree) <= {"case_0006"}
    proc = tree.run(*args, "--continue_prediction")
    assert "Traceback" not in proc.stderr
    assert _accepted_cases_are_correct(out, tree) == {"case_0006", "case_0007"}


def test_an_interrupted_evaluation_says_so_and_continues(tree, tmp_path):
    out = tmp_path / "report"
    args = _evaluate_args(tree, out, "--attacks", "pgd:eps=8,steps=10")  # ~7 s a case, as above
    code, err = _interrupt_when(args, tree.env, lambda: any((out / "adversarial").rglob("case_0006_0000.nii.gz")))
    assert code == 130 and "Traceback" not in err and "attack" not in err.strip().splitlines()[-1]
    assert err.strip().splitlines()[-1].startswith("interrupted; re-run the same command with --continue")
    proc = tree.run(*args, "--continue")
    assert (out / "report.md").is_file() and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------- resume, other settings
def test_resuming_an_attack_with_other_settings_is_refused(tree, tmp_path):
    out = tmp_path / "out"
    tree.run(*_attack_args(tree, out, "--eps", 4))
    kept = _digest(out)
    (out / "case_0007_0000.nii.gz").unlink()
    args = _attack_args(tree, out, "--continue_prediction")
    i = args.index("--attack_name")
    args[i:i + 4] = ["--attack_name", "fgsm", "--eps", 16]  # fgsm at 16/255 instead of pgd at 4/255
    proc = tree.run(*args, check=False)
    _one_error_line(proc, "holds results made with other settings", "attack.name: 'pgd' there, 'fgsm' here")
    assert _digest(out) == {k: v for k, v in kept.items() if k != "case_0007_0000.nii.gz"}


def test_continuing_an_evaluation_with_another_checkpoint_is_refused(tree, tmp_path):
    out = tmp_path / "report"
    tree.run(*_evaluate_args(tree, out))
    kept = _digest(out)
    proc = tree.run(*_evaluate_args(tree, out, "--continue", "-chk", "checkpoint_best.pth"), check=False)
    _one_error_line(proc, "a report made with other settings", "checkpoint: 'checkpoint_final.pth' there, "
                                                               "'checkpoint_best.pth' here")
    assert _digest(out) == kept
    # another seed is another attack: its own folder, the first one's results never relabelled
    tree.run(*_evaluate_args(tree, out, "--continue", "--seed", 5))
    summary = json.loads((out / "summary.json").read_text())
    folders = sorted(p.name for p in (out / "adversarial" / tree.model_folder(TRAINER).name).iterdir())
    assert len(folders) == 2 and all(json.loads((out / "adversarial" / tree.model_folder(TRAINER).name / f /
                                                 "attack.json").read_text())["settings"]["attack"]["options"]["seed"]
                                     in (0, 5) for f in folders)
    assert [r["kind"] for r in summary["results"]][0::2] == ["clean", "worst case"] and len(summary["results"]) == 3


# ----------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("args, message", [(["--num_train", 0], "number of training cases must be >= 1"),
                                           (["--num_test", -1], "--num_test must be >= 1"),
                                           (["-d", 1000], "dataset id must be an integer in 1..999")])
def test_bad_demo_arguments_create_nothing(tmp_path, capsys, args, message):
    from nnunet_adv.cli.demo import main

    out = tmp_path / "demo"
    in_process(main, ["-o", out, "-device", "cpu", *args], capsys, message)
    assert not out.exists()  # the corrected re-run is not blocked


@pytest.mark.parametrize("value", ["0", "-1", "inf"])
def test_a_bad_sweep_eps_is_one_line(tree, tmp_path, capsys, value):
    from nnunet_adv.cli.evaluate import main

    out = tmp_path / "report"
    in_process(main, _evaluate_args(tree, out, "--eps_sweep", value)[1:], capsys,
               "--eps_sweep values must be finite numbers > 0")
    assert not out.exists()


def test_a_label_off_its_image_fails_that_case(tree, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(tree.dataset / "labelsTs", labels)
    seg = sitk.ReadImage(str(labels / "case_0006.nii.gz"))
    seg.SetOrigin(tuple(o + 5.0 for o in seg.GetOrigin()))
    sitk.WriteImage(seg, str(labels / "case_0006.nii.gz"))
    args = _attack_args(tree, tmp_path / "out")
    args[args.index("-l") + 1] = labels
    proc = tree.run(*args, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "case_0006.nii.gz: origin differs from its image's" in proc.stderr
