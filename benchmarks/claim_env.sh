# Sourced by the benchmarks/claim_*.sh scripts: the work folder of benchmarks/evidence_rerun.sh (argument 1,
# made the current folder) and the seeds (the other arguments, default 0 1), with nnU-Net's folders and the
# settings that make it fast on a 2-core CPU. An empty folder will do: the demo dataset and the study's models a
# claim needs are made there first, by the study's commands and names (clean_model, study_finetunes).
set -euo pipefail
work=$(realpath "${1:?usage: $(basename "$0") WORK_FOLDER [SEED ...]}"); shift
seeds=${*:-0 1}
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_n_proc_DA=0 nnUNet_def_n_proc=1 nnUNet_compile=f
dataset=Dataset910_AdvDemoMRI
cd "$work"
mkdir -p logs
# the demo dataset as the study makes it, when this work folder has none yet
[ -d "raw/$dataset" ] || DATASETS=910 bash "$(dirname "${BASH_SOURCE[0]}")/evidence_rerun.sh" "$work" data

# train_once TRAINER LOG [nnUNetv2_train OPTION ...]: nnUNetv2_train 910 2d 0 unless TRAINER has a final
# checkpoint; an unfinished one continues with --c (then the options, e.g. -pretrained_weights, are dropped).
train_once() {
  local trainer=$1 log=$2; shift 2
  local folder=results/$dataset/${trainer}__nnUNetPlans__2d/fold_0
  [ -f "$folder/checkpoint_final.pth" ] && return 0
  local options=("$@"); [ -f "$folder/checkpoint_latest.pth" ] && options=(--c)
  /usr/bin/time -v nnUNetv2_train 910 2d 0 -tr "$trainer" -device cpu "${options[@]}" > "$log" 2>&1
}

# evaluate OUT LOG SEED nnUNetv2_adv_evaluate OPTION ...: the held-out cases of Dataset910 2d fold 0 on the
# CPU, resumed with --continue when OUT holds an earlier run.
evaluate() {
  local out=$1 log=$2 seed=$3; shift 3
  local resume=(); { [ -e "$out/summary.json" ] || [ -e "$out/adversarial" ]; } && resume=(--continue)
  /usr/bin/time -v nnUNetv2_adv_evaluate -i "raw/$dataset/imagesTs" -l "raw/$dataset/labelsTs" -o "$out" \
    -d 910 -c 2d -f 0 -device cpu --disable_tta --disable_progress_bar --tile_batch_size 40 --seed "$seed" \
    "$@" "${resume[@]}" > "$log" 2>&1
}

# clean_model SEED: the study's clean model of SEED (20 x 50 iterations from scratch; nnUNetv2_adv_study's
# name for it), trained here when the work folder lacks it: nnU-Net's seeded training gives the study's model
# (docs/evidence.md: retrained models matched every digit shown), so a claim runs on a fresh work folder.
# Sets clean (its trainer name) and pretrained (the option that fine-tunes from it).
clean_model() {
  clean=nnUNetTrainerClean_ep-20_its-50_valits-2_valsteps-1_seed-$1
  train_once "$clean" "logs/claim_train_clean_s$1.log"
  pretrained=(-pretrained_weights "results/$dataset/${clean}__nnUNetPlans__2d/fold_0/checkpoint_final.pth")
}

# study_finetunes SEED TAG SETTINGS BASE ...: the study's clean, clean-continued and PGD-AT models of seed SEED
# (trained when missing), then each recipe BASE with the name items SETTINGS fine-tuned from that clean model with
# the study's schedule and seed (3 x 50 iterations; logs/claim_TAG_train_BASE_sSEED.log). Sets baseline and pgdat
# (the study's fine-tunes) and trained (the new ones), the models of the claim's evaluation.
study_finetunes() {
  local seed=$1 tag=$2 settings=$3 base t; shift 3
  local finetune=ep-3_its-50_valits-2_valsteps-1_seed-$seed
  clean_model "$seed"
  baseline=nnUNetTrainerClean_lr-0.01_$finetune pgdat=nnUNetTrainerPGDAT_steps-3_alphaeps-0.833_$finetune
  train_once "$baseline" "logs/claim_train_continued_s$seed.log" "${pretrained[@]}"
  train_once "$pgdat" "logs/claim_train_pgdat_s$seed.log" "${pretrained[@]}"
  trained=()
  for base in "$@"; do
    t=${base}_${settings}_$finetune
    train_once "$t" "logs/claim_${tag}_train_${base}_s$seed.log" "${pretrained[@]}"
    trained+=("$t")
  done
}

#: the L-inf worst case of the study's report (its attacks at their published steps), at eps $1 (x/255)
linf_attacks() { echo "pgd:eps=$1,steps=10" "apgd-rog:eps=$1" "segpgd:eps=$1,steps=10" "cospgd:eps=$1,steps=10"; }
