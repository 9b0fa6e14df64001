"""``nnUNetv2_adv_evaluate``: how much does each model's segmentation degrade under attack?

For every model: nnU-Net's prediction of the clean images, then for every attack (and every eps
of the sweep) the whole-volume attack of ``nnUNetv2_adv_attack`` crafted on that model (or, with
``--transfer_from``, on the source model), nnU-Net's own prediction of the adversarial images,
and metrics with nnU-Net's ``compute_metrics`` plus HD95, attack success rate and image
similarity. Writes into the report folder:

    summary.json          nnU-Net's summary layout per (model, attack), with ``model`` / ``attack`` keys
    metrics.csv           one row per model x attack x eps x case x class
    report.md             the paper table (mean foreground Dice and HD95), sweep, transfer, ROG fraction
    robustness_curve.png  Dice and Jaccard vs eps per model (with --eps_sweep)
    examples.png          central slices: image, perturbation, adversarial image, predictions, labels
    saliency.png          input-gradient saliency per model (with --saliency; report.md and summary.json
                          then give each model's share of it inside the labelled structures)
    adversarial/MODEL/ATTACK/       the adversarial images and attack.json
    predictions/MODEL/SETTING/      nnU-Net's predictions
    metrics/MODEL/SETTING.json      per-case metrics

Everything is kept, so ``--continue`` recomputes nothing that exists and is still valid: results made
from an image or label that changed since (SHA-256) are recomputed, saying so, and a cached result
that no longer matches its checksum is recomputed with a warning. See docs/evaluate.md.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import List

from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_adv.cli.common import CLIError, OneLineArgumentParser, at_least_one, cli_main, pick_device
from nnunet_adv.errors import UserError
from nnunet_adv.evaluation.pipeline import EvaluationRun, RobustnessEvaluation, labelled_cases
from nnunet_adv.evaluation.plan import (
    Model,
    Setting,
    attack_settings,
    check_settings,
    corruption_settings,
    sweep_settings,
    worst_case_setting,
)
from nnunet_adv.records import check_part
from nnunet_adv.volume import folders
from nnunet_adv.volume.cascade_options import DEFAULT_GRADIENT, GRADIENTS
from nnunet_adv.volume.folders import check_folders, configuration_of

SWEEP_ATTACK_DEFAULT = "ifgsm-targeted"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="nnUNetv2_adv_evaluate", allow_abbrev=False,
                description="Robustness report of trained nnU-Net models: clean and adversarial predictions with "
                            "nnU-Net's own predictor, nnU-Net's metrics plus HD95, attack success rate and image "
                            "similarity; summary.json, metrics.csv, report.md and figures.")
    g = p.add_argument_group("data")
    g.add_argument("-i", required=True, help="folder of test images (CASE_XXXX.ext, nnU-Net's naming); never modified")
    g.add_argument("-l", required=True, help="folder of reference segmentations (CASE.ext, labelsTr naming)")
    g.add_argument("-o", required=True, help="report folder (new, or an earlier report with --continue)")
    m = p.add_argument_group("models (-d/-c/-tr as nnUNetv2_predict, several trainers; or -m MODEL_FOLDER ...)")
    m.add_argument("-d", default=None, help="dataset name or id")
    m.add_argument("-c", default=None, help="configuration (e.g. 3d_fullres)")
    m.add_argument("-tr", nargs="+", default=None, help="trainer(s), one model each (default nnUNetTrainer)")
    m.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    m.add_argument("-m", nargs="+", default=None, help="trained model folder(s) instead of -d/-c/-tr/-p")
    m.add_argument("-f", nargs="+", default=None,
                   help="fold(s) of every model (default 0, or the folds of --inference_information; several = "
                        "ensemble)")
    m.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    m.add_argument("--inference_information", nargs="?", const="", default=None, metavar="JSON",
                   help="also evaluate what nnUNetv2_find_best_configuration selected, as deployed: its "
                        "inference_information.json (alone: the one of -d in nnUNet_results); an ensemble of "
                        "configurations is attacked through all its members at once and predicted with "
                        "nnUNetv2_predict --save_probabilities per member, nnUNetv2_ensemble and "
                        "nnUNetv2_apply_postprocessing")
    a = p.add_argument_group("attacks")
    a.add_argument("--attacks", nargs="*", default=[], metavar="NAME:KEY=VALUE,...",
                   help="attacks as 'pgd:eps=4,steps=20' 'vafa-3d:q_max=20,steps=20,block_size=32' 'gn:std=4' "
                        "(options and units as nnUNetv2_adv_attack: eps/alpha/std in x/255 of the intensity window)")
    a.add_argument("--eps_sweep", nargs="*", type=float, default=[],
                   help="eps values (x/255) of a sweep with --sweep_attack (e.g. 0.5 1 2 4 8 16 32)")
    a.add_argument("--sweep_attack", default=SWEEP_ATTACK_DEFAULT,
                   help=f"attack of the sweep, with options as in --attacks but without eps "
                        f"(default {SWEEP_ATTACK_DEFAULT}: NLCEN's targeted iterative FGSM; without steps it "
                        f"takes NLCEN's min(eps + 4, ceil(1.25 eps)) iterations of 1/255)")
    a.add_argument("--transfer_from", default=None,
                   help="also evaluate every other model on the adversarial images crafted on this model "
                        "(black-box transfer); a trainer of -tr (or a model folder name of -m)")
    a.add_argument("--corruptions", nargs="*", default=[], metavar="NAME[:SEVERITY]",
                   help="natural corruptions with TorchIO (pip install \"nnunet_adv[corruptions]\"): "
                        "noise blur bias motion ghosting spike gamma lowres, or all; a name alone runs severities "
                        "1-5, NAME:S one severity (table in docs/evaluate.md)")
    a.add_argument("--nsd_tolerance", nargs="+", type=float, default=[1.0], metavar="MM",
                   help="tolerance of the normalised surface Dice in mm: one value, or one per foreground class "
                        "(default 1)")
    eot = a.add_mutually_exclusive_group()
    eot.add_argument("--eot_mirroring", dest="eot_mirroring", action="store_true", default=None,
                     help="attack the mirroring average (nnU-Net's test-time augmentation); the default whenever "
                          "predictions use test-time mirroring, so the attacks see what they are measured on")
    eot.add_argument("--no_eot_mirroring", dest="eot_mirroring", action="store_false",
                     help="attack the plain network even though predictions use test-time mirroring (cheaper; the "
                          "attacks' effect is then underestimated: the report says so)")
    a.add_argument("--previous_stage_gradient", choices=GRADIENTS, default=DEFAULT_GRADIENT,
                   help="3d_cascade_fullres models: the attacks' gradient through the 3d_lowres stage, its softmax "
                        "('softmax', default) or none ('fixed': held at its clean prediction); the report says which")
    c = p.add_argument_group("checks (docs/evaluate.md: how to make a robustness claim)")
    c.add_argument("--no_checks", dest="checks", action="store_false",
                   help="leave out the checks (gradient masking, loss, gradient-free/transfer, saturation, "
                        "convergence) and the attacks they add: the report then cannot say whether its worst case "
                        "can be trusted")
    c.add_argument("--check_queries", type=int, default=100,
                   help="queries of the gradient-free Square attack the checks add (default 100; one forward each)")
    c.add_argument("--check_factor", type=int, default=5,
                   help="the convergence check re-runs the strongest single white-box attack (a preset only if "
                        "alone) with this many times its steps (default 5)")
    a.add_argument("--seed", type=int, default=0, help="seed of the attacks (default 0)")
    a.add_argument("--tile_batch_size", type=int, default=1,
                   help="sliding-window tiles per network call in the attacks (as nnUNetv2_adv_attack; default 1)")
    r = p.add_argument_group("prediction and report")
    r.add_argument("--disable_tta", action="store_true",
                   help="predict without test-time mirroring (as nnUNetv2_predict --disable_tta; faster)")
    r.add_argument("--saliency", action="store_true",
                   help="also draw input-gradient saliency maps per model and report each model's share of the "
                        "saliency inside the labelled structures")
    r.add_argument("--num_examples", type=int, default=2, help="cases shown in examples.png (default 2)")
    r.add_argument("-device", default=None, choices=("cpu", "cuda", "mps"),
                   help="device (default cuda if available, else cpu)")
    r.add_argument("-num_parts", type=int, default=1,
                   help="split the work over this many runs (as nnUNetv2_predict; parts may run at once on other "
                        "GPUs or machines sharing the report folder); then run once without it and with --continue "
                        "to write the report")
    r.add_argument("-part_id", type=int, default=0, help="which part this run computes (0 .. num_parts - 1)")
    r.add_argument("--continue", dest="resume", action="store_true",
                   help="resume the report in -o: reuse every adversarial image, prediction and metric there")
    r.add_argument("--disable_progress_bar", action="store_true", help="no tqdm bars")
    return p


def models_of(a) -> List[Model]:
    """The models the flags name (-m folders, or -d/-c/-tr/-p); all of one dataset."""
    a.f = a.f or (None if a.inference_information is not None else ["0"])
    if a.inference_information is not None:
        from nnunet_adv.volume.deployed_ensemble import read_inference_information  # torch: once the flags are read

        deployed = read_inference_information(a.inference_information or None, a.d)
        a.f = a.f or [str(f) for f in deployed.folds]
        models = [Model(deployed.name if deployed.is_ensemble else deployed.members[0].name, deployed.members[0],
                        members=tuple(deployed.members[1:]), postprocessing=deployed.postprocessing_file)]
        if a.m is not None or a.c is not None:
            raise CLIError("give either --inference_information or the models (-m, or -d/-c/-tr/-p), not both")
    elif a.m is not None:
        if a.d is not None or a.tr is not None:
            raise CLIError("give either -m MODEL_FOLDER ... or -d DATASET -c CONFIGURATION -tr TRAINER ..., not both")
        models = [Model(Path(f).resolve().name, Path(f)) for f in a.m]
    else:
        if a.d is None or a.c is None:
            raise CLIError("the models are missing: give -d DATASET -c CONFIGURATION -tr TRAINER ... "
                           "or -m MODEL_FOLDER ...")
        results = folders.dataset_results_folder(a.d)
        models = [Model(t, results / f"{t}__{a.p}__{a.c}") for t in (a.tr or ["nnUNetTrainer"])]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise CLIError(f"a model is given twice: {', '.join(names)}")
    for model in models:
        for folder in (model.folder, *model.members):
            folders.check_model_folder(folder)
            for fold in a.f:
                ckpt = folder / f"fold_{fold}" / a.chk
                if not ckpt.is_file():
                    raise CLIError(f"model {model.name}: checkpoint {ckpt} does not exist")
    reference = json.loads((models[0].folder / "plans.json").read_text())["dataset_name"]
    labels = json.loads((models[0].folder / "dataset.json").read_text())["labels"]
    for model in models[1:]:
        dataset = json.loads((model.folder / "plans.json").read_text())["dataset_name"]
        other = json.loads((model.folder / "dataset.json").read_text())["labels"]
        if dataset != reference or other != labels:
            raise CLIError(f"model {model.name} was trained on {dataset}, not on {reference} like "
                           f"{models[0].name}: models of one report must share the dataset")
    return models


def settings_of(a) -> List[Setting]:
    """clean, the --attacks strings and their worst case, the sweep points, the corruptions; no
    setting twice."""
    out = [Setting("clean")] + attack_settings(a.attacks, a.seed)
    out += worst_case_setting(out)
    if a.checks:
        out += check_settings(out, a.seed, a.check_queries)
    if a.eps_sweep:
        for eps in a.eps_sweep:
            if not (math.isfinite(eps) and eps > 0):
                raise CLIError(f"--eps_sweep values must be finite numbers > 0 (x/255 of the window), got {eps:g}")
        out += sweep_settings(a.sweep_attack, a.eps_sweep, a.seed)
    out += corruption_settings(a.corruptions)
    tags = [s.tag for s in out]
    duplicates = sorted({t for t in tags if tags.count(t) > 1})
    if duplicates:
        raise CLIError(f"attack {duplicates[0]!r} is given twice")
    seen = {}  # canonical settings -> label: pgd:eps=4 and pgd:eps=4.0 are one attack, computed once
    for s in out:
        if s.attack is not None:
            canonical = s.attack.settings_hash()
            if canonical in seen:
                raise CLIError(f"attacks {seen[canonical]!r} and {s.label!r} are the same setting; give it once")
            seen[canonical] = s.label
    return out


def say_with_clock(started: float):
    def say(text: str) -> None:
        print(f"[nnUNetv2_adv_evaluate {time.time() - started:5.0f} s] {text}", flush=True)
    return say


def run(a, argv: List[str]) -> int:

    say = say_with_clock(time.time())
    if a.num_examples < 0:
        raise CLIError("--num_examples must be >= 0")
    if not all(math.isfinite(t) and t > 0 for t in a.nsd_tolerance):
        raise CLIError(f"--nsd_tolerance must be > 0 mm, got {' '.join(f'{t:g}' for t in a.nsd_tolerance)}")
    at_least_one("--tile_batch_size", a.tile_batch_size)
    at_least_one("--check_queries", a.check_queries)
    at_least_one("--check_factor", a.check_factor)
    part = check_part(a.num_parts, a.part_id)
    models = models_of(a)
    settings = settings_of(a)
    source = None
    if a.transfer_from is not None:
        source = next((m for m in models if m.name == a.transfer_from), None)
        if source is None:
            raise CLIError(f"--transfer_from {a.transfer_from}: not one of the models "
                           f"({', '.join(m.name for m in models)})")
        if len(models) < 2:
            raise CLIError("--transfer_from needs at least two models")
    root = Path(a.o)
    check_folders(Path(a.i), root, Path(a.l))
    if root.exists() and not root.is_dir():
        raise CLIError(f"the report path {root} is a file, not a folder; choose another (-o)")
    if root.exists() and any(not p.name.startswith(".") for p in root.iterdir()) and not a.resume \
            and a.num_parts == 1:
        raise CLIError(f"report folder {root} exists and is not empty: use --continue to resume it or "
                       f"choose a new folder (nothing was changed)")
    dataset_json = json.loads((models[0].folder / "dataset.json").read_text())
    plans = json.loads((models[0].folder / "plans.json").read_text())
    for setting in settings:
        if setting.attack is not None:
            try:
                setting.attack.check_for(plans, configuration_of(models[0].folder), dataset_json)
            except UserError as e:
                raise CLIError(f"attack {setting.label!r}: {e}") from None
    rw = recursive_find_reader_writer_by_name(plans["image_reader_writer"])()
    cases = labelled_cases(Path(a.i), Path(a.l), dataset_json, rw, attacked=any(s.attack for s in settings))
    classes = len(_foreground(dataset_json))
    if len(a.nsd_tolerance) not in (1, classes):
        raise CLIError(f"--nsd_tolerance takes one value or one per foreground class ({classes}), got "
                       f"{len(a.nsd_tolerance)}")
    device = pick_device(a.device)
    evaluation = RobustnessEvaluation(EvaluationRun(
        models=models, settings=settings, images=Path(a.i), labels=Path(a.l), cases=cases, output=root,
        dataset_json=dataset_json, plans=plans, folds=[f if f == "all" else int(f) for f in a.f],
        checkpoint=a.chk, device=device, transfer_from=source,
        eot_mirroring=(not a.disable_tta) if a.eot_mirroring is None else a.eot_mirroring,
        tile_batch_size=a.tile_batch_size, tta=not a.disable_tta, saliency=a.saliency, num_examples=a.num_examples,
        progress=not a.disable_progress_bar, resume=a.resume or part is not None, seed=a.seed, part=part,
        nsd_tolerance=a.nsd_tolerance[0] if len(a.nsd_tolerance) == 1 else list(a.nsd_tolerance),
        checks=a.checks, check_factor=a.check_factor,
        command=shlex.join(["nnUNetv2_adv_evaluate", *argv]), previous_stage_gradient=a.previous_stage_gradient),
        log=say)
    text = evaluation.execute()
    if part is None:
        say(f"done: {root / 'report.md'}")
        print("\n" + text)
    return 0


def _foreground(dataset_json: dict) -> list:
    lm = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    return list(lm.foreground_regions if lm.has_regions else lm.foreground_labels)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(lambda: run(build_parser().parse_args(argv), argv),
                    resume_hint="re-run the same command with --continue to resume (finished results are kept)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
