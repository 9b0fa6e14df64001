"""nnUNetv2_adv_study end to end on the real-MRI test tree (tiny schedules, one-step attacks): it trains the
clean model and the fine-tuned ones with nnUNetv2_train, evaluates them per eps, writes the table, the
curve and study.json; --continue reuses everything; bad input is one line and changes nothing."""
import json
import shutil

import pytest
from nnunet_tree import DATASET_ID

pytestmark = pytest.mark.e2e

SMOKE = ["--clean_schedule", "1x2", "--finetune_schedule", "1x2", "--recipes", "nnUNetTrainerPGDAT",
         "--eps_sweep", "4", "8", "--attack_steps", "1", "-device", "cpu", "--disable_progress_bar"]


@pytest.fixture(scope="module")
def study(nnunet_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s0"
    proc = nnunet_tree.run("nnUNetv2_adv_study", "-d", DATASET_ID, "-o", out, *SMOKE, timeout=1800)
    return nnunet_tree, out, proc


def test_the_study_trains_fine_tunes_evaluates_and_writes_one_table(study):
    tree, out, proc = study
    assert "1/3 the clean model" in proc.stdout and "3/3 evaluation 3/3 (vafa-gn)" in proc.stdout
    results = tree.results / "Dataset901_AdvTestMRI"
    names = sorted(p.name for p in results.iterdir() if "seed-0" in p.name)
    assert names == ["nnUNetTrainerClean_ep-1_its-2_valits-2_valsteps-1_seed-0__nnUNetPlans__2d",
                     "nnUNetTrainerClean_lr-0.01_ep-1_its-2_valits-2_valsteps-1_seed-0__nnUNetPlans__2d",
                     "nnUNetTrainerPGDAT_steps-3_alphaeps-0.833_ep-1_its-2_valits-2_valsteps-1_seed-0__nnUNetPlans__2d"]
    record = json.loads((out / "study.json").read_text())
    rows = {r["model"]: r for r in record["results"]}
    assert list(rows) == ["clean-continued", "nnUNetTrainerPGDAT"] and record["cases"] == 2
    for r in rows.values():
        # the worst case is per case the minimum: never above any of its attacks, and the L-inf-only one >= it
        lp = [v for a, v in r["attacks"].items() if a.split(":")[0] in ("pgd", "apgd-rog", "segpgd", "cospgd")]
        assert r["worst_case_lp"] <= min(lp) + 1e-9 and r["worst_case"] <= r["worst_case_lp"] + 1e-9
        assert set(r["worst_case_lp_vs_eps"]) == {"4", "8"} and r["train_seconds"] > 0
        # the curve's Jaccard panel: the Jaccard of each case's worst attack (it used to be left empty)
        jaccard = [r["clean_jaccard"], *r["worst_case_lp_jaccard_vs_eps"].values()]
        assert set(r["worst_case_lp_jaccard_vs_eps"]) == {"4", "8"} and all(0 <= j <= 1 for j in jaccard)
        # the report eps ran ROG's complete AutoAttack and the checks; both count in its worst case
        assert r["worst_case_lp"] <= r["attacks"]["autoattack-rog:eps=4,steps=1,restarts=1,queries=10"] + 1e-9
        assert set(r["checks"]) == {"gradient", "loss rises", "gradient-free or transfer", "saturation", "convergence"}
        assert set(r["checks"].values()) <= {"pass", "warn"}
        assert r["worst_case_lp_vs_eps"]["4"] == r["worst_case_lp"]
    assert any(a.startswith("square:eps=4,queries=10") for a in record["check_attacks"])
    assert rows["nnUNetTrainerPGDAT"]["attack_steps_per_iteration"] == 3.0
    assert (rows["clean-continued"]["attack_steps_per_iteration"] == 0.0
            and rows["clean-continued"]["cost_vs_clean"] == 1)
    # the evaluation's own reports: one per eps (worst-case row over that eps' attacks) and VAFA/GN
    for folder in ("eps-4", "eps-8", "vafa-gn"):
        report = (out / "evaluation" / folder / "report.md").read_text()
        assert "worst case" in report
    table = (out / "study.md").read_text()
    assert "| clean-continued |" in table and "worst L-inf (eps 4)" in table and "vafa-3d-ref" in table
    header = next(line for line in table.splitlines() if line.startswith("| model | clean |"))
    assert "| autoattack-rog |" in header and "| square |" in header and "| checks |" in header
    assert "## Checks: can the worst case be trusted?" in (out / "evaluation" / "eps-4" / "report.md").read_text()
    assert "## Checks" not in (out / "evaluation" / "eps-8" / "report.md").read_text()
    assert (out / "worst_case_vs_eps.png").stat().st_size > 0


def test_continue_reuses_every_model_and_result(study):
    tree, out, _ = study
    before = (out / "study.md").read_text()
    proc = tree.run("nnUNetv2_adv_study", "-d", DATASET_ID, "-o", out, *SMOKE, "--continue")
    assert "$ nnUNetv2_train" not in proc.stdout and proc.stdout.count("reusing") == 3
    assert (out / "study.md").read_text() == before


def test_combine_gives_mean_and_spread_over_seeds(study, tmp_path):
    tree, out, _ = study
    other = tmp_path / "s1"
    shutil.copytree(out, other)
    record = json.loads((other / "study.json").read_text())
    record["settings"]["seed"] = 1
    for r in record["results"]:
        r["clean"] += 0.1
    (other / "study.json").write_text(json.dumps(record))
    text = tree.run("nnUNetv2_adv_study", "--combine", out, other).stdout
    first = json.loads((out / "study.json").read_text())["results"][0]
    assert "Mean over seeds 0, 1" in text
    assert f"| clean-continued | {first['clean'] + 0.05:.3f} (0.100) |" in text
    record["settings"]["fold"] = 3
    (other / "study.json").write_text(json.dumps(record))
    proc = tree.run("nnUNetv2_adv_study", "--combine", out, other, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith("the studies to combine differ in more than the seed")


@pytest.mark.parametrize("extra, message", [
    (["--recipes", "nnUNetTrainerPGDATT"], "unknown recipe(s) nnUNetTrainerPGDATT; recipes: "),
    (["--finetune_schedule", "0x50"], "the finetune schedule must have at least one epoch of one iteration, got 0x50"),
    (["--clean_schedule", "2xfifty"], "expected EPOCHSxITERATIONS (e.g. 6x50), got '2xfifty'"),
    (["--eps_sweep", "0"], "eps values must be > 0"),
])
def test_bad_input_is_one_line_and_writes_nothing(nnunet_tree, tmp_path, capsys, monkeypatch, extra, message):
    """The command's main() in this process, with the tree's nnU-Net folders (the study's own process
    is tested by the other tests here)."""
    from nnunet_adv.cli.study import main

    nnunet_tree.set_in_process(monkeypatch)
    out = tmp_path / "study"
    assert main([str(a) for a in ["-d", DATASET_ID, "-o", out, *extra]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert message in err and not out.exists()


def test_an_existing_study_is_not_overwritten_and_a_foreign_clean_model_is_refused(study, tmp_path):
    tree, out, _ = study
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = tree.run("nnUNetv2_adv_study", "-d", DATASET_ID, "-o", out, *SMOKE, check=False)
    assert proc.returncode == 2 and "exists and is not empty: use --continue" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    clean = next(p for p in (tree.results / "Dataset901_AdvTestMRI").iterdir()
                 if p.name.startswith("nnUNetTrainerClean_ep-1"))
    proc = tree.run("nnUNetv2_adv_study", "-d", DATASET_ID, "-o", tmp_path / "gpu", "--profile", "gpu",
                    "--clean_model", clean, check=False)
    assert (proc.returncode == 2
            and "is of Dataset901_AdvTestMRI 2d, not Dataset901_AdvTestMRI 3d_fullres" in proc.stderr)
    assert not (tmp_path / "gpu").exists()
