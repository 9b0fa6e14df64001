"""The demo: the whole story on real MRI, from an empty folder to a robustness report.

In a new folder: build the real-MRI demo dataset (:mod:`nnunet_adv.demo.data`), plan and
preprocess it with ``nnUNetv2_plan_and_preprocess``, train a clean model and a PGD adversarially
trained one (fine-tuned from the clean model, as the papers do) with ``nnUNetv2_train``, then
attack both on the held-out test cases and write the robustness report with
:class:`nnunet_adv.evaluation.pipeline.RobustnessEvaluation`. nnU-Net's steps run through
nnU-Net's own commands (subprocesses, as a user runs them, each in its own process group so that
Ctrl-C ends it quietly: :mod:`nnunet_adv.subprocesses`); the evaluation runs in process.

``demo.json`` records the demo's settings and its finished steps: an interrupted demo resumed with
``resume`` (``nnUNetv2_adv_demo --continue``) skips the finished steps, continues an unfinished
training from its latest checkpoint (``nnUNetv2_train --c``) and reuses every finished result of
the evaluation.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

from nnunet_adv.demo.data import DEFAULT_NAME, _validate, build_demo_dataset
from nnunet_adv.errors import UserError
from nnunet_adv.evaluation.pipeline import EvaluationRun, RobustnessEvaluation, labelled_cases
from nnunet_adv.evaluation.plan import Model, Setting, attack_settings, sweep_settings, worst_case_setting
from nnunet_adv.files import atomic_write_json
from nnunet_adv.locks import folder_lock
from nnunet_adv.records import ensure_writable, first_difference
from nnunet_adv.subprocesses import run_command

#: nnU-Net configuration per device: the demo dataset's 2d slices on a CPU (20 minutes on 2 cores),
#: 3d_fullres on a GPU
CONFIGURATIONS = {"cpu": "2d", "mps": "2d", "cuda": "3d_fullres"}

# Attacks of the demo report at the budget of the VAFA paper's voxel-attack baselines (x/255 of each
# image's intensity window): the strong L-inf attacks (their worst case is the robustness number), Gaussian
# noise as a control, and an FGSM eps sweep for the robustness curve.
DEMO_ATTACKS = ("pgd:eps=4,steps=10", "apgd-ce:eps=4,steps=10", "segpgd:eps=4,steps=10", "cospgd:eps=4,steps=10",
                "gn:std=4")
DEMO_EPS_SWEEP = (2.0, 4.0, 8.0)
DEMO_SWEEP_ATTACK = "fgsm"


@dataclass
class DemoRun:
    """The demo's settings: ``output`` a new folder; ``device`` ``"cpu"`` (short schedule) or
    ``"cuda"`` (longer one); the dataset id, train/test case counts and the seed of the dataset's
    augmentations and of the attacks."""

    output: Path
    device: str = "cpu"
    dataset_id: int = 900
    num_train: int = 20
    num_test: int = 4
    seed: int = 0
    resume: bool = False

    def settings(self) -> dict:
        """What a resumed demo must share with the run that made its folder (``demo.json``)."""
        return {"device": self.device, "dataset_id": self.dataset_id, "num_train": self.num_train,
                "num_test": self.num_test, "seed": self.seed}

    def validate(self) -> None:
        """Every argument checked before anything is created (a refused run leaves nothing)."""
        output = Path(self.output).resolve()
        if output.exists() and not output.is_dir():
            raise UserError(f"{output} is a file, not a folder; choose a new folder with -o (nothing was changed)")
        if output.exists() and not self.resume:
            raise UserError(f"{output} already exists; resume it with --continue, or choose a new folder with -o "
                            f"(nothing was changed)")
        if not isinstance(self.num_test, int) or self.num_test < 1:
            raise UserError(f"--num_test must be >= 1 (the report attacks the held-out test cases), "
                            f"got {self.num_test}")
        _validate(output.parent, self.dataset_id, DEFAULT_NAME, self.num_train, self.num_test, "auto", self.seed)
        if output.exists():
            recorded = _read_state(output).get("settings")
            difference = first_difference(recorded, self.settings())
            if difference is not None:
                raise UserError(f"{output} is a demo with other settings ({difference}); resume it with the same "
                                f"options, or choose a new folder (nothing was changed)")
        ensure_writable(output)


DEMO_JSON = "demo.json"


def _read_state(root: Path) -> dict:
    """``demo.json`` of a demo folder: ``{'settings': ..., 'done': [finished steps]}``."""
    try:
        return json.loads((root / DEMO_JSON).read_text())
    except FileNotFoundError:
        raise UserError(f"{root} is not a demo folder (no {DEMO_JSON}); choose a new folder (nothing was "
                        f"changed)") from None
    except (ValueError, OSError) as e:
        raise UserError(f"{root / DEMO_JSON} cannot be read ({type(e).__name__}); choose a new folder") from None


class Demo:
    def __init__(self, run: DemoRun, log: Callable[[str], None] = print):
        self.run, self.log = run, log
        self.root = Path(run.output).resolve()
        self.raw, self.pre, self.results = (self.root / n
                                            for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        suffix = "GPU" if run.device == "cuda" else "CPU"
        self.configuration = CONFIGURATIONS.get(run.device, "2d")
        # the seed also seeds training (nnunet_adv.training.names: seed-N), so a demo run is repeatable
        self.clean_trainer = f"nnUNetTrainer_AdvDemo{suffix}_seed-{run.seed}"
        self.robust_trainer = f"nnUNetTrainerPGDAT_AdvDemo{suffix}_seed-{run.seed}"
        self.env = dict(os.environ, nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre),
                        nnUNet_results=str(self.results), MPLBACKEND="agg")
        if run.device == "cpu":  # fast settings for a small CPU machine (see README)
            self.env.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnUNet_compile="f")
        self.started = time.time()

    def step(self, text: str) -> None:
        self.log(f"\n[nnunet_adv demo {time.time() - self.started:6.0f} s] {text}")

    def nnunet(self, *args, extra_env=None) -> None:
        """Run one of nnU-Net's commands as a user would (its output goes to the terminal; Ctrl-C ends it
        quietly, :func:`nnunet_adv.subprocesses.run_command`)."""
        cmd = [str(a) for a in args]
        self.log("$ " + " ".join(cmd))
        exe = Path(sys.executable).parent / cmd[0]
        code = run_command([str(exe) if exe.exists() else cmd[0], *cmd[1:]], env=dict(self.env, **(extra_env or {})))
        if code != 0:
            raise UserError(f"'{' '.join(cmd)}' failed with exit code {code} (see its output above)")

    def dataset_folder(self) -> Path:
        return next(self.raw.glob(f"Dataset{self.run.dataset_id:03d}_*"))

    def model_folder(self, trainer: str) -> Path:
        return self.results / self.dataset_folder().name / f"{trainer}__nnUNetPlans__{self.configuration}"

    def execute(self) -> str:
        """Run every step not finished yet (the demo folder locked against a second run,
        :mod:`nnunet_adv.locks`); returns the report's text."""
        self.run.validate()
        with folder_lock(self.root, command=f"nnUNetv2_adv_demo -o {self.root}"):
            return self._execute()

    def _execute(self) -> str:
        state = _read_state(self.root) if (self.root / DEMO_JSON).is_file() else {"settings": self.run.settings(),
                                                                                   "done": []}
        self._save(state)
        for folder in (self.raw, self.pre, self.results):
            folder.mkdir(parents=True, exist_ok=True)
        d = self.run.dataset_id
        if self._todo(state, "dataset", f"building the real-MRI demo dataset in {self.raw}"):
            build_demo_dataset(self.raw, d, num_train=self.run.num_train, num_test=self.run.num_test,
                               seed=self.run.seed, progress=True)
            self._finished(state, "dataset")
        if self._todo(state, "preprocessing", "planning and preprocessing with nnU-Net"):
            # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): it must be >= 1 there
            self.nnunet("nnUNetv2_plan_and_preprocess", "-d", d, "-c", self.configuration, "-np", 1, "-npfp", 1,
                        extra_env={"nnUNet_n_proc_DA": "1"} if self.run.device == "cpu" else None)
            self._finished(state, "preprocessing")
        if self._todo(state, "clean model", f"training the clean model ({self.clean_trainer})"):
            self.train(self.clean_trainer)
            self._finished(state, "clean model")
        clean_ckpt = self.model_folder(self.clean_trainer) / "fold_0" / "checkpoint_final.pth"
        if self._todo(state, "robust model", f"PGD adversarial training ({self.robust_trainer}), fine-tuned from "
                                             f"the clean model"):
            self.train(self.robust_trainer, pretrained=clean_ckpt)
            self._finished(state, "robust model")
        self.step("attacking both models on the held-out test cases and writing the robustness report")
        text = self.evaluate() + "\n" + self.headline()
        self.step(f"done; the report (report.md, summary.json, metrics.csv, figures) is in {self.root / 'report'}")
        return text

    def train(self, trainer: str, pretrained: Optional[Path] = None) -> None:
        """``nnUNetv2_train`` of one model; an interrupted run continues from its latest checkpoint
        (``--c``, which nnU-Net does not combine with ``-pretrained_weights``: the checkpoint holds them)."""
        fold = self.model_folder(trainer) / "fold_0"
        started = any((fold / c).is_file() for c in ("checkpoint_latest.pth", "checkpoint_final.pth"))
        extra = ["--c"] if started else ([] if pretrained is None else ["-pretrained_weights", pretrained])
        self.nnunet("nnUNetv2_train", self.run.dataset_id, self.configuration, 0, "-tr", trainer,
                    "-device", self.run.device, *extra)

    def _todo(self, state: dict, step: str, text: str) -> bool:
        """Whether ``step`` still has to run; says which, and that a finished one is reused."""
        if step in state["done"]:
            self.step(f"{step}: finished by an earlier run, reused")
            return False
        self.step(text)
        return True

    def _finished(self, state: dict, step: str) -> None:
        state["done"].append(step)
        self._save(state)

    def _save(self, state: dict) -> None:
        atomic_write_json(self.root / DEMO_JSON, state)

    def evaluate(self) -> str:


        dataset = self.dataset_folder()
        models = [Model(t, self.model_folder(t)) for t in (self.clean_trainer, self.robust_trainer)]
        seed = self.run.seed
        attacks = [Setting("clean")] + attack_settings(DEMO_ATTACKS, seed)
        settings = attacks + worst_case_setting(attacks) + sweep_settings(DEMO_SWEEP_ATTACK, DEMO_EPS_SWEEP, seed)
        dataset_json = json.loads((models[0].folder / "dataset.json").read_text())
        plans = json.loads((models[0].folder / "plans.json").read_text())
        rw = recursive_find_reader_writer_by_name(plans["image_reader_writer"])()
        cases = labelled_cases(dataset / "imagesTs", dataset / "labelsTs", dataset_json, rw)
        run = EvaluationRun(models=models, settings=settings, images=dataset / "imagesTs", labels=dataset / "labelsTs",
                            cases=cases, output=self.root / "report", dataset_json=dataset_json, plans=plans,
                            folds=[0], device=self.run.device, tta=False, saliency=True, progress=False,
                            tile_batch_size=40 if self.configuration == "2d" else 4, seed=seed,
                            command=f"nnUNetv2_adv_demo -o {self.root} -device {self.run.device} (evaluation step)")
        return RobustnessEvaluation(run, log=self.log).execute()

    def headline(self) -> str:
        """What the report means in one paragraph: the worst-case drop of the clean model and the share of
        it the PGD-AT model recovers, at what cost in clean Dice (from summary.json)."""
        summary = json.loads((self.root / "report" / "summary.json").read_text())
        fg = {(r["model"], r["attack"]): r["foreground_mean"]["Dice"] for r in summary["results"]}
        worst = {m: next(v for (model, a), v in fg.items() if model == m and a == "worst case")
                 for m in (self.clean_trainer, self.robust_trainer)}
        clean = {m: fg[(m, "clean")] for m in worst}
        drop = clean[self.clean_trainer] - worst[self.clean_trainer]
        recovered = (worst[self.robust_trainer] - worst[self.clean_trainer]) / drop if drop > 0 else float("nan")
        return (f"Worst case over {', '.join(a.split(':')[0] for a in DEMO_ATTACKS[:4])} at eps 4/255 (per case "
                f"the lowest Dice, then the mean over {len(summary['results'][0]['metric_per_case'])} held-out "
                f"volumes): the clean model falls from {clean[self.clean_trainer]:.3f} to "
                f"{worst[self.clean_trainer]:.3f} (-{drop:.3f}); the PGD-AT model keeps "
                f"{worst[self.robust_trainer]:.3f}, recovering {recovered:.0%} of that drop, at a clean Dice of "
                f"{clean[self.robust_trainer]:.3f} ({clean[self.robust_trainer] - clean[self.clean_trainer]:+.3f}).\n")
