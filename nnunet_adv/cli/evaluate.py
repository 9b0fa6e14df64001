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
    saliency.png          input-gradient saliency per model (with --saliency)
    adversarial/MODEL/ATTACK/       the adversarial images and attack.json
    predictions/MODEL/SETTING/      nnU-Net's predictions
    metrics/MODEL/SETTING.json      per-case metrics

Everything is kept, so ``--continue`` recomputes nothing that exists. See docs/evaluate.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nnunet_adv.cli.common import (CLIError, OneLineArgumentParser, cli_main, dataset_results_folder,
                                   pick_device)
from nnunet_adv.robustness_report import ReportFolder

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
    m.add_argument("-f", nargs="+", default=["0"], help="fold(s) of every model (default 0; several = ensemble)")
    m.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
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
    a.add_argument("--eot_mirroring", action="store_true",
                   help="attack the mirroring average (nnU-Net's test-time augmentation) instead of the plain network")
    a.add_argument("--seed", type=int, default=0, help="seed of the attacks (default 0)")
    a.add_argument("--tile_batch_size", type=int, default=1,
                   help="sliding-window tiles per network call in the attacks (as nnUNetv2_adv_attack; default 1)")
    r = p.add_argument_group("prediction and report")
    r.add_argument("--disable_tta", action="store_true",
                   help="predict without test-time mirroring (as nnUNetv2_predict --disable_tta; faster)")
    r.add_argument("--saliency", action="store_true", help="also draw input-gradient saliency maps per model")
    r.add_argument("--num_examples", type=int, default=2, help="cases shown in examples.png (default 2)")
    r.add_argument("-device", default=None, choices=("cpu", "cuda", "mps"),
                   help="device (default cuda if available, else cpu)")
    r.add_argument("--continue", dest="resume", action="store_true",
                   help="resume the report in -o: reuse every adversarial image, prediction and metric there")
    r.add_argument("--disable_progress_bar", action="store_true", help="no tqdm bars")
    return p


@dataclass
class Model:
    name: str
    folder: Path


@dataclass
class Setting:
    """One column of the report: clean, an attack of --attacks, or one eps of the sweep."""

    label: str
    spec: object = None  # AttackSpec, None for clean
    sweep: bool = False

    @property
    def tag(self) -> str:
        return "clean" if self.spec is None else self.spec.tag

    @property
    def eps(self) -> Optional[float]:
        return 0.0 if self.spec is None else self.spec.eps


@dataclass
class Evaluation:
    """Predictions of ``model`` on the images of ``setting`` crafted on ``source``."""

    model: Model
    setting: Setting
    source: Optional[Model]  # None: clean images

    @property
    def transfer(self) -> bool:
        return self.source is not None and self.source.name != self.model.name

    @property
    def key(self) -> str:
        return self.setting.tag + (f"__from_{self.source.name}" if self.transfer else "")


class EvaluateCommand:
    def __init__(self, args, argv: List[str]):
        self.args, self.argv = args, argv
        self.started = time.time()
        self.root = Path(args.o)
        self.folder = ReportFolder(self.root)
        self.folds = [f if f == "all" else int(f) for f in args.f]
        self.done_work: List[str] = []  # what this run computed: "attack ...", "prediction ...", ...
        self._predictors: Dict[str, object] = {}  # model name -> initialised nnUNetPredictor
        self._attack_models: Dict[str, object] = {}  # model name -> TrainedModel (saliency)

    def say(self, text: str) -> None:
        print(f"[nnUNetv2_adv_evaluate {time.time() - self.started:5.0f} s] {text}", flush=True)

    # ------------------------------------------------------------------------------ inputs
    def models(self) -> List[Model]:
        a = self.args
        if a.m is not None:
            if a.d is not None or a.tr is not None:
                raise CLIError("give either -m MODEL_FOLDER ... or -d DATASET -c CONFIGURATION -tr TRAINER ..., not both")
            models = [Model(Path(f).resolve().name, Path(f)) for f in a.m]
        else:
            if a.d is None or a.c is None:
                raise CLIError("the models are missing: give -d DATASET -c CONFIGURATION -tr TRAINER ... "
                               "or -m MODEL_FOLDER ...")
            results = dataset_results_folder(a.d)
            models = [Model(t, results / f"{t}__{a.p}__{a.c}") for t in (a.tr or ["nnUNetTrainer"])]
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise CLIError(f"a model is given twice: {', '.join(names)}")
        for model in models:
            self._check_model(model)
        reference = json.loads((models[0].folder / "plans.json").read_text())["dataset_name"]
        labels = json.loads((models[0].folder / "dataset.json").read_text())["labels"]
        for model in models[1:]:
            dataset = json.loads((model.folder / "plans.json").read_text())["dataset_name"]
            other = json.loads((model.folder / "dataset.json").read_text())["labels"]
            if dataset != reference or other != labels:
                raise CLIError(f"model {model.name} was trained on {dataset}, not on {reference} like "
                               f"{models[0].name}: models of one report must share the dataset")
        return models

    def _check_model(self, model: Model) -> None:
        folder = model.folder
        if not folder.is_dir():
            raise CLIError(f"model folder {folder} does not exist")
        for required in ("plans.json", "dataset.json"):
            if not (folder / required).is_file():
                raise CLIError(f"{folder} is not a trained nnU-Net model folder (no {required})")
        for fold in self.args.f:
            ckpt = folder / f"fold_{fold}" / self.args.chk
            if not ckpt.is_file():
                raise CLIError(f"model {model.name}: checkpoint {ckpt} does not exist")

    def settings(self) -> List[Setting]:
        from nnunet_adv.attack_spec import parse_attack_spec
        from nnunet_adv.attacks.targeted import nlcen_iterations

        a = self.args
        out = [Setting("clean")]
        for text in a.attacks:
            out.append(Setting(text, parse_attack_spec(text)))
        if a.eps_sweep:
            base = a.sweep_attack
            base_spec = parse_attack_spec(base)
            if any(key in ("eps", "eps_raw") for key, _ in base_spec.options):
                raise CLIError(f"--sweep_attack {base!r}: leave eps out, --eps_sweep sets it")
            nlcen_rule = base_spec.name == "ifgsm-targeted" and "steps" not in dict(base_spec.options)
            for eps in a.eps_sweep:
                text = f"{base}{',' if ':' in base else ':'}eps={eps:g}"
                if nlcen_rule:  # NLCEN's protocol: alpha 1/255, iterations from eps
                    text += f",steps={nlcen_iterations(eps)}"
                out.append(Setting(text, parse_attack_spec(text), sweep=True))
        tags = [s.tag for s in out]
        duplicates = sorted({t for t in tags if tags.count(t) > 1})
        if duplicates:
            raise CLIError(f"attack {duplicates[0]!r} is given twice")
        return out

    def cases(self, dataset_json: dict, reader_writer) -> Dict[str, dict]:
        """case -> {'images': [files], 'label': file}; checks labels exist and hold known values."""
        from nnunet_adv.cli.attack import AttackCommand

        ending = dataset_json["file_ending"]
        channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
        found = AttackCommand.cases(Path(self.args.i), ending, channels)
        allowed = _label_values(dataset_json)
        cases = {}
        for case, info in found.items():
            if info["problem"] is not None:
                raise CLIError(info["problem"])
            label = Path(self.args.l) / f"{case}{ending}"
            if not label.is_file():
                raise CLIError(f"case {case}: no label file {label}")
            values = np.unique(reader_writer.read_seg(str(label))[0])
            unknown = sorted(set(values.tolist()) - allowed)
            if unknown:
                raise CLIError(f"case {case}: label file {label} has value(s) {unknown} that dataset.json does not "
                               f"define (labels: {sorted(allowed)})")
            cases[case] = {"images": info["files"], "label": str(label)}
        return cases

    def check_output(self) -> None:
        from nnunet_adv.cli.attack import AttackCommand

        out, i = self.root.resolve(), Path(self.args.i).resolve()
        AttackCommand.check_folders(i, out, Path(self.args.l))
        if out.exists() and any(out.iterdir()) and not self.args.resume:
            raise CLIError(f"report folder {self.root} exists and is not empty: use --continue to resume it or "
                           f"choose a new folder (nothing was changed)")

    # ------------------------------------------------------------------------------ run
    def run(self) -> int:
        from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

        a = self.args
        if a.num_examples < 0:
            raise CLIError("--num_examples must be >= 0")
        if a.tile_batch_size < 1:
            raise CLIError(f"--tile_batch_size must be >= 1, got {a.tile_batch_size}")
        models = self.models()
        settings = self.settings()
        source = None
        if a.transfer_from is not None:
            source = next((m for m in models if m.name == a.transfer_from), None)
            if source is None:
                raise CLIError(f"--transfer_from {a.transfer_from}: not one of the models ({', '.join(m.name for m in models)})")
            if len(models) < 2:
                raise CLIError("--transfer_from needs at least two models")
        self.check_output()
        dataset_json = json.loads((models[0].folder / "dataset.json").read_text())
        self.file_ending = dataset_json["file_ending"]
        plans = json.loads((models[0].folder / "plans.json").read_text())
        rw = recursive_find_reader_writer_by_name(plans["image_reader_writer"])()
        cases = self.cases(dataset_json, rw)
        self.device = pick_device(a.device)
        self.root.mkdir(parents=True, exist_ok=True)
        self.say(f"{len(models)} model(s), {len(settings)} setting(s), {len(cases)} case(s) on {self.device}; "
                 f"report in {self.root}")

        evaluations = []
        for model in models:
            for setting in settings:
                evaluations.append(Evaluation(model, setting, None if setting.spec is None else model))
        if source is not None:
            for setting in settings[1:]:
                evaluations += [Evaluation(m, setting, source) for m in models if m.name != source.name]

        for setting in settings[1:]:  # attacks first: one attack run per (crafting model, setting)
            for model in models:
                self.attack(model, setting, cases)
        for ev in evaluations:
            self.predict(ev, cases)
        labels = _labels_or_regions(dataset_json)
        summaries = {}
        for ev in evaluations:
            summaries[(ev.model.name, ev.key)] = self.metrics(ev, cases, rw, labels, dataset_json)

        from nnunet_adv import robustness_report as report

        context = report.ReportContext(folder=self.folder, file_ending=self.file_ending, command=shlex.join(["nnUNetv2_adv_evaluate", *self.argv]),
                                       dataset=plans["dataset_name"], models=models, settings=settings,
                                       evaluations=evaluations, summaries=summaries, labels=labels,
                                       tta=not a.disable_tta, eot=a.eot_mirroring, device=self.device,
                                       folds=list(a.f), checkpoint=a.chk, cases=list(cases))
        report.write_summary_json(context)
        report.write_metrics_csv(context)
        figures = report.write_figures(context, cases, rw, a.num_examples)
        if a.saliency:
            figures.append(self.saliency(models, cases, context))
        text = report.write_report_md(context, figures)
        self.say("computed this run: " + (_count_kinds(self.done_work) if self.done_work else "nothing (all reused)"))
        self.say(f"done: {self.root / 'report.md'}")
        print("\n" + text)
        return 0

    # ------------------------------------------------------------------------------ steps
    def adversarial_folder(self, model: Model, setting: Setting) -> Path:
        return self.folder.adversarial(model.name, setting.tag)

    def prediction_folder(self, ev: Evaluation) -> Path:
        return self.folder.predictions(ev.model.name, ev.key)

    def images_of(self, ev: Evaluation, case: str, cases: Dict[str, dict]) -> List[str]:
        if ev.source is None:
            return cases[case]["images"]
        folder = self.adversarial_folder(ev.source, ev.setting)
        return [str(folder / Path(f).name) for f in cases[case]["images"]]

    def attack(self, model: Model, setting: Setting, cases: Dict[str, dict]) -> None:
        from nnunet_adv.cli.attack import main as attack_main

        a = self.args
        out = self.adversarial_folder(model, setting)
        if out.is_dir() and all((out / Path(f).name).is_file() for c in cases.values() for f in c["images"]):
            return
        self.say(f"attacking with {setting.label} on {model.name}")
        argv = ["-i", a.i, "-o", str(out), "-l", a.l, "-m", str(model.folder), "-f", *a.f, "-chk", a.chk,
                *setting.spec.attack_argv(), "-device", self.device, "--continue_prediction",
                "--tile_batch_size", str(a.tile_batch_size)]
        if "--seed" not in argv:
            argv += ["--seed", str(a.seed)]
        if a.eot_mirroring:
            argv.append("--eot_mirroring")
        if a.disable_progress_bar:
            argv.append("--disable_progress_bar")
        if attack_main(argv) != 0:
            raise CLIError(f"attack {setting.label} on {model.name} failed (the error above; per-case reasons in "
                           f"{out / 'attack.json'} if it exists); fix it and re-run with --continue")
        self.done_work.append(f"attack {setting.label} on {model.name}")

    def predict(self, ev: Evaluation, cases: Dict[str, dict]) -> None:
        out = self.prediction_folder(ev)
        missing = [c for c in cases if not (out / f"{c}{self.file_ending}").is_file()]
        if not missing:
            return
        self.say(f"predicting {len(missing)} case(s) of {ev.setting.label}"
                 + (f" crafted on {ev.source.name}" if ev.transfer else "") + f" with {ev.model.name}")
        predictor = self.predictor(ev.model)
        out.mkdir(parents=True, exist_ok=True)
        with _quiet():
            predictor.predict_from_files_sequential([self.images_of(ev, c, cases) for c in missing],
                                                    [str(out / c) for c in missing], save_probabilities=False,
                                                    overwrite=True)
        self.done_work.append(f"prediction {ev.key} with {ev.model.name}")

    def predictor(self, model: Model):
        cache = self._predictors
        if model.name not in cache:
            import torch
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

            device = torch.device(self.device)
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not self.args.disable_tta,
                                        perform_everything_on_device=device.type != "cpu", device=device,
                                        verbose=False, verbose_preprocessing=False,
                                        allow_tqdm=not self.args.disable_progress_bar)
            with _quiet():
                predictor.initialize_from_trained_model_folder(str(model.folder), use_folds=self.folds,
                                                               checkpoint_name=self.args.chk)
            cache[model.name] = predictor
        return cache[model.name]

    def metrics(self, ev: Evaluation, cases: Dict[str, dict], rw, labels, dataset_json) -> dict:
        """nnU-Net-style summary of one evaluation (cached in metrics/MODEL/KEY.json)."""
        from nnunet_adv.robustness_metrics import case_metrics, jsonable_summary, summarize

        cache = self.folder.metrics(ev.model.name, ev.key)
        if cache.is_file():
            return json.loads(cache.read_text())
        ending = self.file_ending
        pred = self.prediction_folder(ev)
        clean = self.prediction_folder(Evaluation(ev.model, Setting("clean"), None))
        ignore = dataset_json["labels"].get("ignore")
        per_case = [case_metrics(cases[c]["label"], str(pred / f"{c}{ending}"), rw, labels, ignore,
                                 None if ev.source is None else str(clean / f"{c}{ending}"))
                    for c in cases]
        summary = jsonable_summary(summarize(per_case, labels))
        if ev.source is not None:
            records = json.loads((self.adversarial_folder(ev.source, ev.setting) / "attack.json").read_text())["cases"]
            for case, entry in zip(cases, summary["metric_per_case"]):
                rec = records.get(case, {})
                entry["SSIM"] = _channel_mean(rec.get("ssim"))
                entry["PSNR"] = _channel_mean(rec.get("psnr"))
                entry["Linf_raw"] = _channel_mean(rec.get("linf_raw"), np.max)
                entry["LPIPS"] = self.lpips(cases[case]["images"], self.images_of(ev, case, cases), rw)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, cache)
        self.done_work.append(f"metrics {ev.key} of {ev.model.name}")
        return summary

    @staticmethod
    def lpips(clean_files: List[str], adversarial_files: List[str], rw) -> Optional[float]:
        """Mean over channels of the slice-wise LPIPS of adversarial vs clean, None if unavailable."""
        from nnunet_adv.metrics import lpips_available, lpips_distance

        if not lpips_available():
            return None
        clean, adv = rw.read_images(clean_files)[0], rw.read_images(adversarial_files)[0]
        values = [lpips_distance(c, a, float(c.max() - c.min())) for c, a in zip(clean, adv)]
        return None if any(v is None for v in values) else float(np.mean(values))

    def saliency(self, models: List[Model], cases: Dict[str, dict], context) -> str:
        """saliency.png for the first --num_examples cases (maps cached in saliency/MODEL/CASE.npz)."""
        from nnunet_adv import robustness_report as report

        chosen = list(cases)[:max(1, self.args.num_examples)]
        slices = {m.name: [self.saliency_slices(m, case, cases[case]) for case in chosen] for m in models}
        maps = {name: [saliency for _, saliency in pairs] for name, pairs in slices.items()}
        first = slices[models[0].name]  # the image panel: the first model's preprocessed grid
        return report.write_saliency(context, [(case, image) for case, (image, _) in zip(chosen, first)], maps)

    def saliency_slices(self, model: Model, case: str, files: dict):
        """(image, saliency) central slices of one case, computed once and cached."""
        cache = self.folder.saliency(model.name, case)
        if not cache.is_file():
            import torch

            from nnunet_adv.saliency import saliency_slices
            from nnunet_adv.trained_model import load_trained_model

            if model.name not in self._attack_models:
                with _quiet():
                    self._attack_models[model.name] = load_trained_model(model.folder, self.folds, self.args.chk,
                                                                         device=torch.device(self.device))
            image, saliency = saliency_slices(self._attack_models[model.name], files["images"], files["label"],
                                              torch.device(self.device))
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, image=image, saliency=saliency)
            self.done_work.append(f"saliency {case} of {model.name}")
        data = np.load(cache)
        return data["image"], data["saliency"]


def _count_kinds(work: List[str]) -> str:
    """'3 attack, 6 prediction, 6 metrics' from the done_work entries (first word = kind)."""
    kinds: Dict[str, int] = {}
    for item in work:
        kinds[item.split()[0]] = kinds.get(item.split()[0], 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in kinds.items())


@contextlib.contextmanager
def _quiet():
    """nnU-Net's predictor prints its trainer search and per-case device notes; the evaluation logs
    its own one line per step instead (errors still reach stderr)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _channel_mean(values, reduce=np.mean) -> Optional[float]:
    """Mean (or ``reduce``) over channels of a per-channel list from attack.json ('inf' kept as inf)."""
    if not values:
        return None
    numbers = [float(v) for v in values if v is not None]
    return float(reduce(numbers)) if numbers else None


def _labels_or_regions(dataset_json: dict) -> list:
    """What nnUNetv2_evaluate_folder evaluates: foreground regions or foreground labels."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    lm = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    return list(lm.foreground_regions if lm.has_regions else lm.foreground_labels)


def _label_values(dataset_json: dict) -> set:
    values = set()
    for v in dataset_json["labels"].values():
        values.update(v if isinstance(v, (list, tuple)) else [v])
    return {int(v) for v in values}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(lambda: EvaluateCommand(build_parser().parse_args(argv), argv).run())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
