"""``nnUNetv2_adv_study``: a robustness study on any nnU-Net dataset (see nnunet_adv.evaluation.study)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nnunet_adv.cli.common import CLIError, OneLineArgumentParser, cli_main, pick_device


def _schedule(text):
    try:
        ep, its = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EPOCHSxITERATIONS (e.g. 6x50), got {text!r}") from None
    return {"ep": ep, "its": its}


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="nnUNetv2_adv_study",
                              description="Train a clean model, fine-tune every selected recipe from it for the same "
                                          "iterations, attack every model with PGD, APGD, SegPGD, CosPGD, VAFA and GN "
                                          "at an eps sweep and write one table (study.md) with the worst case.")
    p.add_argument("-d", help="dataset name or id (nnU-Net's raw, preprocessed and results folders)")
    p.add_argument("-o", help="study folder (new, or an earlier study with --continue)")
    p.add_argument("--profile", default="cpu", choices=("cpu", "gpu"),
                   help="schedules and attack settings (cpu: 2d, 1000 clean + 150 fine-tuning iterations, fewer "
                        "attack steps in training; gpu: 3d_fullres, 25000 + 5000 iterations)")
    p.add_argument("--recipes", nargs="+", default=None,
                   help="our trainers to fine-tune (default: the profile's, e.g. nnUNetTrainerPGDAT nnUNetTrainerVAFT "
                        "nnUNetTrainerSAAT)")
    p.add_argument("--clean_model", default=None, help="an existing clean model folder to fine-tune from (skips "
                                                      "the clean pre-training)")
    p.add_argument("--clean_schedule", type=_schedule, default=None, metavar="ExI", help="clean pre-training epochs x "
                                                                                       "iterations (profile default)")
    p.add_argument("--finetune_schedule", type=_schedule, default=None, metavar="ExI",
                   help="fine-tuning epochs x iterations (profile default)")
    p.add_argument("--eps_sweep", nargs="+", type=float, default=None, metavar="E",
                   help="attack budgets in x/255 of the window (profile default 2 4 8; the first >= 4 is reported)")
    p.add_argument("--attack_steps", type=int, default=None,
                   help="steps of every evaluation attack (default: published: PGD/SegPGD/CosPGD 10, APGD ROG's 5 x 5 "
                        "restarts, VAFA 20); fewer only for smoke tests")
    p.add_argument("--tile_batch_size", type=int, default=None, help="tiles per network call in the attacks "
                                                                     "(profile default: cpu 40, gpu 8)")
    p.add_argument("--combine", nargs="+", default=None, metavar="STUDY",
                   help="print the mean and spread over finished studies that differ only in --seed, and exit")
    p.add_argument("-i", default=None, help="held-out images (default: the dataset's imagesTs)")
    p.add_argument("-l", default=None, help="their labels (default: the dataset's labelsTs)")
    p.add_argument("-f", type=int, default=0, help="fold (default 0)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier of every model (default nnUNetPlans; e.g. "
                                                   "nnUNetResEncUNetMPlans)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks (default 0)")
    p.add_argument("-device", default=None, choices=("cpu", "cuda", "mps"))
    p.add_argument("--continue", dest="resume", action="store_true", help="reuse every finished model and result")
    p.add_argument("--disable_progress_bar", action="store_true")
    return p


def run(args) -> int:
    from nnunet_adv.evaluation.study import Study, StudyRun, combine_studies  # after the flags are read

    if args.combine:
        missing = [f for f in args.combine if not (Path(f) / "study.json").is_file()]
        if missing:
            raise CLIError(f"not a study folder (no study.json): {missing[0]}")
        print(combine_studies([Path(f) for f in args.combine]), end="")
        return 0
    if not args.d or not args.o:
        raise CLIError("-d and -o are required (or --combine STUDY STUDY ...)")

    started = time.time()
    study = Study(StudyRun(dataset=args.d, output=Path(args.o), profile=args.profile, recipes=args.recipes,
                           fold=args.f, device=pick_device(args.device), seed=args.seed,
                           clean_model=None if args.clean_model is None else Path(args.clean_model),
                           clean=args.clean_schedule, finetune=args.finetune_schedule,
                           images=None if args.i is None else Path(args.i),
                           labels=None if args.l is None else Path(args.l),
                           resume=args.resume, progress=not args.disable_progress_bar, eps_sweep=args.eps_sweep,
                           attack_steps=args.attack_steps, tile_batch_size=args.tile_batch_size, plans=args.p),
                  log=lambda line: print(f"[nnUNetv2_adv_study {time.time() - started:6.0f} s] {line}", flush=True))
    print("\n" + study.execute())
    return 0


def main(argv=None) -> int:
    return cli_main(lambda: run(build_parser().parse_args(argv)),
                    resume_hint="re-run the same command with --continue to resume (finished models are kept)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
