"""Ctrl-C during the demo, as a terminal sends it (SIGINT to the whole foreground process group): our
one line, not the nnU-Net child's KeyboardInterrupt traceback; ``--continue`` resumes the folder with
the finished steps reused. The demo runs as a real process (an interruption needs one); it is stopped
in its first nnU-Net step, so no model is trained."""
import json
import os
import signal
import subprocess
import time

import pytest
from fault_helpers import _digest
from nnunet_tree import BIN

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

RESUME_LINE = "interrupted; re-run the same command with --continue to resume (finished steps are kept)"


def _ctrl_c_when(args, log, ready, timeout=300):
    """Start the demo in its own process group, send SIGINT to the group once ``ready()`` holds (a
    terminal's Ctrl-C), return (exit code, stderr). SIGINT gets its default disposition (a suite started
    in the background ignores it, and children inherit that)."""
    env = dict(os.environ, OMP_NUM_THREADS="2", MPLBACKEND="agg", PYTHONUNBUFFERED="1")
    with open(log, "w") as stdout:
        proc = subprocess.Popen([str(BIN / "nnUNetv2_adv_demo"), *map(str, args)], stdout=stdout,
                                stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        started = time.time()
        while not ready() and proc.poll() is None and time.time() - started < timeout:
            time.sleep(0.2)
        assert proc.poll() is None, f"the demo ended before it could be interrupted:\n{log.read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _interrupted_quietly(code, err):
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == RESUME_LINE


def test_ctrl_c_in_the_demo_is_one_line_and_continue_resumes_it(tmp_path):
    out = tmp_path / "demo"
    args = ["-o", out, "-device", "cpu", "-d", 950, "--num_train", 5, "--num_test", 1]
    planning = lambda: (out / "nnUNet_preprocessed" / "Dataset950_AdvDemoMRI").is_dir()  # noqa: E731 - child runs
    _interrupted_quietly(*_ctrl_c_when(args, tmp_path / "first.log", planning))
    assert json.loads((out / "demo.json").read_text())["done"] == ["dataset"]
    dataset = _digest(out / "nnUNet_raw")

    log = tmp_path / "second.log"
    replanning = lambda: "$ nnUNetv2_plan_and_preprocess" in log.read_text()  # noqa: E731
    _interrupted_quietly(*_ctrl_c_when(args + ["--continue"], log, replanning))
    assert "dataset: finished by an earlier run, reused" in log.read_text()
    assert _digest(out / "nnUNet_raw") == dataset  # not built again
