"""The before/after table of docs/evidence.md from finished studies (``nnUNetv2_adv_study``): on the
same models, the worst case over the attack set the evidence used to report (PGD, APGD, SegPGD, CosPGD)
against the worst case over everything the study now runs at the report's eps (those four, ROG's
complete AutoAttack, the checks' Square and convergence re-run), and the share of the baseline's
worst-case drop each recipe recovers under each.

    python benchmarks/evidence_table.py STUDY [STUDY ...]       (one study folder per seed)

Reads ``STUDY/study.json``'s settings and ``STUDY/evaluation/eps-E/`` (E: the report's eps): metrics.csv
and summary.json's checks. Dice: per
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
    """(seed, eps, {model: row}) of one study; reads the report eps' evaluation (its metrics.csv and
    summary.json's checks), so it works as soon as that evaluation is done, before the study's others."""
    settings = json.loads((folder / "study.json").read_text())["settings"]
    eps = settings["report_eps"]
    evaluation = folder / "evaluation" / f"eps-{eps:g}"
    dice = per_case_dice(evaluation / "metrics.csv")
    checks = json.loads((evaluation / "summary.json").read_text())["checks"]
    saturation = "pgd:eps=64"
    rows = {}
    for model in dict.fromkeys(m for (m, _) in dice):
        texts = [a for (m, a) in dice if m == model and a != "clean" and not a.startswith(saturation)]
        previous = [a for a in texts if a.split(":")[0] in PREVIOUS_SET and "x the steps" not in a]
        rows[model] = {"clean": worst(dice, model, ["clean"]), "previous": worst(dice, model, previous),
                       "complete": worst(dice, model, texts),
                       "checks": {name: c["status"] for name, c in checks[model].items()}}
    base = rows[BASELINE]
    for r in rows.values():
        for kind in ("previous", "complete"):
            drop = base["clean"] - base[kind]
            r[f"recovered_{kind}"] = (r[kind] - base[kind]) / drop if r is not base and drop > 0 else None
    return settings["seed"], eps, rows


def attack_costs(folder: Path, eps: float):
    """{attack folder tag: (mean seconds per case, mean forwards per case)} over the models of the report
    eps' evaluation (attack.json's per-case ``seconds`` and ``attack_forwards``)."""
    cost = defaultdict(list)
    for record in sorted((folder / "evaluation" / f"eps-{eps:g}" / "adversarial").glob("*/*/attack.json")):
        tag = record.parent.name.rsplit("-", 1)[0]
        cases = json.loads(record.read_text())["cases"].values()
        cost[tag] += [(c["seconds"], c.get("attack_forwards") or 0) for c in cases if c.get("status") == "ok"]
    return {tag: (sum(s for s, _ in v) / len(v), sum(f for _, f in v) / len(v)) for tag, v in cost.items() if v}


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
    print("\nCost of each attack at the report's eps (mean over models and cases; one study per line block):\n")
    print("| seed | attack (folder tag) | seconds per case | forwards per case | seconds vs the PGD at that eps |")
    print("|---|---|---|---|---|")
    for folder in args.studies:
        seed, eps, _ = study_rows(folder)
        costs = attack_costs(folder, eps)
        pgd = next((v[0] for t, v in costs.items() if t.startswith(f"pgd_eps-{eps:g}_steps")), None)
        for tag, (seconds, forwards) in sorted(costs.items(), key=lambda kv: kv[1][0]):
            ratio = f"{seconds / pgd:.1f}" if pgd else "n/a"
            print(f"| {seed} | {tag} | {seconds:.1f} | {forwards:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
