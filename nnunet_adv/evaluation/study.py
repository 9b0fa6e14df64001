"""A robustness study on any nnU-Net dataset: the papers' protocol, reproducible by a user.

1. a clean model (``nnUNetTrainerClean``) trained to the profile's schedule, or an existing clean
   model folder reused;
2. every selected recipe fine-tuned from it with ``nnUNetv2_train -pretrained_weights`` for the same
   number of iterations (the papers fine-tune clean models), and the clean model itself trained on
   for those iterations (the fair baseline: it still improves); each with its published attack
   settings unless the profile says otherwise (the CPU profile uses fewer attack steps: see
   :data:`PROFILES`);
3. :class:`nnunet_adv.evaluation.pipeline.RobustnessEvaluation` of every model on the held-out cases:
   PGD, APGD, SegPGD, CosPGD at every eps of the sweep, VAFA (the paper's and the authors' code's),
   Gaussian noise; predictions without test-time mirroring, so every attack is exactly white box;
4. ``study.md`` / ``study.json``: per model the clean Dice, the Dice under each attack at the reporting
   eps, the worst case over the attacks there (AutoAttack's rule per case), training wall time and
   seconds per iteration relative to the clean continuation, robust Dice gained per training hour;
   ``worst_case_vs_eps.png``: worst-case Dice vs eps per model.

Models are nnU-Net model folders in ``$nnUNet_results`` whose trainer names carry the schedule
(``nnUNetTrainerPGDAT_ep-3_its-50_steps-3_alphaeps-0.833``, nnunet_adv.training.names), so a rerun
with ``resume`` reuses every finished model and evaluation.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

from nnunet_adv.attacks import attack_defaults
from nnunet_adv.errors import UserError
from nnunet_adv.evaluation.case_metrics import nan_mean
from nnunet_adv.evaluation.figures import plot_robustness_curve
from nnunet_adv.evaluation.pipeline import EvaluationRun, RobustnessEvaluation, labelled_cases, worst_case_summary
from nnunet_adv.evaluation.plan import Model, Setting, attack_settings, check_settings, worst_case_setting
from nnunet_adv.files import atomic_write_json, atomic_write_text
from nnunet_adv.locks import folder_lock
from nnunet_adv.records import first_difference
from nnunet_adv.training.adversarial_trainer import nnUNetTrainerAdversarial
from nnunet_adv.volume.folders import check_model_folder, configuration_of, dataset_results_folder

#: Per profile: configuration, clean schedule, fine-tuning schedule, validation, per-recipe settings
#: (name items), the eps sweep, the reporting eps, the attacks' steps and tiles per network call.
PROFILES: Dict[str, dict] = {
    # 2 CPU cores: the real-MRI demo dataset's 2d configuration (40 x 40 slices, batch 40). 1000 clean
    # iterations take the clean model past the noise (validation Dice ~0.88 in issue 11's investigation; 300
    # leave the amygdala at 0); 150 fine-tuning iterations are where PGD-AT's robustness showed there. The
    # recipes train with fewer attack steps than published (PGD-AT 3 instead of 10, VAFT 5 instead of 20)
    # to fit the hour; every evaluation attack keeps its published strength.
    "cpu": {"configuration": "2d", "clean": {"ep": 20, "its": 50}, "finetune": {"ep": 3, "its": 50},
            "validation": {"valits": 2, "valsteps": 1}, "eps_sweep": [2.0, 4.0, 8.0], "report_eps": 4.0,
            "attack_steps": None, "tile_batch_size": 40,
            "recipes": ["nnUNetTrainerPGDAT", "nnUNetTrainerVAFT", "nnUNetTrainerSAAT"],
            "recipe_settings": {"nnUNetTrainerPGDAT": "steps-3_alphaeps-0.833", "nnUNetTrainerVAFT": "steps-5",
                                "nnUNetTrainerVAFA": "steps-5", "nnUNetTrainerSAAT": "period-1",
                                "nnUNetTrainerDualNorm": "steps-3_alphaeps-0.833",
                                "nnUNetTrainerDualBN": "steps-3_alphaeps-0.833", "nnUNetTrainerNLCE_VAFT": "steps-5"}},
    # a GPU: 3d_fullres, the recipes' published attack settings
    "gpu": {"configuration": "3d_fullres", "clean": {"ep": 100, "its": 250}, "finetune": {"ep": 20, "its": 250},
            "validation": {"valits": 20, "valsteps": 5}, "eps_sweep": [2.0, 4.0, 8.0], "report_eps": 4.0,
            "attack_steps": None, "tile_batch_size": 8,
            "recipes": ["nnUNetTrainerPGDAT", "nnUNetTrainerVAFT", "nnUNetTrainerSAAT", "nnUNetTrainerDualNorm",
                        "nnUNetTrainerNLCE"],
            "recipe_settings": {}},
}
CLEAN = "nnUNetTrainerClean"
CLEAN_CONTINUED = "clean-continued"
STUDY_JSON = "study.json"
#: steps of the evaluation attacks as published: PGD / SegPGD / CosPGD 10 (VAFA paper's baselines,
#: SegPGD's and CosPGD's papers), APGD as ROG runs it (5 steps x 5 restarts), VAFA 20 (VAFA paper)
PUBLISHED_STEPS = {"lp": 10, "apgd": None, "vafa": 20}


def lp_attacks(eps: float, steps: Optional[int]) -> List[str]:
    """The L-inf attacks of the study at ``eps`` (x/255); ``steps`` overrides every attack's steps."""
    n = steps or PUBLISHED_STEPS["lp"]
    apgd = f"apgd-rog:eps={eps:g}" + (f",steps={steps}" if steps else "")
    return [f"pgd:eps={eps:g},steps={n}", apgd, f"segpgd:eps={eps:g},steps={n}", f"cospgd:eps={eps:g},steps={n}"]


#: a quick study (``--attack_steps N``) gives gradient-free attacks this many queries per gradient step
QUICK_QUERIES_PER_STEP = 10


def complete_attacks(eps: float, steps: Optional[int]) -> List[str]:
    """ROG's complete AutoAttack at ``eps`` (x/255), run at the report's budget; ``steps`` (a quick study)
    also cuts its restarts to 1 and Square's queries to ``QUICK_QUERIES_PER_STEP`` x steps."""
    quick = f",steps={steps},restarts=1,queries={QUICK_QUERIES_PER_STEP * steps}" if steps else ""
    return [f"autoattack-rog:eps={eps:g}{quick}"]


def check_strength(steps: Optional[int]) -> Tuple[int, int]:
    """(Square queries, convergence factor) of the checks: (100, 5) as published, (``QUICK_QUERIES_PER_STEP``
    x steps, 2) for a quick study."""
    return (100, 5) if not steps else (QUICK_QUERIES_PER_STEP * steps, 2)


def other_attacks(steps: Optional[int]) -> List[str]:
    """VAFA with the authors' quantisation and CE (``vafa-3d``) and as the authors' code runs it, the
    authors' rescale alone (a control: how much of their VAFA's drop is the rescale) and Gaussian noise
    (a control of budget)."""
    n = steps or PUBLISHED_STEPS["vafa"]
    return [f"vafa-3d:q_max=20,steps={n},block_size=8", f"vafa-3d-ref:q_max=20,steps={n},block_size=8",
            "slice-rescale", "gn:std=4"]


@dataclass
class StudyRun:
    """What a study needs.

    Attributes: dataset (nnU-Net id or name), output (the study folder), profile (``cpu``/``gpu``),
    recipes (our trainers' base names), fold, device, seed (training: ``seed-N`` in every trainer name,
    so each seed has its own models; attacks), clean_model (an existing clean model folder to fine-tune
    from instead of training one), finetune / clean (schedule overrides ``{"ep": E, "its": I}``),
    images / labels (held-out cases; default the dataset's imagesTs / labelsTs), resume, progress,
    eps_sweep (x/255), attack_steps (overrides the steps of every evaluation attack; None: published), plans (the
    plans identifier every model trains with, nnU-Net's ``-p``: e.g. ``nnUNetResEncUNetMPlans``).
    """

    dataset: str
    output: Path
    profile: str = "cpu"
    recipes: Optional[List[str]] = None
    fold: int = 0
    device: str = "cpu"
    seed: int = 0
    clean_model: Optional[Path] = None
    clean: Optional[Dict[str, int]] = None
    finetune: Optional[Dict[str, int]] = None
    images: Optional[Path] = None
    labels: Optional[Path] = None
    resume: bool = False
    progress: bool = True
    tile_batch_size: Optional[int] = None
    eps_sweep: Optional[List[float]] = None
    attack_steps: Optional[int] = None
    plans: str = "nnUNetPlans"

    @property
    def settings(self) -> dict:
        p = PROFILES[self.profile]
        sweep = sorted(self.eps_sweep or p["eps_sweep"])
        report = next((e for e in sweep if e >= p["report_eps"]), sweep[-1])
        return {**p, "clean": self.clean or p["clean"], "finetune": self.finetune or p["finetune"],
                "recipes": self.recipes or p["recipes"], "eps_sweep": sweep, "report_eps": report,
                "attack_steps": self.attack_steps or p["attack_steps"],
                "tile_batch_size": self.tile_batch_size or p["tile_batch_size"]}


def _bases() -> Dict[str, type]:
    import nnunet_adv.trainers as trainers  # installs our nnU-Net integration: only when a study runs

    return {n: getattr(trainers, n) for n in trainers.__all__ if isinstance(getattr(trainers, n), type)
            and issubclass(getattr(trainers, n), nnUNetTrainerAdversarial) and not n.endswith(("_TestShort",))
            and "AdvDemo" not in n and n not in ("nnUNetTrainerAdversarial", CLEAN)}


def _name(base: str, schedule: Dict[str, int], seed: int, extra: str = "", validation: Optional[dict] = None) -> str:
    items = [f"ep-{schedule['ep']}", f"its-{schedule['its']}"]
    items += [f"{k}-{v}" for k, v in (validation or {}).items()] + [f"seed-{seed}"]
    return "_".join([base] + ([extra] if extra else []) + items)


class Study:
    """Runs a :class:`StudyRun` (module docstring)."""

    def __init__(self, run: StudyRun, log: Callable[[str], None] = print):
        self.run, self.log = run, log
        self.started = time.time()

    # ------------------------------------------------------------------------------ checks
    def validate(self) -> dict:
        """Everything checked before anything is trained or written (one-line errors)."""
        r = self.run
        if r.profile not in PROFILES:
            raise UserError(f"unknown profile {r.profile!r}; profiles: {', '.join(PROFILES)}")
        s = r.settings
        bases = _bases()
        unknown = [n for n in s["recipes"] if n not in bases]
        if unknown:
            raise UserError(f"unknown recipe(s) {', '.join(unknown)}; recipes: {', '.join(sorted(bases))}")
        for which in ("clean", "finetune"):
            if any(int(v) < 1 for v in s[which].values()):
                raise UserError(f"the {which} schedule must have at least one epoch of one iteration, got "
                                f"{s[which]['ep']}x{s[which]['its']}")
        repeated = sorted({e for e in s["eps_sweep"] if s["eps_sweep"].count(e) > 1})
        if repeated:  # one report per eps: a second one would overwrite the first after minutes of work
            raise UserError(f"--eps_sweep gives eps {repeated[0]:g} twice; give each eps once")
        if not all(math.isfinite(e) and e > 0 for e in s["eps_sweep"]) or (s["attack_steps"] or 1) < 1 \
                or s["tile_batch_size"] < 1:
            raise UserError(f"eps values must be > 0, attack steps and tiles per call >= 1, got {s['eps_sweep']}, "
                            f"{s['attack_steps']} and {s['tile_batch_size']}")
        results = dataset_results_folder(r.dataset)
        self.results = results
        self.configuration = s["configuration"]
        self.raw = Path(os.environ.get("nnUNet_raw", "")) / results.name
        plans_file = Path(os.environ.get("nnUNet_preprocessed", "")) / results.name / f"{r.plans}.json"
        if not plans_file.is_file():
            raise UserError(f"no plans {r.plans!r} for {results.name}: {plans_file} is missing (plan it with "
                            f"nnUNetv2_plan_and_preprocess, e.g. -pl nnUNetPlannerResEncM for nnUNetResEncUNetMPlans)")
        if r.clean_model is not None:
            folder = Path(r.clean_model)
            check_model_folder(folder)
            plans = json.loads((folder / "plans.json").read_text())
            if plans["dataset_name"] != results.name or configuration_of(folder) != self.configuration:
                raise UserError(f"the clean model {folder} is of {plans['dataset_name']} {configuration_of(folder)}, "
                                f"not {results.name} {self.configuration}")
            if plans.get("plans_name", "nnUNetPlans") != r.plans:
                raise UserError(f"the clean model {folder} was trained with the plans {plans.get('plans_name')!r}, "
                                f"not {r.plans!r} (-p)")
            if not (folder / f"fold_{r.fold}" / "checkpoint_final.pth").is_file():
                raise UserError(f"the clean model {folder} has no fold_{r.fold}/checkpoint_final.pth")
        out = Path(r.output)
        if out.exists() and not out.is_dir():
            raise UserError(f"the study path {out} is a file, not a folder")
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()) and not r.resume:
            raise UserError(f"study folder {out} exists and is not empty: use --continue to resume it or choose a "
                            f"new folder (nothing was changed)")
        images = Path(r.images) if r.images else self.raw / "imagesTs"
        labels = Path(r.labels) if r.labels else self.raw / "labelsTs"
        if not images.is_dir() or not labels.is_dir():
            raise UserError(f"held-out cases not found: {images} and {labels} (give -i and -l)")
        self.images, self.labels = images, labels
        recorded = out / STUDY_JSON
        settings = {"dataset": results.name, "fold": r.fold, "seed": r.seed, **{k: v for k, v in s.items()}}
        if r.plans != "nnUNetPlans":  # recorded only when set, so studies made before -p existed resume
            settings["plans"] = r.plans
        if recorded.is_file():
            difference = first_difference(json.loads(recorded.read_text()).get("settings"), settings)
            if difference is not None:
                raise UserError(f"{out} is a study with other settings ({difference}); choose a new folder")
        return settings

    # ------------------------------------------------------------------------------ training
    def model_folder(self, trainer: str) -> Path:
        """nnU-Net's folder of ``trainer`` with the study's plans and configuration."""
        return self.results / f"{trainer}__{self.run.plans}__{self.configuration}"

    def train(self, trainer: str, pretrained: Optional[Path]) -> dict:
        """``nnUNetv2_train`` (reused when its checkpoint_final exists); returns timing."""
        folder = self.model_folder(trainer)
        fold = folder / f"fold_{self.run.fold}"
        timing_file = fold / "nnunet_adv_study_timing.json"
        if (fold / "checkpoint_final.pth").is_file() and timing_file.is_file():
            self.log(f"reusing {folder.name}")
            return json.loads(timing_file.read_text())
        cmd = [str(Path(sys.executable).parent / "nnUNetv2_train"), str(self.results.name), self.configuration,
               str(self.run.fold), "-tr", trainer, "-p", self.run.plans, "-device", self.run.device]
        if pretrained is not None:
            cmd += ["-pretrained_weights", str(pretrained)]
        self.log("$ nnUNetv2_train " + " ".join(cmd[1:]))
        started = time.time()
        log_file = Path(self.run.output) / "logs" / f"{trainer}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise UserError(f"nnUNetv2_train {trainer} failed with exit code {proc.returncode} (log: {log_file})")
        wall = time.time() - started
        text = log_file.read_text()
        epochs = [float(v) for v in re.findall(r"Epoch time: ([0-9.]+) s", text)]
        timing = {"wall_seconds": round(wall, 1), "epoch_seconds": epochs, "attack_steps": _attack_steps(trainer, text)}
        atomic_write_json(timing_file, timing)
        self.log(f"trained {trainer} in {wall:.0f} s")
        return timing

    # ------------------------------------------------------------------------------ run
    def evaluations(self, s: dict) -> List[Tuple[str, List[str], bool]]:
        """(report folder, attack strings, checks): one report per eps of the sweep (its worst-case row is
        the worst case over the L-inf attacks at that eps) and one for VAFA's variants and GN. The report's
        eps also runs ROG's complete AutoAttack and the checks (:mod:`nnunet_adv.evaluation.checks`)."""
        steps, report = s["attack_steps"], s["report_eps"]
        return ([(f"eps-{eps:g}", lp_attacks(eps, steps) + (complete_attacks(eps, steps) if eps == report else []),
                  eps == report) for eps in s["eps_sweep"]]
                + [("vafa-gn", other_attacks(steps), False)])

    def execute(self) -> str:
        """Train, evaluate and write the tables (the study folder locked against a second run,
        :mod:`nnunet_adv.locks`); returns study.md's text."""
        settings = self.validate()
        with folder_lock(self.run.output, command=" ".join(sys.argv)):
            return self._execute(settings)

    def _execute(self, settings: dict) -> str:

        r = self.run
        out = Path(r.output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / STUDY_JSON, {"settings": settings})
        s = r.settings
        val = s["validation"]
        timings, models = {}, {}
        if r.clean_model is None:
            clean_name = _name(CLEAN, s["clean"], r.seed, validation=val)
            self.log(f"1/3 the clean model ({s['clean']['ep']} x {s['clean']['its']} iterations)")
            timings["clean"] = self.train(clean_name, None)
            clean_folder = self.model_folder(clean_name)
        else:
            clean_folder = Path(r.clean_model)
            timings["clean"] = {"wall_seconds": None, "epoch_seconds": []}
        checkpoint = clean_folder / f"fold_{r.fold}" / "checkpoint_final.pth"
        # the clean model trained on for the fine-tuning's iterations: the fair baseline (lr-0.01 is nnU-Net's
        # default; it keeps the name apart from the pre-training's when the schedules are equal)
        runs = [(CLEAN_CONTINUED, _name(CLEAN, s["finetune"], r.seed, "lr-0.01", validation=val))]
        runs += [(b, _name(b, s["finetune"], r.seed, s["recipe_settings"].get(b, ""), validation=val))
                 for b in s["recipes"]]
        for i, (label, trainer) in enumerate(runs):
            self.log(f"2/3 fine-tuning {i + 1}/{len(runs)}: {label} ({s['finetune']['ep']} x {s['finetune']['its']} "
                     f"iterations from the clean model)")
            timings[label] = self.train(trainer, checkpoint)
            models[label] = self.model_folder(trainer)

        dataset_json = json.loads((clean_folder / "dataset.json").read_text())
        plans = json.loads((clean_folder / "plans.json").read_text())
        rw = recursive_find_reader_writer_by_name(plans["image_reader_writer"])()
        cases = labelled_cases(self.images, self.labels, dataset_json, rw)
        model_list = [Model(label, folder) for label, folder in models.items()]
        evaluations = self.evaluations(s)
        queries, factor = check_strength(s["attack_steps"])
        for i, (folder, texts, checks) in enumerate(evaluations):
            self.log(f"3/3 evaluation {i + 1}/{len(evaluations)} ({folder}): {', '.join(texts)}"
                     f"{' and the checks' if checks else ''} on {len(model_list)} models x {len(cases)} held-out cases")
            attacks = [Setting("clean")] + attack_settings(texts, r.seed)
            attacks += worst_case_setting(attacks)
            report = out / "evaluation" / folder
            RobustnessEvaluation(EvaluationRun(
                models=model_list, settings=attacks + (check_settings(attacks, r.seed, queries) if checks else []),
                checks=checks, check_factor=factor, images=self.images,
                labels=self.labels, cases=cases, output=report, dataset_json=dataset_json, plans=plans,
                folds=[r.fold], device=r.device, tta=False, eot_mirroring=False, tile_batch_size=s["tile_batch_size"],
                progress=r.progress, resume=report.exists(), seed=r.seed, num_examples=0,
                command=f"nnUNetv2_adv_study -o {out} (evaluation step)"), log=self.log).execute()
        clean_val = _validation_dice(clean_folder / f"fold_{r.fold}")
        return self.write_tables(out, model_list, timings, s, clean_val)

    # ------------------------------------------------------------------------------ tables
    def write_tables(self, out: Path, models, timings: dict, s: dict, clean_val: Optional[float]) -> str:
        """study.json (every number), study.md (the table) and worst_case_vs_eps.png."""
        results: Dict[Tuple[str, str], dict] = {}  # (model, attack) -> that evaluation's summary
        checks, extra = {}, []  # the report eps' checks per model; their attacks that count in its worst case
        for folder, _, with_checks in self.evaluations(s):
            summary = json.loads((out / "evaluation" / folder / "summary.json").read_text())
            for result in summary["results"]:
                if result.get("kind") != "worst case" and result.get("crafted_on") in (None, result["model"]):
                    results[(result["model"], result["attack"])] = result
                if with_checks and result.get("kind") in ("check: gradient-free", "check: convergence") \
                        and result["attack"] not in extra:
                    extra.append(result["attack"])
            if with_checks:
                checks = summary.get("checks", {})
        steps, e = s["attack_steps"], s["report_eps"]
        vafa = other_attacks(steps)[:2]
        linf = lp_attacks(e, steps) + complete_attacks(e, steps) + extra  # everything run at the report eps

        def dice(cases: List[dict]) -> float:
            """Mean over cases of the per-case foreground Dice (NaN cases left out)."""
            return nan_mean([c["foreground_dice"] for c in cases])

        def jaccard(cases: List[dict]) -> float:
            """Mean over cases of the per-case mean foreground IoU."""
            return nan_mean([nan_mean([m["IoU"] for m in c["metrics"].values()]) for c in cases])

        def worst(model: str, attacks: Sequence[str], metric: Callable[[List[dict]], float] = dice) -> float:
            """The evaluation's worst-case rule (AutoAttack's, per case) over ``attacks`` of ``model``."""
            chosen = worst_case_summary([(a, results[(model, a)]) for a in attacks])
            return metric(chosen["metric_per_case"])

        def mean(model: str, attack: str) -> float:
            return dice(results[(model, attack)]["metric_per_case"])

        rows = []
        for m in models:
            timing = timings[m.name]
            iterations = s["finetune"]["ep"] * s["finetune"]["its"]
            per_it = ((float(np.median(timing["epoch_seconds"])) / s["finetune"]["its"])
                      if timing["epoch_seconds"] else None)
            rows.append({"model": m.name, "folder": m.folder.name, "clean": mean(m.name, "clean"),
                         "attacks": {a: mean(m.name, a) for a in linf + other_attacks(steps)},
                         "worst_case": worst(m.name, linf + vafa),
                         "worst_case_lp": worst(m.name, linf),
                         "worst_case_lp_vs_eps": {f"{x:g}": worst(m.name, linf if x == e else lp_attacks(x, steps))
                                                  for x in s["eps_sweep"]},
                         "clean_jaccard": jaccard(results[(m.name, "clean")]["metric_per_case"]),
                         "worst_case_lp_jaccard_vs_eps": {
                             f"{x:g}": worst(m.name, linf if x == e else lp_attacks(x, steps), jaccard)
                             for x in s["eps_sweep"]},
                         "checks": {name: c["status"] for name, c in checks.get(m.name, {}).items()},
                         "train_seconds": timing["wall_seconds"], "iterations": iterations,
                         "attack_steps_per_iteration": timing.get("attack_steps"),
                         "seconds_per_iteration": per_it})
        base = next(r for r in rows if r["model"] == CLEAN_CONTINUED)
        for r in rows:
            r["cost_vs_clean"] = (r["seconds_per_iteration"] / base["seconds_per_iteration"]
                                  if r["seconds_per_iteration"] and base["seconds_per_iteration"] else None)
            hours = (r["train_seconds"] or 0) / 3600.0
            r["robust_dice_per_hour"] = (None if r is base or not hours
                                         else (r["worst_case"] - base["worst_case"]) / hours)
        record = {"settings": json.loads((out / STUDY_JSON).read_text())["settings"], "clean_model": {
            "validation_dice": clean_val, "train_seconds": timings["clean"]["wall_seconds"]}, "results": rows,
            "check_attacks": extra, "checks": checks,
            "cases": len(results[(rows[0]["model"], "clean")]["metric_per_case"])}
        atomic_write_json(out / STUDY_JSON, record)
        curves = {r["model"]: {"eps": [0.0] + list(s["eps_sweep"]),
                               "dice": [r["clean"]] + list(r["worst_case_lp_vs_eps"].values()),
                               "jaccard": [r["clean_jaccard"]] + list(r["worst_case_lp_jaccard_vs_eps"].values())}
                  for r in rows}
        plot_robustness_curve(curves, out / "worst_case_vs_eps.png", x_label="eps (x/255 of the intensity window)",
                              title="worst case over PGD, APGD, SegPGD, CosPGD")
        text = study_markdown(record, title=f"Robustness study: {self.results.name}, {self.configuration}, profile "
                                            f"{self.run.profile}, seed {self.run.seed}")
        atomic_write_text(out / "study.md", text)
        self.log(f"study written in {time.time() - self.started:.0f} s: {out / 'study.md'}")
        return text


def _attack_steps(trainer: str, log_text: str) -> float:
    """Attack gradient steps per training iteration: SAAT's m per epoch from its log (mean), else the
    recipe's attack steps; 0 for clean training."""
    import nnunet_adv.trainers as trainers  # as in _bases

    cls = getattr(trainers, trainer)
    if not cls.adversarial_loss_weight:
        return 0.0
    m = [int(v) for v in re.findall(r"SAAT: ([0-9]+) attack iteration\(s\) per batch this epoch", log_text)]
    if m:
        return float(np.mean(m))
    return float(cls.attack_kwargs.get("steps", attack_defaults(cls.attack_name).get("steps", 1)))


def _validation_dice(fold: Path) -> Optional[float]:
    """nnU-Net's final validation: mean foreground Dice (``validation/summary.json``)."""
    summary = fold / "validation" / "summary.json"
    if not summary.is_file():
        return None
    return float(json.loads(summary.read_text())["foreground_mean"]["Dice"])


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _short(attack: str) -> str:
    """A column header: the attack's name (``pgd 5x steps`` for the convergence check's re-run)."""
    rerun = re.search(r"\((\d+)x the steps of", attack)
    return attack.split(":")[0] + (f" {rerun.group(1)}x steps" if rerun else "")


def study_markdown(record: dict, title: str) -> str:
    """The table of one study (``study.json``'s record)."""
    s, rows = record["settings"], record["results"]
    e, steps = s["report_eps"], s["attack_steps"]
    extra = record.get("check_attacks", [])
    attacks = lp_attacks(e, steps) + complete_attacks(e, steps) + extra + other_attacks(steps)
    cm = record["clean_model"]
    header = ["model", "clean"] + [_short(a) for a in attacks] + [f"worst L-inf (eps {e:g})",
              "worst incl. VAFA", "checks", "train s", "s / it vs clean", "attack steps / it", "robust Dice / h"]
    lines = [f"# {title}", "",
             f"Clean model ({CLEAN}, {s['clean']['ep']} x {s['clean']['its']} iterations): nnU-Net validation Dice "
             f"{_f(cm['validation_dice'])}, trained in {_f(cm['train_seconds'], 0)} s. "
             "Every row fine-tuned from it for "
             f"{s['finetune']['ep']} x {s['finetune']['its']} iterations with `nnUNetv2_train -pretrained_weights` "
             f"({CLEAN_CONTINUED}: the clean model trained on alike, the baseline). Mean foreground Dice on "
             f"{record['cases']} held-out volumes, predicted without test-time mirroring (every attack white box). "
             f"L-inf attacks at eps {e:g}/255 of each volume's intensity window: "
             + ", ".join(f"`{a}`" for a in lp_attacks(e, steps) + complete_attacks(e, steps) + extra)
             + " (ROG's complete AutoAttack; the checks' gradient-free Square and convergence re-run)"
             + "; VAFA: " + ", ".join(
                 f"`{a}`" for a in other_attacks(steps)[:2]) + "; `slice-rescale` (the authors' rescale alone) "
             "and `gn:std=4` "
             "(noise): controls, not in the worst case. "
             "Worst case: per case the lowest Dice over the attacks (AutoAttack's rule), then the mean. "
             "Robust Dice / h: worst case incl. VAFA gained over the baseline per hour of fine-tuning.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join([r["model"], _f(r["clean"])] + [_f(r["attacks"][a]) for a in attacks] + [
            _f(r["worst_case_lp"]), _f(r["worst_case"]), _checks_cell(r.get("checks")), _f(r["train_seconds"], 0),
            _f(r["cost_vs_clean"], 2),
            _f(r.get("attack_steps_per_iteration"), 1), _f(r["robust_dice_per_hour"], 3)]) + " |")
    lines += ["", f"Checks (evaluation/eps-{e:g}/report.md has their numbers): a worst case is trustworthy only where "
              "every check passes; `warn: ...` names the checks that failed (docs/evaluate.md).", "",
              f"Worst case over PGD, APGD, SegPGD, CosPGD vs eps (x/255; at eps {e:g} also ROG's complete AutoAttack "
              "and the checks' attacks):", "",
              "| model | clean | " + " | ".join(f"eps {x:g}" for x in s["eps_sweep"]) + " |",
              "|---|---|" + "---|" * len(s["eps_sweep"])]
    for r in rows:
        lines.append(f"| {r['model']} | {_f(r['clean'])} | " + " | ".join(
            _f(v) for v in r["worst_case_lp_vs_eps"].values()) + " |")
    lines += ["", "![worst case vs eps](worst_case_vs_eps.png)", ""]
    return "\n".join(lines)


def _checks_cell(checks: Optional[dict]) -> str:
    """'pass', 'warn: gradient, convergence' or 'n/a' (no checks ran) for the table."""
    if not checks:
        return "n/a"
    warned = [name for name, status in checks.items() if status == "warn"]
    return "warn: " + ", ".join(warned) if warned else "pass"


def combine_studies(folders: Sequence[Path]) -> str:
    """Mean and spread (max - min) over studies of the same settings but the seed: one table."""
    records = [json.loads((Path(f) / STUDY_JSON).read_text()) for f in folders]
    if any("results" not in r for r in records):
        raise UserError("every study to combine must be finished (study.json has no results yet)")
    settings = [{k: v for k, v in r["settings"].items() if k != "seed"} for r in records]
    if any(x != settings[0] for x in settings[1:]):
        raise UserError("the studies to combine differ in more than the seed")
    seeds = [r["settings"]["seed"] for r in records]
    keys = [("clean", "clean"), ("worst_case_lp", "worst L-inf"), ("worst_case", "worst incl. VAFA"),
            ("cost_vs_clean", "s / it vs clean"), ("attack_steps_per_iteration", "attack steps / it")]
    lines = [f"Mean over seeds {', '.join(map(str, seeds))} (spread: max - min)", "",
             "| model | " + " | ".join(label for _, label in keys) + " | recovered share of the baseline's worst-case "
             "drop |", "|---|" + "---|" * (len(keys) + 1)]
    for i, row in enumerate(records[0]["results"]):
        cells = []
        for key, _ in keys:
            values = [r["results"][i][key] for r in records]
            cells.append("n/a" if any(v is None for v in values) else
                         f"{np.mean(values):.3f} ({np.max(values) - np.min(values):.3f})")
        shares = []
        for r in records:
            base = next(x for x in r["results"] if x["model"] == CLEAN_CONTINUED)
            drop = base["clean"] - base["worst_case"]
            shares.append((r["results"][i]["worst_case"] - base["worst_case"]) / drop if drop > 0 else math.nan)
        cells.append(" / ".join(_f(v, 2) for v in shares))
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
