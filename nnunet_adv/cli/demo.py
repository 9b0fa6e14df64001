"""``nnUNetv2_adv_demo``: the whole story on real MRI in one command (see nnunet_adv.demo.pipeline)."""
from __future__ import annotations

import argparse
import sys

from nnunet_adv.cli.common import OneLineArgumentParser, cli_main, pick_device


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="nnUNetv2_adv_demo",
        description="Build a real-MRI nnU-Net dataset, train a clean and a PGD-AT model with nnU-Net's own "
                    "commands, attack both and print clean vs adversarial Dice.")
    p.add_argument("-o", "--output", default="nnunet_adv_demo",
                   help="new folder for everything the demo writes (default: ./nnunet_adv_demo); must not exist, "
                        "except with --continue")
    p.add_argument("-device", default=None, choices=("cpu", "cuda", "mps"),
                   help="device for training and attacks (default: cuda if available, else cpu). "
                        "The schedule is short on cpu and longer on cuda.")
    p.add_argument("-d", "--dataset_id", type=int, default=900, help="nnU-Net dataset id to use (default 900)")
    p.add_argument("--num_train", type=int, default=20, help="training cases (default 20)")
    p.add_argument("--num_test", type=int, default=4, help="held-out test cases (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset's augmentations and of the attacks")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="resume an interrupted demo in -o (same options): finished steps are reused, an unfinished "
                        "training continues from its latest checkpoint")
    return p


def run(args) -> int:
    from nnunet_adv.demo.pipeline import Demo, DemoRun  # nnU-Net and torch: after the flags are read

    demo_run = DemoRun(output=args.output, device=pick_device(args.device), dataset_id=args.dataset_id,
                       num_train=args.num_train, num_test=args.num_test, seed=args.seed, resume=args.resume)
    demo_run.validate()
    text = Demo(demo_run, log=lambda line: print(line, flush=True)).execute()
    print("\n" + text)
    return 0


def main(argv=None) -> int:
    return cli_main(lambda: run(build_parser().parse_args(argv)),
                    resume_hint="re-run the same command with --continue to resume (finished steps are kept)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
