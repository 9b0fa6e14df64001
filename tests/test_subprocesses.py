"""Interruptions of child commands (:mod:`nnunet_adv.subprocesses`). One interrupted while it holds a
multiprocessing pool, as nnU-Net's planning does: nothing of its process group is left when
:func:`run_command` hands the interruption on, and nothing of it prints afterwards, neither the pool's
semaphore warning nor anything else. A real child process; the interruption is a KeyboardInterrupt
raised in our wait, as a terminal's Ctrl-C raises it. And the one-line report starts its own line."""
import os
import signal
import subprocess
import sys
import time

import pytest

from nnunet_adv.cli.common import cli_main
from nnunet_adv.subprocesses import QUIET_RESOURCE_TRACKER, child_environment, run_command

# a spawn-context semaphore is what nnU-Net's preprocessing pools register with the resource tracker
CHILD = """
import multiprocessing, pathlib, sys, time
lock = multiprocessing.get_context("spawn").Semaphore()
pathlib.Path(sys.argv[1]).write_text("ready")
time.sleep(120)
"""


def _interrupt_once(ready):
    """A SIGALRM handler that raises KeyboardInterrupt once ``ready`` exists (checked every 50 ms)."""
    def handler(signum, frame):
        if ready.exists():
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise KeyboardInterrupt
    return handler


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_an_interrupted_child_leaves_nothing_behind_and_prints_nothing_after(tmp_path, monkeypatch):
    ready, err = tmp_path / "ready", tmp_path / "stderr.txt"
    pids = []

    class Recording(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pids.append(self.pid)

    monkeypatch.setattr("nnunet_adv.subprocesses.subprocess.Popen", Recording)
    previous = signal.signal(signal.SIGALRM, _interrupt_once(ready))
    signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
    started = time.monotonic()
    try:
        with open(err, "w") as stderr, pytest.raises(KeyboardInterrupt):
            run_command([sys.executable, "-c", CHILD, str(ready)], stderr=stderr, grace=20)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 60  # ended, not slept out
    assert ready.exists()
    assert not _group_alive(pids[0]), "run_command handed the interruption on with its child's group alive"
    printed = err.read_text()
    time.sleep(1.0)  # anything left would print now
    assert err.read_text() == printed == "", printed


def test_the_child_environment_keeps_the_users_warning_filters(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    env = child_environment(None)
    assert env["PYTHONWARNINGS"] == f"error::DeprecationWarning,{QUIET_RESOURCE_TRACKER}"
    assert child_environment({"A": "1"}) == {"A": "1", "PYTHONWARNINGS": QUIET_RESOURCE_TRACKER}


def test_the_interruption_report_starts_its_own_line(capsys):
    """A progress bar stops mid-line when Ctrl-C comes (the demo's planning child showed
    "Extracting dataset fingerprint:   0%| ... interrupted; re-run ..." on one line)."""
    def interrupted_mid_bar():
        print("Extracting dataset fingerprint:   0%|          | 0/5", end="", file=sys.stderr)
        raise KeyboardInterrupt

    assert cli_main(interrupted_mid_bar, resume_hint="re-run with --continue") == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted; re-run with --continue"
