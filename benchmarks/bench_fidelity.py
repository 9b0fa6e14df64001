"""Fidelity of VAFA: the paper's algorithm, the authors' code's variant and the rescale alone.

Measures, on the real-MRI demo data (Colin27 T1 + AAL hippocampus/amygdala crops):

* a small trained 3D net (trained here on random crops, no intensity augmentation), attacked
  in process on the 4 held-out volumes;
* nnU-Net models (``nnUNetTrainer_5epochs``, 1250 iterations, ``2d`` configuration, fold 0) of
  the MR dataset (ZScoreNormalization) and of a CT-normalised copy of it (the same images with
  ``channel_names {"0": "CT"}``: nnU-Net's CTNormalization with the dataset's percentiles),
  trained with nnU-Net's own commands and evaluated with ``nnUNetv2_adv_evaluate
  --disable_tta`` on the held-out volumes;

under: clean, Gaussian noise (4/255), PGD-10 (4/255), ``vafa-3d`` (paper; q_max 20, 20 steps,
block 8), ``vafa-3d-ref`` (the authors' code: per-slice rescale inside 96^3 tiles = whole slices
of these 40^3 volumes; and inside 20^3 tiles), ``slice-rescale`` (the rescale alone, both
tilings). Reported per attack: mean foreground Dice, the perturbation's RMS and L-inf in x/255 of
the image's intensity range, and SSIM (adversarial vs clean). The table goes to
``<workdir>/fidelity.md`` (docs/fidelity.md publishes it with the command).

Usage (on 2 CPU cores: the small net about 2 min, each nnU-Net model 13.5 min of training and about
4 min of evaluation; the models and reports are kept and reused):
    python benchmarks/bench_fidelity.py --workdir /tmp/bench_fidelity --seed 0

The VAFA variants side by side on the small net only (``--attacks`` replaces the list; the
small net's volumes are attacked with their NIfTI spacing, so ``tile_mm`` maps to voxels as on a
case; the table goes to ``<workdir>/fidelity_variants.md``):
    python benchmarks/bench_fidelity.py --workdir /tmp/bench_fidelity --seed 0 --skip-nnunet \
        --attacks "${VARIANTS[@]}"      # VARIANTS: see docs/fidelity.md

Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MR_ID, CT_ID = 960, 961
CONFIGURATION = "2d"
TRAINER = "nnUNetTrainer_5epochs"
VAFA = "q_max=20,steps=20,block_size=8"
ATTACKS = ["gn:std=4", "pgd:eps=4,steps=10", f"vafa-3d:{VAFA}", f"vafa-3d-ref:{VAFA}",
           f"vafa-3d-ref:{VAFA},rescale_tile=20", "slice-rescale", "slice-rescale:rescale_tile=20"]
#: 2d tiles per network call in the whole-volume attacks: all 40 slices of a demo volume at once
TILE_BATCH_SIZE = 40


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="folder for datasets, models and reports (reused if present)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset's augmentations and of the attacks")
    p.add_argument("--toy-steps", type=int, default=400, help="training steps of the small 3D net (default 400)")
    p.add_argument("--skip-nnunet", action="store_true", help="only the small net")
    p.add_argument("--attacks", nargs="+", default=None,
                   help="attack strings instead of the default list (with --skip-nnunet: the small net only)")
    return p.parse_args(argv)


def log(text: str) -> None:
    print(f"[bench_fidelity {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(*cmd, env) -> None:
    exe = Path(sys.executable).parent / cmd[0]
    log("$ " + " ".join(map(str, cmd)))
    subprocess.run([str(exe), *map(str, cmd[1:])], env=env, check=True)


# --------------------------------------------------------------------------------------- datasets
def datasets(workdir: Path, seed: int, env: dict, plan: bool = True):
    from nnunet_adv.demo.data import build_demo_dataset

    raw = Path(env["nnUNet_raw"])
    found = {i: sorted(raw.glob(f"Dataset{i:03d}_*")) for i in (MR_ID, CT_ID)}
    mr = found[MR_ID][0] if found[MR_ID] else build_demo_dataset(raw, MR_ID, name="FidelityMR", seed=seed)
    if found[CT_ID]:
        ct = found[CT_ID][0]
    else:  # the same images, normalised as CT (dataset percentiles and statistics)
        import shutil

        ct = raw / f"Dataset{CT_ID:03d}_FidelityCT"
        shutil.copytree(mr, ct)
        dataset_json = json.loads((ct / "dataset.json").read_text())
        dataset_json["channel_names"] = {"0": "CT"}
        (ct / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    pre = Path(env["nnUNet_preprocessed"])
    todo = [i for i, d in ((MR_ID, mr), (CT_ID, ct)) if plan and not (pre / d.name / "nnUNetPlans.json").is_file()]
    if todo:  # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): >= 1 there
        run("nnUNetv2_plan_and_preprocess", "-d", *todo, "-c", CONFIGURATION, "-np", 1, "-npfp", 1,
            env=dict(env, nnUNet_n_proc_DA="1"))
    return mr, ct


def nnunet_rows(dataset: Path, seed: int, env: dict, workdir: Path) -> dict:
    """Train (or reuse) the model, run nnUNetv2_adv_evaluate (or reuse its report), return rows."""
    dataset_id = int(dataset.name[len("Dataset"):len("Dataset") + 3])
    model = Path(env["nnUNet_results"]) / dataset.name / f"{TRAINER}__nnUNetPlans__{CONFIGURATION}"
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        started = time.time()
        run("nnUNetv2_train", dataset_id, CONFIGURATION, 0, "-tr", TRAINER, "-device", "cpu", env=env)
        log(f"{dataset.name}: trained in {time.time() - started:.0f} s")
    report = workdir / f"report_{dataset.name}"
    run("nnUNetv2_adv_evaluate", "-i", dataset / "imagesTs", "-l", dataset / "labelsTs", "-o", report,
        "-m", model, "-f", 0, "--attacks", *ATTACKS, "--seed", seed, "--disable_tta",
        "--tile_batch_size", TILE_BATCH_SIZE,
        "-device", "cpu", "--disable_progress_bar", "--num_examples", 0, *(["--continue"] if report.exists() else []),
        env=env)
    summary = json.loads((report / "summary.json").read_text())
    rows = {}
    for result in summary["results"]:
        attack = result["attack"]
        cases = result["metric_per_case"]
        rows[attack] = {"dice": result["foreground_mean"]["Dice"],
                        "rms": _mean([_rms_x255(c.get("PSNR")) for c in cases]),
                        "linf": _mean([_linf_x255(report, model.name, result, c) for c in cases]),
                        "ssim": _mean([c.get("SSIM") for c in cases])}
    return rows


def _rms_x255(psnr):
    """PSNR = 20 log10(range / RMS): RMS in x/255 of the clean image's range."""
    if psnr is None or psnr == "inf" or psnr == float("inf"):
        return 0.0 if psnr is not None else None
    return 255.0 * 10 ** (-float(psnr) / 20.0)


def _linf_x255(report: Path, model: str, result: dict, case: dict):
    if result["attack"] == "clean" or result.get("kind") == "worst case":
        return None
    # the evaluation's folder tag (settings hash, the seed included): the prediction folder's name
    tag = Path(result["prediction_folder"]).name
    record = json.loads((report / "adversarial" / model / tag / "attack.json").read_text())
    name = Path(case["reference_file"]).name.replace(".nii.gz", "")
    rec = record["cases"][name]
    return 255.0 * max(rec["linf_raw"]) / max(rec["data_range"])


def _mean(values):
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------- small net
def toy_rows(dataset: Path, seed: int, steps: int, attacks=ATTACKS) -> dict:
    """A small 3D U-Net-like net trained on random 32^3 crops (z-scored volumes, no augmentation),
    attacked on the 4 held-out volumes with the library (threat model: each volume's range; the
    spacing: each volume's NIfTI voxel size, in its array's axis order)."""
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    from nnunet_adv.attack_config import AttackConfig
    from nnunet_adv.metrics import dice_per_class, ssim
    from nnunet_adv.threat_model import ThreatModel

    torch.manual_seed(seed)

    spacings = []

    def load(split):
        images, labels = [], []
        for f in sorted((dataset / f"images{split}").glob("*_0000.nii.gz")):
            img = nib.load(f)
            x = np.asarray(img.dataobj, dtype=np.float32)
            spacings.append(tuple(float(z) for z in img.header.get_zooms()[:3]))
            y = np.asarray(nib.load(dataset / f"labels{split}" / f.name.replace("_0000.nii.gz", ".nii.gz")).dataobj)
            y = y.astype(np.int64)
            images.append((x - x.mean()) / max(x.std(), 1e-8))
            labels.append(y)
        return images, labels

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv3d(1, 16, 3, padding=1), nn.ReLU(),
                                     nn.Conv3d(16, 16, 3, padding=1), nn.ReLU())
            self.mid = nn.Sequential(nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(),
                                     nn.Conv3d(32, 32, 3, padding=1), nn.ReLU())
            self.dec = nn.Sequential(nn.Conv3d(48, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 3, 1))

        def forward(self, x):
            e = self.enc(x)
            m = F.interpolate(self.mid(F.max_pool3d(e, 2)), size=e.shape[2:], mode="trilinear", align_corners=False)
            return self.dec(torch.cat([e, m], 1))

    train_x, train_y = load("Tr")
    test_x, test_y = load("Ts")
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    started = time.time()
    for step in range(steps):
        xs, ys = [], []
        for _ in range(2):
            i = rng.integers(len(train_x))
            o = [rng.integers(0, s - 32 + 1) for s in train_x[i].shape]
            sl = tuple(slice(a, a + 32) for a in o)
            xs.append(train_x[i][sl])
            ys.append(train_y[i][sl])
        x = torch.from_numpy(np.stack(xs))[:, None]
        y = torch.from_numpy(np.stack(ys))
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    log(f"small net: {steps} steps in {time.time() - started:.0f} s, last loss {loss.item():.3f}")
    net.eval()
    threat_model = ThreatModel(["ZScoreNormalization"])
    rows = {}
    test_spacings = spacings[len(train_x):]
    for text in ["clean"] + list(attacks):
        dice, rms, linf, sims = [], [], [], []
        for x_np, y_np, spacing in zip(test_x, test_y, test_spacings):
            x = torch.from_numpy(x_np)[None, None]
            y = torch.from_numpy(y_np)[None, None]
            if text == "clean":
                xa = x
            else:
                config = AttackConfig.parse(text)
                if config.seed is None and config.uses("seed"):
                    config = AttackConfig.parse(text + f",seed={seed}" if ":" in text else text + f":seed={seed}")
                xa = config.build(threat_model, x, spacing=spacing)(net, x, y)
            with torch.no_grad():
                pred = net(xa).argmax(1)[0].numpy()
            dice.append(np.nanmean(dice_per_class(pred, y_np, [1, 2])))
            window = float(x.max() - x.min())
            d = (xa - x)[0, 0].numpy()
            rms.append(255.0 * float(np.sqrt((d ** 2).mean())) / window)
            linf.append(255.0 * float(np.abs(d).max()) / window)
            sims.append(ssim(x_np, xa[0, 0].numpy(), data_range=window))
        rows[text] = {"dice": float(np.mean(dice)), "rms": float(np.mean(rms)), "linf": float(np.mean(linf)),
                      "ssim": float(np.mean(sims))}
    return rows


# --------------------------------------------------------------------------------------- table
def table(title: str, rows: dict) -> str:
    clean = rows["clean"]["dice"]
    lines = [f"### {title}", "", "| attack | Dice | change | RMS (x/255) | L-inf (x/255) | SSIM |",
             "|---|---|---|---|---|---|"]
    for attack, r in rows.items():
        f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| {attack} | {f(r['dice'])} | {f(r['dice'] - clean, 3) if attack != 'clean' else ''} | "
                     f"{f(r['rms'], 2)} | {f(r['linf'], 1)} | {f(r['ssim'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir).resolve()
    env = dict(os.environ, nnUNet_raw=str(workdir / "nnUNet_raw"),
               nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
               nnUNet_results=str(workdir / "nnUNet_results"), nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1",
               nnUNet_compile="f", MPLBACKEND="agg")
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    mr, ct = datasets(workdir, args.seed, env, plan=not args.skip_nnunet)
    if args.attacks:
        return variants(args, workdir, mr)
    parts = [f"# VAFA fidelity, seed {args.seed}\n",
             "RMS and L-inf of the perturbation in x/255 of each image's intensity range; Dice: mean foreground "
             "Dice over the 4 held-out volumes.\n"]
    cached = workdir / f"toy_rows_seed-{args.seed}_steps-{args.toy_steps}.json"  # the small net is reused
    rows = json.loads(cached.read_text()) if cached.is_file() else toy_rows(mr, args.seed, args.toy_steps)
    cached.write_text(json.dumps(rows))
    parts.append(table(f"Small 3D net ({args.toy_steps} steps, no intensity augmentation), z-scored MR", rows))
    (workdir / "fidelity.md").write_text("\n".join(parts))
    if not args.skip_nnunet:
        for dataset, kind in ((mr, "MR, ZScoreNormalization"), (ct, "CT-normalised copy, CTNormalization")):
            parts.append(table(f"nnU-Net {CONFIGURATION} ({TRAINER}), {kind}",
                               nnunet_rows(dataset, args.seed, env, workdir)))
            (workdir / "fidelity.md").write_text("\n".join(parts))
    print("\n".join(parts))
    return 0


def variants(args, workdir: Path, dataset: Path) -> int:
    """The small net under ``args.attacks`` only (its rows cached under the list's hash)."""
    import hashlib

    tag = hashlib.sha1("\n".join(args.attacks).encode()).hexdigest()[:8]
    cached = workdir / f"toy_rows_seed-{args.seed}_steps-{args.toy_steps}_{tag}.json"
    started = time.time()
    rows = json.loads(cached.read_text()) if cached.is_file() else toy_rows(dataset, args.seed, args.toy_steps,
                                                                           args.attacks)
    cached.write_text(json.dumps(rows))
    text = table(f"Small 3D net ({args.toy_steps} steps, no intensity augmentation), z-scored MR, seed {args.seed}",
                 rows)
    (workdir / "fidelity_variants.md").write_text(text)
    print(text)
    log(f"variants: {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
