"""nnUNetv2_adv_ext_trainer: the explicit export line for environments without the start-up hook."""
import os
import subprocess
import sys
from pathlib import Path

from nnunet_adv.ext_trainer import trainer_folder

SCRIPT = Path(sys.executable).parent / "nnUNetv2_adv_ext_trainer"


def test_prints_the_export_line_and_the_folder():
    line = subprocess.run([str(SCRIPT)], capture_output=True, text=True, check=True).stdout.strip()
    assert line.startswith('export nnUNet_extTrainer="') and line.endswith(f'{os.pathsep}}}{trainer_folder()}"')
    folder = subprocess.run([str(SCRIPT), "--folder"], capture_output=True, text=True, check=True).stdout.strip()
    assert folder == trainer_folder() and (Path(folder) / "nnunet_adv_trainers.py").is_file()


def test_a_bad_flag_is_one_line():
    proc = subprocess.run([str(SCRIPT), "--nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: unrecognized arguments: --nope"
