"""The files of an ``nnUNetv2_adv_evaluate`` report: summary.json, metrics.csv, report.md, figures.

Inputs are the per-evaluation summaries of :mod:`nnunet_adv.evaluation.case_metrics` (nnU-Net's
summary layout, label keys as strings). "Mean foreground Dice" everywhere is nnU-Net's
``foreground_mean['Dice']`` (mean over classes of the per-class mean over cases), the number
``nnUNetv2_evaluate_folder`` reports; HD95 in millimetres likewise.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from nnunet_adv.attacks import attack_class
from nnunet_adv.evaluation.checks import ADVICE, WARN
from nnunet_adv.evaluation.figures import ExampleRow, central_slice, plot_examples, plot_robustness_curve, plot_saliency
from nnunet_adv.evaluation.plan import worst_case_threat_models
from nnunet_adv.files import atomic_write_text
from nnunet_adv.metrics import lpips_available, robust_fraction

ROG_FACTOR = 0.5  # a case is robust if its Dice > 0.5 x the model's mean clean Dice (ROG)


@dataclass(frozen=True)
class ReportFolder:
    """Where a report keeps its intermediate results (one place for the layout)."""

    root: Path

    def adversarial(self, crafted_on: str, attack_tag: str) -> Path:
        """Adversarial images and attack.json of one attack crafted on one model."""
        return self.root / "adversarial" / crafted_on / attack_tag

    def predictions(self, model: str, key: str) -> Path:
        """nnU-Net's predictions of ``model``; key = setting tag (+ ``__from_SOURCE``), 'clean'."""
        return self.root / "predictions" / model / key

    def corrupted(self, corruption_tag: str) -> Path:
        """Corrupted images and corruption.json of one corruption at one severity (every model's input)."""
        return self.root / "corrupted" / corruption_tag

    def metrics(self, model: str, key: str) -> Path:
        return self.root / "metrics" / model / f"{key}.json"

    def saliency(self, model: str, case: str) -> Path:
        return self.root / "saliency" / model / f"{case}.npz"


@dataclass
class ReportContext:
    folder: ReportFolder
    file_ending: str
    command: str
    dataset: str
    models: list  # [Model(name, folder)]
    settings: list  # [Setting], clean first
    evaluations: list  # [Evaluation]
    summaries: Dict[Tuple[str, str], dict]  # (model name, evaluation key) -> summary
    labels: list
    tta: bool
    eot: bool
    device: str
    folds: list
    checkpoint: str
    cases: List[str]
    checks: Dict[str, dict] = field(default_factory=dict)  # model name -> checks.run_checks(...)
    saliency: Dict[str, dict] = field(default_factory=dict)  # model name -> inside_share, ... (--saliency)
    notes: List[str] = field(default_factory=list)  # how models that are not one network ran (cascades)

    @property
    def root(self) -> Path:
        return self.folder.root

    def rows(self):
        """``(model, setting, crafted_on name or None, key)`` of every result: the evaluations, then
        the worst case of every model."""
        for ev in self.evaluations:
            yield ev.model, ev.setting, None if ev.source is None else ev.source.name, ev.key
        for setting in self.settings:
            if setting.worst:
                for model in self.models:
                    yield model, setting, model.name, setting.tag

    def summary(self, model_name: str, key: str) -> Optional[dict]:
        return self.summaries.get((model_name, key))

    def fg(self, model_name: str, key: str, metric: str = "Dice") -> float:
        s = self.summary(model_name, key)
        value = None if s is None else s["foreground_mean"].get(metric)
        return float("nan") if value is None else float(value)

    def robust_fraction(self, model_name: str, key: str) -> float:
        s = self.summary(model_name, key)
        per_case = [c["foreground_dice"] for c in s["metric_per_case"]]
        return robust_fraction(per_case, self.fg(model_name, "clean"), ROG_FACTOR)

    def mean_corruption(self, model_name: str, severity: Optional[int] = None, metric: str = "Dice") -> float:
        """Mean over the corruptions (at one severity, or all) of the mean foreground metric
        (ImageNet-C's mean corruption score)."""
        values = [self.fg(model_name, s.tag, metric) for s in self.settings
                  if s.corruption is not None and (severity is None or s.corruption[1] == severity)]
        values = [v for v in values if math.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")

    def per_case_mean(self, model_name: str, key: str, field: str) -> float:
        values = [c.get(field) for c in self.summary(model_name, key)["metric_per_case"]]
        values = [float(v) for v in values if v is not None]
        finite = [v for v in values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")


# ---------------------------------------------------------------------------------------- files
def write_summary_json(ctx: ReportContext) -> None:
    """``summary.json``: run information and, per evaluation, nnU-Net's summary with ``model``,
    ``attack``, ``eps``, ``crafted_on`` and ``robust_fraction`` keys."""
    results = []
    spanned = worst_case_threat_models(ctx.settings)
    for model, setting, source, key in ctx.rows():
        s = ctx.summary(model.name, key)
        kind = "worst case" if setting.worst else "corruption" if setting.corruption else "sweep" if setting.sweep \
            else f"check: {setting.check}" if setting.check else "attack" if setting.attack else "clean"
        results.append({"model": model.name, "attack": setting.label, "kind": kind, "eps": setting.eps,
                        "sweep": setting.sweep, "crafted_on": source,
                        "corruption": None if setting.corruption is None else {"name": setting.corruption[0],
                                                                              "severity": setting.corruption[1]},
                        "prediction_folder": None if setting.worst else
                        str(ctx.folder.predictions(model.name, key).relative_to(ctx.root)),
                        "robust_fraction": ctx.robust_fraction(model.name, key),
                        **({"threat_models": spanned} if setting.worst else {}),
                        **s})
    doc = {"command": ctx.command, "dataset": ctx.dataset,
           "created": datetime.datetime.now().isoformat(timespec="seconds"),
           "models": {m.name: str(m.folder.resolve()) for m in ctx.models}, "folds": ctx.folds,
           "checkpoint": ctx.checkpoint, "device": ctx.device, "test_time_mirroring": ctx.tta,
           "eot_mirroring": ctx.eot, "cases": ctx.cases, "lpips": _lpips_note(),
           "conventions": {"Dice/IoU": "nnU-Net compute_metrics (NaN when a class is absent from both maps)",
                           "HD95": "mm; a class in only one map: the image diagonal",
                           "ASR": "fraction of voxels whose predicted label differs from the clean prediction",
                           "SSIM/PSNR": "adversarial vs clean raw image, mean over channels",
                           "LPIPS": "adversarial vs clean raw image, slice-wise (first axis), mean over channels; "
                                    "null when unavailable",
                           "robust_fraction": f"cases with foreground Dice > {ROG_FACTOR} x mean clean Dice (ROG)",
                           "NSD": "normalised surface Dice at the tolerance in evaluation.json (mm), MONAI's "
                                  "implementation; NaN when a class is absent from both maps",
                           "worst case": "per case the attack with the lowest foreground Dice (worst_of) of every "
                                         "attack run at the evaluation's budgets: --attacks, the checks' "
                                         "gradient-free attack and convergence re-run, the transfer attacks "
                                         "(controls and the saturation check left out), then nnU-Net's averaging "
                                         "(AutoAttack's rule)",
                           "checks": "per model: gradient, loss rises, gradient-free or transfer, saturation, "
                                     "convergence; status pass / warn / not run (docs/evaluate.md)",
                           "saliency": "with --saliency, per model: inside_share, the share of the input-gradient "
                                       "saliency max_c |dCE/dx_c| (whole volume, nnU-Net's network space) inside the "
                                       "labelled structures, over nnU-Net's nonzero mask; structure_fraction, the "
                                       "structures' share of those voxels (an even map's inside_share); mean over "
                                       "the cases and per case"},
           "checks": ctx.checks, "saliency": ctx.saliency, "results": results}
    atomic_write_text(ctx.root / "summary.json", json.dumps(doc, indent=1, default=_json_default))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


CSV_COLUMNS = ["model", "attack", "eps", "crafted_on", "case", "class", "dice", "iou", "hd95_mm", "nsd", "tp", "fp",
               "fn", "n_ref", "n_pred", "asr", "ssim", "psnr", "linf_raw", "lpips", "worst_of"]


def write_metrics_csv(ctx: ReportContext) -> None:
    """``metrics.csv``: one row per model x attack x eps x case x class."""
    f = io.StringIO(newline="")
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for model, setting, source, key in ctx.rows():
        s = ctx.summary(model.name, key)
        for case, entry in zip(ctx.cases, s["metric_per_case"]):
            for label, m in entry["metrics"].items():
                writer.writerow([model.name, setting.label, _cell(setting.eps), source or "", case, label,
                                 _cell(m["Dice"]), _cell(m["IoU"]), _cell(m["HD95"]), _cell(m.get("NSD")), m["TP"],
                                 m["FP"], m["FN"], m["n_ref"], m["n_pred"], _cell(entry.get("ASR")),
                                 _cell(entry.get("SSIM")), _cell(entry.get("PSNR")), _cell(entry.get("Linf_raw")),
                                 _cell(entry.get("LPIPS")), entry.get("worst_of", "")])
    atomic_write_text(ctx.root / "metrics.csv", f.getvalue())


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{float(value):.6g}"


def write_figures(ctx: ReportContext, cases: Dict[str, dict], reader_writer, num_examples: int) -> List[str]:
    """robustness_curve.png (with a sweep) and examples.png (with an attack); their file names."""
    written = []
    sweep = [s for s in ctx.settings if s.sweep]
    if sweep:
        curves = {m.name: {"eps": [0.0] + [s.eps for s in sweep],
                           "dice": [ctx.fg(m.name, "clean")] + [ctx.fg(m.name, s.tag) for s in sweep],
                           "jaccard": [ctx.fg(m.name, "clean", "IoU")] + [ctx.fg(m.name, s.tag, "IoU") for s in sweep]}
                  for m in ctx.models}
        plot_robustness_curve(curves, ctx.root / "robustness_curve.png",
                              x_label="eps (x/255 of the intensity window)",
                              title=f"{sweep[0].attack.name} sweep, {ctx.dataset}")
        written.append("robustness_curve.png")
    corrupted = [s for s in ctx.settings if s.corruption is not None]
    if corrupted:
        severities = sorted({s.corruption[1] for s in corrupted})
        curves = {m.name: {"eps": [0.0] + [float(v) for v in severities],
                           "dice": [ctx.fg(m.name, "clean")] + [ctx.mean_corruption(m.name, v) for v in severities],
                           "jaccard": [ctx.fg(m.name, "clean", "IoU")] +
                                      [ctx.mean_corruption(m.name, v, "IoU") for v in severities]}
                  for m in ctx.models}
        plot_robustness_curve(curves, ctx.root / "corruption_curve.png",
                              x_label="corruption severity (mean over the corruptions)",
                              title=f"natural corruptions, {ctx.dataset}")
        written.append("corruption_curve.png")
    attacked = [s for s in ctx.settings if s.attack is not None]
    if attacked and num_examples > 0:
        setting = next((s for s in attacked if not s.sweep), attacked[-1])
        def image(path):  # central slice of channel 0
            return central_slice(reader_writer.read_images([str(path)])[0][0])

        def seg(path):
            return central_slice(reader_writer.read_seg(str(path))[0][0])

        rows = []
        for model in ctx.models:
            adversarial = ctx.folder.adversarial(model.name, setting.tag)
            for case in ctx.cases[:num_examples]:
                image_file, prediction = cases[case]["images"][0], f"{case}{ctx.file_ending}"
                rows.append(ExampleRow(
                    title=f"{model.name}, {case}, {setting.label}",
                    image=image(image_file),
                    adversarial=image(adversarial / Path(image_file).name),
                    clean_prediction=seg(ctx.folder.predictions(model.name, "clean") / prediction),
                    adversarial_prediction=seg(ctx.folder.predictions(model.name, setting.tag) / prediction),
                    reference=seg(cases[case]["label"])))
        plot_examples(rows, ctx.root / "examples.png", num_classes=max(_max_label(ctx.labels) + 1, 2))
        written.append("examples.png")
    return written


def _max_label(labels) -> int:
    return max(max(label) if isinstance(label, (tuple, list)) else int(label) for label in labels)


def write_saliency(ctx: ReportContext, image_slices, maps) -> str:
    plot_saliency(image_slices, maps, ctx.root / "saliency.png")
    return "saliency.png"


# ---------------------------------------------------------------------------------------- report.md
def _f(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def write_report_md(ctx: ReportContext, figures: List[str]) -> str:
    """``report.md``, one section per function below; returns its text."""
    main = [s for s in ctx.settings if not s.sweep and s.corruption is None and s.check is None]
    attacked = [s for s in ctx.settings if s.attack is not None and s.check is None]
    lines = (_header_section(ctx) + _dice_section(ctx, main) + _nsd_section(ctx, main)
             + _worst_case_lines(ctx, main) + _checks_section(ctx) + _attack_effect_section(ctx, attacked)
             + _corruption_section(ctx, [s for s in ctx.settings if s.corruption is not None])
             + _sweep_section(ctx, [s for s in ctx.settings if s.sweep])
             + _transfer_section(ctx, attacked) + _saliency_section(ctx))
    for name in figures:
        lines += [f"![{name}]({name})", ""]
    text = "\n".join(lines)
    atomic_write_text(ctx.root / "report.md", text)
    return text


def _saliency_section(ctx: ReportContext) -> List[str]:
    """--saliency: where each model's input gradient lies, as one number per model (the dual-BN paper's
    interpretability claim, made checkable)."""
    if not ctx.saliency:
        return []
    lines = ["## Saliency inside the labelled structures", "",
             f"Share of the input-gradient saliency |dLoss/dx| that lies inside the labelled structures (whole "
             f"volumes, nnU-Net's nonzero mask), mean over the {len(ctx.cases)} case(s). A map spread evenly would put "
             f"the structures' share of the voxels there; the ratio says how many times more the model's saliency "
             f"concentrates on the anatomy (higher: more of what moves the prediction is the structure itself).", ""]
    rows = []
    for model, found in ctx.saliency.items():
        share, fraction = found["inside_share"], found["structure_fraction"]
        ratio = share / fraction if math.isfinite(share) and fraction > 0 else float("nan")
        rows.append([model, _f(share), _f(fraction), _f(ratio, 2)])
    return lines + _table(["model", "saliency inside", "structures' share of the voxels", "ratio"], rows) + [""]


def _header_section(ctx: ReportContext) -> List[str]:
    """Title, what was run and how, the command and the attacks' one-line summaries."""
    lines = [f"# Robustness report: {ctx.dataset}", "",
             f"{len(ctx.cases)} test case(s); folds {', '.join(map(str, ctx.folds))} ({ctx.checkpoint}); prediction "
             f"with nnU-Net's predictor, test-time mirroring {'on' if ctx.tta else 'off'}; attacks on whole volumes "
             f"in nnU-Net's network space{' with mirroring EOT' if ctx.eot else ''}, written as images and predicted "
             f"like any input; device {ctx.device}."
             + (" **The attacks did not see the test-time mirroring the predictions use: their effect is "
                "underestimated** (the mirrored views rescue a non-robust model most); use the default adaptive "
                "attack (EOT over the mirroring) or --disable_tta." if ctx.tta and not ctx.eot else ""), "",
             f"Command: `{ctx.command}`", ""]
    lines += [line for note in ctx.notes for line in (note, "")]
    names = list(dict.fromkeys(s.attack.name for s in ctx.settings if s.attack is not None))
    if names:
        lines += ["Attacks: " + "; ".join(f"`{n}` {attack_class(n).summary}" for n in names) + ".", ""]
    return lines


def _dice_section(ctx: ReportContext, main: list) -> List[str]:
    """Mean foreground Dice (HD95) per model and setting: the paper table."""
    lines = ["## Mean foreground Dice (HD95 in mm)", ""]
    lines += _table(["model"] + [s.label for s in main],
                    [[m.name] + [f"{_f(ctx.fg(m.name, s.tag))} ({_f(ctx.fg(m.name, s.tag, 'HD95'), 1)})" for s in main]
                     for m in ctx.models])
    lines += ["", "Dice is nnU-Net's `foreground_mean` (the number `nnUNetv2_evaluate_folder` gives for the same "
                  "predictions); HD95 of a class missing from one map counts as the image diagonal."
              + (" **worst case**: per case the attack with the lowest foreground Dice (AutoAttack's rule; "
                 "controls such as `slice-rescale` left out): a robustness claim is this column, not one attack."
                 if any(s.worst for s in main) else ""), ""]
    spanned = worst_case_threat_models(ctx.settings)
    if len(spanned) > 1:
        lines += [f"**This worst case spans {len(spanned)} threat models** ({'; '.join(spanned)}): it is the lowest "
                  "Dice over all of them, not a robustness number for any one budget, and its checks test that "
                  "mixture. For a claim, evaluate one budget at a time (`nnUNetv2_adv_study --eps_sweep` does).", ""]
    return lines


def _nsd_section(ctx: ReportContext, main: list) -> List[str]:
    lines = ["## Mean foreground normalised surface Dice", ""]
    lines += _table(["model"] + [s.label for s in main],
                    [[m.name] + [_f(ctx.fg(m.name, s.tag, "NSD")) for s in main] for m in ctx.models])
    return lines + ["", "NSD at the tolerance of evaluation.json (mm), MONAI's implementation of DeepMind's surface "
                        "Dice.", ""]


def _worst_case_lines(ctx: ReportContext, main: list) -> List[str]:
    """Per model and case, the attack that gave the worst case."""
    if not any(s.worst for s in main):
        return []
    return ["Worst case, the attack that achieved it per case: "
            + "; ".join(f"{m.name}: " + ", ".join(f"{case} {entry.get('worst_of')}" for case, entry in
                                                 zip(ctx.cases, ctx.summary(m.name, 'worst-case')["metric_per_case"]))
                        for m in ctx.models) + ".", ""]


def _checks_section(ctx: ReportContext) -> List[str]:
    """Per model, each check's numbers and status; a model with a warning is marked untrustworthy,
    in words, with what to run next."""
    if not ctx.checks:
        return []
    lines = ["## Checks: can the worst case be trusted?", ""]
    rows = []
    for model, found in ctx.checks.items():
        for name, c in found.items():
            numbers = ", ".join(f"{k} {_number(v)}" for k, v in c["numbers"].items())
            rows.append([model, name, c["status"].upper() if c["status"] == WARN else c["status"], numbers,
                         c["finding"]])
    lines += _table(["model", "check", "status", "numbers", "finding"], rows) + [""]
    for model, found in ctx.checks.items():
        warned = [name for name, c in found.items() if c["status"] == WARN]
        if warned:
            lines += [f"**The worst-case Dice of {model} is not trustworthy.** The attacks may have missed "
                      f"inputs that break it ({', '.join(warned)}): treat its worst case as an upper bound on its "
                      f"robustness, not a measurement. Next: " + "; ".join(ADVICE[n] for n in warned) + ".", ""]
        elif all(c["status"] == "pass" for c in found.values()):
            lines += [f"{model}: every check passed.", ""]
        else:
            missing = [name for name, c in found.items() if c["status"] != "pass"]
            lines += [f"{model}: no check warned, but {', '.join(missing)} did not run: the report cannot vouch for "
                      f"that part of its worst case.", ""]
    return lines + ["What each check catches: docs/evaluate.md, \"How to make a robustness claim\".", ""]


def _number(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_number(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _attack_effect_section(ctx: ReportContext, attacked: list) -> List[str]:
    """Jaccard, voxel ASR, ROG's robust fraction and image similarity per model and attack."""
    if not attacked:
        return []
    with_lpips = lpips_available()  # slice-wise LPIPS, only where the package and its weights are installed
    rows = []
    for m in ctx.models:
        for s in attacked:
            rows.append([m.name, s.label, _f(ctx.fg(m.name, s.tag, "IoU")),
                         _f(ctx.per_case_mean(m.name, s.tag, "ASR")),
                         _f(ctx.robust_fraction(m.name, s.tag), 2),
                         _f(ctx.per_case_mean(m.name, s.tag, "SSIM")),
                         _f(ctx.per_case_mean(m.name, s.tag, "PSNR"), 1)]
                        + ([_f(ctx.per_case_mean(m.name, s.tag, "LPIPS"))] if with_lpips else []))
    header = ["model", "attack", "Jaccard (IoU)", "voxel ASR", "robust fraction", "SSIM", "PSNR dB"]
    lines = ["## Attack effect", ""] + _table(header + (["LPIPS"] if with_lpips else []), rows)
    clean = ", ".join(f"{m.name} {_f(ctx.robust_fraction(m.name, 'clean'), 2)}" for m in ctx.models)
    return lines + ["", f"Robust fraction: cases whose foreground Dice exceeds {ROG_FACTOR} x the model's mean clean "
                        f"Dice (ROG); clean: {clean}. SSIM / PSNR: adversarial vs clean image. LPIPS: "
                        f"{_lpips_note()}.", ""]


def _corruption_section(ctx: ReportContext, corrupted: list) -> List[str]:
    """Mean foreground Dice per corruption and severity, and each model's mean corruption Dice."""
    if not corrupted:
        return []
    names = list(dict.fromkeys(s.corruption[0] for s in corrupted))
    severities = sorted({s.corruption[1] for s in corrupted})
    header = ["model", "corruption"] + [f"severity {v}" for v in severities] + ["mean"]
    rows = []
    for m in ctx.models:
        for name in names:
            values = {s.corruption[1]: ctx.fg(m.name, s.tag) for s in corrupted if s.corruption[0] == name}
            finite = [v for v in values.values() if math.isfinite(v)]
            rows.append([m.name, name] + [_f(values.get(v)) for v in severities]
                        + [_f(float(np.mean(finite)) if finite else float("nan"))])
    lines = ["## Natural corruptions (TorchIO): mean foreground Dice", ""] + _table(header, rows)
    return lines + ["", "Mean corruption Dice (over every corruption and severity, ImageNet-C's summary): "
                    + ", ".join(f"{m.name} {_f(ctx.mean_corruption(m.name))}" for m in ctx.models)
                    + " (clean: " + ", ".join(f"{m.name} {_f(ctx.fg(m.name, 'clean'))}" for m in ctx.models) + "). "
                    "Severities: nnunet_adv.evaluation.corruptions (docs/evaluate.md).", ""]


def _sweep_section(ctx: ReportContext, sweep: list) -> List[str]:
    if not sweep:
        return []
    lines = [f"## eps sweep ({sweep[0].attack.name}): mean foreground Dice / Jaccard", ""]
    lines += _table(["model", "clean"] + [f"eps {s.eps:g}" for s in sweep],
                    [[m.name] + [f"{_f(ctx.fg(m.name, s.tag))} / {_f(ctx.fg(m.name, s.tag, 'IoU'))}"
                                 for s in [ctx.settings[0]] + sweep] for m in ctx.models])
    return lines + ["", "eps in x/255 of each channel's intensity window.", ""]


def _transfer_section(ctx: ReportContext, attacked: list) -> List[str]:
    transfer = [ev for ev in ctx.evaluations if ev.transfer]
    if not transfer:
        return []
    source = transfer[0].source.name
    lines = [f"## Transfer attacks (crafted on {source}): mean foreground Dice", ""]
    lines += _table(["model"] + [s.label for s in attacked],
                    [[m.name] + [_f(ctx.fg(m.name, f"{s.tag}__from_{source}")) for s in attacked]
                     for m in ctx.models if m.name != source])
    return lines + [""]


def _lpips_note() -> str:
    return "slice-wise along the first axis, AlexNet (package lpips with local weights)" if lpips_available() \
        else "unavailable (the lpips package and its local weights are not installed)"
