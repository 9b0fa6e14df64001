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
import shlex
import sys
from pathlib import Path
from typing import List

from nnunet_adv.attack_config import AttackConfig, attack_names
from nnunet_adv.attack_strings import parse_bool
from nnunet_adv.attacks import attack_class, attack_defaults
from nnunet_adv.attacks.options import canonical_name
from nnunet_adv.cli.common import CLIError, OneLineArgumentParser, at_least_one, cli_main, pick_device
from nnunet_adv.errors import UserError
from nnunet_adv.records import check_part
from nnunet_adv.volume.cascade_options import DEFAULT_GRADIENT, GRADIENTS

# attack-library options exposed as flags: name -> argparse kwargs
_BOOL = {"type": lambda s: _parse_bool(s), "nargs": "?", "const": True, "metavar": "true|false"}  # noqa: E731
_ATTACK_FLAGS = {
    "steps": {"type": int, "help": "attack iterations"},
    "alpha": {"type": float, "help": "step size in x/255 of each channel's intensity window "
                                     "(default: the attack's, 0.01 on [0,1] images = 2.55)"},
    "std": {"type": float, "help": "Gaussian-noise std (gn) in x/255 of the window (default 4)"},
    "q_max": {"type": float, "help": "VAFA: upper bound of the quantisation table (the budget)"},
    "q_min": {"type": float, "help": "VAFA: lower bound of the quantisation table"},
    "block_size": {"type": int, "nargs": "+",
                   "help": "VAFA: block size per axis (e.g. 32 32 32; one value: every axis)"},
    "use_ssim_loss": {**_BOOL, "help": "VAFA: add the SSIM term (flag alone = true)"},
    "random_start": {**_BOOL, "help": "random start in the eps-ball (flag alone = true)"},
    "restarts": {"type": int, "help": "restarts; the worst case per case is kept"},
    "norm": {"choices": ("linf", "l2"), "help": "threat model norm"},
    "targeted": {**_BOOL, "help": "targeted attack (target: --attack_option target=K, default the NLCEN rule)"},
}


def _parse_bool(s: str) -> bool:
    try:
        return parse_bool(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
    m = p.add_argument_group("model (either -d/-c/-tr/-p as nnUNetv2_predict, "
                             "or -m as nnUNetv2_predict_from_modelfolder)")
    m.add_argument("-d", default=None, help="dataset name or id")
    m.add_argument("-c", default=None, help="configuration (e.g. 3d_fullres, 2d)")
    m.add_argument("-tr", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    m.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    m.add_argument("-m", default=None, help="trained model folder (.../TRAINER__PLANS__CONFIG) instead of -d/-c/-tr/-p")
    m.add_argument("-f", nargs="+", action="extend", default=None,
                   help="fold(s); several = ensemble as nnU-Net (-f 0 1 or -f 0 -f 1; 'all'). "
                        "Default: every fold_X of the model folder that has the checkpoint")
    m.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    m.add_argument("--inference_information", nargs="?", const="", default=None, metavar="JSON",
                   help="the model or ensemble of configurations nnUNetv2_find_best_configuration selected: its "
                        "inference_information.json (alone: the one of -d in nnUNet_results); an ensemble is attacked "
                        "through all its members at once (their averaged probabilities); folds from the file unless -f")
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
    a.add_argument("--members", nargs="+", default=None, metavar="NAME[(KEY=VALUE,...)]",
                   help="ensemble only: the member attacks (e.g. 'pgd(steps=20)' apgd-ce segpgd); per case the member "
                        "image with the lowest Dice is kept; --eps/--alpha/--seed go to members that leave theirs out")
    a.add_argument("--window_raw", nargs=2, type=float, default=None, metavar=("LOWER", "UPPER"),
                   help="CT only: the raw window (HU) that replaces the dataset's [p0.5, p99.5] for this attack's "
                        "budget and box, e.g. the VAFA reference code's -175 250")
    a.add_argument("--attack_option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the attack library (e.g. temperature=(0.1,1e-20)); repeatable")
    a.add_argument("--seed", type=int, default=0, help="seed of the attack's random generator (default 0)")
    a.add_argument("--eot_mirroring", action="store_true",
                   help="attack the average over the model's allowed mirror axes (nnU-Net's test-time mirroring)")
    a.add_argument("--previous_stage_gradient", choices=GRADIENTS, default=DEFAULT_GRADIENT,
                   help="3d_cascade_fullres only: how the gradient passes the 3d_lowres stage's argmax: 'softmax' (its "
                        "softmax as a differentiable surrogate, default) or 'fixed' (the previous stage held at its "
                        "clean prediction); the exported image is always segmented by both stages, as deployed")
    a.add_argument("--list_attacks", action="store_true", help="print the attacks and their options, then exit")
    r = p.add_argument_group("run")
    r.add_argument("-device", default=None, choices=("cpu", "cuda", "mps"),
                   help="device (default cuda if available, else cpu)")
    r.add_argument("--tile_batch_size", type=int, default=1,
                   help="sliding-window tiles per network call (default 1, as nnU-Net; the gradient is the same; "
                        "memory grows with it; on a CPU 4 is several times faster per tile)")
    r.add_argument("-num_parts", type=int, default=1,
                   help="split the cases over this many runs (as nnUNetv2_predict; parts may run at once on other GPUs "
                        "or machines sharing the output folder); then run once without it and with "
                        "--continue_prediction to merge their records into attack.json")
    r.add_argument("-part_id", type=int, default=0, help="which part this run attacks (0 .. num_parts - 1)")
    r.add_argument("--continue_prediction", action="store_true",
                   help="skip cases whose adversarial images already exist in the output folder")
    r.add_argument("--disable_progress_bar", action="store_true", help="no tqdm bars")
    return p


def _valid_flags(name: str) -> List[str]:
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
def attack_config_from_args(a):
    """The :class:`AttackConfig` the flags describe: the flags become the items of an attack string
    (eps/alpha/std in x/255 of the window, as there) and go through :meth:`AttackConfig.from_options`,
    the same door and validation as ``"pgd:eps=4,steps=20"``. Only what is about flags is checked
    here: which flags the attack takes, named as flags."""
    name = canonical_name(a.attack_name)
    if name not in attack_names():
        raise CLIError(f"unknown attack {a.attack_name!r}; valid attacks: {', '.join(attack_names())}")
    items = _flag_items(a, name)
    try:
        return AttackConfig.from_options(name, items)
    except UserError as e:
        raise CLIError(f"attack '{name}': {e}") from None


def _flag_items(a, name: str) -> list:
    """``[(key, value text), ...]`` of the flags given (``--block_size 8 8 8`` -> ``block_size=8x8x8``,
    ``--window_raw -175 250`` -> ``window_raw=(-175.0,250.0)``, ``--attack_option K=V`` as written)."""
    budget = [("eps", a.eps), ("eps_raw", a.eps_raw), ("seed", a.seed),
              ("window_raw", None if a.window_raw is None else "({},{})".format(*a.window_raw))]
    flags = [(k, getattr(a, f"attack_{k}")) for k in _ATTACK_FLAGS if getattr(a, f"attack_{k}") is not None]
    options = []
    for item in a.attack_option:
        if "=" not in item:
            raise CLIError(f"--attack_option expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options.append((key.strip(), value))
    if name == "ensemble":
        if not a.members:
            raise CLIError("--attack_name ensemble needs --members (e.g. --members 'pgd(steps=20)' apgd-ce segpgd)")
        given = [f"--{k}" for k, _ in flags if k != "alpha"] + ["--attack_option"] * bool(options)
        if given:
            raise CLIError(f"option(s) {', '.join(given)} do not apply to the ensemble: give them to its members, "
                           f"e.g. --members 'pgd(steps=20)'")
        alpha = [("alpha", a.attack_alpha)] if a.attack_alpha is not None else []
        return [("members", "+".join(a.members))] + [(k, _text(v)) for k, v in budget + alpha if v is not None]
    if a.members is not None:
        raise CLIError("--members is for --attack_name ensemble")
    accepted = set(attack_defaults(name))
    bad = [f"--{k}" for k, _ in flags if k not in accepted]
    bad += ["--eps" if a.eps is not None else "--eps_raw"] if (a.eps, a.eps_raw) != (None, None) \
        and "eps" not in accepted else []
    seen = {k for k, _ in flags}
    for key, _ in options:
        if key in seen:
            raise CLIError(f"--attack_option {key} is given twice; give it once")
        seen.add(key)
        if key not in accepted or key in _NOT_OPTIONS or key in _ATTACK_FLAGS:
            bad.append(f"--attack_option {key}")
    if bad:
        raise CLIError(f"option(s) {', '.join(bad)} do not apply to attack '{name}'; valid options for "
                       f"{name}: {', '.join(_valid_flags(name))}")
    budget = [(k, v) for k, v in budget if v is not None and (k != "seed" or "seed" in accepted)]
    return [(k, _text(v)) for k, v in budget + flags] + options


#: options that are not --attack_option's: budgets (their own flags) and what is computed per batch
_NOT_OPTIONS = ("eps", "alpha", "std", "seed", "lower", "upper", "loss", "amp_loss_scale")


def _text(value) -> str:
    """A flag's value as an attack string writes it (``[8, 8, 8]`` -> ``8x8x8``)."""
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)


def say(text: str) -> None:
    print(f"[nnUNetv2_adv_attack] {text}", flush=True)


def run(args, argv: List[str]) -> int:
    from nnunet_adv.volume import folders  # nnU-Net: imported once the flags are read (--help stays fast)

    a = args
    if a.list_attacks:
        for name in attack_names():
            flags = _valid_flags(name) if name != "ensemble" else ["--members A B(KEY=VALUE,...) ...", "--eps",
                                                                   "--eps_raw", "--alpha", "--seed"]
            print(f"{name}: {attack_class(name).summary}\n    options: {', '.join(flags)}")
        return 0
    missing = [flag for flag, value in (("-i", a.i), ("-o", a.o)) if value is None]
    if missing:
        raise CLIError(f"the following arguments are required: {', '.join(missing)}")
    at_least_one("--tile_batch_size", a.tile_batch_size)
    part = check_part(a.num_parts, a.part_id)
    config = attack_config_from_args(a)
    folder, members, folds = _model_of(a, folders)
    folds = folders.resolve_folds(folder, folds, a.chk)
    input_folder, output_folder = Path(a.i), Path(a.o)
    labels_folder = None if a.l is None else Path(a.l)
    device = pick_device(a.device)

    from nnunet_adv.volume.runner import AttackRun, run_attack  # nnU-Net and torch: after the flags are read

    result = run_attack(AttackRun(attack=config, model_folder=folder, folds=folds, checkpoint=a.chk,
                                  input_folder=input_folder, output_folder=output_folder, labels_folder=labels_folder,
                                  device=device, eot_mirroring=a.eot_mirroring, tile_batch_size=a.tile_batch_size,
                                  resume=a.continue_prediction, progress=not a.disable_progress_bar, part=part,
                                  command=shlex.join(["nnUNetv2_adv_attack", *argv]), argv=list(argv),
                                  previous_stage_gradient=a.previous_stage_gradient, members=members), log=say)
    records = result.report["cases"]
    for c in result.new:
        r = records[c]
        say(f"{c}: L-inf {_fmt(r['linf_raw'])} (raw), SSIM {_fmt(r['ssim'])}, "
            f"loss {r['loss_clean']:.3f} -> {r['loss_adv']:.3f} (exported: {_fmt(r['loss_adv_exported'])}), "
            f"{r['seconds']:.1f} s")
    summary = result.report["summary"]
    failed = result.failed
    say(f"{summary['ok']} ok ({summary['skipped']} skipped), {len(failed)} failed"
        + (f": {', '.join(failed)}" if failed else "") + f"; report {output_folder / result.record}")
    if failed:
        print(f"error: {len(failed)} case(s) failed: {', '.join(failed)} (reasons in {output_folder / result.record})",
              file=sys.stderr)
        return 1
    return 0


def _model_of(a, folders):
    """(the model folder, the other members of an ensemble, the folds asked for or None) of the flags."""
    if a.inference_information is None:
        return folders.model_folder(a.m, a.d, a.c, a.tr, a.p), [], a.f
    if a.m is not None or a.c is not None:
        raise CLIError("give either --inference_information or the model (-m, or -d/-c/-tr/-p), not both")
    from nnunet_adv.volume.deployed_ensemble import read_inference_information  # torch: after the flags are read

    deployed = read_inference_information(a.inference_information or None, a.d)
    return deployed.members[0], deployed.members[1:], a.f or [str(f) for f in deployed.folds]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)

    def parse_and_run():
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:
            name = canonical_name(args.attack_name)
            try:
                valid = f"valid options for {name}: {', '.join(_valid_flags(name))}"
            except ValueError:
                valid = "see --list_attacks"
            raise CLIError(f"unknown option(s) {' '.join(unknown)}; {valid} (and see --help)")
        return run(args, argv)

    return cli_main(parse_and_run, resume_hint="re-run the same command with --continue_prediction to resume "
                                               "(finished cases are kept)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
