"""A temporary nnU-Net folder tree with the real-MRI demo dataset, for end-to-end tests.

The nnU-Net commands run as subprocesses with an environment that does NOT contain
``nnUNet_extTrainer`` (our start-up hook must set it in the child by itself), and with
the settings that make nnU-Net fast on a 2-core CPU (see DESIGN.md).
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from nnunet_adv.demo.data import build_demo_dataset

DATASET_ID = 901
DATASET_NAME = "Dataset901_AdvTestMRI"
BIN = Path(sys.executable).parent
#: the one adversarially trained model the end-to-end tests attack, evaluate and predict with (the
#: session fixture ``shared_model`` trains it once)
SHARED_TRAINER = "nnUNetTrainerPGDAT_TestShort"


class NNUNetTree:
    """Folders ``raw``, ``preprocessed``, ``results`` under ``root`` and a clean environment."""

    def __init__(self, root: Path, threads: int = 2):
        self.root = Path(root)
        self.raw, self.preprocessed, self.results = (self.root / n for n in ("raw", "preprocessed", "results"))
        for p in (self.raw, self.preprocessed, self.results):
            p.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed),
                   nnUNet_results=str(self.results), nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1",
                   nnUNet_compile="f", OMP_NUM_THREADS=str(threads), MPLBACKEND="agg", PYTHONUNBUFFERED="1")
        self.env = env

    def set_in_process(self, monkeypatch, extra_env=None) -> None:
        """Give this process the tree's nnU-Net folders (and ``extra_env``'s nnU-Net variables), for a
        command run through its ``main()`` or a trainer made here; ``monkeypatch`` undoes it."""
        for key, value in {**self.env, **(extra_env or {})}.items():
            if key.startswith("nnUNet_"):
                monkeypatch.setenv(key, value)

    @property
    def dataset(self) -> Path:
        return self.raw / DATASET_NAME

    def run(self, *args, extra_env=None, check=True, timeout=900) -> subprocess.CompletedProcess:
        """Run an installed console script (e.g. ``nnUNetv2_train``) in this tree."""
        env = dict(self.env, **(extra_env or {}))
        cmd = [str(BIN / args[0]), *map(str, args[1:])]
        proc = subprocess.run(cmd, env=env, cwd=self.root, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    def model_folder(self, trainer: str, configuration: str = "3d_fullres") -> Path:
        return self.results / DATASET_NAME / f"{trainer}__nnUNetPlans__{configuration}"


#: features per stage of the test tree's networks (nnU-Net plans 32, 64, 128, 256 for these volumes)
TINY_FEATURES = [4, 8, 16, 32, 32, 32, 32, 32]


def shrink_networks(plans_file: Path, plans_name: Optional[str] = None, configurations=None) -> dict:
    """Give the ``configurations`` (default: every one) of a plans file :data:`TINY_FEATURES` (same
    topology, stages, patch and preprocessing); write it as ``plans_name`` (default: in place) and
    return it. A forward and backward pass of a 32^3 volume then costs 136 ms instead of 601 ms on one
    CPU thread, and every command keeps its whole pipeline."""
    plans = json.loads(plans_file.read_text())
    plans["plans_name"] = plans_name or plans["plans_name"]
    for name, cfg in plans["configurations"].items():
        if configurations is not None and name not in configurations:
            continue
        arch = cfg.get("architecture", {}).get("arch_kwargs")
        if arch:
            arch["features_per_stage"] = TINY_FEATURES[:arch["n_stages"]]
    plans_file.with_name(f"{plans['plans_name']}.json").write_text(json.dumps(plans, indent=1))
    return plans


def make_tree(root: Path, configurations=("3d_fullres", "2d"), threads: int = 2) -> NNUNetTree:
    """Build the real-MRI dataset (6 training, 2 test cases of 32^3 voxels), plan and preprocess it with
    nnU-Net's commands, and shrink every planned network (:func:`shrink_networks`): the suite checks
    behaviour, not accuracy, and an attack step costs a quarter. The shared model (``shared_model``),
    trained two iterations, predicts noise either way (clean Dice 0.10-0.19); what the tests need is that
    PGD lowers it, which it did in 11 of 11 trainings of the tiny network (docs/development.md)."""
    tree = NNUNetTree(root, threads)
    build_demo_dataset(tree.raw, DATASET_ID, name="AdvTestMRI", num_train=6, num_test=2, crop_size=32, seed=0)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): it must be >= 1 here
    tree.run("nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", *configurations, "-np", 1, "-npfp", 1,
             extra_env={"nnUNet_n_proc_DA": "1"})
    shrink_networks(tree.preprocessed / DATASET_NAME / "nnUNetPlans.json")
    return tree


def predict_and_check(tree: NNUNetTree, trainer: str, configuration: str, out: Path, plans: str = "nnUNetPlans",
                      extra_env=None):
    """Predict the test images with the stock ``nnUNetv2_predict`` and check that it wrote one
    prediction per reference label, with the label's geometry and only the dataset's labels."""
    import nibabel as nib
    import numpy as np

    tree.run("nnUNetv2_predict", "-i", tree.dataset / "imagesTs", "-o", out, "-d", DATASET_ID, "-c", configuration,
             "-f", 0, "-tr", trainer, "-p", plans, "-chk", "checkpoint_final.pth", "-device", "cpu", "--disable_tta",
             "-npp", 0, "-nps", 0, extra_env=extra_env)  # sequential mode: no worker processes on 2 cores
    written = sorted(p.name for p in out.glob("*.nii.gz"))
    assert written == sorted(p.name for p in (tree.dataset / "labelsTs").glob("*.nii.gz"))
    pred = nib.load(out / written[0])
    ref = nib.load(tree.dataset / "labelsTs" / written[0])
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}


#: the hand-written plans with a cascade (:func:`add_cascade`)
CASCADE_PLANS = "nnUNetPlansCascade"


def add_cascade(tree: NNUNetTree, plans_name: str = CASCADE_PLANS) -> dict:
    """A plans file ``plans_name`` with nnU-Net's cascade written by hand (nnU-Net plans ``3d_lowres`` only
    for images large relative to the patch): ``3d_fullres`` as planned; ``3d_lowres`` a copy at twice the
    spacing (half the patch, one pooling stage fewer) whose ``next_stage`` is ``3d_cascade_fullres``; and
    ``3d_cascade_fullres`` inheriting ``3d_fullres`` with ``previous_stage: 3d_lowres`` (it reads the
    3d_fullres data, as nnU-Net's own cascade plans do). Every network tiny (:func:`shrink_networks`);
    3d_lowres is preprocessed with ``nnUNetv2_preprocess``."""
    import copy

    folder = tree.preprocessed / DATASET_NAME
    plans = json.loads((folder / "nnUNetPlans.json").read_text())
    configs = plans["configurations"]
    full = configs["3d_fullres"]
    low = copy.deepcopy(full)
    arch = low["architecture"]["arch_kwargs"]
    for key in ("kernel_sizes", "strides", "n_conv_per_stage"):
        arch[key] = arch[key][:-1]
    arch["n_conv_per_stage_decoder"] = arch["n_conv_per_stage_decoder"][:-1]
    arch["n_stages"] -= 1
    low.update(data_identifier=f"{plans_name}_3d_lowres", spacing=[2 * s for s in full["spacing"]],
               patch_size=[p // 2 for p in full["patch_size"]], batch_size=2,
               median_image_size_in_voxels=[m / 2 for m in full["median_image_size_in_voxels"]],
               next_stage="3d_cascade_fullres")
    configs["3d_lowres"] = low
    configs["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    plans["plans_name"] = plans_name
    (folder / f"{plans_name}.json").write_text(json.dumps(plans, indent=1))
    plans = shrink_networks(folder / f"{plans_name}.json")
    tree.run("nnUNetv2_preprocess", "-d", DATASET_ID, "-plans_name", plans_name, "-c", "3d_lowres", "-np", 1)
    return plans
