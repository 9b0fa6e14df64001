"""Benchmark of the published training recipes on the real-MRI demo dataset.

What it does (everything on nnU-Net's own data pipeline, in this process):
  1. builds the real-MRI demo dataset (nnunet_adv.demo.data: Colin27 T1 + AAL, 3 labels) and
     plans/preprocesses it with ``nnUNetv2_plan_and_preprocess`` (3d_fullres);
  2. pre-trains a clean model (nnU-Net's ``nnUNetTrainer``) and a clean BatchNorm model
     (``nnUNetTrainerBN``, the start of dual BN) for ``--pretrain-iters`` iterations;
  3. fine-tunes, from the matching clean checkpoint (as the papers and ``nnUNetv2_adv_demo`` do),
     the clean baseline (``nnUNetTrainer``, training continued) and every recipe for the same
     schedule (``--epochs`` x ``--iters-per-epoch`` iterations, nnU-Net's poly learning rate),
     with the recipes' published attack settings (PGD-AT 10 steps, VAFT 20 VAFA steps, ...),
     timing every ``train_step`` call;
  4. attacks every model on the held-out test cases (whole volumes, nnunet_adv.volume.dice:
     differentiable sliding window, no mirroring): clean, PGD-10 at 4/255 of the intensity
     window, VAFA-3D q_max 20, 20 steps, block 32;
  5. prints one table: mean foreground Dice per setting, median seconds per training iteration
     and that cost relative to clean training (expected ~steps+1 for PGD-AT, ~steps+2 for VAFT).

Trained models are ordinary nnU-Net model folders (``<workdir>/nnUNet_results``): the bench
classes only change the schedule and carry the recipe's own name, so nnU-Net's predictor
and ``nnunet_adv.volume.trained_model.load_trained_model`` rebuild each network through the recipe's
``build_network_architecture``.

Usage (docs/recipes.md reports this command and its output):
    /work/venv/bin/python benchmarks/bench_recipes.py --workdir /tmp/bench_recipes

Not a test: nothing is asserted. The default schedule is very short (a CPU smoke benchmark):
the Dice values show what a few iterations do, not what the methods reach.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID = 902
CONFIGURATION = "3d_fullres"
RECIPES = ["nnUNetTrainerPGDAT", "nnUNetTrainerVAFT", "nnUNetTrainerVAFA", "nnUNetTrainerSAAT",
           "nnUNetTrainerDualBN", "nnUNetTrainerDualNorm", "nnUNetTrainerNLCE", "nnUNetTrainerNLCE_VAFT"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="folder for the dataset, models and results (reused if present)")
    p.add_argument("--num-train", type=int, default=10)
    p.add_argument("--num-test", type=int, default=2)
    p.add_argument("--crop", type=int, default=32, help="voxels per axis of each case (default 32)")
    p.add_argument("--pretrain-iters", type=int, default=100, help="clean pre-training iterations (default 100)")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per model (default 3)")
    p.add_argument("--iters-per-epoch", type=int, default=3, help="fine-tuning iterations per epoch (default 3)")
    p.add_argument("--features", type=int, nargs="*", default=[16, 32, 64, 128],
                   help="features_per_stage of the network (default 16 32 64 128: half the planned width, "
                        "to fit a small CPU; give no value to keep the planned network)")
    p.add_argument("--saat-check-period", type=int, default=1,
                   help="SAAT decision period in epochs for this short schedule (published: 3)")
    p.add_argument("--recipes", nargs="+", default=RECIPES)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def setup_environment(workdir: Path) -> dict:
    """nnU-Net's folders and the fast settings for a small CPU machine; must precede nnunetv2 imports."""
    env = {"nnUNet_raw": str(workdir / "nnUNet_raw"), "nnUNet_preprocessed": str(workdir / "nnUNet_preprocessed"),
           "nnUNet_results": str(workdir / "nnUNet_results"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
           "nnUNet_compile": "f", "MPLBACKEND": "agg"}
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[k]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    return env


def prepare_dataset(args, env) -> Path:
    from nnunet_adv.demo.data import build_demo_dataset

    raw = Path(env["nnUNet_raw"])
    existing = sorted(raw.glob(f"Dataset{DATASET_ID:03d}_*"))
    dataset = existing[0] if existing else build_demo_dataset(raw, DATASET_ID, name="BenchRecipes",
                                                               num_train=args.num_train, num_test=args.num_test,
                                                               crop_size=args.crop, seed=0)
    if not (Path(env["nnUNet_preprocessed"]) / dataset.name / "nnUNetPlans.json").is_file():
        exe = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
        # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): >= 1 there
        subprocess.run([str(exe), "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", "1", "-npfp", "1"],
                       env=dict(os.environ, nnUNet_n_proc_DA="1"), check=True, stdout=subprocess.DEVNULL)
    return dataset


def bench_class(base, name: str, schedule: dict, extra: dict):
    """A subclass with ``schedule`` that carries ``name`` (a trainer nnU-Net can find), so the
    checkpoint's trainer_name and the model folder are those of the real trainer."""
    from nnunet_adv.training.adversarial_trainer import nnUNetTrainerAdversarial

    if issubclass(base, nnUNetTrainerAdversarial):
        return type(name, (base,), {"training_schedule": schedule, "robust_validation": False, **extra})

    import torch

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        # stock nnU-Net trainers: set the schedule after construction (nnU-Net records these arguments)
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for key, value in schedule.items():
            setattr(self, key, value)
    return type(name, (base,), {"__init__": __init__})


def train(cls, features=None, pretrained: Path = None, log: Path = None):
    """Train ``cls`` in this process; returns (model folder, seconds of every train_step call)."""
    import torch
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_adv.training.pretrained import load_pretrained_weights

    dataset_name = maybe_convert_to_dataset_name(DATASET_ID)
    pre = Path(os.environ["nnUNet_preprocessed"]) / dataset_name
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans["continue_training"] = False
    if features:  # saved with the model (plans.json), so prediction rebuilds the same network
        arch = plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"]
        arch["features_per_stage"] = list(features)[:arch["n_stages"]]
    torch.manual_seed(0)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        trainer = cls(plans, CONFIGURATION, 0, dataset_json, torch.device("cpu"))
        trainer.initialize()
        if pretrained is not None:
            load_pretrained_weights(trainer.network, str(pretrained))
        times = []
        step = trainer.train_step

        def timed(batch):
            t0 = time.perf_counter()
            out = step(batch)
            times.append(time.perf_counter() - t0)
            return out

        trainer.train_step = timed
        trainer.run_training()
    return Path(trainer.output_folder).parent, times


def evaluate(model_folder: Path, dataset: Path, log: Path) -> dict:
    import numpy as np
    import torch

    from nnunet_adv.attack_config import AttackConfig
    from nnunet_adv.volume.dice import evaluate_under_attacks
    from nnunet_adv.volume.trained_model import load_trained_model

    torch.manual_seed(0)
    labels = sorted((dataset / "labelsTs").glob("*.nii.gz"))
    cases = [([str(dataset / "imagesTs" / lab.name.replace(".nii.gz", "_0000.nii.gz"))], str(lab)) for lab in labels]
    settings = {
        "clean": None,
        "PGD-10 4/255": AttackConfig("pgd", {"steps": 10, "random_start": True, "seed": 0}, eps_frac=4 / 255,
                                     alpha_over_eps=2.5 / 10),
        "VAFA q20": AttackConfig("vafa-3d", {"q_max": 20.0, "steps": 20, "use_ssim_loss": True,
                                             "block_size": (32, 32, 32)}),
    }
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        model = load_trained_model(model_folder, (0,))
        dice = evaluate_under_attacks(model, cases, settings, progress=False)
    return {name: float(np.nanmean(v)) for name, v in dice.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = setup_environment(workdir)
    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    log = workdir / "bench_recipes.log"

    def say(text):
        print(f"[{time.time() - started:6.0f} s] {text}", flush=True)

    dataset = prepare_dataset(args, env)
    say(f"dataset {dataset.name} ready ({args.num_train} training / {args.num_test} test cases, {args.crop}^3)")

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.network_architecture.nnUNetTrainerBN import nnUNetTrainerBN

    import nnunet_adv.trainers as recipes

    pretrain = {"num_epochs": 1, "num_iterations_per_epoch": args.pretrain_iters, "num_val_iterations_per_epoch": 1}
    finetune = {"num_epochs": args.epochs, "num_iterations_per_epoch": args.iters_per_epoch,
                "num_val_iterations_per_epoch": 1}
    clean_ckpts = {}
    for base in (nnUNetTrainer, nnUNetTrainerBN):
        ckpt = workdir / f"clean_{base.__name__}.pth"
        if not ckpt.is_file():
            folder, times = train(bench_class(base, base.__name__, pretrain, {}), args.features, log=log)
            (folder / "fold_0" / "checkpoint_final.pth").replace(ckpt)
            say(f"pre-trained {base.__name__}: {len(times)} iterations, median {statistics.median(times):.2f} s")
        clean_ckpts[base.__name__] = ckpt

    rows = {}
    names = ["nnUNetTrainer"] + list(args.recipes)
    for name in names:
        if name == "nnUNetTrainer":
            cls, source = bench_class(nnUNetTrainer, name, finetune, {}), "nnUNetTrainer"
        else:
            base = getattr(recipes, name)
            extra = {"saat_check_period": args.saat_check_period} if name == "nnUNetTrainerSAAT" else {}
            cls = bench_class(base, name, finetune, extra)
            source = "nnUNetTrainerBN" if name == "nnUNetTrainerDualBN" else "nnUNetTrainer"
        folder, times = train(cls, args.features, pretrained=clean_ckpts[source], log=log)
        times = times[1:] if len(times) > 1 else times  # the first call includes one-off set-up
        say(f"fine-tuned {name}: median {statistics.median(times):.2f} s per iteration")
        dice = evaluate(folder, dataset, log)
        say(f"evaluated {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items()))
        extra_info = ""
        if name == "nnUNetTrainerSAAT":
            ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
            extra_info = f"m per epoch {ckpt['logging']['saat_m']}"
        rows[name] = {"sec_per_iter": statistics.median(times), **dice, "note": extra_info}

    clean_time = rows["nnUNetTrainer"]["sec_per_iter"]
    settings = ["clean", "PGD-10 4/255", "VAFA q20"]
    lines = ["| trainer | s / iteration | cost vs clean | " + " | ".join(f"Dice {s}" for s in settings) + " |",
             "|---|---|---|" + "---|" * len(settings)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['sec_per_iter']:.2f} | {r['sec_per_iter'] / clean_time:.1f}x | "
                     + " | ".join(f"{r[s]:.3f}" for s in settings) + " |")
    notes = [f"{n}: {r['note']}" for n, r in rows.items() if r["note"]]
    print("\n" + "\n".join(lines))
    plans = json.loads((Path(env['nnUNet_preprocessed']) / dataset.name / 'nnUNetPlans.json').read_text())
    print(f"\nSchedule: clean pre-training {args.pretrain_iters} iterations (nnUNetTrainer, and nnUNetTrainerBN for "
          f"dual BN), then every row {args.epochs} epochs x {args.iters_per_epoch} iterations from that checkpoint "
          f"(batch {plans['configurations'][CONFIGURATION]['batch_size']}, "
          f"{args.crop}^3 cases, PlainConvUNet features {args.features or 'as planned'}). Dice: mean foreground Dice "
          f"over {args.num_test} held-out whole volumes. s / iteration: median of the train_step calls after the "
          f"first. SAAT check period {args.saat_check_period} epoch(s).")
    for n in notes:
        print(n)
    print(f"Total {time.time() - started:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU.")
    (workdir / "bench_recipes.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
