#!/usr/bin/env bash
# The GPU check (issue 11): one script, <= 8 minutes on one H200, that prints one table.
#
#   1. installs nothing beyond this repository's own files: the wheels in .whl/ (made on a machine with
#      internet by benchmarks/gpu_wheels.sh, since the GPU machine has none) and the project itself;
#   2. builds the real-MRI demo dataset from the Colin27 templates in .gpu_data/ (copied there by
#      gpu_wheels.sh from Debian's mricron-data) at 64^3 voxels and preprocesses 3d_fullres;
#   3. trains, through nnUNetv2_train with CUDA AMP (nnU-Net's default on cuda) and nnUNet_compile=t,
#      a short clean model, 3D VAFT and PGD-AT (settings and schedule in the trainer names), and reads
#      nnU-Net's epoch times from its logs (first epoch dropped: compilation);
#   4. times nnUNetv2_predict and nnUNetv2_adv_attack (whole-volume PGD-10) on the same single volume;
#   5. runs benchmarks/bench_attack_step.py (PGD and VAFA step / forward+backward ratios) on cuda;
#   6. prints one markdown table (and writes it to $OUT/gpu_check.md when $OUT is set).
#
# Usage on the device machine, from the repository root:   bash benchmarks/gpu_check.sh
# (carry .whl and .gpu_data; see gpu_wheels.sh).  Timings are wall-clock on that machine, one run.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT_DIR=${OUT:-/tmp/nnunet_adv_gpu_check}
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/nnunet_adv_gpu.XXXX)
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
step() { echo "[gpu_check $(($(date +%s) - T0)) s] $*" | tee -a "$LOG"; }
T0=$(date +%s)

step "installing the carried wheels and the project"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl >>"$LOG" 2>&1
fi
for tarball in .whl/*.tar.xz; do  # SimpleITK, unpacked wheel files (see gpu_wheels.sh)
  [ -e "$tarball" ] || continue
  python3 -c "import sys, site, tarfile; tarfile.open(sys.argv[1]).extractall(site.getsitepackages()[0])" "$tarball"
done
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$LOG" 2>&1
BIN=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
export PATH="$BIN:$PATH"
python3 -c "import torch, nnunetv2, nnunet_adv; assert torch.cuda.is_available(), 'no GPU'" 2>&1 | tee -a "$LOG"

export nnUNet_raw=$WORK/raw nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results
export nnUNet_compile=t nnUNet_n_proc_DA=8 PYTHONUNBUFFERED=1 MPLBACKEND=agg
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
TEMPLATES=${NNUNET_ADV_MRICRON_DIR:-$REPO/.gpu_data}
[ -f "$TEMPLATES/ch2.nii.gz" ] || TEMPLATES=/usr/share/mricron/templates

step "demo dataset (real MRI, 64^3, 12 train + 1 test) and 3d_fullres preprocessing"
nnUNetv2_adv_make_demo_dataset -d 990 --num_train 12 --num_test 1 --crop_size 64 --template_dir "$TEMPLATES" \
  --source auto >>"$LOG" 2>&1
nnUNetv2_plan_and_preprocess -d 990 -c 3d_fullres -np 8 -npfp 8 >>"$LOG" 2>&1

SCHEDULE=ep-3_its-20_valits-2_valsteps-2
declare -A TRAINERS=([clean]=nnUNetTrainerClean_$SCHEDULE [pgdat]=nnUNetTrainerPGDAT_$SCHEDULE
                     [vaft]=nnUNetTrainerVAFT_$SCHEDULE)
for key in clean pgdat vaft; do
  tr=${TRAINERS[$key]}
  step "nnUNetv2_train 990 3d_fullres 0 -tr $tr -device cuda"
  start=$(date +%s%N)
  nnUNetv2_train 990 3d_fullres 0 -tr "$tr" -device cuda >"$OUT_DIR/train_$key.log" 2>&1
  echo "$key wall $((($(date +%s%N) - start) / 1000000))" >>"$WORK/timings.txt"
done

DS=$nnUNet_raw/Dataset990_AdvDemoMRI
MODEL=$nnUNet_results/Dataset990_AdvDemoMRI/${TRAINERS[clean]}__nnUNetPlans__3d_fullres
step "nnUNetv2_predict vs nnUNetv2_adv_attack (PGD-10, whole volume) on one volume"
start=$(date +%s%N)
nnUNetv2_predict_from_modelfolder -i "$DS/imagesTs" -o "$WORK/pred" -m "$MODEL" -f 0 -device cuda --disable_tta \
  >>"$LOG" 2>&1
echo "predict wall $((($(date +%s%N) - start) / 1000000))" >>"$WORK/timings.txt"
start=$(date +%s%N)
nnUNetv2_adv_attack -i "$DS/imagesTs" -l "$DS/labelsTs" -o "$WORK/adv" -m "$MODEL" -f 0 --attack_name pgd --eps 4 \
  --steps 10 -device cuda --disable_progress_bar >>"$LOG" 2>&1
echo "attack wall $((($(date +%s%N) - start) / 1000000))" >>"$WORK/timings.txt"

step "attack-step ratios (benchmarks/bench_attack_step.py, 96^3 patch, cuda)"
python3 benchmarks/bench_attack_step.py --size 96 --batch 2 --repeats 7 --steps 4 --device cuda \
  >"$OUT_DIR/bench_attack_step.txt" 2>&1

step "table"
python3 - "$WORK/timings.txt" "$OUT_DIR" "${TRAINERS[clean]}" "${TRAINERS[pgdat]}" "${TRAINERS[vaft]}" <<'EOF' | tee "$OUT_DIR/gpu_check.md"
import re, statistics, subprocess, sys
from pathlib import Path
timings = dict((l.split()[0], float(l.split()[2]) / 1000) for l in Path(sys.argv[1]).read_text().splitlines())
out, names = Path(sys.argv[2]), dict(zip(("clean", "pgdat", "vaft"), sys.argv[3:6]))
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                     text=True).stdout.strip()
epoch = {}
for key in names:
    text = (out / f"train_{key}.log").read_text()
    times = [float(v) for v in re.findall(r"Epoch time: ([0-9.]+) s", text)]
    dice = re.findall(r"Pseudo dice \[(.*?)\]", text)
    epoch[key] = (statistics.median(times[1:]) if len(times) > 1 else times[0], dice[-1] if dice else "n/a")
print(f"## GPU check ({gpu}; nnUNet_compile=t, AMP; 3d_fullres, Dataset990 64^3 real MRI)\n")
print("| measurement | value |\n|---|---|")
for key, label in (("clean", "clean"), ("pgdat", "PGD-AT (10 steps)"), ("vaft", "VAFT (VAFA 20 steps)")):
    sec, dice = epoch[key]
    print(f"| {label}: `{names[key]}` epoch time (20 its, median after epoch 1) | {sec:.1f} s "
          f"({sec / epoch['clean'][0]:.2f}x clean); train wall {timings[key]:.0f} s; last pseudo Dice {dice} |")
print(f"| nnUNetv2_predict, 1 volume (process wall) | {timings['predict']:.1f} s |")
print(f"| nnUNetv2_adv_attack PGD-10 whole volume, 1 volume (process wall) | {timings['attack']:.1f} s "
      f"({timings['attack'] / timings['predict']:.2f}x predict) |")
bench = (out / "bench_attack_step.txt").read_text().strip().splitlines()
for line in bench:
    if "ratio" in line or "median" in line:
        print(f"| bench_attack_step: {line.strip()} | |")
EOF
step "done in $(($(date +%s) - T0)) s"
