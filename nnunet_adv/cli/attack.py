"""``nnUNetv2_adv_attack``: whole-volume attacks on a trained nnU-Net model, written as raw images.

Reads ``CASE_XXXX.ext`` images from a folder (nnU-Net's naming, the dataset's reader/writer),
preprocesses them exactly as nnU-Net, attacks the whole volume in network space, maps the
perturbation back to the raw geometry, clips it to the raw budget and writes the adversarial
images with the input's file names and geometry. ``nnUNetv2_predict -i OUTPUT ...`` then
predicts them unchanged. ``attack.json`` in the output folder records the command, the model,
every attack option and per-case norms, similarities, losses and timings.

See docs/attack_cli.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from nnunet_adv.cli.common import (CLIError, OneLineArgumentParser, cli_main, dataset_results_folder,
                                   pick_device)

ATTACK_JSON = "attack.json"
_IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl", ".png", ".bmp", ".tif", ".tiff")

# attack-library options exposed as flags: name -> argparse kwargs
_BOOL = {"type": lambda s: _parse_bool(s), "nargs": "?", "const": True, "metavar": "true|false"}
_ATTACK_FLAGS = {
    "steps": {"type": int, "help": "attack iterations"},
    "alpha": {"type": float, "help": "step size in x/255 of each channel's intensity window "
                                     "(default: the attack's, 0.01 on [0,1] images = 2.55)"},
    "std": {"type": float, "help": "Gaussian-noise std (gn) in x/255 of the window (default 4)"},
    "q_max": {"type": float, "help": "VAFA: upper bound of the quantisation table (the budget)"},
    "q_min": {"type": float, "help": "VAFA: lower bound of the quantisation table"},
    "block_size": {"type": int, "nargs": "+", "help": "VAFA: block size per axis (e.g. 32 32 32)"},
    "use_ssim_loss": {**_BOOL, "help": "VAFA: add the SSIM term (flag alone = true)"},
    "random_start": {**_BOOL, "help": "random start in the eps-ball (flag alone = true)"},
    "restarts": {"type": int, "help": "restarts; the worst case per case is kept"},
    "norm": {"choices": ("linf", "l2"), "help": "threat model norm"},
    "targeted": {**_BOOL, "help": "targeted attack (target: --attack_option target=K, default the NLCEN rule)"},
}


def _parse_bool(s: str) -> bool:
    v = str(s).lower()
    if v in ("1", "true", "yes", "y", "on"):
        return True
    if v in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _parse_value(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="nnUNetv2_adv_attack", allow_abbrev=False,
                description="Attack the images in a folder with a trained nnU-Net model (whole volumes, in nnU-Net's "
                            "network space) and write the adversarial images with the inputs' names and geometry, "
                            "ready for nnUNetv2_predict.")
    g = p.add_argument_group("input / output (as nnUNetv2_predict)")
    g.add_argument("-i", default=None, help="input folder with CASE_XXXX.ext images (nnU-Net's naming); never modified")
    g.add_argument("-o", default=None, help="output folder for the adversarial images and attack.json "
                                             "(must not be or contain the input folder)")
    g.add_argument("-l", default=None, help="labels folder with CASE.ext reference segmentations (labelsTr naming). "
                                            "Without it the attack targets the model's own clean prediction")
    m = p.add_argument_group("model (either -d/-c/-tr/-p as nnUNetv2_predict, or -m as nnUNetv2_predict_from_modelfolder)")
    m.add_argument("-d", default=None, help="dataset name or id")
    m.add_argument("-c", default=None, help="configuration (e.g. 3d_fullres, 2d)")
    m.add_argument("-tr", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    m.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    m.add_argument("-m", default=None, help="trained model folder (.../TRAINER__PLANS__CONFIG) instead of -d/-c/-tr/-p")
    m.add_argument("-f", nargs="+", action="extend", default=None,
                   help="fold(s); several = ensemble as nnU-Net (-f 0 1 or -f 0 -f 1; 'all'). "
                        "Default: every fold_X of the model folder that has the checkpoint")
    m.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    a = p.add_argument_group("attack")
    a.add_argument("--attack_name", default="pgd", help="attack (default pgd); see --list_attacks")
    budget = a.add_mutually_exclusive_group()
    budget.add_argument("--eps", type=float, default=None,
                        help="budget in x/255 of each channel's intensity window (the reference code's units; "
                             "default: the attack's, 4)")
    budget.add_argument("--eps_raw", type=float, default=None, help="budget in raw intensity units (e.g. HU)")
    for name, kw in _ATTACK_FLAGS.items():
        kw = {"metavar": name.upper(), **kw} if "choices" not in kw else kw
        a.add_argument(f"--{name}", dest=f"attack_{name}", default=None, **kw)
    a.add_argument("--attack_option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the attack library (e.g. temperature=(0.1,1e-20)); repeatable")
    a.add_argument("--seed", type=int, default=0, help="seed of the attack's random generator (default 0)")
    a.add_argument("--eot_mirroring", action="store_true",
                   help="attack the average over the model's allowed mirror axes (nnU-Net's test-time mirroring)")
    a.add_argument("--list_attacks", action="store_true", help="print the attacks and their options, then exit")
    r = p.add_argument_group("run")
    r.add_argument("-device", default=None, choices=("cpu", "cuda", "mps"),
                   help="device (default cuda if available, else cpu)")
    r.add_argument("--tile_batch_size", type=int, default=1,
                   help="sliding-window tiles per network call (default 1, as nnU-Net; the gradient is the same; "
                        "memory grows with it; on a CPU 4 is several times faster per tile)")
    r.add_argument("--continue_prediction", action="store_true",
                   help="skip cases whose adversarial images already exist in the output folder")
    r.add_argument("--disable_progress_bar", action="store_true", help="no tqdm bars")
    return p


def _valid_flags(name: str) -> List[str]:
    from nnunet_adv.attacks import attack_defaults

    accepted = set(attack_defaults(name))
    flags = ["--seed"] if "seed" in accepted else []
    if "eps" in accepted:
        flags += ["--eps", "--eps_raw"]
    flags += [f"--{k}" for k in _ATTACK_FLAGS if k in accepted]
    others = sorted(k for k in accepted if k not in _ATTACK_FLAGS and k not in
                    ("eps", "seed", "lower", "upper", "loss", "amp_loss_scale"))
    flags += [f"--attack_option {k}=..." for k in others]
    return flags


# ----------------------------------------------------------------------------------------------
class AttackCommand:
    def __init__(self, args, argv: List[str]):
        self.args, self.argv = args, argv
        self.started = time.time()

    def say(self, text: str) -> None:
        print(f"[nnUNetv2_adv_attack] {text}", flush=True)

    # -------------------------------------------------------------------------------- setup
    def attack_config(self):
        from nnunet_adv.volume_attack import AttackConfig, attack_names

        a = self.args
        name = a.attack_name.lower().replace("_", "-")
        if name not in attack_names():
            raise CLIError(f"unknown attack {a.attack_name!r}; valid attacks: {', '.join(attack_names())}")
        from nnunet_adv.attacks import attack_defaults

        accepted = set(attack_defaults(name))
        options = {}
        given_bad = []
        for key in _ATTACK_FLAGS:
            value = getattr(a, f"attack_{key}")
            if value is None or key in ("alpha", "std"):
                continue
            if key not in accepted:
                given_bad.append(f"--{key}")
                continue
            options[key] = tuple(value) if key == "block_size" else value
        for key, flag in (("alpha", "--alpha"), ("std", "--std")):
            if getattr(a, f"attack_{key}") is not None and key not in accepted:
                given_bad.append(flag)
        if (a.eps is not None or a.eps_raw is not None) and "eps" not in accepted:
            given_bad.append("--eps" if a.eps is not None else "--eps_raw")
        for item in a.attack_option:
            if "=" not in item:
                raise CLIError(f"--attack_option expects KEY=VALUE, got {item!r}")
            key, value = item.split("=", 1)
            key = key.strip()
            if key not in accepted or key in ("eps", "alpha", "std", "seed", "lower", "upper", "loss",
                                              "amp_loss_scale") or key in _ATTACK_FLAGS:
                given_bad.append(f"--attack_option {key}")
                continue
            options[key] = _parse_value(value)
        if given_bad:
            raise CLIError(f"option(s) {', '.join(given_bad)} do not apply to attack '{name}'; valid options for "
                           f"{name}: {', '.join(_valid_flags(name))}")
        try:
            return AttackConfig(name=name, options=options, eps=a.eps, eps_raw=a.eps_raw,
                                alpha=a.attack_alpha, std=a.attack_std, seed=a.seed,
                                eot_mirroring=a.eot_mirroring)
        except ValueError as e:
            raise CLIError(f"attack '{name}': {e}") from None

    def model_folder(self) -> Path:
        a = self.args
        if a.m is not None:
            if a.d is not None or a.c is not None:
                raise CLIError("give either -m MODEL_FOLDER or -d DATASET -c CONFIGURATION, not both")
            folder = Path(a.m)
        else:
            if a.d is None or a.c is None:
                raise CLIError("the model is missing: give -d DATASET -c CONFIGURATION [-tr TRAINER -p PLANS] "
                               "or -m MODEL_FOLDER")
            folder = dataset_results_folder(a.d) / f"{a.tr}__{a.p}__{a.c}"
        if not folder.is_dir():
            raise CLIError(f"model folder {folder} does not exist")
        for required in ("plans.json", "dataset.json"):
            if not (folder / required).is_file():
                raise CLIError(f"{folder} is not a trained nnU-Net model folder (no {required})")
        return folder

    def folds(self, folder: Path) -> list:
        a = self.args
        available = sorted(p.name[len("fold_"):] for p in folder.glob("fold_*") if p.is_dir())
        if a.f is None:
            folds = [f for f in available if (folder / f"fold_{f}" / a.chk).is_file()]
            if not folds:
                raise CLIError(f"no fold of {folder} has the checkpoint {a.chk} (folds: {', '.join(available) or 'none'})")
        else:
            folds = list(dict.fromkeys(a.f))
        parsed = []
        for f in folds:
            if f != "all" and not re.fullmatch(r"\d+", str(f)):
                raise CLIError(f"fold {f!r} is not a number or 'all'")
            if not (folder / f"fold_{f}").is_dir():
                raise CLIError(f"fold {f} does not exist in {folder} (available: {', '.join(available) or 'none'})")
            if not (folder / f"fold_{f}" / a.chk).is_file():
                present = sorted(p.name for p in (folder / f"fold_{f}").glob("*.pth"))
                raise CLIError(f"checkpoint {folder / f'fold_{f}' / a.chk} does not exist "
                               f"(checkpoints there: {', '.join(present) or 'none'})")
            parsed.append(f if f == "all" else int(f))
        return parsed

    @staticmethod
    def cases(input_folder: Path, file_ending: str, num_channels: int) -> Dict[str, dict]:
        """case id -> {'files': [...] or None, 'problem': str or None}, nnU-Net's naming."""
        if not input_folder.is_dir():
            raise CLIError(f"input folder {input_folder} does not exist")
        files = sorted(p.name for p in input_folder.iterdir() if p.is_file() and not p.name.startswith("."))
        other = [f for f in files if not f.endswith(file_ending) and f.lower().endswith(_IMAGE_ENDINGS)]
        if other:
            raise CLIError(f"{input_folder / other[0]}: file ending does not match the dataset's {file_ending!r} "
                           f"({len(other)} such file(s); nnU-Net would ignore them)")
        pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))
        channels: Dict[str, Dict[int, str]] = {}
        for f in files:
            if not f.endswith(file_ending):
                continue
            match = pattern.fullmatch(f)
            if match is None:
                raise CLIError(f"{input_folder / f}: not an nnU-Net image file name (expected CASE_XXXX{file_ending})")
            channels.setdefault(match.group(1), {})[int(match.group(2))] = f
        if not channels:
            raise CLIError(f"no images ending in {file_ending} in {input_folder}")
        out = {}
        for case, chans in sorted(channels.items()):
            problem = None
            extra = sorted(c for c in chans if c >= num_channels)
            missing = [c for c in range(num_channels) if c not in chans]
            if extra:
                problem = (f"{chans[extra[0]]}: channel {extra[0]} but the dataset has {num_channels} channel(s) "
                           f"(_0000.._{num_channels - 1:04d})")
            elif missing:
                problem = (f"{case}_{missing[0]:04d}{file_ending} is missing: the dataset has {num_channels} "
                           f"channel(s)")
            files_ = [str(input_folder / chans[c]) for c in range(num_channels)] if problem is None else None
            out[case] = {"files": files_, "names": [chans[c] for c in sorted(chans)], "problem": problem}
        return out

    @staticmethod
    def check_folders(input_folder: Path, output_folder: Path, labels_folder: Optional[Path]) -> None:
        i, o = input_folder.resolve(), output_folder.resolve()
        if o == i:
            raise CLIError(f"the output folder {output_folder} is the input folder; choose another (-o)")
        if o in i.parents:
            raise CLIError(f"the output folder {output_folder} contains the input folder {input_folder}; choose another")
        if i in o.parents:
            raise CLIError(f"the output folder {output_folder} is inside the input folder {input_folder} "
                           f"(the input folder is never modified); choose another")
        if labels_folder is not None:
            lab = labels_folder.resolve()
            if not lab.is_dir():
                raise CLIError(f"labels folder {labels_folder} does not exist")
            if o == lab or o in lab.parents or lab in o.parents:
                raise CLIError(f"the output folder {output_folder} overlaps the labels folder {labels_folder}")

    # -------------------------------------------------------------------------------- run
    def run(self) -> int:
        a = self.args
        if a.list_attacks:
            from nnunet_adv.volume_attack import attack_names

            for name in attack_names():
                print(f"{name}: {', '.join(_valid_flags(name))}")
            return 0
        missing = [flag for flag, value in (("-i", a.i), ("-o", a.o)) if value is None]
        if missing:
            raise CLIError(f"the following arguments are required: {', '.join(missing)}")
        if a.tile_batch_size < 1:
            raise CLIError(f"--tile_batch_size must be >= 1, got {a.tile_batch_size}")
        config = self.attack_config()
        folder = self.model_folder()
        folds = self.folds(folder)
        dataset_json = json.loads((folder / "dataset.json").read_text())
        file_ending = dataset_json["file_ending"]
        num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
        input_folder, output_folder = Path(a.i), Path(a.o)
        labels_folder = None if a.l is None else Path(a.l)
        if not input_folder.is_dir():
            raise CLIError(f"input folder {input_folder} does not exist")
        self.check_folders(input_folder, output_folder, labels_folder)
        cases = self.cases(input_folder, file_ending, num_channels)
        device_name = pick_device(a.device)

        import torch

        from nnunet_adv.export import ExportError, tmp_folder
        from nnunet_adv.trained_model import load_trained_model
        from nnunet_adv.volume_attack import CaseError, VolumeAttack

        device = torch.device(device_name)
        done = {c for c, info in cases.items() if a.continue_prediction and info["problem"] is None
                and all((output_folder / n).is_file() for n in info["names"])}
        model = engine = None
        if len(done) < len(cases):
            self.say(f"model {folder} folds {folds} ({a.chk}) on {device_name}")
            try:
                model = load_trained_model(folder, folds, a.chk, device=device)
            except FileNotFoundError:
                raise
            except Exception as e:
                raise CLIError(f"cannot load the model from {folder}: {type(e).__name__}: "
                               f"{(str(e).strip().splitlines() or [''])[-1][:300]}") from None
            try:
                engine = VolumeAttack(model, config, device, progress=not a.disable_progress_bar, log=self.say,
                                      tile_batch_size=a.tile_batch_size)
            except (ValueError, ExportError) as e:
                raise CLIError(str(e)) from None
            if labels_folder is None:
                self.say("no labels (-l): the attack targets the model's own clean prediction")
        else:
            self.say(f"--continue_prediction: all {len(cases)} case(s) are done in {output_folder}; nothing to attack")

        output_folder.mkdir(parents=True, exist_ok=True)
        partial = tmp_folder(output_folder)
        shutil.rmtree(partial, ignore_errors=True)
        previous = self._previous_records(output_folder) if a.continue_prediction else {}
        report = self._report_header(folder, folds, model, config, device_name, labels_folder)
        records: Dict[str, dict] = report["cases"]

        from tqdm import tqdm

        bar = tqdm(cases.items(), desc=f"{config.name} on {len(cases)} case(s)", unit="case",
                   disable=a.disable_progress_bar)
        for case, info in bar:
            bar.set_postfix_str(case)
            outputs = [output_folder / n for n in info["names"]]
            if case in done:
                rec = dict(previous.get(case, {}))
                rec.update(status=rec.get("status", "ok"), skipped=True)
                records[case] = rec
                self._write_report(output_folder, report)
                continue
            started = time.perf_counter()
            try:
                if info["problem"] is not None:
                    raise CaseError(info["problem"])
                label_file = None
                if labels_folder is not None:
                    label_file = labels_folder / f"{case}{file_ending}"
                    if not label_file.is_file():
                        raise CaseError(f"no label file {label_file} for case {case}")
                partial.mkdir(exist_ok=True)
                tmp_files = [partial / n for n in info["names"]]
                rec = engine.run_case(info["files"], None if label_file is None else str(label_file), outputs,
                                      tmp_files)
                for src, dst in zip(tmp_files, outputs):
                    os.replace(src, dst)
                records[case] = rec
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one bad case must not stop the others
                reason = _one_line(e)
                records[case] = {"status": "failed", "reason": reason,
                                 "seconds": round(time.perf_counter() - started, 3)}
                tqdm.write(f"error: case {case} failed: {reason}", file=sys.stderr)
            self._write_report(output_folder, report)
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)

        failed = sorted(c for c, r in records.items() if r.get("status") != "ok")
        skipped = sorted(c for c, r in records.items() if r.get("skipped"))
        report["summary"] = {"cases": len(records), "ok": len(records) - len(failed), "failed": len(failed),
                             "skipped": len(skipped), "failed_cases": failed, "skipped_cases": skipped,
                             "seconds": round(time.time() - self.started, 1)}
        report["finished"] = _now()
        self._write_report(output_folder, report)
        ok_new = [c for c, r in records.items() if r.get("status") == "ok" and not r.get("skipped")]
        for c in ok_new:
            r = records[c]
            self.say(f"{c}: L-inf {_fmt(r['linf_raw'])} (raw), SSIM {_fmt(r['ssim'])}, "
                     f"loss {r['loss_clean']:.3f} -> {r['loss_adv']:.3f} (exported: {_fmt(r['loss_adv_exported'])}), "
                     f"{r['seconds']:.1f} s")
        self.say(f"{len(records) - len(failed)} ok ({len(skipped)} skipped), {len(failed)} failed"
                 + (f": {', '.join(failed)}" if failed else "") + f"; report {output_folder / ATTACK_JSON}")
        if failed:
            print(f"error: {len(failed)} case(s) failed: {', '.join(failed)} (reasons in {output_folder / ATTACK_JSON})",
                  file=sys.stderr)
            return 1
        return 0

    # -------------------------------------------------------------------------------- report
    def _report_header(self, folder, folds, model, config, device_name, labels_folder) -> dict:
        parts = folder.resolve().name.split("__")
        trainer, plans, configuration = parts if len(parts) == 3 else (None, None, None)
        info = {"folder": str(folder.resolve()), "folds": folds, "checkpoint": self.args.chk,
                "trainer": trainer, "plans": plans, "configuration": configuration,
                "dataset": folder.resolve().parent.name}
        if model is not None:
            p = model.predictor
            info.update(trainer=model.trainer_name, plans=p.plans_manager.plans_name,
                        dataset=p.plans_manager.dataset_name, patch_size=list(model.patch_size),
                        mirror_axes=None if model.mirror_axes is None else list(model.mirror_axes))
        attacked_axes = None
        if config.eot_mirroring and model is not None and model.mirror_axes:
            attacked_axes = list(model.mirror_axes)
        return {
            "command": shlex.join(["nnUNetv2_adv_attack", *self.argv]),
            "argv": list(self.argv),
            "started": _now(),
            "model": info,
            "attack": {"name": config.name, "options": config.resolved_options(), "units": config.units(),
                       "eot_mirroring": config.eot_mirroring, "mirror_axes_attacked": attacked_axes,
                       "sliding_window": {"tile_step_size": 0.5, "gaussian": True,
                                          "tile_batch_size": self.args.tile_batch_size},
                       "target": "labels" if labels_folder is not None else "clean prediction",
                       "labels_folder": None if labels_folder is None else str(labels_folder.resolve())},
            "export": {"dtype": "float32",
                       "rule": "adv = clip(raw + clip(d, -eps_raw, eps_raw), min(raw, lower), max(raw, upper)) per "
                               "channel and voxel; d = the network-space perturbation times the normalisation scale, "
                               "un-resampled (resampling_fn_data), un-cropped, un-transposed; eps_raw = eps_network * "
                               "scale; [lower, upper] = CT: [p0.5, p99.5] of the dataset, others: the raw image's "
                               "[min, max] inside nnU-Net's crop (RGB [0, 255]); L2: d scaled onto the network-unit "
                               "L2 ball; attacks without eps (VAFA): box only"},
            "device": device_name,
            "cases": {},
        }

    @staticmethod
    def _previous_records(output_folder: Path) -> dict:
        f = output_folder / ATTACK_JSON
        if not f.is_file():
            return {}
        try:
            return json.loads(f.read_text()).get("cases", {})
        except (ValueError, OSError):
            return {}

    @staticmethod
    def _write_report(output_folder: Path, report: dict) -> None:
        tmp = output_folder / f".{ATTACK_JSON}.tmp"
        tmp.write_text(json.dumps(report, indent=2, default=str))
        os.replace(tmp, output_folder / ATTACK_JSON)


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    from nnunet_adv.export import ExportError
    from nnunet_adv.volume_attack import CaseError

    if isinstance(e, (CaseError, ExportError)):
        return text[:500]
    return f"{type(e).__name__}: {text[:500]}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def run():
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:
            name = args.attack_name.lower().replace("_", "-")
            try:
                valid = f"valid options for {name}: {', '.join(_valid_flags(name))}"
            except ValueError:
                valid = "see --list_attacks"
            raise CLIError(f"unknown option(s) {' '.join(unknown)}; {valid} (and see --help)")
        return AttackCommand(args, argv).run()

    return cli_main(run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
