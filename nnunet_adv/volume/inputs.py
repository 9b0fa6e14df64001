"""A case's input files, checked before any model loads, and their SHA-256 (what resumes compare).

* :func:`check_complete`: a file cut short (a ``.nii.gz`` copied half-way) is refused: ITK's NIfTI
  reader, and so nnU-Net's SimpleITKIO, reads the missing part as zeros without an error.
* :func:`check_label`: a reference segmentation must lie on its image (shape, spacing, origin,
  direction) and hold only whole-numbered labels of the dataset (a 1.5 would be cast to class 1).
* :func:`case_inputs` / :func:`input_change`: the SHA-256 of a case's images and label, recorded
  with every result made from them, so that a resume redoes exactly the cases whose inputs changed.

A problem of one case is a :class:`CaseError` (the attack fails that case, the others go on; the
evaluation refuses the run).
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Dict, Optional, Sequence

import nibabel
import numpy as np

from nnunet_adv.errors import UserError
from nnunet_adv.files import file_digest


class CaseError(UserError):
    """A problem with one case (bad file, NaN, shape mismatch): the case fails, others go on."""


def check_complete(path) -> None:
    """:class:`CaseError` when ``path`` is cut short: a gzip file (``.gz``) must end its gzip stream;
    an NIfTI file (``.nii``, ``.nii.gz``) must hold the data bytes its header promises. Other formats
    are left to their readers."""
    path = Path(path)
    name = path.name.lower()
    length = None
    if name.endswith(".gz"):
        length = _gzip_length(path)
    if name.endswith((".nii", ".nii.gz")):
        expected = _nifti_bytes(path)
        length = path.stat().st_size if length is None else length
        if expected is not None and length < expected:
            raise CaseError(f"{path.name} is truncated: it holds {length} of the {expected} bytes its NIfTI "
                            f"header promises (a copy cut short?)")


def _gzip_length(path: Path) -> int:
    """Uncompressed length of a gzip file (every member); :class:`CaseError` when the stream breaks off."""
    length = 0
    try:
        with gzip.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                length += len(block)
    except (EOFError, OSError, zlib.error) as e:
        raise CaseError(f"{path.name} is truncated or damaged ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'unreadable gzip stream'})") from None
    return length


def _nifti_bytes(path: Path) -> Optional[int]:
    """Bytes an NIfTI file must have (data offset + voxels x bytes per voxel), None if nibabel cannot
    read its header (then the dataset's reader decides)."""
    try:
        proxy = nibabel.load(str(path)).dataobj  # the file's layout (the image's header copy has offset 0)
        return int(proxy.offset) + int(np.prod(proxy.shape)) * int(np.dtype(proxy.dtype).itemsize)
    except Exception:  # not an NIfTI nibabel knows: nothing to compare
        return None


def case_inputs(image_files: Sequence, label_file=None) -> Dict[str, object]:
    """``{'images': {file name: SHA-256}, 'label': SHA-256 or None}`` of one case's input files."""
    return {"images": {Path(f).name: file_digest(f) for f in image_files},
            "label": None if label_file is None else file_digest(label_file)}


def input_change(recorded: Optional[dict], current: dict) -> Optional[str]:
    """What differs between the inputs a result was made from (``recorded``, :func:`case_inputs`) and
    the case's inputs now: ``'case_0006_0000.nii.gz'``, ``'the label'``, ``'inputs not recorded'``;
    None when they are the same files."""
    if not recorded:
        return "inputs not recorded"
    changed = [name for name in sorted(set(recorded.get("images", {})) | set(current["images"]))
               if recorded.get("images", {}).get(name) != current["images"].get(name)]
    if recorded.get("label") != current["label"]:
        changed.append("the label")
    return ", ".join(changed) or None


def changes_line(changes: Dict[str, str], what: str) -> str:
    """One line naming the cases whose inputs changed: ``2 case(s) changed since WHAT: case_0006
    (case_0006_0000.nii.gz), case_0007 (the label)``."""
    listed = ", ".join(f"{case} ({change})" for case, change in sorted(changes.items()))
    return f"the inputs of {len(changes)} case(s) changed since {what}: {listed}"


def check_label(seg: np.ndarray, seg_props: dict, image_shape, image_props: dict, name: str, allowed,
                ignore: Optional[int] = None) -> None:
    """A reference segmentation ``seg`` (1, *S) as the reader read it must fit its image (``image_shape``
    (C, *S), ``image_props``) and hold only whole numbers of ``allowed``; ``ignore``: a label value
    that is refused (the attacks do not support partially annotated references)."""
    if tuple(seg.shape[1:]) != tuple(image_shape[1:]):
        raise CaseError(f"{name}: shape {tuple(seg.shape[1:])} != image shape {tuple(image_shape[1:])}")
    geometry = geometry_difference(image_props, seg_props)
    if geometry:
        raise CaseError(f"{name}: {geometry} differs from its image's; the label does not lie on the image")
    values = np.unique(seg)
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise CaseError(f"{name}: label values must be whole numbers (class ids), got {fractional[0]:g}")
    present = set(values.astype(np.int64).tolist())
    if ignore is not None and ignore in present:
        raise CaseError(f"{name}: contains the ignore label {ignore}; attacking partially annotated references is "
                        f"not supported (omit -l to attack the clean prediction)")
    known = sorted(int(v) for v in allowed)
    unknown = sorted(present - set(known))
    if unknown:
        raise CaseError(f"{name}: label values {unknown} are not labels of the dataset {known}")


def precheck_case(image_files: Sequence, label_file, reader_writer, allowed, ignore: Optional[int] = None) -> None:
    """Everything about one case that can be checked without a model: every file complete, and the
    label (if any) fitting its image (:func:`check_label`). ``reader_writer``: the dataset's
    reader/writer instance."""
    for f in [*image_files, *([] if label_file is None else [label_file])]:
        check_complete(f)
    if label_file is None:
        return
    try:
        raw, props = reader_writer.read_images([str(f) for f in image_files])
        seg, seg_props = reader_writer.read_seg(str(label_file))
    except Exception as e:  # nnU-Net's readers raise bare RuntimeErrors
        raise CaseError(f"cannot read {Path(label_file).name} or its image with {type(reader_writer).__name__}: "
                        f"{type(e).__name__} {str(e).splitlines()[0] if str(e) else ''}".rstrip()) from None
    check_label(seg, seg_props, raw.shape, props, Path(label_file).name, allowed, ignore)


def geometry_difference(image_props: dict, seg_props: dict) -> Optional[str]:
    """The first of spacing / origin / direction in which a label's reader properties differ from
    its image's (relative tolerance 1e-4), or None."""
    for stuff in ("sitk_stuff", "nibabel_stuff"):
        a, b = image_props.get(stuff), seg_props.get(stuff)
        if a is None or b is None:
            continue
        for key in ("spacing", "origin", "direction", "original_affine"):
            if key in a and key in b and not np.allclose(np.asarray(a[key], float), np.asarray(b[key], float),
                                                         rtol=1e-4, atol=1e-4):
                return key.replace("original_", "")
    if not np.allclose(np.asarray(image_props.get("spacing", ()), float),
                       np.asarray(seg_props.get("spacing", ()), float),
                       rtol=1e-4, atol=1e-6):
        return "spacing"
    return None
