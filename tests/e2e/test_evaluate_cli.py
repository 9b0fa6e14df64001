"""``nnUNetv2_adv_evaluate`` end to end on the real-MRI dataset 901 (subprocesses): two models, two
attacks, a three-point eps sweep, a transfer attack and saliency maps; the report's numbers against
nnU-Net's own ``nnUNetv2_evaluate_folder``; the figures; ``--continue``; one-line errors.

Models: ``nnUNetTrainerPGDAT_TestShort`` (2 iterations; reused if the session trained it already)
and a copy of its folder under another trainer name. The copy makes the transfer attack exactly
checkable (same weights: the transferred predictions equal the white-box ones) without training a
second model. Their Dice is low; what is checked is that the report is correct for the
predictions it made, not that the models are good.
"""
import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from nnunet_tree import DATASET_ID, SHARED_TRAINER

from nnunet_adv.evaluation.figures import curve_figure_size, examples_figure_size, saliency_figure_size

pytestmark = pytest.mark.e2e

MODELS = [SHARED_TRAINER, "nnUNetTrainerPGDATCopy"]
ATTACKS = ["pgd:eps=16,steps=2,alpha=8", "vafa-3d:q_max=20,steps=2,block_size=16",
           # the authors' VAFA (per-slice rescale inside 16^3 tiles of the 32^3 volumes) and its control
           "vafa-3d-ref:q_max=20,steps=2,block_size=16,rescale_tile=16", "slice-rescale:rescale_tile=16"]
SWEEP = ["4", "16"]
NUM_EXAMPLES = 2
#: the checks' attacks, small: Square with 3 queries, PGD at 64/255 (saturation), the strongest attack with
#: twice its steps (convergence)
CHECKS = ["--check_queries", 3, "--check_factor", 2]


def _evaluate_args(tree, out, *extra):
    return ["nnUNetv2_adv_evaluate", "-i", tree.dataset / "imagesTs", "-l", tree.dataset / "labelsTs", "-o", out,
            "-d", DATASET_ID, "-c", "3d_fullres", "-f", 0, "-tr", *MODELS, "--disable_tta", "-device", "cpu",
            "--disable_progress_bar", *CHECKS, *extra]


@pytest.fixture(scope="module")
def report(shared_model, tmp_path_factory):
    tree = shared_model
    if not tree.model_folder(MODELS[1]).is_dir():
        shutil.copytree(tree.model_folder(MODELS[0]), tree.model_folder(MODELS[1]))
    out = tmp_path_factory.mktemp("evaluate") / "report"
    proc = tree.run(*_evaluate_args(tree, out, "--attacks", *ATTACKS, "--eps_sweep", *SWEEP,
                                    "--sweep_attack", "ifgsm-targeted:steps=2", "--transfer_from", MODELS[0],
                                    "--saliency", "--num_examples", NUM_EXAMPLES))
    summary = json.loads((out / "summary.json").read_text())
    return {"tree": tree, "out": out, "proc": proc, "summary": summary}


def _result(summary, model, attack, crafted_on="self"):
    crafted_on = model if crafted_on == "self" else crafted_on
    if attack == "clean":
        crafted_on = None
    matches = [r for r in summary["results"] if r["model"] == model and r["attack"] == attack
               and r["crafted_on"] == crafted_on]
    assert len(matches) == 1, (model, attack, crafted_on)
    return matches[0]


def test_report_files_and_layout(report):
    out, summary = report["out"], report["summary"]
    for name in ("summary.json", "metrics.csv", "report.md", "robustness_curve.png", "examples.png", "saliency.png"):
        assert (out / name).is_file(), name
    settings = ["clean", *ATTACKS, *[f"ifgsm-targeted:steps=2,eps={e}" for e in SWEEP]]
    # every model x setting white-box and its worst case, plus the transfer rows of the other model; the
    # checks' Square and saturation attacks white-box and transferred, their convergence re-run white-box
    assert len(summary["results"]) == len(MODELS) * (len(settings) + 1) + (len(settings) - 1) + 3 * 2 + 2
    for model in MODELS:
        for setting in settings:
            r = _result(summary, model, setting)
            assert set(r) >= {"metric_per_case", "mean", "foreground_mean", "model", "attack", "eps"}
            assert len(r["metric_per_case"]) == 2 and set(r["mean"]) == {"1", "2"}
            for case in r["metric_per_case"]:
                assert set(case["metrics"]["1"]) >= {"Dice", "IoU", "HD95", "TP", "FP", "FN", "n_ref", "n_pred"}
                assert case["metrics"]["1"]["HD95"] >= 0
    pgd = _result(summary, MODELS[0], ATTACKS[0])
    assert pgd["eps"] == 16 and all(0 <= c["ASR"] <= 1 for c in pgd["metric_per_case"])
    assert all(0 < c["SSIM"] <= 1 and c["PSNR"] > 0 for c in pgd["metric_per_case"])
    transfer = _result(summary, MODELS[1], ATTACKS[0], crafted_on=MODELS[0])
    assert transfer["prediction_folder"].endswith(f"__from_{MODELS[0]}")
    # same weights and seed: the transferred attack is the white-box one, case by case
    assert [c["metrics"] for c in transfer["metric_per_case"]] == [c["metrics"] for c in pgd["metric_per_case"]]
    # the adversarial images are kept next to the predictions
    readable = sorted(p.name.rsplit("-", 1)[0] for p in (out / "adversarial" / MODELS[0]).iterdir())
    checks = ["square_eps-16_queries-3", "pgd_eps-64_alpha-32_steps-5"]
    mine = ["pgd_eps-16_steps-2_alpha-8", "vafa-3d_q_max-20_steps-2_block_size-16",
            "vafa-3d-ref_q_max-20_steps-2_block_size-16_rescale_tile-16", "slice-rescale_rescale_tile-16",
            *[f"ifgsm-targeted_steps-2_eps-{e}" for e in SWEEP]]
    # the convergence check re-ran the strongest white-box attack of the four with twice its steps
    convergence = [r for r in readable if r not in mine + checks]
    assert len(convergence) == 1 and "steps-4" in convergence[0], readable
    assert readable == sorted(mine + checks + convergence)


def test_vafa_variants_side_by_side_and_named(report):
    """The VAFA hybrid (the authors' quantisation with CE), the authors' variant and the rescale-only control
    are separate columns of report.md, each attack named with what it is; attack.json records the variant."""
    text = (report["out"] / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model | clean |"))
    assert all(attack in header for attack in ATTACKS[1:])
    assert "`vafa-3d` VAFA-3D: the authors' quantisation (q from q_max, q_min 5) with CE" in text
    assert "`vafa-3d-ref` VAFA-3D as the authors' code runs it" in text
    assert "`slice-rescale` control: the authors' per-slice rescale of VAFA alone" in text
    from nnunet_adv.attack_config import AttackConfig

    # the folder's tag ends in a hash of every setting (the evaluation adds its own, e.g. EOT)
    readable = AttackConfig.parse(ATTACKS[2]).tag.rsplit("-", 1)[0]
    folder, = [p for p in (report["out"] / "adversarial" / MODELS[0]).iterdir() if p.name.rsplit("-", 1)[0] == readable]
    record = json.loads((folder / "attack.json").read_text())["attack"]
    assert record["name"] == "vafa-3d-ref" and "authors' code" in record["summary"]
    assert record["options"]["rescale_tile"] == [16, 16, 16] and record["options"]["renormalize_slices"] is True
    rescaled = _result(report["summary"], MODELS[0], ATTACKS[3])
    assert np.mean([c["ASR"] for c in rescaled["metric_per_case"]]) > 0  # the stretch alone changes predictions


def test_attacks_change_predictions(report):
    summary = report["summary"]
    pgd = _result(summary, MODELS[0], ATTACKS[0])
    assert np.mean([c["ASR"] for c in pgd["metric_per_case"]]) > 0.01
    assert pgd["foreground_mean"]["Dice"] < _result(summary, MODELS[0], "clean")["foreground_mean"]["Dice"]
    assert all(c["ASR"] is None for c in _result(summary, MODELS[0], "clean")["metric_per_case"])


def test_checks_in_the_report_and_the_worst_case_over_everything_run(report):
    """report.md's Checks section and summary.json's ``checks``: every check per model with numbers and a
    status; the worst case takes the lowest Dice per case over the attacks, the checks' Square and
    convergence re-run and the transfer attack (never the saturation attack, another budget)."""
    summary, text = report["summary"], (report["out"] / "report.md").read_text()
    names = ["gradient", "loss rises", "gradient-free or transfer", "saturation", "convergence"]
    assert set(summary["checks"]) == set(MODELS)
    for model in MODELS:
        found = summary["checks"][model]
        assert list(found) == names
        assert all(c["status"] in ("pass", "warn") and c["numbers"] and c["finding"] for c in found.values()), found
        assert 0 <= found["gradient"]["numbers"]["zero_fraction"] < 0.5  # a real network's gradient is dense
        assert found["saturation"]["numbers"]["dice"] == pytest.approx(
            _result(summary, model, "pgd:eps=64,alpha=32,steps=5")["foreground_mean"]["Dice"], abs=0.15)
        for name in names:
            assert any(line.startswith(f"| {model} | {name} |") for line in text.splitlines()), (model, name)
        # a warning marks the model's worst case untrustworthy in report.md, else every check passed
        warned = any(c["status"] == "warn" for c in found.values())
        assert (f"**The worst-case Dice of {model} is not trustworthy.**" in text) == warned
        assert (f"{model}: every check passed." in text) == (not warned)
    assert "## Checks: can the worst case be trusted?" in text
    # Square on whole volumes through the sliding window: one forward per query and the start, no gradient
    square = next((report["out"] / "adversarial" / MODELS[0]).glob("square_eps-16_queries-3-*"))
    for case in json.loads((square / "attack.json").read_text())["cases"].values():
        assert case["attack_forwards"] == 4 and case["input_gradient"] is None and case["objective_trace"] == []
        assert max(case["linf_raw"]) > 0  # it moved the image
    pgd = next((report["out"] / "adversarial" / MODELS[0]).glob("pgd_eps-16_steps-2_alpha-8-*"))
    for case in json.loads((pgd / "attack.json").read_text())["cases"].values():
        assert len(case["objective_trace"]) == 2 and case["input_gradient"]["l1"] > 0
    # the worst case over everything run at the evaluation's budgets
    copy = MODELS[1]
    worst = _result(summary, copy, "worst case", crafted_on=copy)["metric_per_case"]
    members = [r for r in summary["results"] if r["model"] == copy and r["kind"] in ("attack", "check: gradient-free",
                                                                                     "check: convergence")
               and r["attack"] != "slice-rescale:rescale_tile=16"]
    assert any(r["crafted_on"] == MODELS[0] for r in members) and any(r["kind"] == "check: convergence"
                                                                       for r in members)
    for i, case in enumerate(worst):
        lowest = min(r["metric_per_case"][i]["foreground_dice"] for r in members)
        assert case["foreground_dice"] == pytest.approx(lowest)


def _nnunet_evaluate(tree, pred_folder, out_json):
    model = tree.model_folder(MODELS[0])
    tree.run("nnUNetv2_evaluate_folder", tree.dataset / "labelsTs", pred_folder, "-djfile", model / "dataset.json",
             "-pfile", model / "plans.json", "-o", out_json, "-np", 1)
    return json.loads(out_json.read_text())


@pytest.mark.parametrize("model,attack,crafted_on", [(MODELS[0], "clean", None), (MODELS[1], "clean", None),
                                                     (MODELS[0], ATTACKS[0], "self"), (MODELS[1], ATTACKS[1], "self"),
                                                     (MODELS[1], ATTACKS[0], MODELS[0])])
def test_numbers_agree_with_nnunet_evaluate_folder(report, tmp_path, model, attack, crafted_on):
    out, summary = report["out"], report["summary"]
    ours = _result(summary, model, attack, crafted_on)
    theirs = _nnunet_evaluate(report["tree"], out / ours["prediction_folder"], tmp_path / "summary.json")
    for key in ("Dice", "IoU", "TP", "FP", "FN"):
        assert ours["foreground_mean"][key] == pytest.approx(theirs["foreground_mean"][key], rel=1e-9, nan_ok=True)
        for label in ("1", "2"):
            assert ours["mean"][label][key] == pytest.approx(theirs["mean"][label][key], rel=1e-9, nan_ok=True)
    if crafted_on in (None, "self"):  # the paper table of report.md prints these numbers
        row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith(f"| {model} |"))
        columns = ["clean", *ATTACKS]
        cell = row.strip("|").split("|")[1 + columns.index(attack)].strip()
        assert cell.startswith(f"{theirs['foreground_mean']['Dice']:.3f} (")


def test_metrics_csv_rows(report):
    rows = list(csv.DictReader(open(report["out"] / "metrics.csv")))
    n_results = len(report["summary"]["results"])
    assert len(rows) == n_results * 2 * 2  # x cases x classes
    assert {r["class"] for r in rows} == {"1", "2"} and {r["model"] for r in rows} == set(MODELS)
    sweep = [r for r in rows if r["attack"].startswith("ifgsm-targeted") and r["crafted_on"] == r["model"]]
    assert sorted({float(r["eps"]) for r in sweep}) == [float(e) for e in SWEEP]
    summary = report["summary"]
    r = _result(summary, MODELS[0], ATTACKS[0])
    case = r["metric_per_case"][0]
    row = next(x for x in rows if x["model"] == MODELS[0] and x["attack"] == ATTACKS[0] and x["class"] == "1"
               and x["crafted_on"] == MODELS[0] and case["reference_file"].endswith(x["case"] + ".nii.gz"))
    assert float(row["dice"]) == pytest.approx(case["metrics"]["1"]["Dice"], rel=1e-5, nan_ok=True)
    assert float(row["hd95_mm"]) == pytest.approx(case["metrics"]["1"]["HD95"], rel=1e-5)


def _png_size(path):
    image = sitk.ReadImage(str(path))  # a PNG reader: checks the file is a valid PNG
    return image.GetSize()[:2]


def test_figures_are_valid_pngs_of_the_expected_size(report):
    out = report["out"]
    assert _png_size(out / "robustness_curve.png") == curve_figure_size()
    assert _png_size(out / "examples.png") == examples_figure_size(len(MODELS) * NUM_EXAMPLES)
    assert _png_size(out / "saliency.png") == saliency_figure_size(NUM_EXAMPLES, len(MODELS))
    text = (out / "report.md").read_text()
    assert "![robustness_curve.png](robustness_curve.png)" in text and "## Transfer attacks" in text


def test_saliency_inside_the_structures_per_model(report):
    """--saliency's number: each model's share of the input gradient inside the labelled structures, per
    case and averaged, in summary.json and report.md; the copy has the same weights, so the same numbers."""
    saliency, text = report["summary"]["saliency"], (report["out"] / "report.md").read_text()
    assert set(saliency) == set(MODELS)
    for model in MODELS:
        found = saliency[model]
        assert set(found["per_case"]) == {"case_0006", "case_0007"}
        assert all(0 < c["inside_share"] < 1 and 0 < c["structure_fraction"] < 1 for c in found["per_case"].values())
        assert found["inside_share"] == pytest.approx(np.mean([c["inside_share"] for c in found["per_case"].values()]))
    assert saliency[MODELS[0]] == saliency[MODELS[1]]
    section = text[text.index("## Saliency inside the labelled structures"):]
    row = next(line for line in section.splitlines() if line.startswith(f"| {MODELS[0]} |"))
    assert row.split(" | ")[1] == f"{saliency[MODELS[0]]['inside_share']:.3f}"


def test_continue_recomputes_nothing(report):
    out, tree = report["out"], report["tree"]
    kept = {p: p.stat().st_mtime_ns for sub in ("adversarial", "predictions", "metrics", "saliency")
            for p in (out / sub).rglob("*") if p.is_file()}
    assert len(kept) > 50
    proc = tree.run(*_evaluate_args(tree, out, "--attacks", *ATTACKS, "--eps_sweep", *SWEEP,
                                    "--sweep_attack", "ifgsm-targeted:steps=2", "--transfer_from", MODELS[0],
                                    "--saliency", "--num_examples", NUM_EXAMPLES, "--continue"))
    assert "computed this run: nothing (all reused)" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert json.loads((out / "summary.json").read_text())["results"] == report["summary"]["results"]


def test_existing_report_needs_continue(report, capsys, monkeypatch):
    from nnunet_adv.cli.evaluate import main

    tree = report["tree"]
    tree.set_in_process(monkeypatch)
    before = {p: p.stat().st_mtime_ns for p in report["out"].rglob("*")}
    assert main([str(a) for a in _evaluate_args(tree, report["out"], "--attacks", ATTACKS[0])[1:]]) == 2
    err = capsys.readouterr().err
    assert "--continue" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in report["out"].rglob("*")} == before


# ------------------------------------------------------------------------------------------ bad input
def _copy_data(tree, tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(tree.dataset / "imagesTs", images)
    shutil.copytree(tree.dataset / "labelsTs", labels)
    return images, labels


def _bad_label_value(tree, tmp_path):
    images, labels = _copy_data(tree, tmp_path)
    first = sorted(labels.iterdir())[0]
    image = sitk.ReadImage(str(first))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = 7
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    sitk.WriteImage(bad, str(first))
    return {"-i": [images], "-l": [labels]}, f"case {first.name[:-7]}: {first.name}: label values [7] are not labels"


def _missing_label(tree, tmp_path):
    images, labels = _copy_data(tree, tmp_path)
    gone = sorted(labels.iterdir())[-1]
    gone.unlink()
    return {"-i": [images], "-l": [labels]}, f"case {gone.name[:-7]}: no label file"


def _other_dataset(tree, tmp_path):
    fake = tmp_path / "OtherTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(tree.model_folder(MODELS[0]), fake)
    plans = json.loads((fake / "plans.json").read_text())
    plans["dataset_name"] = "Dataset999_Other"
    (fake / "plans.json").write_text(json.dumps(plans))
    return ({"-m": [tree.model_folder(MODELS[0]), fake], "-d": None, "-c": None, "-tr": None},
            "OtherTrainer__nnUNetPlans__3d_fullres was trained on Dataset999_Other")


BAD = {
    "label value not in dataset.json": _bad_label_value,
    "missing label": _missing_label,
    "model of another dataset": _other_dataset,
    "attack string": lambda tree, tmp: ({"--attacks": ["pgd:eps=4,stepz=3"]}, "attack 'pgd:eps=4,stepz=3'"),
    "unparsable attack string": lambda tree, tmp: ({"--attacks": ["pgd:eps=4,=3"]}, "cannot parse"),
    "unknown attack": lambda tree, tmp: ({"--attacks": ["pgdx"]}, "unknown attack 'pgdx'"),
    "transfer source": lambda tree, tmp: ({"--transfer_from": ["nnUNetTrainerNope"]},
                                          "--transfer_from nnUNetTrainerNope"),
    "tile batch size": lambda tree, tmp: ({"--tile_batch_size": ["0"]}, "--tile_batch_size must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_error(report, tmp_path, case, capsys, monkeypatch):
    """In process (fast): exit code 2, one line naming the problem, nothing written."""
    from nnunet_adv.cli.evaluate import main

    tree = report["tree"]
    overrides, expected = BAD[case](tree, tmp_path)
    args = {"-i": [tree.dataset / "imagesTs"], "-l": [tree.dataset / "labelsTs"], "-o": [tmp_path / "report"],
            "-d": [DATASET_ID], "-c": ["3d_fullres"], "-tr": MODELS, "--attacks": [ATTACKS[0]], "-device": ["cpu"]}
    args.update(overrides)
    argv = [str(x) for flag, values in args.items() if values is not None for x in (flag, *values)]
    tree.set_in_process(monkeypatch)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "report").exists()  # nothing written on a refused run
