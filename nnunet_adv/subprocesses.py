"""Child commands (nnU-Net's) that a Ctrl-C ends quietly, with everything they started.

A terminal sends Ctrl-C's SIGINT to every process of its foreground process group: a child command
in our group gets it too and prints its own KeyboardInterrupt traceback over our one-line report,
and ending only the child's main process orphans the workers it started (nnU-Net's augmentation
and preprocessing pools). :func:`run_command` runs the child in its own session instead: Ctrl-C
reaches only us, and we end the child's whole group (SIGTERM, which Python ends on without a
traceback; SIGKILL after a grace period), wait until nothing of that group is left, then let the
interruption go on to the command's one-line report.

A child ended this way cannot close its multiprocessing pools (nnU-Net's preprocessing uses spawn
pools), so multiprocessing's resource tracker, which lives in the child's group and ignores SIGTERM,
removes their semaphores itself and warns "There appear to be N leaked semaphore objects to clean up
at shutdown". That clean-up is what should happen; its warning is silenced in the child's environment,
as it would otherwise land after the one-line report.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Optional, Sequence

#: seconds a child's group gets to end after SIGTERM before SIGKILL
GRACE_SECONDS = 10.0

#: a PYTHONWARNINGS filter for the resource tracker's clean-up warning (see the module docstring)
QUIET_RESOURCE_TRACKER = "ignore:resource_tracker:UserWarning"


def run_command(cmd: Sequence[str], env: Optional[dict] = None, stdout=None, stderr=None,
                grace: float = GRACE_SECONDS) -> int:
    """Run ``cmd`` in its own session and wait for it; returns its exit code. Any exception while
    waiting (KeyboardInterrupt above all) ends the child's process group first, then propagates."""
    proc = subprocess.Popen(list(cmd), env=child_environment(env), stdout=stdout, stderr=stderr,
                            start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        end_group(proc, grace)
        raise


def child_environment(env: Optional[dict]) -> dict:
    """``env`` (default: ours) with the resource tracker's clean-up warning silenced; a user's own
    PYTHONWARNINGS is kept (later filters take precedence, so ours applies to that warning only)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), QUIET_RESOURCE_TRACKER) if w)
    return env


def end_group(proc: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """End the process group led by ``proc`` (started with ``start_new_session``): SIGTERM, then
    SIGKILL to whatever of the group is left after ``grace`` seconds. Returns once the whole group is
    gone, not just ``proc``: the resource tracker and pool workers outlive it for a moment, and what
    they print must come before the command's report."""
    deadline = time.monotonic() + grace
    if not _signal_group(proc, signal.SIGTERM):
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    while _signal_group(proc, 0):  # signal 0: is anything of the group left?
        if time.monotonic() >= deadline:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.05)


def _signal_group(proc: subprocess.Popen, sig: int) -> bool:
    """Send ``sig`` to ``proc``'s group; False when nothing of the group is left."""
    try:
        os.killpg(proc.pid, sig)
        return True
    except ProcessLookupError:
        return False
