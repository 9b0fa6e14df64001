"""``nnUNetv2_adv_make_demo_dataset``: write the real-MRI demo dataset into $nnUNet_raw.

Examples::

    nnUNetv2_adv_make_demo_dataset                       # $nnUNet_raw/Dataset900_AdvDemoMRI
    nnUNetv2_adv_make_demo_dataset -o /data/raw -d 901 --num_train 10 --seed 1

Bad input (existing dataset id, bad numbers, missing raw folder, missing mricron-data with
``--source mricron``) prints one line on stderr and exits with status 2; never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from nnunet_adv.cli.common import CLIError, OneLineArgumentParser, cli_main
from nnunet_adv.demo import data as demo_data

PROG = "nnUNetv2_adv_make_demo_dataset"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG,
        description="Write a small real-MRI nnU-Net v2 dataset (Colin27 T1 + AAL hippocampus/"
                    "amygdala crops from Debian's mricron-data; without it the ICBM 2009a template nilearn "
                    "installs, grey/white matter labels; synthetic where neither is found).")
    parser.add_argument("-o", "--output", default=None,
                        help="nnU-Net raw folder (default: $nnUNet_raw); must exist")
    parser.add_argument("-d", "--dataset_id", type=int, default=demo_data.DEFAULT_DATASET_ID,
                        help="dataset id 1..999 (default: %(default)s)")
    parser.add_argument("--name", default=demo_data.DEFAULT_NAME,
                        help="dataset name (default: %(default)s)")
    parser.add_argument("--num_train", type=int, default=demo_data.DEFAULT_NUM_TRAIN,
                        help="training cases, >= 1 (default: %(default)s)")
    parser.add_argument("--num_test", type=int, default=demo_data.DEFAULT_NUM_TEST,
                        help="test cases in imagesTs/labelsTs, >= 0 (default: %(default)s)")
    parser.add_argument("--crop_size", type=int, nargs="+",
                        default=[demo_data.DEFAULT_CROP_SIZE], metavar="VOX",
                        help="crop size in 1 mm voxels: one value or three "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--source", choices=demo_data.SOURCES, default="auto",
                        help="mricron: Colin27 + AAL (error if mricron-data is missing); icbm152: the ICBM "
                             "2009a template nilearn installs (grey/white matter); synthetic; auto: mricron, "
                             "else icbm152, else synthetic (default)")
    parser.add_argument("--structures", choices=list(demo_data.STRUCTURES), default=demo_data.DEFAULT_STRUCTURES,
                        help="the two labelled AAL structures (default: %(default)s; caudate-putamen: a second "
                             "task of other anatomy)")
    parser.add_argument("--template_dir", default=None,
                        help=f"folder with ch2.nii.gz and aal.nii.gz (default: "
                             f"${demo_data.TEMPLATE_DIR_ENV}, else "
                             f"{demo_data.DEFAULT_TEMPLATE_DIR})")
    return parser


def run(args) -> int:
    raw_root = args.output or os.environ.get("nnUNet_raw")
    if not raw_root:
        raise CLIError("no raw folder: pass -o RAW_FOLDER or set $nnUNet_raw")
    if len(args.crop_size) not in (1, 3):
        raise CLIError(f"--crop_size takes 1 or 3 values, got {len(args.crop_size)}")
    crop = args.crop_size[0] if len(args.crop_size) == 1 else args.crop_size
    try:
        folder = demo_data.build_demo_dataset(
            raw_root, dataset_id=args.dataset_id, name=args.name, num_train=args.num_train,
            num_test=args.num_test, crop_size=crop, seed=args.seed, source=args.source,
            template_folder=args.template_dir, progress=True, structures=args.structures)
    except demo_data.DemoDataError:
        raise
    except OSError as err:  # e.g. raw folder not writable
        raise CLIError(f"could not write the dataset: {err}") from None
    except KeyboardInterrupt:  # the partial folder is already removed by build_demo_dataset
        print(f"{PROG}: interrupted; no dataset written", file=sys.stderr)
        return 130
    source = json.loads((folder / demo_data.MANIFEST_FILE).read_text())["source"]
    print(f"wrote {folder} ({args.num_train} training + {args.num_test} test cases, "
          f"source: {source})")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return cli_main(lambda: run(build_parser().parse_args(argv)), prefix=f"{PROG}: error")


if __name__ == "__main__":
    sys.exit(main())
