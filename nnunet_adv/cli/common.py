"""What every nnunet_adv command shares: one-line errors and device selection."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable

from nnunet_adv.errors import UserError

# A deprecation notice that torch prints when nnU-Net's dependencies import it: not the user's
# business, and it would break the promise of one line on stderr for bad input.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)


class CLIError(UserError):
    """A user-facing problem found by a command: printed as one line, exit code 2, no traceback."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are CLIErrors: one line, exit code 2 (argparse would print the
    whole usage first)."""

    def error(self, message):
        raise CLIError(message)


def at_least_one(flag: str, value: int) -> int:
    """``value`` of an integer flag that must be >= 1 (else one line naming the flag), checked by the
    commands before anything loads."""
    if value < 1:
        raise CLIError(f"{flag} must be >= 1, got {value}")
    return value


def cli_main(run: Callable[[], int], prefix: str = "error", resume_hint: str = "") -> int:
    """Run a command: bad input (:class:`UserError`) and a failing file system (``OSError``: full,
    read-only, a missing folder) become one line ``PREFIX: message`` on stderr and exit code 2; an
    interruption is reported as such (exit code 130) with how to resume."""
    try:
        return run()
    except UserError as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prefix}: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # on a line of its own: a progress bar (ours, or an nnU-Net child's) stops mid-line, and a
        # terminal echoes ^C without a newline
        print(f"\ninterrupted{'; ' + resume_hint if resume_hint else ''}", file=sys.stderr)
        return 130


def pick_device(requested):
    """nnU-Net's -device choice; default cuda where available, else cpu."""
    import torch  # after the flags are read: --help and flag errors stay fast

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise CLIError("-device cuda requested but no CUDA device is available (use -device cpu)")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise CLIError("-device mps requested but MPS is not available (use -device cpu)")
    return requested
