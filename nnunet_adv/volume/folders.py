"""nnU-Net's folders as the commands name them: model folders, folds, cases of an image folder.

Every function checks what nnU-Net's own commands would find wrong and raises
:class:`nnunet_adv.errors.UserError` with one line naming the path.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from nnunet_adv.errors import UserError

#: image file endings nnU-Net's readers take (others in an image folder are not images)
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl", ".png", ".bmp", ".tif", ".tiff")


def dataset_results_folder(dataset) -> Path:
    """``$nnUNet_results/DatasetXXX_Name`` for a dataset name or id (as nnU-Net's -d)."""
    if not os.environ.get("nnUNet_results"):
        raise UserError("nnUNet_results is not set: export it or give the model folder with -m")
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except Exception as e:  # nnU-Net raises RuntimeError with a long text
        raise UserError(f"dataset {dataset!r} not found in nnUNet_raw/nnUNet_preprocessed/nnUNet_results "
                        f"({str(e).splitlines()[0][:200]})") from None
    return Path(os.environ["nnUNet_results"]) / name


def model_folder(folder=None, dataset=None, configuration=None, trainer: str = "nnUNetTrainer",
                 plans: str = "nnUNetPlans") -> Path:
    """The trained model folder: ``folder`` (-m) or ``results/DATASET/TRAINER__PLANS__CONFIG``."""
    if folder is not None:
        if dataset is not None or configuration is not None:
            raise UserError("give either -m MODEL_FOLDER or -d DATASET -c CONFIGURATION, not both")
        path = Path(folder)
    else:
        if dataset is None or configuration is None:
            raise UserError("the model is missing: give -d DATASET -c CONFIGURATION [-tr TRAINER -p PLANS] "
                            "or -m MODEL_FOLDER")
        path = dataset_results_folder(dataset) / f"{trainer}__{plans}__{configuration}"
    check_model_folder(path)
    return path


def configuration_of(folder: Path) -> str:
    """The configuration of a trained model folder ``TRAINER__PLANS__CONFIGURATION`` (nnU-Net's naming)."""
    parts = Path(folder).resolve().name.split("__")
    if len(parts) != 3:
        raise UserError(f"{folder}: not an nnU-Net model folder name (TRAINER__PLANS__CONFIGURATION)")
    return parts[2]


def require_folder(path: Path, what: str) -> None:
    """``path`` must be a folder; one line saying whether it is missing or a file (``what``: e.g.
    'input folder')."""
    if Path(path).is_dir():
        return
    if Path(path).exists():
        raise UserError(f"{what} {path} is a file, not a folder")
    raise UserError(f"{what} {path} does not exist")


def check_model_folder(path: Path) -> None:
    require_folder(path, "model folder")
    for required in ("plans.json", "dataset.json"):
        if not (path / required).is_file():
            raise UserError(f"{path} is not a trained nnU-Net model folder (no {required})")


def resolve_folds(folder: Path, folds: Optional[Sequence], checkpoint: str) -> List[Union[int, str]]:
    """The folds to use: ``folds`` as given (``'all'`` or numbers), or every ``fold_X`` of ``folder``
    that holds ``checkpoint``; each must exist and hold it."""
    available = sorted(p.name[len("fold_"):] for p in folder.glob("fold_*") if p.is_dir())
    if folds is None:
        chosen = [f for f in available if (folder / f"fold_{f}" / checkpoint).is_file()]
        if not chosen:
            raise UserError(f"no fold of {folder} has the checkpoint {checkpoint} "
                            f"(folds: {', '.join(available) or 'none'})")
    else:
        chosen = list(dict.fromkeys(str(f) for f in folds))
    parsed = []
    for f in chosen:
        if f != "all" and not re.fullmatch(r"\d+", f):
            raise UserError(f"fold {f!r} is not a number or 'all'")
        if not (folder / f"fold_{f}").is_dir():
            raise UserError(f"fold {f} does not exist in {folder} (available: {', '.join(available) or 'none'})")
        if not (folder / f"fold_{f}" / checkpoint).is_file():
            present = sorted(p.name for p in (folder / f"fold_{f}").glob("*.pth"))
            raise UserError(f"checkpoint {folder / f'fold_{f}' / checkpoint} does not exist "
                            f"(checkpoints there: {', '.join(present) or 'none'})")
        parsed.append(f if f == "all" else int(f))
    return parsed


def find_cases(input_folder: Path, file_ending: str, num_channels: int) -> Dict[str, dict]:
    """The cases of an image folder in nnU-Net's naming (``CASE_XXXX.ext``).

    Returns:
        case id -> ``{'files': [one file per channel] or None, 'names': [file names], 'problem':
        None or a one-line reason}`` (a case with a problem is reported, the others go on).
    """
    require_folder(input_folder, "input folder")
    files = sorted(p.name for p in input_folder.iterdir() if p.is_file() and not p.name.startswith("."))
    other = [f for f in files if not f.endswith(file_ending) and f.lower().endswith(IMAGE_ENDINGS)]
    if other:
        raise UserError(f"{input_folder / other[0]}: file ending does not match the dataset's {file_ending!r} "
                        f"({len(other)} such file(s); nnU-Net would ignore them)")
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))
    channels: Dict[str, Dict[int, str]] = {}
    for f in files:
        if not f.endswith(file_ending):
            continue
        match = pattern.fullmatch(f)
        if match is None:
            raise UserError(f"{input_folder / f}: not an nnU-Net image file name (expected CASE_XXXX{file_ending})")
        channels.setdefault(match.group(1), {})[int(match.group(2))] = f
    if not channels:
        raise UserError(f"no images ending in {file_ending} in {input_folder}")
    out = {}
    for case, chans in sorted(channels.items()):
        problem = None
        extra = sorted(c for c in chans if c >= num_channels)
        missing = [c for c in range(num_channels) if c not in chans]
        if extra:  # e.g. a label file case_0006.nii.gz among the images: case 'case', channel 6
            name = chans[extra[0]]
            hint = "" if 0 in chans else (f"; name images {name[:-len(file_ending)]}_0000{file_ending} (label "
                                          f"files belong in the labels folder)")
            problem = (f"{name}: nnU-Net's image naming CASE_XXXX{file_ending} (XXXX: the 4-digit channel) reads it "
                       f"as case {case!r}, channel {extra[0]}, but the dataset has {num_channels} channel(s) "
                       f"(_0000.._{num_channels - 1:04d}){hint}")
        elif missing:
            problem = f"{case}_{missing[0]:04d}{file_ending} is missing: the dataset has {num_channels} channel(s)"
        files_ = [str(input_folder / chans[c]) for c in range(num_channels)] if problem is None else None
        out[case] = {"files": files_, "names": [chans[c] for c in sorted(chans)], "problem": problem}
    return out


def check_folders(input_folder: Path, output_folder: Path, labels_folder: Optional[Path]) -> None:
    """The output folder must not be, contain or lie inside the input (or labels) folder."""
    i, o = input_folder.resolve(), output_folder.resolve()
    if o == i:
        raise UserError(f"the output folder {output_folder} is the input folder; choose another (-o)")
    if o in i.parents:
        raise UserError(f"the output folder {output_folder} contains the input folder {input_folder}; choose another")
    if i in o.parents:
        raise UserError(f"the output folder {output_folder} is inside the input folder {input_folder} "
                        f"(the input folder is never modified); choose another")
    if labels_folder is not None:
        require_folder(labels_folder, "labels folder")
        lab = labels_folder.resolve()
        if o == lab or o in lab.parents or lab in o.parents:
            raise UserError(f"the output folder {output_folder} overlaps the labels folder {labels_folder}")
