#!/usr/bin/env bash
# The measurements behind docs/evidence.md, as a user runs them: the robustness study on the demo
# dataset (Dataset910, hippocampus + amygdala) and on a second task of other anatomy (Dataset911,
# caudate + putamen), two seeds each, with ROG's complete AutoAttack and the checks at the report's
# eps; then the fine-tuning-length curve: PGD-AT fine-tuned for 150, 300, 600 and 1200 iterations
# from each seed's clean model, each against the clean model trained on for as long.
#
#   bash benchmarks/evidence_rerun.sh WORK_FOLDER [STEP ...]      STEP: data study curve combine (default: all)
#
# A part of it, for a machine with fewer hours: DATASETS="910" SEEDS="0 1" RECIPES="nnUNetTrainerPGDAT
# nnUNetTrainerSAAT" EPS="4 8" bash benchmarks/evidence_rerun.sh WORK data study combine  (the study's
# defaults where unset: every dataset and seed above, the profile's recipes and eps sweep).
#
# Everything goes under WORK_FOLDER (nnU-Net folders, studies, logs; never the repository). Each study
# resumes with --continue, so a run that was stopped goes on where it stopped. On the 2-core CPU
# machine one study took about an hour before ROG's AutoAttack and the checks were added
# (docs/evidence.md); run it in the background:  nohup bash benchmarks/evidence_rerun.sh /work/ev > ev.log 2>&1 &
set -euo pipefail
work=$(realpath "${1:?usage: evidence_rerun.sh WORK_FOLDER [STEP ...]}"); shift
steps=${*:-data study curve combine}
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_n_proc_DA=0 nnUNet_def_n_proc=1 nnUNet_compile=f   # README: a small CPU machine
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results" "$work/logs"
cd "$work"
all="910:hippocampus-amygdala:AdvDemoMRI 911:caudate-putamen:AdvDemoBasalGanglia"
datasets=$(for item in $all; do for id in ${DATASETS:-910 911}; do [ "${item%%:*}" != "$id" ] || echo "$item"; done; done)
seeds=${SEEDS:-0 1}
study_options=()
[ -n "${RECIPES:-}" ] && study_options+=(--recipes $RECIPES)
[ -n "${EPS:-}" ] && study_options+=(--eps_sweep $EPS)
resume() { [ -e "$1/study.json" ] && echo --continue || true; }

for step in $steps; do case $step in
data)
  for item in $datasets; do
    IFS=: read -r id structures name <<< "$item"
    if [ ! -d "$nnUNet_raw/Dataset${id}_$name" ]; then
      nnUNetv2_adv_make_demo_dataset -d "$id" --name "$name" --source mricron --structures "$structures"
      nnUNet_n_proc_DA=1 nnUNetv2_plan_and_preprocess -d "$id" -c 2d -np 1 -npfp 1
    fi
  done ;;
study)
  for item in $datasets; do id=${item%%:*}
    for seed in $seeds; do
      out=study/d$id/s$seed
      /usr/bin/time -v nnUNetv2_adv_study -d "$id" -o "$out" --seed "$seed" -device cpu --disable_progress_bar \
        "${study_options[@]}" $(resume "$out") > "logs/study_d${id}_s$seed.log" 2>&1
    done
  done ;;
curve)
  # the CPU profile fine-tunes 3 x 50 = 150 iterations; the curve adds 300, 600 and 1200
  for item in $datasets; do id=${item%%:*}
    for seed in $seeds; do
      clean=$(ls -d "$nnUNet_results"/Dataset${id}_*/nnUNetTrainerClean_ep-20_its-50_*seed-${seed}__nnUNetPlans__2d)
      for epochs in 6 12 24; do
        out=curve/d$id/s$seed/ep-$epochs
        /usr/bin/time -v nnUNetv2_adv_study -d "$id" -o "$out" --seed "$seed" -device cpu --disable_progress_bar \
          --clean_model "$clean" --recipes nnUNetTrainerPGDAT --finetune_schedule "${epochs}x50" --eps_sweep 4 \
          $(resume "$out") > "logs/curve_d${id}_s${seed}_ep$epochs.log" 2>&1
      done
    done
  done ;;
combine)
  for item in $datasets; do id=${item%%:*}
    nnUNetv2_adv_study --combine $(for s in $seeds; do echo study/d$id/s$s; done) > "combined_d$id.md"
    for epochs in 6 12 24; do
      [ -d curve/d$id ] || continue
      nnUNetv2_adv_study --combine $(for s in $seeds; do echo curve/d$id/s$s/ep-$epochs; done) > "curve_d${id}_ep$epochs.md"
    done
  done ;;
*) echo "unknown step $step (data study curve combine)" >&2; exit 2 ;;
esac; done
