"""Child commands (nnU-Net's) that a Ctrl-C ends quietly, with everything they started.

A terminal sends Ctrl-C's SIGINT to every process of its foreground process group: a child command
in our group gets it too and prints its own KeyboardInterrupt traceback over our one-line report,
and ending only the child's main process orphans the workers it started (nnU-Net's augmentation
and preprocessing pools). :func:`run_command` runs the child in its own session instead: Ctrl-C
reaches only us, and we end the child's whole group (SIGTERM, which Python ends on without a
traceback; SIGKILL after a grace period), then let the interruption go on to the command's
one-line report.
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Optional, Sequence

#: seconds a child's group gets to end after SIGTERM before SIGKILL
GRACE_SECONDS = 10.0


def run_command(cmd: Sequence[str], env: Optional[dict] = None, stdout=None, stderr=None,
                grace: float = GRACE_SECONDS) -> int:
    """Run ``cmd`` in its own session and wait for it; returns its exit code. Any exception while
    waiting (KeyboardInterrupt above all) ends the child's process group first, then propagates."""
    proc = subprocess.Popen(list(cmd), env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        end_group(proc, grace)
        raise


def end_group(proc: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """End the process group led by ``proc`` (started with ``start_new_session``): SIGTERM, then
    SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return  # the whole group is gone
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
