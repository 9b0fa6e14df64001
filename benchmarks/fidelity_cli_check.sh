#!/bin/bash
# The three VAFA variants through nnUNetv2_adv_attack on the demo-data (real MRI) nnU-Net 2d model of
# bench_fidelity, then stock nnUNetv2_predict + nnUNetv2_evaluate_folder on the exported images.
set -eu
# Usage: benchmarks/fidelity_cli_check.sh WORKDIR OUTPUT   (WORKDIR: bench_fidelity.py's --workdir, run first)
W=$(realpath "${1:?usage: fidelity_cli_check.sh WORKDIR_OF_bench_fidelity.py OUTPUT_FOLDER}")
mkdir -p "${2:?output folder}"; O=$(realpath "$2")
cd "$(dirname "$0")/.."; [ -f .venv/bin/activate ] && source .venv/bin/activate
export nnUNet_n_proc_DA=0 nnUNet_def_n_proc=1 nnUNet_compile=f OMP_NUM_THREADS=2 MPLBACKEND=agg
export nnUNet_raw=$W/nnUNet_raw nnUNet_preprocessed=$W/nnUNet_preprocessed nnUNet_results=$W/nnUNet_results
DS=$nnUNet_raw/Dataset960_FidelityMR
M=$nnUNet_results/Dataset960_FidelityMR/nnUNetTrainer_5epochs__nnUNetPlans__2d
for A in "vafa-3d" "vafa-3d-ref" "slice-rescale"; do
  EXTRA=(); [ "$A" != "slice-rescale" ] && EXTRA=(--q_max 20 --steps 20 --block_size 8)
  [ "$A" != "vafa-3d" ] && EXTRA+=(--attack_option rescale_tile=20)
  rm -rf $O/adv_$A $O/pred_$A
  /usr/bin/time -f "$A attack %e s" nnUNetv2_adv_attack -i $DS/imagesTs -l $DS/labelsTs -o $O/adv_$A -m $M -f 0 \
     --attack_name $A "${EXTRA[@]}" --seed 0 --tile_batch_size 40 -device cpu --disable_progress_bar
  nnUNetv2_predict -i $O/adv_$A -o $O/pred_$A -d 960 -c 2d -tr nnUNetTrainer_5epochs -f 0 --disable_tta \
     -device cpu --disable_progress_bar > /dev/null
  nnUNetv2_evaluate_folder $DS/labelsTs $O/pred_$A -djfile $M/dataset.json -pfile $M/plans.json > /dev/null
  python -c "import json,sys; print('$A', 'stock nnU-Net foreground Dice', round(json.load(open('$O/pred_$A/summary.json'))['foreground_mean']['Dice'], 3))"
done
