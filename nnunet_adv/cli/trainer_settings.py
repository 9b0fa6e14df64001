"""``nnUNetv2_adv_trainer_settings TRAINER``: the settings a trainer's name can carry
(``-tr nnUNetTrainerPGDAT_eps-8_steps-5``), with what each sets, its units and its default."""
from __future__ import annotations

import sys

from nnunet_adv.cli.common import CLIError, OneLineArgumentParser, cli_main
from nnunet_adv.threat_model import to_x255


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog="nnUNetv2_adv_trainer_settings",
                              description="List the KEY-VALUE settings of a trainer name "
                                          "(nnUNetv2_train ... -tr BASE_KEY-VALUE_KEY-VALUE), with their defaults.")
    p.add_argument("trainer", nargs="?", default=None,
                   help="a trainer of nnunet_adv (e.g. nnUNetTrainerPGDAT); without it: the trainers")
    return p


def run(args) -> int:
    # the trainers import nnU-Net and install our integration: only when listing them
    import nnunet_adv.trainers as trainers
    from nnunet_adv.training.adversarial_trainer import nnUNetTrainerAdversarial
    from nnunet_adv.training.names import default_of, settings_of

    bases = sorted(n for n in trainers.__all__ if isinstance(getattr(trainers, n), type)
                   and issubclass(getattr(trainers, n), nnUNetTrainerAdversarial) and n != "nnUNetTrainerAdversarial")
    if args.trainer is None:
        print("trainers whose names take settings (nnUNetv2_adv_trainer_settings TRAINER lists them):")
        print("  " + "\n  ".join(bases))
        return 0
    if args.trainer not in bases:
        raise CLIError(f"unknown trainer {args.trainer!r}; trainers: {', '.join(bases)}")
    base = getattr(trainers, args.trainer)
    settings = settings_of(base)
    print(f"{args.trainer}: nnUNetv2_train DATASET CONFIG FOLD -tr {args.trainer}_KEY-VALUE[_KEY-VALUE...]")
    width = max(len(k) for k in settings)
    for key in sorted(settings):
        s = settings[key]
        default = default_of(base, s)
        if key == "eps" and isinstance(default, float):
            default = to_x255(default)
        print(f"  {key:<{width}}  {s.kind.__name__:<5}  default {default!r:<14} {s.doc}")
    return 0


def main(argv=None) -> int:
    return cli_main(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
