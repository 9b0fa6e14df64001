"""What every nnunet_adv command shares: one-line errors and device selection."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from nnunet_adv.errors import UserError


class CLIError(UserError):
    """A user-facing problem found by a command: printed as one line, exit code 2, no traceback."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are CLIErrors: one line, exit code 2 (argparse would print the
    whole usage first)."""

    def error(self, message):
        raise CLIError(message)


def cli_main(run: Callable[[], int], prefix: str = "error") -> int:
    """Run a command; bad input (:class:`UserError`) becomes one line ``PREFIX: message`` on stderr
    and exit code 2."""
    try:
        return run()
    except (UserError, FileNotFoundError) as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def pick_device(requested):
    """nnU-Net's -device choice; default cuda where available, else cpu."""
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise CLIError("-device cuda requested but no CUDA device is available (use -device cpu)")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise CLIError("-device mps requested but MPS is not available (use -device cpu)")
    return requested
