"""Run records: what a run writes beside its results (``attack.json``, ``prediction.json``,
``evaluation.json``) and how a later run reads them back: part records of ``-num_parts`` runs and
their merge, nnU-Net's split of cases over parts, the package versions a result depends on, the
first setting two runs differ in, and the write check made before any model loads. Used by
``volume/`` (the attack runner), ``evaluation/``, ``demo/`` and the commands alike.
"""
from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from nnunet_adv.errors import UserError
from nnunet_adv.files import ChecksumMismatch, verify_checked_json

ATTACK_JSON = "attack.json"


def part_record_name(name: str, part: Tuple[int, int]) -> str:
    """``attack.json`` -> ``attack.part0-of-2.json`` for part 0 of 2."""
    stem, _, ext = name.rpartition(".")
    return f"{stem}.part{part[1]}-of-{part[0]}.{ext}"


def split_cases(cases: Sequence[str], part: Optional[Tuple[int, int]]) -> List[str]:
    """nnU-Net's split of work over ``-num_parts N -part_id I``: sorted cases ``[I::N]``."""
    ordered = sorted(cases)
    if part is None:
        return ordered
    num_parts, part_id = part
    return ordered[part_id::num_parts]


def check_part(num_parts: int, part_id: int) -> Optional[Tuple[int, int]]:
    """``(num_parts, part_id)`` checked as nnU-Net's predictor does; None for a single run."""
    if num_parts == 1 and part_id == 0:
        return None
    if num_parts < 1:
        raise UserError(f"-num_parts must be >= 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise UserError(f"-part_id must be 0..{num_parts - 1} for -num_parts {num_parts}, got {part_id}")
    return num_parts, part_id


def load_records(folder: Path, name: str = ATTACK_JSON) -> Optional[dict]:
    """The run record of a folder with every part's records merged in (their ``cases`` / ``files``
    united; the ``settings`` of all must agree), or None when there is none."""
    stem, _, ext = name.rpartition(".")
    files = ([folder / name] if (folder / name).is_file() else []) + sorted(folder.glob(f"{stem}.part*-of-*.{ext}"))
    merged = None
    for f in files:
        try:
            record = verify_checked_json(f, json.loads(f.read_text()))
        except ChecksumMismatch as e:  # it vouches for images and holds numbers the report reads
            raise UserError(f"{e}: delete {folder} to recompute what it holds, or choose a new folder (nothing was "
                            f"changed)") from None
        except (ValueError, OSError) as e:
            raise UserError(f"{f} cannot be read ({type(e).__name__}); choose a new folder "
                            "(nothing was changed)") from None
        if merged is None:
            merged = record
            for key in _MERGED_KEYS:
                merged[key] = dict(record.get(key, {}))
            continue
        difference = first_difference(merged.get("settings"), record.get("settings"))
        if difference is not None:
            raise UserError(f"{f} was made with other settings than {files[0].name} ({difference})")
        for key in _MERGED_KEYS:
            merged[key].update(record.get(key, {}))
    return merged


# per-case records (attack.json, corruption.json), per-file digests of the files and of what they were made
# from (prediction.json)
_MERGED_KEYS = ("cases", "files", "inputs")


def package_version(package: str) -> Optional[str]:
    """The installed version of ``package``, None if it is not installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def versions() -> dict:
    """Versions of the packages whose change can change a result."""
    import torch  # here, not at the top: the commands import this module before parsing their flags

    return {"nnunet_adv": package_version("nnunet_adv"), "nnunetv2": package_version("nnunetv2"),
            "torch": torch.__version__}


def first_difference(old, new, path: str = "") -> Optional[str]:
    """'KEY.PATH: OLD there, NEW here' for the first difference of two JSON-like values, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    normal = lambda v: json.loads(json.dumps(v, default=repr))  # noqa: E731 - tuples and lists alike
    if normal(old) != normal(new):
        return f"{path or 'settings'}: {old!r} there, {new!r} here"
    return None


def ensure_writable(folder: Path) -> None:
    """The folder (or the nearest existing parent it would be made in) accepts a new file, checked
    before any model is loaded: a read-only or full file system is one line, not a traceback."""
    probe_dir = folder
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise UserError(f"cannot write into {folder}: {probe_dir} is a file")
    probe = probe_dir / f".nnunet_adv_write_test_{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write into {folder}: {e.strerror or e}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def one_line(e: BaseException) -> str:
    """An exception as one line: the message of a user error, ``Type: message`` otherwise."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    if isinstance(e, UserError):
        return text[:500]
    return f"{type(e).__name__}: {text[:500]}"
