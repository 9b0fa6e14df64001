"""Attack a folder of images with one trained model: the batch behind ``nnUNetv2_adv_attack``.

For every case of the input folder (nnU-Net's naming): the whole-volume attack of
:class:`nnunet_adv.volume.engine.VolumeAttack`, the adversarial image written with the input's
name and geometry (into a hidden partial folder, then renamed into place), and a record in
``attack.json`` (the command, the model, every attack option, per case norms, similarities,
losses and timings). One bad case fails alone; the others go on; what can be checked without the
model (a truncated file, a label off its image or with fractional or unknown values) fails a case
before the model loads. With ``resume`` cases whose images exist as recorded and whose input files
(image and label, by SHA-256) are unchanged are skipped; the others are attacked again, saying so.
A resumed folder holding files this run would not write is refused, and one output folder is
written by one run at a time (:mod:`nnunet_adv.locks`).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm import tqdm

from nnunet_adv.attack_config import AttackConfig
from nnunet_adv.attacks import attack_class
from nnunet_adv.errors import UserError
from nnunet_adv.files import atomic_write_checked_json, file_digest, has_digest
from nnunet_adv.locks import folder_lock
from nnunet_adv.records import (
    ATTACK_JSON,
    ensure_writable,
    first_difference,
    load_records,
    one_line,
    part_record_name,
    split_cases,
    versions,
)
from nnunet_adv.volume.cascade import PreviousStage, check_previous_folds, previous_stage_folder
from nnunet_adv.volume.cascade_options import DEFAULT_GRADIENT, GRADIENT_MEANS
from nnunet_adv.volume.engine import VolumeAttack
from nnunet_adv.volume.export import WriteError
from nnunet_adv.volume.folders import check_folders, configuration_of, find_cases, require_folder
from nnunet_adv.volume.inputs import CaseError, case_inputs, changes_line, input_change, precheck_case
from nnunet_adv.volume.trained_model import load_trained_model

PARTIAL_FOLDER = ".nnunet_adv_partial"  # images are written here, then renamed into place (one file system)


@dataclass
class AttackRun:
    """One whole-volume attack of a folder of images.

    Attributes:
        attack: the attack; model_folder / folds / checkpoint: the trained model (folds resolved,
        see :func:`nnunet_adv.volume.folders.resolve_folds`); input_folder / output_folder /
        labels_folder: nnU-Net's image naming, output never inside the input; labels None:
        attack the model's own clean prediction. device: ``"cpu"``, ``"cuda"``, ...;
        eot_mirroring: attack nnU-Net's test-time mirroring average; tile_batch_size: tiles
        per network call; resume: skip cases whose images exist; command / argv: recorded;
        previous_stage_gradient: a cascade stage's gradient through its previous stage
        (:data:`nnunet_adv.volume.cascade.GRADIENTS`); members: the other model folders of an ensemble of
        configurations (``model_folder`` is its first member; :mod:`nnunet_adv.volume.deployed_ensemble`).
    """

    attack: AttackConfig
    model_folder: Path
    folds: list
    checkpoint: str
    input_folder: Path
    output_folder: Path
    labels_folder: Optional[Path] = None
    device: str = "cpu"
    eot_mirroring: bool = False
    tile_batch_size: int = 1
    resume: bool = False
    progress: bool = True
    command: str = ""
    argv: List[str] = field(default_factory=list)
    part: Optional[Tuple[int, int]] = None
    previous_stage_gradient: str = DEFAULT_GRADIENT
    members: List[Path] = field(default_factory=list)

    @property
    def previous_stage(self) -> Optional[Path]:
        """A cascade stage's previous-stage model folder (:func:`previous_stage_folder`), None for other
        configurations."""
        return previous_stage_folder(self.model_folder)

    @property
    def record_name(self) -> str:
        """attack.json, or ``attack.partI-of-N.json`` for one part of a run split as nnU-Net's
        ``-num_parts N -part_id I`` (parts write their own records; a later run merges them)."""
        return ATTACK_JSON if self.part is None else part_record_name(ATTACK_JSON, self.part)


@dataclass
class AttackResult:
    report: dict                  # what attack.json (or this part's record) holds
    failed: List[str]             # cases that failed (reasons in the report)
    new: List[str]                # cases attacked by this run
    record: str = ATTACK_JSON     # the record's file name


def run_attack(run: AttackRun, log: Callable[[str], None] = print) -> AttackResult:
    """Attack every case of ``run.input_folder``; see the module docstring."""
    started = time.time()
    if run.tile_batch_size < 1:
        raise UserError(f"--tile_batch_size must be >= 1, got {run.tile_batch_size}")
    dataset_json = json.loads((Path(run.model_folder) / "dataset.json").read_text())
    plans = json.loads((Path(run.model_folder) / "plans.json").read_text())
    try:
        run.attack.check_for(plans, configuration_of(Path(run.model_folder)), dataset_json)
    except UserError as e:
        raise UserError(f"attack '{run.attack.name}': {e}") from None
    if run.previous_stage is not None:  # a cascade: its previous stage with the same folds, or one line
        check_previous_folds(run.previous_stage, run.folds, run.checkpoint, configuration_of(Path(run.model_folder)))
    file_ending = dataset_json["file_ending"]
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    output_folder = Path(run.output_folder)
    require_folder(Path(run.input_folder), "input folder")
    check_folders(Path(run.input_folder), output_folder, run.labels_folder)
    all_cases = find_cases(Path(run.input_folder), file_ending, num_channels)
    cases = {c: all_cases[c] for c in split_cases(all_cases, run.part)}

    for note in run.attack.warnings():
        log(f"warning: {note}")
    settings = run_settings(run)
    ensure_writable(output_folder)
    with folder_lock(output_folder, run.part, run.command):
        prior = prior_report(output_folder, settings, run.resume or run.part is not None)
        check_leftovers(output_folder, prior, all_cases)
        label_of = (lambda case: None) if run.labels_folder is None else \
            (lambda case: Path(run.labels_folder) / f"{case}{file_ending}")
        inputs, problems = _inputs_of(cases, label_of)
        done = set()
        if run.resume:
            done, changed = resumable_cases(output_folder, prior, cases, inputs)
            if changed:
                log(f"{changes_line(changed, 'they were attacked')}; attacking them again")
        problems.update(_precheck(cases, [c for c in inputs if c not in done], label_of, plans, dataset_json))
        return _attack_cases(run, cases, done, problems, inputs, prior, settings, label_of, started, log)


def _attack_cases(run: AttackRun, cases: Dict[str, dict], done: set, problems: Dict[str, str],
                  inputs: Dict[str, dict], prior: Optional[dict], settings: dict, label_of: Callable,
                  started: float, log: Callable[[str], None]) -> AttackResult:
    """The loop over the cases (the folder locked, every check done): ``done`` are reused as recorded,
    ``problems`` fail with their reason, the others are attacked (the model loads only for them);
    the record is rewritten after every case, so an interruption keeps what finished."""
    output_folder = Path(run.output_folder)
    todo = [c for c in cases if c not in done and c not in problems]
    engine = _load_engine(run, log) if todo else None
    if not todo and len(done) == len(cases):
        log(f"--continue_prediction: all {len(cases)} case(s) are done in {output_folder}; nothing to attack")
    output_folder.mkdir(parents=True, exist_ok=True)
    partial = output_folder / (PARTIAL_FOLDER + ("" if run.part is None else f"-{run.part[1]}-of-{run.part[0]}"))
    shutil.rmtree(partial, ignore_errors=True)
    previous = (prior or {}).get("cases", {})
    report = _report_header(run, None if engine is None else engine.model, settings)
    records: Dict[str, dict] = report["cases"]
    if prior is None:
        # a new folder gets its record first: an interruption right after the first image is written (before its
        # record) must leave a folder --continue_prediction recognises as ours (it attacks that case again). A
        # resumed folder has one already, whose finished cases an early rewrite would drop.
        atomic_write_checked_json(output_folder / run.record_name, report, indent=2, default=str)
    new = []
    bar = tqdm(cases.items(), desc=f"{run.attack.name} on {len(cases)} case(s)", unit="case", disable=not run.progress)
    for case, info in bar:
        bar.set_postfix_str(case)
        if case in done:
            records[case] = {**previous.get(case, {}), "status": previous.get(case, {}).get("status", "ok"),
                             "skipped": True}
        else:
            records[case] = _attack_one(engine, case, info, problems.get(case), label_of(case), inputs.get(case),
                                        output_folder, partial)
            new += [case] if records[case].get("status") == "ok" else []
        atomic_write_checked_json(output_folder / run.record_name, report, indent=2, default=str)
    bar.close()
    shutil.rmtree(partial, ignore_errors=True)
    return _finish(run, report, new, started)


def _load_engine(run: AttackRun, log: Callable[[str], None]) -> VolumeAttack:
    """The trained model and the whole-volume attack on it (a model that cannot load is one line)."""
    log(f"model {run.model_folder} folds {run.folds} ({run.checkpoint}) on {run.device}")
    model = _load(run.model_folder, run)
    previous = None
    if run.previous_stage is not None:
        log(f"previous stage {run.previous_stage} (gradient: {run.previous_stage_gradient})")
        previous = PreviousStage(_load(run.previous_stage, run), model.predictor.label_manager,
                                 run.previous_stage_gradient, mirroring=run.eot_mirroring,
                                 tile_batch_size=run.tile_batch_size)
    if run.members:
        log(f"ensemble with {', '.join(str(m) for m in run.members)}: the attack sees the averaged probabilities "
            f"(members on another network grid through linear resampling)")
    members = [_load(folder, run) for folder in run.members]
    if run.labels_folder is None:
        log("no labels (-l): the attack targets the model's own clean prediction")
    return VolumeAttack(model, run.attack, torch.device(run.device), eot_mirroring=run.eot_mirroring,
                        progress=run.progress, log=log, tile_batch_size=run.tile_batch_size, previous_stage=previous,
                        members=members)


def _load(folder: Path, run: AttackRun):
    """One trained model of the run (a model that cannot load is one line)."""
    try:
        return load_trained_model(folder, run.folds, run.checkpoint, device=torch.device(run.device))
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except Exception as e:
        raise UserError(f"cannot load the model from {folder}: {type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[-1][:300]}") from None


def _attack_one(engine: Optional[VolumeAttack], case: str, info: dict, problem: Optional[str],
                label_file: Optional[Path], inputs: Optional[dict], output_folder: Path, partial: Path) -> dict:
    """One case: attacked, written into ``partial``, verified, renamed into place; its record. A case
    that fails (its known ``problem``, or an error of its own) fails alone: the record says why."""
    case_started = time.perf_counter()
    try:
        if problem is not None:
            raise CaseError(problem)
        partial.mkdir(exist_ok=True)
        tmp_files = [partial / n for n in info["names"]]
        outputs = [output_folder / n for n in info["names"]]
        rec = engine.run_case(info["files"], None if label_file is None else str(label_file), outputs, tmp_files)
        rec["files"] = {Path(f).name: file_digest(f) for f in tmp_files}  # verified: see VolumeAttack.run_case
        rec["inputs"] = inputs  # what a resume compares (resumable_cases)
        for src, dst in zip(tmp_files, outputs):
            os.replace(src, dst)
        return rec
    except (KeyboardInterrupt, OSError, WriteError):
        raise  # an interruption, or a write failure of the output folder: not one case's problem
    except Exception as e:  # one bad case must not stop the others
        reason = one_line(e)
        tqdm.write(f"error: case {case} failed: {reason}", file=sys.stderr)
        return {"status": "failed", "reason": reason, "seconds": round(time.perf_counter() - case_started, 3)}


def _finish(run: AttackRun, report: dict, new: List[str], started: float) -> AttackResult:
    """The record's summary, written once more; the run's result."""
    records = report["cases"]
    failed = sorted(c for c, r in records.items() if r.get("status") != "ok")
    skipped = sorted(c for c, r in records.items() if r.get("skipped"))
    report["summary"] = {"cases": len(records), "ok": len(records) - len(failed), "failed": len(failed),
                         "skipped": len(skipped), "failed_cases": failed, "skipped_cases": skipped,
                         "seconds": round(time.time() - started, 1)}
    report["finished"] = _now()
    atomic_write_checked_json(Path(run.output_folder) / run.record_name, report, indent=2, default=str)
    return AttackResult(report=report, failed=failed, new=new, record=run.record_name)


def _inputs_of(cases: Dict[str, dict], label_of: Callable) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """``(inputs, problems)``: per case the SHA-256 of its input files (:func:`case_inputs`), or the
    one-line reason it cannot be attacked (its naming, a missing label file)."""
    inputs, problems = {}, {}
    for case, info in cases.items():
        label = label_of(case)
        if info["problem"] is not None:
            problems[case] = info["problem"]
        elif label is not None and not label.is_file():
            problems[case] = f"no label file {label} for case {case}"
        else:
            inputs[case] = case_inputs(info["files"], label)
    return inputs, problems


def _precheck(cases: Dict[str, dict], todo: Sequence[str], label_of: Callable, plans: dict,
              dataset_json: dict) -> Dict[str, str]:
    """The cases of ``todo`` whose files fail the checks that need no model (truncated files, a label
    off its image or with values that are not the dataset's classes), with their reasons."""
    manager = PlansManager(plans)
    labels = manager.get_label_manager(dataset_json)
    ignore = labels.ignore_label if labels.has_ignore_label else None
    reader_writer = manager.image_reader_writer_class()
    problems = {}
    for case in todo:
        try:
            precheck_case(cases[case]["files"], label_of(case), reader_writer, labels.all_labels, ignore)
        except CaseError as e:
            problems[case] = one_line(e)
    return problems


def run_settings(run: AttackRun) -> dict:
    """Everything that determines the images a run writes (attack.json's ``settings``): a resume
    with other settings is refused instead of mixing results."""
    return {"model": str(Path(run.model_folder).resolve()), "checkpoint": run.checkpoint,
            "folds": [str(f) for f in run.folds], "attack": run.attack.settings(),
            "labels": None if run.labels_folder is None else str(Path(run.labels_folder).resolve()),
            "eot_mirroring": bool(run.eot_mirroring),
            "sliding_window": {"tile_step_size": 0.5, "gaussian": True, "tile_batch_size": run.tile_batch_size},
            "versions": versions(), **_previous_stage_settings(run),
            **({"ensemble_members": [str(Path(m).resolve()) for m in run.members],
                # how members on another network grid than the first are reached (per case: ensemble_grids)
                "ensemble_other_grids": "linear resampling"} if run.members else {})}


def _previous_stage_settings(run: AttackRun) -> dict:
    """A cascade stage's previous stage and how the gradient passes it (absent for other configurations)."""
    previous = run.previous_stage
    if previous is None:
        return {}
    return {"previous_stage": {"model": str(Path(previous).resolve()), "gradient": run.previous_stage_gradient,
                               "gradient_means": GRADIENT_MEANS[run.previous_stage_gradient]}}


def prior_report(output_folder: Path, settings: dict, resume: bool) -> Optional[dict]:
    """attack.json of an earlier run in ``output_folder``, parts merged (None: none there). Refuses
    a folder with files no run of ours wrote, and a resume whose settings differ (one line naming
    the setting)."""
    if not output_folder.is_dir():
        if output_folder.exists():
            raise UserError(f"the output path {output_folder} is a file, not a folder; choose another (-o)")
        return None
    prior = load_records(output_folder)
    if prior is None:
        if any(not p.name.startswith(".") for p in output_folder.iterdir()):
            raise UserError(f"the output folder {output_folder} holds files that nnUNetv2_adv_attack did not write "
                            f"(no {ATTACK_JSON}); choose a new folder (nothing was changed)")
        return None
    if resume:
        difference = first_difference(prior.get("settings"), settings)
        if difference is not None:
            raise UserError(f"{output_folder} holds results made with other settings ({difference}); resume only "
                            f"with the same settings, or choose a new folder (nothing was changed)")
    return prior


def resumable_cases(output_folder: Path, prior: Optional[dict], cases: Dict[str, dict],
                    inputs: Dict[str, dict]) -> Tuple[set, Dict[str, str]]:
    """``(done, changed)``: the cases whose images are on disk as recorded (:func:`verified_cases`)
    and were made from the case's input files as they are now (``inputs``, :func:`case_inputs`);
    ``changed``: case -> what changed (:func:`input_change`) for verified cases made from other inputs."""
    records = (prior or {}).get("cases", {})
    done, changed = set(), {}
    for case in verified_cases(output_folder, prior, cases) & set(inputs):  # the others fail with their problem
        change = input_change(records[case].get("inputs"), inputs[case])
        if change is None:
            done.add(case)
        else:
            changed[case] = change
    return done, changed


def check_leftovers(output_folder: Path, prior: Optional[dict], all_cases: Dict[str, dict]) -> None:
    """A folder with an earlier run's results may hold only what this run writes: the images of the
    input's cases and the run records. Anything else (the images of a case no longer in the input, a
    file added since) would be read by ``nnUNetv2_predict`` with the results: one line naming it, and
    nothing is changed."""
    if prior is None:
        return
    expected = {n for info in all_cases.values() for n in info["names"]}
    ours = {n for rec in prior.get("cases", {}).values() for n in (rec.get("files") or {})}
    stray = sorted(p.name for p in output_folder.iterdir()
                   if not p.name.startswith(".") and p.name not in expected and not _is_record(p.name))
    if stray:
        described = [f"{n} ({'its case is no longer in the input' if n in ours else 'not written by nnunet_adv'})"
                     for n in stray[:3]] + ([f"{len(stray) - 3} more"] if len(stray) > 3 else [])
        raise UserError(f"{output_folder} holds file(s) that are not results of this input folder: "
                        f"{', '.join(described)}; nnUNetv2_predict would read them with the results: move them "
                        f"out, or choose a new folder (nothing was changed)")


def _is_record(name: str) -> bool:
    """attack.json or one part's record (``attack.partI-of-N.json``)."""
    stem, _, ext = ATTACK_JSON.rpartition(".")
    return name == ATTACK_JSON or re.fullmatch(rf"{re.escape(stem)}\.part\d+-of-\d+\.{ext}", name) is not None


def verified_cases(output_folder: Path, prior: Optional[dict], cases: Dict[str, dict]) -> set:
    """Cases whose every image is on disk exactly as the earlier run recorded it (SHA-256)."""
    records = (prior or {}).get("cases", {})
    done = set()
    for case, info in cases.items():
        rec = records.get(case, {})
        digests = rec.get("files") or {}
        if info["problem"] is None and rec.get("status") == "ok" and set(digests) == set(info["names"]) and \
                all(has_digest(output_folder / n, d) for n, d in digests.items()):
            done.add(case)
    return done


def _report_header(run: AttackRun, model, settings: dict) -> dict:
    folder = Path(run.model_folder).resolve()
    parts = folder.name.split("__")
    trainer, plans, configuration = parts if len(parts) == 3 else (None, None, None)
    info = {"folder": str(folder), "folds": run.folds, "checkpoint": run.checkpoint,
            "trainer": trainer, "plans": plans, "configuration": configuration, "dataset": folder.parent.name}
    if model is not None:
        p = model.predictor
        info.update(trainer=model.trainer_name, plans=p.plans_manager.plans_name,
                    dataset=p.plans_manager.dataset_name, patch_size=list(model.patch_size),
                    mirror_axes=None if model.mirror_axes is None else list(model.mirror_axes))
    attacked_axes = None
    if run.eot_mirroring and model is not None and model.mirror_axes:
        attacked_axes = list(model.mirror_axes)
    cfg = run.attack
    return {
        "command": run.command,
        "argv": list(run.argv),
        "started": _now(),
        "settings": settings,
        "model": info,
        "attack": {"name": cfg.name, "summary": _summary(cfg.name), "label": cfg.label,
                   "options": cfg.resolved_options(), "units": cfg.units(),
                   "eot_mirroring": run.eot_mirroring, "mirror_axes_attacked": attacked_axes,
                   "sliding_window": {"tile_step_size": 0.5, "gaussian": True, "tile_batch_size": run.tile_batch_size},
                   "target": "labels" if run.labels_folder is not None else "clean prediction",
                   "labels_folder": None if run.labels_folder is None else str(Path(run.labels_folder).resolve())},
        "export": {"dtype": "float32",
                   "rule": "adv = clip(raw + clip(d, -eps_raw, eps_raw), min(raw, lower), max(raw, upper)) per "
                           "channel and voxel; d = the network-space perturbation times the normalisation scale, "
                           "un-resampled (resampling_fn_data), un-cropped, un-transposed; eps_raw = eps_network * "
                           "scale; [lower, upper] = CT: [p0.5, p99.5] of the dataset, others: the raw image's "
                           "[min, max] inside nnU-Net's crop (RGB [0, 255]); L2: d scaled onto the network-unit "
                           "L2 ball; attacks without eps (VAFA): box only"},
        "device": run.device,
        "cases": {},
    }


def _summary(name: str) -> str:
    return attack_class(name).summary


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
