"""``nnUNetv2_adv_demo``: the whole story on real MRI in one command.

In a new folder: build the real-MRI demo dataset, plan and preprocess it with nnU-Net,
train a clean model and a PGD adversarially trained one (fine-tuned from the clean
model, as the papers do), attack both on the held-out test cases and print a table of
clean vs adversarial Dice. Every nnU-Net step runs through nnU-Net's own commands; the
attacks and the report through ``nnUNetv2_adv_evaluate`` (whole-volume attacks written as
images, predicted by nnU-Net's predictor), which prints its report.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from nnunet_adv.cli.common import CLIError, cli_main, pick_device

CONFIGURATION = "3d_fullres"

# Attacks of the demo report, budgets as in the VAFA paper's voxel-attack baselines
# (x/255 of each image's intensity window), and an FGSM eps sweep for the robustness curve
# (one step per eps: NLCEN's targeted I-FGSM sweep would cost 3-10 steps per point on a CPU).
DEMO_ATTACKS = ("gn:std=4", "pgd:eps=4,steps=10")
DEMO_EPS_SWEEP = ("2", "4", "8")
DEMO_SWEEP_ATTACK = "fgsm"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_adv_demo",
        description="Build a real-MRI nnU-Net dataset, train a clean and a PGD-AT model with nnU-Net's own "
                    "commands, attack both and print clean vs adversarial Dice.")
    p.add_argument("-o", "--output", default="nnunet_adv_demo",
                   help="new folder for everything the demo writes (default: ./nnunet_adv_demo); must not exist")
    p.add_argument("-device", default=None, choices=("cpu", "cuda", "mps"),
                   help="device for training and attacks (default: cuda if available, else cpu). "
                        "The schedule is short on cpu and longer on cuda.")
    p.add_argument("-d", "--dataset_id", type=int, default=900, help="nnU-Net dataset id to use (default 900)")
    p.add_argument("--num_train", type=int, default=20, help="training cases (default 20)")
    p.add_argument("--num_test", type=int, default=4, help="held-out test cases (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset's augmentations and of the attacks")
    return p


class Demo:
    def __init__(self, args):
        self.args = args
        self.device = pick_device(args.device)
        self.root = Path(args.output).resolve()
        self.raw, self.pre, self.results = (self.root / n for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        suffix = "GPU" if self.device == "cuda" else "CPU"
        self.clean_trainer = f"nnUNetTrainer_AdvDemo{suffix}"
        self.robust_trainer = f"nnUNetTrainerPGDAT_AdvDemo{suffix}"
        self.env = dict(os.environ, nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.pre),
                        nnUNet_results=str(self.results), MPLBACKEND="agg")
        if self.device == "cpu":  # fast settings for a small CPU machine (see README)
            self.env.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1", nnUNet_compile="f")
        self.started = time.time()

    def step(self, text: str) -> None:
        print(f"\n[nnunet_adv demo {time.time() - self.started:6.0f} s] {text}", flush=True)

    def nnunet(self, *args, extra_env=None) -> None:
        cmd = [str(a) for a in args]
        print("$ " + " ".join(cmd), flush=True)
        bin_dir = Path(sys.executable).parent
        exe = bin_dir / cmd[0]
        proc = subprocess.run([str(exe) if exe.exists() else cmd[0], *cmd[1:]], env=dict(self.env, **(extra_env or {})))
        if proc.returncode != 0:
            raise CLIError(f"'{' '.join(cmd)}' failed with exit code {proc.returncode} (see its output above)")

    def dataset_folder(self) -> Path:
        return next(self.raw.glob(f"Dataset{self.args.dataset_id:03d}_*"))

    def model_folder(self, trainer: str) -> Path:
        return self.results / self.dataset_folder().name / f"{trainer}__nnUNetPlans__{CONFIGURATION}"

    def run(self) -> int:
        from nnunet_adv.demo_data import build_demo_dataset

        if self.root.exists():
            raise CLIError(f"{self.root} already exists; choose a new folder with -o (nothing was changed)")
        for folder in (self.raw, self.pre, self.results):
            folder.mkdir(parents=True)
        d = self.args.dataset_id
        self.step(f"building the real-MRI demo dataset in {self.raw}")
        build_demo_dataset(self.raw, d, num_train=self.args.num_train, num_test=self.args.num_test,
                                     seed=self.args.seed, progress=True)
        self.step("planning and preprocessing with nnU-Net")
        # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): it must be >= 1 there
        self.nnunet("nnUNetv2_plan_and_preprocess", "-d", d, "-c", CONFIGURATION, "-np", 1, "-npfp", 1,
                    extra_env={"nnUNet_n_proc_DA": "1"} if self.device == "cpu" else None)
        self.step(f"training the clean model ({self.clean_trainer})")
        self.nnunet("nnUNetv2_train", d, CONFIGURATION, 0, "-tr", self.clean_trainer, "-device", self.device)
        clean_ckpt = self.model_folder(self.clean_trainer) / "fold_0" / "checkpoint_final.pth"
        self.step(f"PGD adversarial training ({self.robust_trainer}), fine-tuned from the clean model")
        self.nnunet("nnUNetv2_train", d, CONFIGURATION, 0, "-tr", self.robust_trainer, "-device", self.device,
                    "-pretrained_weights", clean_ckpt)
        self.step("attacking both models on the held-out test cases and writing the robustness report")
        dataset_folder = self.dataset_folder()
        report = self.root / "report"
        self.nnunet("nnUNetv2_adv_evaluate", "-i", dataset_folder / "imagesTs", "-l", dataset_folder / "labelsTs",
                    "-o", report, "-d", d, "-c", CONFIGURATION, "-f", 0, "-tr", self.clean_trainer,
                    self.robust_trainer, "--attacks", *DEMO_ATTACKS, "--eps_sweep", *DEMO_EPS_SWEEP,
                    "--sweep_attack", DEMO_SWEEP_ATTACK,
                    "--seed", self.args.seed, "--disable_tta", "--saliency", "-device", self.device,
                    "--disable_progress_bar")
        self.step(f"done; the report (report.md, summary.json, metrics.csv, figures) is in {report}")
        return 0


def main(argv=None) -> int:
    return cli_main(lambda: Demo(build_parser().parse_args(argv)).run())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
