"""Clean and adversarial Dice of a trained model on preprocessed whole volumes.

Each case is preprocessed exactly as nnU-Net does, attacked as a whole volume through
the differentiable sliding window (:class:`nnunet_adv.volume.sliding_window.SlidingWindowModel`,
exact gradients, one tile's activations in memory), and scored on nnU-Net's preprocessed
grid against the preprocessed reference segmentation. Test-time mirroring is off for
both the attack and the prediction, so clean and adversarial numbers are comparable.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from nnunet_adv.attack_config import AttackConfig
from nnunet_adv.metrics import dice_per_class
from nnunet_adv.threat_model import ThreatModel
from nnunet_adv.volume.export import spacings
from nnunet_adv.volume.sliding_window import SlidingWindowModel
from nnunet_adv.volume.trained_model import TrainedModel

Case = Tuple[Sequence[str], str]  # (image files of one case, its label file)


def evaluate_under_attacks(model: TrainedModel, cases: Iterable[Case],
                           attacks: Dict[str, Optional[AttackConfig]],
                           device: torch.device = torch.device("cpu"),
                           progress: bool = True) -> Dict[str, np.ndarray]:
    """Mean foreground Dice per case for each named setting.

    Args:
        cases: (image files, label file) per case.
        attacks: setting name -> attack; ``None`` means clean prediction.
    Returns:
        setting name -> (num_cases, num_foreground_classes) Dice array (NaN for absent classes).
    """
    predictor = model.predictor
    threat_model = ThreatModel.from_managers(predictor.plans_manager, predictor.configuration_manager)
    window = SlidingWindowModel(model.networks, model.patch_size, tile_step_size=0.5, use_gaussian=True,
                                mirror_axes=None)
    classes = list(predictor.label_manager.foreground_labels)
    results = {name: [] for name in attacks}
    cases = list(cases)
    bar = tqdm(total=len(cases) * len(attacks), desc=f"attacking {model.trainer_name}", disable=not progress)
    for image_files, label_file in cases:
        data, seg, props = model.preprocess(image_files, label_file)
        spacing = spacings(props, predictor.plans_manager, predictor.configuration_manager)[1]
        volume = torch.from_numpy(data)[None].to(device)
        labels = torch.from_numpy(seg.astype(np.int64))[None].to(device)
        ref = seg[0]
        for name, attack in attacks.items():
            bar.set_postfix_str(name)
            x = volume if attack is None else \
                attack.build(threat_model, volume, spacing=spacing)(window, volume, labels)
            with torch.no_grad():
                pred = window(x).argmax(1)[0].cpu().numpy()
            results[name].append(dice_per_class(pred, ref, classes))
            bar.update()
    bar.close()
    return {name: np.stack(v) for name, v in results.items()}
