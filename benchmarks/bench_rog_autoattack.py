"""Cost of ROG's AutoAttack pieces relative to one PGD step, measured in ONE run (interleaved).

Per unit of each attack on the same network and volume (median over the repeats, each attack's
per-call setup amortised over its units):
  * PGD: one step (forward + backward to the input);
  * APGD-DLR: one step (as APGD-CE: forward + backward);
  * FAB: one iteration of one target rank and restart (forward + backward, the exact L-inf
    projection over every voxel, one more forward to test success);
  * Square: one query (one forward, no backward);
and the whole ``autoattack-rog`` at ROG's settings (5 steps, 5 restarts, 100 Square queries) in
PGD steps, which is what it costs per case and model in an evaluation.

Network: nnU-Net's PlainConvUNet as in bench_attack_step.py (3 classes, so APGD-DLR runs and FAB
has two target ranks).

Example:  python benchmarks/bench_rog_autoattack.py --size 48 --repeats 3 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_attack_step import make_net

from nnunet_adv.attacks import build_attack


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=48, help="cubic volume edge (default 48)")
    p.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--full", action="store_true", help="also time the whole autoattack-rog once")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = make_net(a.features, num_classes=3).eval()
    x = torch.randn(1, 1, a.size, a.size, a.size)
    with torch.no_grad():
        y = net(x)[0].argmax(1, keepdim=True)  # the clean prediction as labels: every attack has work to do
    eps = 0.5
    units = {  # name -> (attack, units of work it does)
        "pgd step": (build_attack("pgd", eps=eps, alpha=eps / 4, steps=4, random_start=False, seed=0), 4),
        "apgd-dlr step": (build_attack("apgd-dlr", eps=eps, steps=4, restarts=1, seed=0), 5),
        "fab iteration": (build_attack("fab", eps=eps, steps=2, restarts=1, target_ranks=[2], seed=0,
                                       dice_threshold=0.0), 2),  # threshold 0: never succeeds, every iteration runs
        "square query": (build_attack("square", eps=eps, queries=8, seed=0), 9),
    }
    times = {name: [] for name in units}
    for attack, _ in units.values():  # warm-up
        attack(net, x, y)
    for _ in range(a.repeats):
        for name, (attack, n) in units.items():
            start = time.perf_counter()
            attack(net, x, y)
            times[name].append((time.perf_counter() - start) / n)
    pgd = statistics.median(times["pgd step"])
    print(f"volume {a.size}^3, PlainConvUNet {a.features}, {a.threads} thread(s), median of {a.repeats}")
    for name in units:
        t = statistics.median(times[name])
        print(f"  {name:<15} {t:8.3f} s   {t / pgd:5.2f} x a PGD step")
    # autoattack-rog at ROG's settings, in PGD steps per case (3 classes: APGD-DLR runs, FAB has 2 ranks):
    # APGD-CE 5 x (5 + 1), APGD-DLR alike, FAB 2 ranks x 5 restarts x 5 iterations, Square 101 forwards,
    # PGD 5 x 5 (+ its restart selection forwards)
    med = {name: statistics.median(v) for name, v in times.items()}
    estimate = (2 * 5 * 6 * med["apgd-dlr step"] + 2 * 5 * 5 * med["fab iteration"] + 101 * med["square query"]
                + 5 * 5 * pgd) / pgd
    print(f"  autoattack-rog (ROG's settings) ~ {estimate:.0f} PGD steps per case (PGD-10: 10)")
    if a.full:
        start = time.perf_counter()
        build_attack("autoattack-rog", eps=eps, seed=0)(net, x, y)
        print(f"  autoattack-rog measured: {(time.perf_counter() - start) / pgd:.0f} PGD steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
