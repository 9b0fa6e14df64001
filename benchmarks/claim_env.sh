# Sourced by the benchmarks/claim_*.sh scripts: the work folder of benchmarks/evidence_rerun.sh (argument 1,
# made the current folder) and the seeds (the other arguments, default 0 1), with nnU-Net's folders and the
# settings that make it fast on a 2-core CPU.
set -euo pipefail
work=$(realpath "${1:?usage: $(basename "$0") WORK_FOLDER [SEED ...]}"); shift
seeds=${*:-0 1}
export nnUNet_raw=$work/raw nnUNet_preprocessed=$work/preprocessed nnUNet_results=$work/results
export nnUNet_n_proc_DA=0 nnUNet_def_n_proc=1 nnUNet_compile=f
dataset=Dataset910_AdvDemoMRI
cd "$work"
mkdir -p logs

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

# require_model TRAINER SEED: stop with one line when the study's model TRAINER is not trained yet
require_model() {
  [ -f "results/$dataset/${1}__nnUNetPlans__2d/fold_0/checkpoint_final.pth" ] || {
    echo "seed $2: the study's model $1 is not trained yet (benchmarks/evidence_rerun.sh)" >&2; exit 2; }
}

# study_finetunes SEED TAG SETTINGS BASE ...: with the study's clean, clean-continued and PGD-AT models of seed
# SEED trained, fine-tune each recipe BASE with the name items SETTINGS from that clean model with the study's
# schedule and seed (3 x 50 iterations; logs/claim_TAG_train_BASE_sSEED.log). Sets baseline and pgdat (the
# study's fine-tunes) and trained (the new ones), the models of the claim's evaluation.
study_finetunes() {
  local seed=$1 tag=$2 settings=$3 base t; shift 3
  local finetune=ep-3_its-50_valits-2_valsteps-1_seed-$seed
  local clean=nnUNetTrainerClean_ep-20_its-50_valits-2_valsteps-1_seed-$seed
  baseline=nnUNetTrainerClean_lr-0.01_$finetune pgdat=nnUNetTrainerPGDAT_steps-3_alphaeps-0.833_$finetune
  for t in "$clean" "$baseline" "$pgdat"; do require_model "$t" "$seed"; done
  trained=()
  for base in "$@"; do
    t=${base}_${settings}_$finetune
    train_once "$t" "logs/claim_${tag}_train_${base}_s$seed.log" \
      -pretrained_weights "results/$dataset/${clean}__nnUNetPlans__2d/fold_0/checkpoint_final.pth"
    trained+=("$t")
  done
}

#: the L-inf worst case of the study's report (its attacks at their published steps), at eps $1 (x/255)
linf_attacks() { echo "pgd:eps=$1,steps=10" "apgd-rog:eps=$1" "segpgd:eps=$1,steps=10" "cospgd:eps=$1,steps=10"; }
