"""The report writer on hand-made summaries: summary.json, metrics.csv and report.md say what the
summaries hold, in nnU-Net's layout, with the settings' labels and eps."""
import csv
import json

import numpy as np
import pytest

from nnunet_adv.attack_config import AttackConfig
from nnunet_adv.evaluation import report
from nnunet_adv.evaluation.plan import Model, Setting, evaluations_of


def _summary(dice_per_case, asr=None):
    cases = [{"metrics": {"1": {"Dice": d, "IoU": d / (2 - d), "HD95": 2.0, "NSD": d, "TP": 1, "FP": 0, "FN": 0,
                                "n_ref": 1, "n_pred": 1}},
              "foreground_dice": d, "ASR": asr, "SSIM": None if asr is None else 0.9,
              "PSNR": None if asr is None else 30.0, "Linf_raw": None, "LPIPS": None} for d in dice_per_case]
    mean = sum(dice_per_case) / len(dice_per_case)
    stats = {"Dice": mean, "IoU": mean / (2 - mean), "HD95": 2.0, "NSD": mean, "TP": 1, "FP": 0, "FN": 0, "n_ref": 1,
             "n_pred": 1}
    return {"metric_per_case": cases, "mean": {"1": stats}, "foreground_mean": stats}


def _context(tmp_path, models, settings, summaries):
    """A report context over two cases, one label, on hand-made summaries."""
    return report.ReportContext(folder=report.ReportFolder(tmp_path), file_ending=".nii.gz", command="cmd",
                                dataset="D", models=models, settings=settings,
                                evaluations=evaluations_of(models, settings), summaries=summaries, labels=[1],
                                tta=False, eot=False, device="cpu", folds=["0"], checkpoint="c", cases=["c1", "c2"])


@pytest.fixture()
def context(tmp_path):
    models = [Model("clean_model", tmp_path / "a"), Model("robust_model", tmp_path / "b")]
    pgd = AttackConfig.parse("pgd:eps=4,steps=10")
    settings = [Setting("clean"), Setting(pgd.label, pgd)]
    evaluations = evaluations_of(models, settings)
    dice = {("clean_model", "clean"): [0.8, 0.6], ("clean_model", pgd.tag): [0.2, 0.4],
            ("robust_model", "clean"): [0.78, 0.6], ("robust_model", pgd.tag): [0.6, 0.5]}
    summaries = {key: _summary(v, None if key[1] == "clean" else 0.1) for key, v in dice.items()}
    return report.ReportContext(folder=report.ReportFolder(tmp_path), file_ending=".nii.gz", command="cmd",
                                dataset="Dataset1_X", models=models, settings=settings, evaluations=evaluations,
                                summaries=summaries, labels=[1], tta=False, eot=False, device="cpu", folds=["0"],
                                checkpoint="checkpoint_final.pth", cases=["c1", "c2"])


def test_summary_json_and_metrics_csv(context):
    report.write_summary_json(context)
    report.write_metrics_csv(context)
    doc = json.loads((context.root / "summary.json").read_text())
    rows = {(r["model"], r["attack"]): r for r in doc["results"]}
    assert rows[("clean_model", "pgd:eps=4,steps=10")]["eps"] == 4.0
    assert rows[("clean_model", "pgd:eps=4,steps=10")]["foreground_mean"]["Dice"] == pytest.approx(0.3)
    assert rows[("robust_model", "clean")]["eps"] == 0.0
    # ROG: a case is robust while its Dice > 0.5 x the model's mean clean Dice (0.7 -> 0.35)
    assert rows[("clean_model", "pgd:eps=4,steps=10")]["robust_fraction"] == pytest.approx(0.5)
    with open(context.root / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 * 2 * 2  # models x settings x cases (one class)
    first = next(r for r in table if r["model"] == "robust_model" and r["attack"] != "clean" and r["case"] == "c1")
    assert float(first["dice"]) == pytest.approx(0.6) and float(first["eps"]) == 4.0 and first["asr"] == "0.1"


def test_report_md_tables(context):
    text = report.write_report_md(context, [])
    assert (context.root / "report.md").read_text() == text
    assert "| clean_model | 0.700 (2.0) | 0.300 (2.0) |" in text
    assert "| robust_model | 0.690 (2.0) | 0.550 (2.0) |" in text
    assert "| model | attack | Jaccard (IoU) | voxel ASR | robust fraction | SSIM | PSNR dB |" in text


def test_worst_case_does_not_keep_a_first_nan_over_a_later_number():
    """A case without foreground gives NaN Dice where the prediction is empty too; an attack that puts
    foreground there (Dice 0) is the worse one, whichever order the attacks ran in."""
    from nnunet_adv.evaluation.pipeline import worst_case_summary

    nan = float("nan")
    summary = worst_case_summary([("a", _summary([nan, 0.5])), ("b", _summary([0.0, 0.6])),
                                  ("c", _summary([nan, 0.7]))])
    assert [c["worst_of"] for c in summary["metric_per_case"]] == ["b", "a"]
    assert [c["foreground_dice"] for c in summary["metric_per_case"]] == [0.0, 0.5]
    everywhere_nan = worst_case_summary([("a", _summary([nan])), ("b", _summary([nan]))])
    assert everywhere_nan["metric_per_case"][0]["worst_of"] == "a"


def test_worst_case_keeps_per_case_the_lowest_dice_attack(tmp_path):
    """AutoAttack's rule: per case the attack with the lowest Dice (and its name), then the means;
    the worst case is a row of summary.json, metrics.csv and a column of report.md."""
    from nnunet_adv.evaluation.pipeline import worst_case_summary
    from nnunet_adv.evaluation.plan import worst_case_setting

    pgd, apgd = AttackConfig.parse("pgd:eps=4"), AttackConfig.parse("apgd-ce:eps=4")
    control = AttackConfig.parse("slice-rescale")
    settings = [Setting("clean"), Setting(pgd.label, pgd), Setting(apgd.label, apgd), Setting(control.label, control)]
    worst = worst_case_setting(settings)
    assert [s.label for s in worst] == ["worst case"]
    summary = worst_case_summary([(pgd.label, _summary([0.2, 0.5])), (apgd.label, _summary([0.3, 0.1]))])
    assert [c["worst_of"] for c in summary["metric_per_case"]] == [pgd.label, apgd.label]
    assert summary["foreground_mean"]["Dice"] == pytest.approx(0.15)
    models = [Model("m", tmp_path / "m")]
    settings += worst
    summaries = {("m", "clean"): _summary([0.8, 0.6]), ("m", pgd.tag): _summary([0.2, 0.5]),
                 ("m", apgd.tag): _summary([0.3, 0.1]), ("m", control.tag): _summary([0.05, 0.05]),
                 ("m", "worst-case"): summary}
    ctx = _context(tmp_path, models, settings, summaries)
    text = report.write_report_md(ctx, [])
    assert "| m | 0.700 (2.0) | 0.350 (2.0) | 0.200 (2.0) | 0.050 (2.0) | 0.150 (2.0) |" in text  # the control is
    assert "m: c1 pgd:eps=4, c2 apgd-ce:eps=4" in text                                     # not in the worst case
    report.write_summary_json(ctx)
    rows = [r for r in json.loads((tmp_path / "summary.json").read_text())["results"] if r["kind"] == "worst case"]
    assert len(rows) == 1 and rows[0]["foreground_mean"]["Dice"] == pytest.approx(0.15)
    assert rows[0]["threat_models"] == ["L-inf 4/255"] and "threat models" not in text  # one budget: no warning
    report.write_metrics_csv(ctx)
    with open(tmp_path / "metrics.csv", newline="") as f:
        worst_rows = [r for r in csv.DictReader(f) if r["attack"] == "worst case"]
    assert [r["worst_of"] for r in worst_rows] == [pgd.label, apgd.label]


def test_corruption_table_and_mean_corruption_dice(tmp_path):
    from nnunet_adv.evaluation.plan import corruption_settings

    models = [Model("m", tmp_path / "m")]
    corrupted = corruption_settings(["noise", "blur:2"])
    assert [s.label for s in corrupted] == ["noise:1", "noise:2", "noise:3", "noise:4", "noise:5", "blur:2"]
    settings = [Setting("clean")] + corrupted
    summaries = {("m", "clean"): _summary([0.8, 0.8])}
    for i, s in enumerate(corrupted):
        summaries[("m", s.tag)] = _summary([0.7 - 0.1 * i, 0.7 - 0.1 * i])
    ctx = _context(tmp_path, models, settings, summaries)
    assert ctx.mean_corruption("m") == pytest.approx(np.mean([0.7, 0.6, 0.5, 0.4, 0.3, 0.2]))
    assert ctx.mean_corruption("m", 2) == pytest.approx(np.mean([0.6, 0.2]))
    text = report.write_report_md(ctx, [])
    assert "| m | noise | 0.700 | 0.600 | 0.500 | 0.400 | 0.300 | 0.500 |" in text
    assert "| m | blur | n/a | 0.200 | n/a | n/a | n/a | 0.200 |" in text
    assert report.write_figures(ctx, {}, None, 0) == ["corruption_curve.png"]


def test_a_non_adaptive_attack_under_test_time_mirroring_is_flagged(context):
    """Predictions with test-time mirroring and attacks that did not see it underestimate the attacks
    (the mirrored views rescue a non-robust model most): report.md says so."""
    assert "underestimated" not in report.write_report_md(context, [])       # tta off
    context.tta, context.eot = True, True
    assert "underestimated" not in report.write_report_md(context, [])       # adaptive (EOT) attack
    context.eot = False
    assert "**The attacks did not see the test-time mirroring" in report.write_report_md(context, [])


def test_evaluate_attacks_through_the_mirroring_whenever_predictions_use_it():
    from nnunet_adv.cli.evaluate import build_parser

    base = ["-i", "i", "-l", "l", "-o", "o", "-m", "m"]
    assert build_parser().parse_args(base).eot_mirroring is None              # -> EOT when TTA is on
    assert build_parser().parse_args(base + ["--no_eot_mirroring"]).eot_mirroring is False
    assert build_parser().parse_args(base + ["--eot_mirroring"]).eot_mirroring is True


def test_a_worst_case_over_several_budgets_says_it_is_no_robustness_number(tmp_path):
    """The lowest Dice over L-inf 4/255 and 8/255, or over VAFA and L-inf, is no robustness number for any one
    budget: report.md says so, and summary.json lists the threat models the worst case spans."""
    from nnunet_adv.evaluation.plan import threat_model, worst_case_setting, worst_case_threat_models

    texts = ["pgd:eps=4,steps=10", "apgd-ce:eps=4", "pgd:eps=8", "pgd:eps=4,norm=l2", "vafa-3d-ref", "slice-rescale"]
    attacks = [AttackConfig.parse(t) for t in texts]
    attack_settings = [Setting(a.label, a) for a in attacks]
    assert [threat_model(s) for s in attack_settings] == ["L-inf 4/255", "L-inf 4/255", "L-inf 8/255", "L2 4/255",
                                                          "vafa-3d-ref", "slice-rescale"]
    assert worst_case_threat_models(attack_settings[:2]) == ["L-inf 4/255"]
    spanned = worst_case_threat_models(attack_settings)  # the control is no member of the worst case
    assert spanned == ["L-inf 4/255", "L-inf 8/255", "L2 4/255", "vafa-3d-ref"]
    models = [Model("m", tmp_path / "m")]
    settings = [Setting("clean"), attack_settings[0], attack_settings[4]]
    settings += worst_case_setting(settings)
    summaries = {("m", "clean"): _summary([0.8, 0.6]), ("m", attacks[0].tag): _summary([0.6, 0.5]),
                 ("m", attacks[4].tag): _summary([0.3, 0.1]), ("m", "worst-case"): _summary([0.3, 0.1])}
    ctx = _context(tmp_path, models, settings, summaries)
    text = report.write_report_md(ctx, [])
    assert "**This worst case spans 2 threat models** (L-inf 4/255; vafa-3d-ref)" in text
    report.write_summary_json(ctx)
    (row,) = [r for r in json.loads((tmp_path / "summary.json").read_text())["results"] if r["kind"] == "worst case"]
    assert row["threat_models"] == ["L-inf 4/255", "vafa-3d-ref"]
