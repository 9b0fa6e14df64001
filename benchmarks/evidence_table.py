"""The before/after table of docs/evidence.md from finished studies (``nnUNetv2_adv_study``): on the
same models, the worst case over the attack set the evidence used to report (PGD, APGD, SegPGD, CosPGD)
against the worst case over everything the study now runs at the report's eps (those four, ROG's
complete AutoAttack, the checks' Square and convergence re-run), and the share of the baseline's
worst-case drop each recipe recovers under each.

    python benchmarks/evidence_table.py STUDY [STUDY ...]       (one study folder per seed)

Reads ``STUDY/study.json`` and ``STUDY/evaluation/eps-E/metrics.csv`` (E: the report's eps). Dice: per
case the mean over foreground classes (nnU-Net's), per case the lowest over the attacks of a set
(AutoAttack's rule), then the mean over cases. Recovered share: (worst(recipe) - worst(baseline)) /
(clean(baseline) - worst(baseline)). Prints a markdown table: one row per study and model.
"""
import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

#: the attack set the evidence reported before the complete AutoAttack (attack names before ':')
PREVIOUS_SET = ("pgd", "apgd-rog", "segpgd", "cospgd")
BASELINE = "clean-continued"


def per_case_dice(metrics_csv: Path):
    """{(model, attack text): {case: mean foreground Dice}} of the white-box rows (crafted on the model)."""
    classes = defaultdict(lambda: defaultdict(list))
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row["crafted_on"] not in ("", row["model"]) or row["attack"] == "worst case":
                continue
            classes[(row["model"], row["attack"])][row["case"]].append(float(row["dice"]))
    return {key: {case: sum(v) / len(v) for case, v in cases.items()} for key, cases in classes.items()}


def worst(dice, model: str, attacks) -> float:
    """Mean over cases of the per-case lowest Dice over ``attacks`` (attack texts) of ``model``."""
    cases = sorted(dice[(model, attacks[0])])
    return sum(min(dice[(model, a)][c] for a in attacks) for c in cases) / len(cases)


def study_rows(folder: Path):
    study = json.loads((folder / "study.json").read_text())
    eps = study["settings"]["report_eps"]
    dice = per_case_dice(folder / "evaluation" / f"eps-{eps:g}" / "metrics.csv")
    saturation = "pgd:eps=64"
    rows = {}
    for model in [r["model"] for r in study["results"]]:
        texts = [a for (m, a) in dice if m == model and a != "clean" and not a.startswith(saturation)]
        previous = [a for a in texts if a.split(":")[0] in PREVIOUS_SET and "x the steps" not in a]
        rows[model] = {"clean": worst(dice, model, ["clean"]), "previous": worst(dice, model, previous),
                       "complete": worst(dice, model, texts),
                       "checks": study["results"][[r["model"] for r in study["results"]].index(model)]["checks"]}
    base = rows[BASELINE]
    for r in rows.values():
        for kind in ("previous", "complete"):
            drop = base["clean"] - base[kind]
            r[f"recovered_{kind}"] = (r[kind] - base[kind]) / drop if r is not base and drop > 0 else None
    return study["settings"]["seed"], eps, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", type=Path)
    args = parser.parse_args()
    print("| seed | model | clean | worst, previous set | worst, complete set | change | recovered, previous "
          "| recovered, complete | checks |")
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in args.studies:
        seed, eps, rows = study_rows(folder)
        for model, r in rows.items():
            share = {k: "n/a" if r[f"recovered_{k}"] is None else f"{100 * r[f'recovered_{k}']:.0f}%"
                     for k in ("previous", "complete")}
            warned = [name for name, status in r["checks"].items() if status != "pass"]
            print(f"| {seed} | {model} | {r['clean']:.3f} | {r['previous']:.3f} | {r['complete']:.3f} | "
                  f"{r['complete'] - r['previous']:+.3f} | {share['previous']} | {share['complete']} | "
                  f"{'pass' if not warned else 'warn: ' + ', '.join(warned)} |")


if __name__ == "__main__":
    main()
