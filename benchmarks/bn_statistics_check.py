"""How much do a short fine-tune's BatchNorm running statistics cost a dual-BN model's clean Dice?

``nnUNetTrainerDualBN`` fine-tuned from nnU-Net's InstanceNorm clean model estimates its running statistics
during the fine-tune (the checkpoint has none: an equal-weight average of the first 100 batches, then the
paper's momentum 0.01), while the weights they were measured with keep changing. This script predicts the
held-out cases with the trained model as it is, then with the clean branch's statistics re-estimated at the
final weights (cumulative average over training patches, the network otherwise unchanged), and prints both
mean foreground Dice values.

    python benchmarks/bn_statistics_check.py MODEL_FOLDER IMAGES LABELS [--batches 100]

MODEL_FOLDER is the trainer's results folder (nnU-Net's environment variables set); the re-estimation
reads the preprocessed training cases of fold 0.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from torch.nn.modules.batchnorm import _BatchNorm

from nnunet_adv.metrics import dice_per_class
from nnunet_adv.modules.dual_norm import CLEAN, dual_norms


def mean_dice(predictor: nnUNetPredictor, images: Path, labels: Path, rw) -> float:
    """Mean foreground Dice over the cases of ``images`` (each label present in the reference)."""
    scores = []
    for label_file in sorted(labels.glob("*.nii.gz")):
        case = label_file.name[:-len(".nii.gz")]
        files = sorted(str(p) for p in images.glob(f"{case}_*.nii.gz"))
        pred = predictor.predict_single_npy_array(*rw.read_images(files), None, None, False)
        ref = rw.read_seg(str(label_file))[0][0]
        scores.extend(dice_per_class(pred, ref, [int(c) for c in np.unique(ref[ref > 0])]))
    return float(np.mean(scores))


def reestimate(network: torch.nn.Module, preprocessed: Path, patch, batches: int, batch_size: int, seed: int) -> int:
    """Reset the clean branch's BatchNorm statistics and average them over ``batches`` random training patches
    (train-mode forwards without gradients); returns the number of BatchNorm modules re-estimated."""
    norms = [m.norms[CLEAN] for m in dual_norms(network) if isinstance(m.norms[CLEAN], _BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None   # cumulative average
    dataset = infer_dataset_class(str(preprocessed))(str(preprocessed))
    keys = list(dataset.identifiers)
    rng = np.random.default_rng(seed)
    network.train()
    with torch.no_grad():
        for _ in range(batches):
            batch = []
            for _ in range(batch_size):
                data = dataset.load_case(keys[rng.integers(len(keys))])[0]
                z = rng.integers(data.shape[1])
                sl = np.asarray(data[:, z])
                corner = [rng.integers(0, max(s - p, 0) + 1) for s, p in zip(sl.shape[1:], patch)]
                crop = sl[:, corner[0]:corner[0] + patch[0], corner[1]:corner[1] + patch[1]]
                pad = [(0, 0)] + [(0, p - s) for s, p in zip(crop.shape[1:], patch)]
                batch.append(np.pad(crop, pad))
            network(torch.from_numpy(np.stack(batch)).float())
    network.eval()
    return len(norms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_folder", type=Path)
    p.add_argument("images", type=Path)
    p.add_argument("labels", type=Path)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(a.model_folder), (0,), "checkpoint_final.pth")
    rw = predictor.plans_manager.image_reader_writer_class()
    before = mean_dice(predictor, a.images, a.labels, rw)
    network = predictor.network
    network.load_state_dict(predictor.list_of_parameters[0])
    cm = predictor.configuration_manager
    preprocessed = Path(os.environ["nnUNet_preprocessed"]) / a.model_folder.parent.name / cm.data_identifier
    n = reestimate(network, preprocessed, cm.patch_size, a.batches, cm.batch_size, a.seed)
    predictor.list_of_parameters = [network.state_dict()]
    after = mean_dice(predictor, a.images, a.labels, rw)
    print(json.dumps({"model": a.model_folder.name, "batchnorms": n, "batches": a.batches,
                      "clean_dice_as_trained": round(before, 4), "clean_dice_statistics_reestimated": round(after, 4),
                      "difference": round(after - before, 4)}))


if __name__ == "__main__":
    main()
