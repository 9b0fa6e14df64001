"""Does SAAT's gradient measure change its decisions? The m per epoch under each measure, on one run.

An SAAT run with Free-AT logs, every epoch, the mean gradient magnitude under the measure it uses
(``saat_grad_magnitude``: ``input`` for nnUNetTrainerSAAT, SEAT's ``perturbation`` for
nnUNetTrainerSAAT_SEAT) and under the other one, from the same backward passes
(``saat_other_grad_magnitude``). This script replays SAAT's rule, with the run's own settings, on both, and
prints per epoch the m the run used and the m the other measure would have chosen along the same trajectory
(docs/fidelity.md, SAAT row).

    python benchmarks/saat_measures.py TRAINER_FOLD_FOLDER [--checkpoint checkpoint_final.pth]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from nnunet_adv.training.saat_schedule import replay


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fold_folder", type=Path,
                   help="e.g. nnUNet_results/DatasetX/nnUNetTrainerSAAT__nnUNetPlans__2d/fold_0")
    p.add_argument("--checkpoint", default="checkpoint_final.pth")
    a = p.parse_args()
    checkpoint = torch.load(a.fold_folder / a.checkpoint, map_location="cpu", weights_only=False)
    state, log = checkpoint.get("saat_state"), checkpoint["logging"]
    if state is None or not log.get("saat_other_grad_magnitude"):
        raise SystemExit(f"{a.fold_folder / a.checkpoint}: no SAAT run that logs both gradient measures "
                         "(saat_other_grad_magnitude: an SAAT trainer with Free-AT, this version or later)")
    settings = {k: state[k] for k in ("check_period", "gamma", "m_max", "m_init", "m_start")}
    used, other = log["saat_grad_magnitude"], log["saat_other_grad_magnitude"]
    rows = [{"epoch": e, "m": m, "magnitude": mag, "other_magnitude": o, "m_by_other": mo}
            for e, (m, mag, o, mo) in enumerate(zip(log["saat_m"], used, other, replay(other, **settings)))]
    assert replay(used, **settings) == log["saat_m"][:len(used)], "the logged m does not replay"
    ratios = [o / u for u, o in zip(used, other) if u > 0 and not math.isnan(o)]
    print(json.dumps({"run": a.fold_folder.parent.name, "settings": settings, "epochs": rows,
                      "other_over_used": [round(r, 4) for r in ratios],
                      "same_decisions": all(r["m"] == r["m_by_other"] for r in rows)}, indent=1))


if __name__ == "__main__":
    main()
