"""What every nnunet_adv command shares: one-line errors and device selection."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


class CLIError(Exception):
    """A user-facing problem: printed as one line, exit code 2, no traceback."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are CLIErrors: one line, exit code 2 (argparse would print the
    whole usage first)."""

    def error(self, message):
        raise CLIError(message)


def cli_main(run: Callable[[], int]) -> int:
    """Run a command; user-facing errors become one line on stderr and exit code 2."""
    from nnunet_adv.demo_data import DemoDataError
    from nnunet_adv.threat_model import ThreatModelError

    try:
        return run()
    except (CLIError, DemoDataError, ThreatModelError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


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


def dataset_results_folder(dataset) -> "Path":
    """``$nnUNet_results/DatasetXXX_Name`` for a dataset name or id (as nnU-Net's -d);
    CLIError if nnUNet_results is unset or the dataset is unknown."""
    import os
    from pathlib import Path

    if not os.environ.get("nnUNet_results"):
        raise CLIError("nnUNet_results is not set: export it or give the model folder with -m")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        name = maybe_convert_to_dataset_name(dataset)
    except Exception as e:  # nnU-Net raises RuntimeError with a long text
        raise CLIError(f"dataset {dataset!r} not found in nnUNet_raw/nnUNet_preprocessed/nnUNet_results "
                       f"({str(e).splitlines()[0][:200]})") from None
    return Path(os.environ["nnUNet_results"]) / name
