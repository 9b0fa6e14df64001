"""``nnUNetv2_adv_ext_trainer``: print the shell line that makes nnU-Net find our trainers
(only needed where the start-up hook of :mod:`nnunet_adv.ext_trainer` does not run)."""
from __future__ import annotations

import os
import sys

from nnunet_adv.cli.common import OneLineArgumentParser, cli_main
from nnunet_adv.ext_trainer import ENV_VAR, trainer_folder


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog="nnUNetv2_adv_ext_trainer",
        description="Print the shell line that makes nnU-Net find the nnunet_adv trainers. Only needed where the "
                    "start-up hook is disabled (python -S, an environment without site-packages hooks).")
    parser.add_argument("--folder", action="store_true", help="print only the folder")
    return parser


def run(args) -> int:
    folder = trainer_folder()
    if args.folder:
        print(folder)
    else:
        print(f'export {ENV_VAR}="${{{ENV_VAR}:+${{{ENV_VAR}}}{os.pathsep}}}{folder}"')
    return 0


def main(argv=None) -> int:
    return cli_main(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
