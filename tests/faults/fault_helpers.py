"""What the fault tests share: the tiny trained model's name, command lines and one-line checks."""
import hashlib
from pathlib import Path

from nnunet_tree import SHARED_TRAINER

TRAINER = SHARED_TRAINER


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _attack_args(tree, out, *extra):
    return ["nnUNetv2_adv_attack", "-i", tree.dataset / "imagesTs", "-o", out, "-l", tree.dataset / "labelsTs",
            "-m", tree.model_folder(TRAINER), "-f", 0, "-device", "cpu", "--disable_progress_bar",
            "--attack_name", "pgd", "--steps", 1, *extra]


def _evaluate_args(tree, out, *extra):
    return ["nnUNetv2_adv_evaluate", "-i", tree.dataset / "imagesTs", "-l", tree.dataset / "labelsTs", "-o", out,
            "-m", tree.model_folder(TRAINER), "-f", 0, "--disable_tta", "-device", "cpu", "--disable_progress_bar",
            "--attacks", "pgd:eps=8,steps=1", "--no_checks", *extra]


def _one_error_line(proc, *expected, code=2):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr[-3000:]
    assert all(text in lines[0] for text in expected), lines[0]
    return lines[0]


def in_process(main, argv, capsys, *expected, code=2):
    """Run a command's ``main(argv)`` in this process (no interpreter start-up): its exit code must be
    ``code`` and, for a refusal, stderr exactly one line holding every ``expected`` text, no traceback.
    Returns (stdout, the error line or None)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == code, err[-3000:]
    assert "Traceback" not in err
    if code != 2:
        return out, None
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    assert all(text in lines[0] for text in expected), lines[0]
    return out, lines[0]
