"""A robustness evaluation of trained nnU-Net models: the work behind ``nnUNetv2_adv_evaluate``.

For every model: nnU-Net's prediction of the clean images; for every attack setting the
whole-volume attack (:func:`nnunet_adv.volume.runner.run_attack`) crafted on that model (or, for
transfer, on the source model); nnU-Net's own prediction of the adversarial images; metrics with
nnU-Net's ``compute_metrics`` plus HD95, attack success rate and image similarity; then the
report files (:mod:`nnunet_adv.evaluation.report`). Every intermediate result is kept in the
report folder (:class:`nnunet_adv.evaluation.report.ReportFolder`), so a resumed evaluation
recomputes nothing that exists.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import nnunet_adv.metrics as image_metrics  # module access: LPIPS is optional, tests stand in for it
from nnunet_adv.errors import UserError
from nnunet_adv.evaluation import report
from nnunet_adv.evaluation.case_metrics import NSD_TOLERANCE_MM, case_metrics, jsonable_summary, nan_mean, summarize
from nnunet_adv.evaluation.checks import Evidence, run_checks
from nnunet_adv.evaluation.corruptions import case_seed, corrupt
from nnunet_adv.evaluation.plan import (
    Evaluation,
    Model,
    Setting,
    convergence_candidate,
    convergence_setting,
    evaluations_of,
    uses_gradients,
    worst_case_members,
)
from nnunet_adv.evaluation.report import ReportFolder
from nnunet_adv.evaluation.saliency import CaseSaliency, case_saliency
from nnunet_adv.files import (
    ChecksumMismatch,
    atomic_write_checked_json,
    atomic_write_json,
    file_digest,
    has_digest,
    read_checked_json,
)
from nnunet_adv.locks import folder_lock
from nnunet_adv.records import (
    ATTACK_JSON,
    ensure_writable,
    first_difference,
    load_records,
    package_version,
    part_record_name,
    split_cases,
    versions,
)
from nnunet_adv.volume.cascade import previous_stage_folder
from nnunet_adv.volume.cascade_options import DEFAULT_GRADIENT, GRADIENT_MEANS
from nnunet_adv.volume.deployed_ensemble import resampling_note
from nnunet_adv.volume.engine import _similarity
from nnunet_adv.volume.export import WriteError, write_image_like
from nnunet_adv.volume.folders import find_cases
from nnunet_adv.volume.inputs import case_inputs, changes_line, input_change, precheck_case
from nnunet_adv.volume.runner import AttackRun, prior_report, resumable_cases, run_attack, run_settings
from nnunet_adv.volume.trained_model import load_trained_model


@dataclass
class EvaluationRun:
    """Everything one robustness evaluation needs.

    Attributes:
        models: the models (same dataset); settings: clean first, then attacks and sweep points;
        images / labels: the test images (nnU-Net's naming) and their reference segmentations;
        cases: case id -> ``{'images': [files], 'label': file}`` (:func:`labelled_cases`);
        output: the report folder; dataset_json / plans: of the models; folds / checkpoint: of every model;
        device: ``"cpu"``, ...;
        transfer_from: also evaluate the other models on this model's adversarial images;
        eot_mirroring: attacks average nnU-Net's test-time mirroring; tile_batch_size: tiles per
        network call in the attacks; tta: predict with test-time mirroring; saliency: draw
        saliency maps; checks: run the checks of :mod:`nnunet_adv.evaluation.checks` (their attacks
        are among ``settings``; the convergence re-run with ``check_factor`` x the steps is added here);
        num_examples: cases in examples.png; progress: tqdm bars; command: the
        command line recorded in the report; previous_stage_gradient: how attacks on a cascade stage
        pass its previous stage (:mod:`nnunet_adv.volume.cascade`).
    """

    models: List[Model]
    settings: List[Setting]
    images: Path
    labels: Path
    cases: Dict[str, dict]
    output: Path
    dataset_json: dict
    plans: dict
    folds: list = field(default_factory=lambda: [0])
    checkpoint: str = "checkpoint_final.pth"
    device: str = "cpu"
    transfer_from: Optional[Model] = None
    eot_mirroring: bool = False
    tile_batch_size: int = 1
    tta: bool = True
    saliency: bool = False
    num_examples: int = 2
    progress: bool = True
    resume: bool = False
    command: str = ""
    nsd_tolerance: Union[float, Sequence[float]] = NSD_TOLERANCE_MM
    seed: int = 0
    part: Optional[Tuple[int, int]] = None
    checks: bool = False  # nnUNetv2_adv_evaluate and the study turn them on (the demo keeps its time budget)
    check_factor: int = 5
    previous_stage_gradient: str = DEFAULT_GRADIENT

    @property
    def part_cases(self) -> List[str]:
        """The cases this run computes (all, or its share of ``-num_parts``)."""
        return split_cases(self.cases, self.part)

    def recorded_settings(self) -> dict:
        """What every cached result of the report depends on (``evaluation.json``): a resume with
        other settings is refused with one line naming the setting."""
        return {"models": {m.name: str(Path(m.folder).resolve()) for m in self.models},
                "checkpoint": self.checkpoint, "folds": [str(f) for f in self.folds],
                "images": str(Path(self.images).resolve()), "labels": str(Path(self.labels).resolve()),
                "cases": sorted(self.cases), "test_time_mirroring": bool(self.tta),
                "eot_mirroring": bool(self.eot_mirroring), "tile_batch_size": self.tile_batch_size,
                "nsd_tolerance_mm": self.nsd_tolerance, "versions": versions(),
                # the seed draws the corruptions' noise; an attack's seed is in its own folder's tag
                "corruption_seed": self.seed if any(s.corruption is not None for s in self.settings) else None,
                **({"previous_stage_gradient": self.previous_stage_gradient} if self.cascades() else {})}

    def cascades(self) -> Dict[str, Path]:
        """Model name -> its previous stage's model folder, for the cascade stages among the models."""
        stages = {m.name: previous_stage_folder(m.folder) for m in self.models}
        return {name: folder for name, folder in stages.items() if folder is not None}

    def deployment_notes(self) -> List[str]:
        """Lines for the report saying how models that are not one network were run (cascades, ensembles of
        configurations, postprocessing)."""
        notes = []
        for m in self.models:
            stages = ", ".join(f"`{Path(f).name}`" for f in (m.folder, *m.members))
            then = ", then `nnUNetv2_apply_postprocessing`" if m.postprocessing else ""
            if m.members:
                notes.append(f"`{m.name}` is an ensemble of configurations as nnUNetv2_find_best_configuration "
                             f"selected it: **its numbers are the ensemble's**: {stages} predicted with "
                             f"`nnUNetv2_predict --save_probabilities`, averaged by `nnUNetv2_ensemble`{then}; every "
                             f"attack is crafted through all members at once (their averaged probabilities; "
                             f"postprocessing not differentiated).")
            elif m.postprocessing:
                notes.append(f"`{m.name}`: predictions postprocessed with `nnUNetv2_apply_postprocessing` "
                             f"({Path(m.postprocessing).name}).")
        for name, folder in self.cascades().items():
            notes.append(f"`{name}` is a cascade stage, deployed as nnU-Net deploys it: `{Path(folder).name}` segments "
                         f"each (clean, attacked or corrupted) image and its prediction is the cascade's "
                         f"previous-stage input (`nnUNetv2_predict -prev_stage_predictions`). Attack gradient "
                         f"`{self.previous_stage_gradient}`: {GRADIENT_MEANS[self.previous_stage_gradient]}.")
        return notes


SETTINGS_JSON = "evaluation.json"
INPUTS_KEY = "inputs"  # evaluation.json: the SHA-256 of every case's image(s) and label at the last run
PREDICTION_JSON = "prediction.json"
CORRUPTION_JSON = "corruption.json"
#: what a saliency cache (saliency/MODEL/CASE.npz) holds; a cache from another version is recomputed
SALIENCY_CONTENT = "central slices, inside_share, structure_fraction"


def _files_verified(folder: Path, record: Optional[dict]) -> bool:
    if not record or record.get("status") != "ok":
        return False
    return all(has_digest(folder / n, d) for n, d in record.get("files", {}).items())


def _reader_writer(plans: dict):
    return recursive_find_reader_writer_by_name(plans["image_reader_writer"])


def _torchio_version():
    return {"torchio": package_version("torchio")}


def worst_case_summary(members: Sequence[Tuple[str, dict]]) -> dict:
    """AutoAttack's rule per case: of the attacks' summaries (``(label, summary)``, same cases in the
    same order), each case keeps the entry of the attack with the lowest foreground Dice (ties: the
    earlier attack; NaN Dice, a case without foreground in reference and prediction, is never lower
    than a number, so an attack that puts foreground there wins), recorded as ``worst_of``; then
    nnU-Net's averaging over the chosen entries."""
    chosen = []
    for entries in zip(*(summary["metric_per_case"] for _, summary in members)):
        dice = np.array([entry["foreground_dice"] for entry in entries], dtype=np.float64)
        best = int(np.argmin(np.where(np.isnan(dice), np.inf, dice)))
        chosen.append({**entries[best], "worst_of": members[best][0]})
    keys = [k for k in chosen[0]["metrics"]]
    summary = summarize(chosen, keys)
    return {**summary, "mean": {str(k): v for k, v in summary["mean"].items()}}


def labelled_cases(images: Path, labels: Path, dataset_json: dict, reader_writer,
                   attacked: bool = True) -> Dict[str, dict]:
    """case -> ``{'images': [files], 'label': file, 'inputs': their SHA-256}``, checked before any model
    loads: every case needs a complete label file on its image holding only the dataset's label values
    (and, when ``attacked``, not the ignore label, which the attacks refuse); every file complete
    (:func:`nnunet_adv.volume.inputs.precheck_case`). :class:`UserError` otherwise."""
    ending = dataset_json["file_ending"]
    channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    found = find_cases(Path(images), ending, channels)
    allowed = _label_values(dataset_json)
    ignore = dataset_json["labels"].get("ignore") if attacked else None
    cases = {}
    for case, info in found.items():
        if info["problem"] is not None:
            raise UserError(info["problem"])
        label = Path(labels) / f"{case}{ending}"
        if not label.is_file():
            raise UserError(f"case {case}: no label file {label}")
        try:
            precheck_case(info["files"], label, reader_writer, allowed, ignore)
        except UserError as e:
            raise UserError(f"case {case}: {e}") from None
        cases[case] = {"images": info["files"], "label": str(label), "inputs": case_inputs(info["files"], label)}
    return cases


class RobustnessEvaluation:
    """Runs an :class:`EvaluationRun` step by step, reusing every result that exists."""

    def __init__(self, run: EvaluationRun, log: Callable[[str], None] = print):
        self.run, self.log = run, log
        self.folder = ReportFolder(Path(run.output))
        self.file_ending = run.dataset_json["file_ending"]
        self.done_work: List[str] = []  # what this run computed: "attack ...", "prediction ...", ...
        self._predictors: Dict[str, object] = {}  # model folder -> initialised nnUNetPredictor
        self._attack_models: Dict[str, object] = {}  # model name -> TrainedModel (saliency)

    def execute(self) -> str:
        """Compute what is missing and write the report (the report folder locked against a second
        run, :mod:`nnunet_adv.locks`); returns report.md's text."""
        ensure_writable(Path(self.run.output))
        with folder_lock(self.run.output, self.run.part, self.run.command):
            return self._execute()

    def _execute(self) -> str:
        r = self.run
        if r.saliency and (r.cascades() or any(m.members for m in r.models)):
            raise UserError("--saliency draws the input gradient of one network: not supported for a cascade stage or "
                            "an ensemble of configurations (leave --saliency out)")
        self.check_settings()
        self.log(f"{len(r.models)} model(s), {len(r.settings)} setting(s), {len(r.cases)} case(s) on {r.device}; "
                 f"report in {r.output}")
        evaluations = evaluations_of(r.models, r.settings, r.transfer_from)
        for setting in r.settings:  # attacks first: one attack run per (crafting model, setting)
            if setting.attack is not None:
                for model in r.models:
                    self.attack(model, setting)
            elif setting.corruption is not None:
                self.corrupt(setting)
        for ev in evaluations:
            self.predict(ev)
        if r.part is not None:
            self.log(f"part {r.part[1]} of {r.part[0]} done ({len(r.part_cases)} case(s)); run once more without "
                     f"-num_parts/-part_id and with --continue to write the report")
            return ""
        labels = _labels_or_regions(r.dataset_json)
        rw = recursive_find_reader_writer_by_name(r.plans["image_reader_writer"])()
        summaries = {(ev.model.name, ev.key): self.metrics(ev, rw, labels) for ev in evaluations}
        settings = list(r.settings)
        if r.checks:  # the strongest white-box attack once more with more steps (needs the metrics above)
            rerun = self.convergence_rerun(settings, summaries, rw, labels)
            if rerun is not None:
                settings.append(rerun)
                evaluations += [Evaluation(m, rerun, m) for m in r.models]
        members = worst_case_members(settings)
        for setting in settings:
            if setting.worst:
                for model in r.models:
                    summaries[(model.name, setting.tag)] = worst_case_summary(
                        [(s.label, summaries[(model.name, s.tag)]) for s in members]
                        + [(f"{ev.setting.label} from {ev.source.name}", summaries[(model.name, ev.key)])
                           for ev in evaluations if ev.transfer and ev.model.name == model.name
                           and ev.setting in members])
        found = {m.name: run_checks(self.evidence(m, settings, evaluations, summaries)) for m in r.models} \
            if r.checks else {}
        maps = self.saliency_maps() if r.saliency else {}
        saliency = {name: saliency_numbers(cases) for name, cases in maps.items()}

        context = report.ReportContext(folder=self.folder, file_ending=self.file_ending, command=r.command,
                                       dataset=r.plans["dataset_name"], models=r.models, settings=settings,
                                       evaluations=evaluations, summaries=summaries, labels=labels, tta=r.tta,
                                       eot=r.eot_mirroring, device=r.device, folds=list(map(str, r.folds)),
                                       checkpoint=r.checkpoint, cases=list(r.cases), checks=found, saliency=saliency,
                                       notes=r.deployment_notes() + self.resampling_notes(settings))
        report.write_summary_json(context)
        report.write_metrics_csv(context)
        figures = report.write_figures(context, r.cases, rw, r.num_examples)
        if r.saliency:
            figures.append(self.saliency_figure(context, maps))
        text = report.write_report_md(context, figures)
        self.log("computed this run: " + (_count_kinds(self.done_work) if self.done_work else "nothing (all reused)"))
        return text

    def resampling_notes(self, settings: Sequence[Setting]) -> List[str]:
        """Lines for the report naming the ensemble members an attack reached through linear resampling
        (another network grid than the first member's; :func:`resampling_note`), from the attacks' records."""
        notes = []
        for model in self.run.models:
            if model.members:
                cases = {}
                for s in settings:
                    if s.attack is not None:
                        record = load_records(self.folder.adversarial(model.name, s.tag)) or {}
                        cases.update(record.get("cases", {}))
                note = resampling_note(model.name, cases)
                notes += [note] if note else []
        return notes

    # ------------------------------------------------------------------------------ checks
    def convergence_rerun(self, settings: List[Setting], summaries: dict, rw, labels) -> Optional[Setting]:
        """The convergence check's attack (:func:`convergence_candidate`: the strongest white-box attack by
        mean Dice over the models) with ``check_factor`` x its steps, run, predicted and measured on every
        model."""
        strongest = convergence_candidate(settings, lambda s: float(np.nanmean(
            [summaries[(m.name, s.tag)]["foreground_mean"]["Dice"] for m in self.run.models])))
        if strongest is None:
            return None
        rerun = convergence_setting(strongest, self.run.check_factor)
        for model in self.run.models:
            self.attack(model, rerun)
            ev = Evaluation(model, rerun, model)
            self.predict(ev)
            summaries[(model.name, ev.key)] = self.metrics(ev, rw, labels)
        return rerun

    def evidence(self, model: Model, settings: List[Setting], evaluations: List[Evaluation],
                 summaries: dict) -> Evidence:
        """What :func:`nnunet_adv.evaluation.checks.run_checks` reads for ``model``."""
        def dice(key: str) -> List[float]:
            return [entry["foreground_dice"] for entry in summaries[(model.name, key)]["metric_per_case"]]

        members = worst_case_members(settings)
        e = Evidence()
        for s in members:
            if s.check == "convergence":
                e.convergence = (s.label, dice(s.tag))
            elif uses_gradients(s):
                e.white_box[s.label] = dice(s.tag)
                records = load_records(self.folder.adversarial(model.name, s.tag))["cases"]
                cases = [records.get(c, {}) for c in self.run.cases]
                if not e.gradients and any(rec.get("input_gradient") for rec in cases):
                    e.gradients = [rec.get("input_gradient") for rec in cases]
                for rec in cases:
                    trace = rec.get("objective_trace") or []
                    for name, values in (trace.items() if isinstance(trace, dict) else [(None, trace)]):
                        e.traces.setdefault(s.label if name is None else f"{s.label} / {name}", []).append(values)
            else:
                e.other[s.label] = dice(s.tag)
        for ev in evaluations:
            if ev.transfer and ev.model.name == model.name and ev.setting in members:
                e.other[f"{ev.setting.label} from {ev.source.name}"] = dice(ev.key)
        saturation = [s for s in settings if s.check == "saturation"]
        if saturation:
            e.saturation = dice(saturation[0].tag)
        return e

    def check_settings(self) -> None:
        """A new report folder gets ``evaluation.json``; a resumed one must have been made with the
        same settings (else one line naming the first that differs, and nothing is changed)."""
        root, settings = Path(self.run.output), self.run.recorded_settings()
        recorded = root / SETTINGS_JSON
        inputs = {case: info["inputs"] for case, info in self.run.cases.items()}
        if recorded.is_file():
            try:
                old = json.loads(recorded.read_text())
            except (ValueError, OSError) as e:
                raise UserError(f"{recorded} cannot be read ({type(e).__name__}); choose a new report folder") from None
            old_inputs = old.pop(INPUTS_KEY, {})  # the inputs are no setting: a change is recomputed, not refused
            difference = first_difference(old, settings)
            if difference is not None:
                raise UserError(f"{root} is a report made with other settings ({difference}); resume only with "
                                f"the same settings, or choose a new folder (nothing was changed)")
            self._say_changed_inputs(old_inputs, inputs)
        elif root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir()):
            raise UserError(f"{root} is not a report of nnUNetv2_adv_evaluate (no {SETTINGS_JSON}); choose a new "
                            f"folder (nothing was changed)")
        ensure_writable(root)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(recorded, {**settings, INPUTS_KEY: inputs})

    def _say_changed_inputs(self, recorded: dict, inputs: dict) -> None:
        """One line naming the cases whose image or label changed since the report's last run: each step
        recomputes exactly what was made from them (attacks, corruptions, predictions, metrics)."""
        changed = {case: input_change(recorded.get(case), now) for case, now in inputs.items()}
        changed = {case: change for case, change in changed.items() if change is not None}
        if changed:
            self.log(f"--continue: {changes_line(changed, 'the last run')}; recomputing what was made from them")

    # ------------------------------------------------------------------------------ steps
    def image_folder(self, ev: Evaluation) -> Optional[Path]:
        """Where the images of an evaluation are: None for the clean images, else the adversarial
        (crafted on ``ev.source``) or corrupted folder."""
        if ev.setting.corruption is not None:
            return self.folder.corrupted(ev.setting.tag)
        if ev.source is None:
            return None
        return self.folder.adversarial(ev.source.name, ev.setting.tag)

    def images_of(self, ev: Evaluation, case: str) -> List[str]:
        folder = self.image_folder(ev)
        if folder is None:
            return self.run.cases[case]["images"]
        return [str(folder / Path(f).name) for f in self.run.cases[case]["images"]]

    def _names(self, cases) -> Dict[str, dict]:
        return {c: {"problem": None, "names": [Path(f).name for f in self.run.cases[c]["images"]]} for c in cases}

    def attack(self, model: Model, setting: Setting) -> None:
        r = self.run
        out = self.folder.adversarial(model.name, setting.tag)
        attack_run = AttackRun(attack=setting.attack, model_folder=model.folder, folds=r.folds, checkpoint=r.checkpoint,
                               input_folder=Path(r.images), output_folder=out, labels_folder=Path(r.labels),
                               device=r.device, eot_mirroring=r.eot_mirroring, tile_batch_size=r.tile_batch_size,
                               resume=True, progress=r.progress, command=r.command, part=r.part,
                               previous_stage_gradient=r.previous_stage_gradient, members=list(model.members))
        if self._attack_done(out, attack_run):
            return
        self.log(f"attacking with {setting.label} on {model.name}")
        out.parent.mkdir(parents=True, exist_ok=True)
        result = run_attack(attack_run, log=self.log)
        if result.failed:
            raise UserError(f"attack {setting.label} on {model.name} failed for case(s) {', '.join(result.failed)} "
                            f"(per-case reasons in {out / attack_run.record_name}); fix it and re-run with --continue")
        self.done_work.append(f"attack {setting.label} on {model.name}")

    def _attack_done(self, out: Path, attack_run) -> bool:
        """Every case of this run (or part) is there as the records say, made with this run's settings
        (other settings: one line, as a resumed nnUNetv2_adv_attack). A run without parts merges the
        parts' records into attack.json."""
        prior = prior_report(out, run_settings(attack_run), resume=True)
        if prior is None:
            return False
        wanted = set(self.run.part_cases)
        inputs = {c: self.run.cases[c]["inputs"] for c in wanted}
        done = resumable_cases(out, prior, self._names(wanted), inputs)[0] == wanted
        if done and attack_run.part is None and not (out / ATTACK_JSON).is_file():
            atomic_write_checked_json(out / ATTACK_JSON, prior, indent=2, default=str)
        return done

    def corrupt(self, setting: Setting) -> None:
        """The corrupted images of one corruption setting (shared by every model), written like
        adversarial images (hidden folder, read back, renamed) and recorded in corruption.json."""
        r = self.run
        name, severity = setting.corruption
        out = self.folder.corrupted(setting.tag)
        settings = {"corruption": name, "severity": severity, "seed": r.seed, "versions": _torchio_version()}
        record_name = CORRUPTION_JSON if r.part is None else part_record_name(CORRUPTION_JSON, r.part)
        prior = load_records(out, CORRUPTION_JSON) if out.is_dir() else None
        if prior is not None:
            difference = first_difference(prior.get("settings"), settings)
            if difference is not None:
                raise UserError(f"{out} holds corrupted images made with other settings ({difference}); choose a new "
                                f"report folder (nothing was changed)")
        records = dict((prior or {}).get("cases", {}))
        wanted = r.part_cases
        todo = [c for c in wanted if not _files_verified(out, records.get(c))
                or records[c].get("inputs") != r.cases[c]["inputs"]["images"]]  # made from other images: redo
        if not todo:
            if r.part is None and not (out / CORRUPTION_JSON).is_file():
                atomic_write_checked_json(out / CORRUPTION_JSON, {"settings": settings, "cases": records})
            return
        self.log(f"corrupting {len(todo)} case(s) with {name} at severity {severity}")
        rw_class = _reader_writer(r.plans)
        partial = out / (".partial" + ("" if r.part is None else f"-{r.part[1]}-of-{r.part[0]}"))
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        mine = {c: records[c] for c in wanted if c in records and c not in todo}
        for case in todo:
            files = r.cases[case]["images"]
            raw, props = rw_class().read_images(files)
            image = corrupt(raw, props["spacing"], name, severity, case_seed(r.seed, case, name, severity))
            tmp = [partial / Path(f).name for f in files]
            write_image_like(image, files, tmp, rw_class, props)
            back, _ = rw_class().read_images([str(t) for t in tmp])
            if not np.array_equal(back, image.astype(back.dtype)):
                raise WriteError(f"cannot write {tmp[0]}: the written image does not read back as written "
                                 f"(is the disk full?)")
            mine[case] = {"status": "ok", "files": {t.name: file_digest(t) for t in tmp},
                          "inputs": r.cases[case]["inputs"]["images"], **_similarity(raw, image),
                          "linf_raw": np.abs(image.astype(np.float64) - raw).reshape(raw.shape[0], -1).max(1).tolist()}
            for t in tmp:
                os.replace(t, out / t.name)
            atomic_write_checked_json(out / record_name, {"settings": settings,
                                                     "cases": mine if r.part else {**records, **mine}})
        shutil.rmtree(partial, ignore_errors=True)
        self.done_work.append(f"corruption {setting.label}")

    def provenance(self, ev: Evaluation) -> dict:
        """What one prediction folder's files come from (recorded in its prediction.json)."""
        source = "clean images"
        if ev.setting.corruption is not None:
            source = {"corruption": load_records(self.image_folder(ev), CORRUPTION_JSON)["settings"]}
        elif ev.source is not None:
            source = {"crafted_on": ev.source.name, "attack": load_records(self.image_folder(ev))["settings"]["attack"]}
        m = ev.model
        previous = previous_stage_folder(m.folder)
        return {"model": str(Path(m.folder).resolve()), "checkpoint": self.run.checkpoint,
                "folds": [str(f) for f in self.run.folds], "test_time_mirroring": bool(self.run.tta), "input": source,
                **({} if previous is None else {"previous_stage": str(Path(previous).resolve())}),
                **({"ensemble_members": [str(Path(f).resolve()) for f in m.members]} if m.members else {}),
                **({} if m.postprocessing is None else {"postprocessing": str(Path(m.postprocessing).resolve())})}

    def predict(self, ev: Evaluation) -> None:
        """nnU-Net's predictions of one evaluation (this run's cases), written to a hidden folder, then
        moved into place and recorded (provenance and SHA-256 per file) in prediction.json (one record
        per part of a split run); a resume keeps only files that match their record."""
        r = self.run
        out = self.folder.predictions(ev.model.name, ev.key)
        provenance = self.provenance(ev)
        old = load_records(out, PREDICTION_JSON) if out.is_dir() else None
        wanted = {c: f"{c}{self.file_ending}" for c in r.part_cases}
        inputs = {wanted[c]: d for c, d in self.input_digests(ev, list(wanted)).items()}  # prediction -> its images
        verified = {}
        if old is not None:
            difference = first_difference(old.get("provenance"), provenance)
            if difference is not None:
                raise UserError(f"{out} holds predictions made with other settings ({difference}); choose a new "
                                f"report folder (nothing was changed)")
            made_from = old.get("inputs", {})
            verified = {n: d for n, d in old.get("files", {}).items() if n in inputs and made_from.get(n) == inputs[n]
                        and has_digest(out / n, d)}
        missing = [c for c, n in wanted.items() if n not in verified]
        record_name = PREDICTION_JSON if r.part is None else part_record_name(PREDICTION_JSON, r.part)
        record = {"provenance": provenance, "settings": provenance,
                  "files": verified if r.part is None else {wanted[c]: verified[wanted[c]] for c in wanted
                                                             if wanted[c] in verified},
                  "inputs": {n: inputs[n] for n in verified}}
        if not missing:
            if r.part is None and not (out / PREDICTION_JSON).is_file():
                atomic_write_checked_json(out / PREDICTION_JSON, record)
            return
        self.log(f"predicting {len(missing)} case(s) of {ev.setting.label}"
                 + (f" crafted on {ev.source.name}" if ev.transfer else "") + f" with {ev.model.name}")
        partial = out / (".partial" + ("" if r.part is None else f"-{r.part[1]}-of-{r.part[0]}"))
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        self.predict_deployed(ev.model, [self.images_of(ev, c) for c in missing], partial, missing)
        for c in missing:
            name = wanted[c]
            record["files"][name] = file_digest(partial / name)
            record["inputs"][name] = inputs[name]
            os.replace(partial / name, out / name)
            atomic_write_checked_json(out / record_name, record)
        shutil.rmtree(partial, ignore_errors=True)
        self.done_work.append(f"prediction {ev.key} with {ev.model.name}")

    def predict_deployed(self, model: Model, images: List[List[str]], out: Path, cases: List[str]) -> None:
        """nnU-Net's predictions ``out/CASE.ext`` of ``images`` by ``model`` as the user deploys it: one
        ``nnUNetv2_predict``; a cascade stage after its previous stage (``-prev_stage_predictions``); an ensemble
        of configurations with ``--save_probabilities`` per member, then ``nnUNetv2_ensemble``; then
        ``nnUNetv2_apply_postprocessing`` where ``model.postprocessing`` names a file."""
        folders = [model.folder, *model.members]
        merged = out if model.postprocessing is None else out / "before_postprocessing"  # what is postprocessed
        outputs = [out / f"member_{k}" for k in range(len(folders))] if model.members else [merged]
        for k, folder in enumerate(folders):
            previous = previous_stage_folder(folder)
            previous_predictions = None
            if previous is not None:  # a cascade, as nnUNetv2_predict -c 3d_lowres, then -prev_stage_predictions
                previous_predictions = out / f"previous_stage_{k}"
                self._predict_folder(previous, images, previous_predictions, cases, False)
            self._predict_folder(folder, images, outputs[k], cases, bool(model.members), previous_predictions)
        # nnUNetv2_ensemble's and nnUNetv2_apply_postprocessing's per-file functions, in this process (their
        # commands run the same functions in a pool of spawned processes)
        plans = PlansManager(str(model.folder / "plans.json"))
        rw = plans.image_reader_writer_class()
        if model.members:
            from nnunetv2.ensembling.ensemble import merge_files

            label_manager = plans.get_label_manager(self.run.dataset_json)
            merged.mkdir(parents=True, exist_ok=True)
            for c in cases:
                merge_files([str(o / f"{c}.npz") for o in outputs], str(merged / c), self.file_ending, rw,
                            label_manager, False)
        if model.postprocessing is not None:
            from nnunetv2.postprocessing.remove_connected_components import load_postprocess_save
            from nnunetv2.utilities.file_path_utilities import load_pickle

            pp_fns, pp_fn_kwargs = load_pickle(str(model.postprocessing))
            for c in cases:
                load_postprocess_save(str(merged / f"{c}{self.file_ending}"), str(out / f"{c}{self.file_ending}"), rw,
                                      pp_fns, pp_fn_kwargs)

    def _predict_folder(self, folder: Path, images: List[List[str]], out: Path, cases: List[str],
                        probabilities: bool, previous_predictions: Optional[Path] = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        with _quiet():
            self.predictor(Model(folder.name, folder)).predict_from_files_sequential(
                images, [str(out / c) for c in cases], save_probabilities=probabilities, overwrite=True,
                folder_with_segs_from_prev_stage=None if previous_predictions is None else str(previous_predictions))

    def input_digests(self, ev: Evaluation, cases: Sequence[str]) -> Dict[str, Dict[str, str]]:
        """case -> SHA-256 per file name of the images ``ev`` predicts: the clean images (hashed by
        :func:`labelled_cases`), or the adversarial / corrupted images as their run records hold them
        (verified against the files by the attack and corruption steps of this run)."""
        folder = self.image_folder(ev)
        if folder is None:
            return {c: self.run.cases[c]["inputs"]["images"] for c in cases}
        records = self.image_records(ev, folder)
        return {c: dict(records[c]["files"]) for c in cases}

    @staticmethod
    def image_records(ev: Evaluation, folder: Path) -> Dict[str, dict]:
        """Per case, the run record of the adversarial or corrupted images ``ev`` predicts (in ``folder``)."""
        return load_records(folder, CORRUPTION_JSON if ev.setting.corruption is not None else ATTACK_JSON)["cases"]

    def predictor(self, model: Model):
        """nnU-Net's predictor of ``model`` (cached)."""
        if str(model.folder) not in self._predictors:
            device = torch.device(self.run.device)
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=self.run.tta,
                                        perform_everything_on_device=device.type != "cpu", device=device,
                                        verbose=False, verbose_preprocessing=False, allow_tqdm=self.run.progress)
            with _quiet():
                predictor.initialize_from_trained_model_folder(str(model.folder), use_folds=self.run.folds,
                                                               checkpoint_name=self.run.checkpoint)
            self._predictors[str(model.folder)] = predictor
        return self._predictors[str(model.folder)]

    def metrics(self, ev: Evaluation, rw, labels) -> dict:
        """nnU-Net-style summary of one evaluation (cached in metrics/MODEL/KEY.json)."""
        cache = self.folder.metrics(ev.model.name, ev.key)
        computed_from = {"prediction": self._prediction_record(ev),
                         "clean_prediction": self._prediction_record(Evaluation(ev.model, Setting("clean"), None)),
                         "labels": {c: info["inputs"]["label"] for c, info in self.run.cases.items()}}
        cached = self._cached(cache, computed_from)
        if cached is not None:
            return cached
        cases, ending = self.run.cases, self.file_ending
        pred = self.folder.predictions(ev.model.name, ev.key)
        clean = self.folder.predictions(ev.model.name, "clean")
        ignore = self.run.dataset_json["labels"].get("ignore")
        compared = ev.setting.attack is not None or ev.setting.corruption is not None
        per_case = [case_metrics(cases[c]["label"], str(pred / f"{c}{ending}"), rw, labels, ignore,
                                 str(clean / f"{c}{ending}") if compared else None, self.run.nsd_tolerance)
                    for c in cases]
        summary = jsonable_summary(summarize(per_case, labels))
        folder = self.image_folder(ev)
        if folder is not None:
            records = self.image_records(ev, folder)
            for case, entry in zip(cases, summary["metric_per_case"]):
                rec = records.get(case, {})
                entry["SSIM"] = _channel_mean(rec.get("ssim"))
                entry["PSNR"] = _channel_mean(rec.get("psnr"))
                entry["Linf_raw"] = _channel_mean(rec.get("linf_raw"), np.max)
                entry["LPIPS"] = image_lpips(cases[case]["images"], self.images_of(ev, case), rw)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_checked_json(cache, {**summary, "computed_from": computed_from})
        self.done_work.append(f"metrics {ev.key} of {ev.model.name}")
        return summary

    def _cached(self, cache: Path, computed_from: dict) -> Optional[dict]:
        """A cached result made from ``computed_from``, read only if it matches its checksum (one warning
        line otherwise: it is recomputed); None when there is none to reuse."""
        if not cache.is_file():
            return None
        try:
            cached = read_checked_json(cache)
        except ChecksumMismatch as e:
            self.log(f"warning: {e}; recomputing it")
            return None
        return cached if cached.pop("computed_from", None) == json.loads(json.dumps(computed_from)) else None

    def _prediction_record(self, ev: Evaluation) -> dict:
        record = load_records(self.folder.predictions(ev.model.name, ev.key), PREDICTION_JSON)
        return {"provenance": record["provenance"], "files": record["files"], "inputs": record.get("inputs", {}),
                "nsd_tolerance_mm": self.run.nsd_tolerance}

    def saliency_maps(self) -> Dict[str, Dict[str, CaseSaliency]]:
        """model name -> case -> :class:`CaseSaliency`, every case (each computed or read once)."""
        return {m.name: {case: self.case_saliency(m, case) for case in self.run.cases} for m in self.run.models}

    def saliency_figure(self, context, maps: Dict[str, Dict[str, CaseSaliency]]) -> str:
        """saliency.png: the first ``num_examples`` cases' central slices of :meth:`saliency_maps`."""
        chosen = list(self.run.cases)[:max(1, self.run.num_examples)]
        first = maps[self.run.models[0].name]  # the image panel: the first model's preprocessed grid
        return report.write_saliency(context, [(case, first[case].image) for case in chosen],
                                     {name: [cases[case].saliency for case in chosen] for name, cases in maps.items()})

    def case_saliency(self, model: Model, case: str) -> CaseSaliency:
        """One case's :class:`CaseSaliency`, computed once and cached in saliency/MODEL/CASE.npz (its checksum,
        the inputs' and what the file holds in the record beside it)."""
        cache = self.folder.saliency(model.name, case)
        record, inputs = cache.with_suffix(".json"), self.run.cases[case]["inputs"]
        expected = {"inputs": inputs, "npz": file_digest(cache), "content": SALIENCY_CONTENT} \
            if cache.is_file() else None
        if expected is None or self._cached(record, expected) is None:
            device = torch.device(self.run.device)
            if model.name not in self._attack_models:
                with _quiet():
                    self._attack_models[model.name] = load_trained_model(model.folder, self.run.folds,
                                                                         self.run.checkpoint, device=device)
            files = self.run.cases[case]
            found = case_saliency(self._attack_models[model.name], files["images"], files["label"], device)
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, **vars(found))
            atomic_write_checked_json(record, {"computed_from": {"inputs": inputs, "npz": file_digest(cache),
                                                                 "content": SALIENCY_CONTENT}})
            self.done_work.append(f"saliency {case} of {model.name}")
        with np.load(cache) as data:
            return CaseSaliency(data["image"], data["saliency"], float(data["inside_share"]),
                                float(data["structure_fraction"]))


def image_lpips(clean_files: List[str], adversarial_files: List[str], rw) -> Optional[float]:
    """Mean over channels of the slice-wise LPIPS of adversarial vs clean, None if unavailable."""
    if not image_metrics.lpips_available():
        return None
    clean, adv = rw.read_images(clean_files)[0], rw.read_images(adversarial_files)[0]
    values = [image_metrics.lpips_distance(c, a, float(c.max() - c.min())) for c, a in zip(clean, adv)]
    return None if any(v is None for v in values) else float(np.mean(values))


def saliency_numbers(cases: Dict[str, CaseSaliency]) -> dict:
    """One model's inside_share and structure_fraction per case and their means over the cases (NaN left out)
    (summary.json's ``saliency``, report.md's saliency section)."""
    per_case = {case: {"inside_share": c.inside_share, "structure_fraction": c.structure_fraction}
                for case, c in cases.items()}
    means = {key: nan_mean([c[key] for c in per_case.values()]) for key in ("inside_share", "structure_fraction")}
    return {**means, "per_case": per_case}


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
    lm = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    return list(lm.foreground_regions if lm.has_regions else lm.foreground_labels)


def _label_values(dataset_json: dict) -> set:
    values = set()
    for v in dataset_json["labels"].values():
        values.update(v if isinstance(v, (list, tuple)) else [v])
    return {int(v) for v in values}
