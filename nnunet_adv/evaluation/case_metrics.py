"""Per-case metrics of one prediction folder and their nnU-Net-style summary.

Dice, IoU (the Jaccard index), TP/FP/FN/TN and voxel counts come from nnU-Net's own
``compute_metrics`` (its NaN rule: a class absent from both maps is NaN and does not count
towards the mean; regions and the ignore label as in the dataset). Added per class:

* ``HD95``: 95th-percentile Hausdorff distance in millimetres (the reference's spacing; see
  :func:`nnunet_adv.metrics.hd95`). A class present in only one of the two maps has an infinite
  HD95; it is recorded as the image diagonal in mm (BraTS' convention) so that means stay finite
  and a vanished structure still counts as the worst case.

* ``NSD``: normalised surface Dice at a tolerance in mm (default 1 mm, or one per class), the
  reference's spacing; NaN when the class is absent from both maps, 0 when from one.

and per case:

* ``ASR``: voxel attack success rate, the fraction of voxels whose predicted label differs from
  the same model's clean prediction (None for the clean setting itself);
* ``foreground_dice``: mean Dice over the foreground classes present (nanmean), used by the ROG
  robust fraction.

:func:`summarize` averages exactly as ``nnunetv2.evaluation.evaluate_predictions.
compute_metrics_on_folder``: per class the nanmean over cases, then ``foreground_mean`` the
plain mean of the class means, so the clean numbers equal ``nnUNetv2_evaluate_folder``'s.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from nnunetv2.evaluation.evaluate_predictions import compute_metrics, label_or_region_to_key

from nnunet_adv.metrics import LabelOrRegion, attack_success_rate, hd95_per_class, nsd_per_class

#: the normalised surface Dice's default tolerance (mm), as nnU-Net's authors report it
NSD_TOLERANCE_MM = 1.0


def case_metrics(reference_file: str, prediction_file: str, reader_writer,
                 labels_or_regions: Sequence[LabelOrRegion], ignore_label: Optional[int] = None,
                 clean_prediction_file: Optional[str] = None, nsd_tolerance=NSD_TOLERANCE_MM) -> dict:
    """nnU-Net's per-case entry (``reference_file``, ``prediction_file``, ``metrics``) plus HD95 and
    NSD (at ``nsd_tolerance`` mm: one value, or one per class) per class, ``ASR`` and
    ``foreground_dice`` (see the module docstring)."""
    entry = compute_metrics(reference_file, prediction_file, reader_writer, list(labels_or_regions), ignore_label)
    ref, props = reader_writer.read_seg(reference_file)
    pred, _ = reader_writer.read_seg(prediction_file)
    ref, pred = ref[0], pred[0]  # (1, *spatial) -> spatial
    entry["ASR"] = None
    if clean_prediction_file is not None:  # every voxel counts, ignored ones too
        entry["ASR"] = attack_success_rate(reader_writer.read_seg(clean_prediction_file)[0][0], pred)
    if ignore_label is not None:  # ignored voxels count for neither map
        ignored = ref == ignore_label
        ref, pred = np.where(ignored, 0, ref), np.where(ignored, 0, pred)
    spacing = np.asarray(props["spacing"], dtype=np.float64)
    diagonal = float(np.sqrt(np.sum((np.asarray(ref.shape) * spacing) ** 2)))
    hd = hd95_per_class(pred, ref, labels_or_regions, spacing=spacing)
    nsd = nsd_per_class(pred, ref, labels_or_regions, nsd_tolerance, spacing=spacing)
    for label, value, surface in zip(labels_or_regions, hd, nsd):
        entry["metrics"][label]["HD95"] = diagonal if np.isinf(value) else float(value)
        entry["metrics"][label]["NSD"] = float(surface)
    dice = [entry["metrics"][label]["Dice"] for label in labels_or_regions]
    entry["foreground_dice"] = float(np.nanmean(dice)) if not np.all(np.isnan(dice)) else float("nan")
    return entry


def summarize(per_case: List[dict], labels_or_regions: Sequence[LabelOrRegion]) -> dict:
    """nnU-Net's summary layout: ``{'metric_per_case', 'mean': {class: {metric: v}},
    'foreground_mean': {metric: v}}`` with nnU-Net's averaging (module docstring)."""
    metric_names = list(per_case[0]["metrics"][labels_or_regions[0]])
    means = {label: {m: nan_mean([c["metrics"][label][m] for c in per_case]) for m in metric_names}
             for label in labels_or_regions}
    foreground = [label for label in labels_or_regions if label not in (0, "0")]
    foreground_mean = {m: float(np.mean([means[label][m] for label in foreground])) for m in metric_names}
    return {"metric_per_case": per_case, "mean": means, "foreground_mean": foreground_mean}


def nan_mean(values) -> float:
    """The mean without NaN (nnU-Net's NaN: a class absent from reference and prediction); NaN if all are."""
    values = np.asarray(values, dtype=np.float64)
    return float("nan") if np.all(np.isnan(values)) else float(np.nanmean(values))


def jsonable_summary(summary: dict) -> dict:
    """Copy with nnU-Net's JSON conventions: label / region keys as strings (``'1'``, ``'(1, 2)'``),
    numpy scalars as Python numbers, NaN kept (json writes NaN as nnU-Net's summary.json does)."""
    def fix(value):
        if isinstance(value, dict):
            return {(label_or_region_to_key(k) if not isinstance(k, str) else k): fix(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [fix(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        return value

    return fix(summary)
