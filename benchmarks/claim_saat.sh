#!/usr/bin/env bash
# SAAT's claim (Wang et al., MICCAI 2023): robustness equal to PGD-AT's with fewer attack iterations. Issue 18
# item 3, docs/claims.md. On the work folder of benchmarks/evidence_rerun.sh (Dataset910 and the study's clean
# model of each seed), this fine-tunes from that clean model, with the seed, for 12 x 50 iterations: long enough
# for SEAT's 3-epoch check period to decide three times (after epochs 6, 9 and 12; m is 1 for epochs 1-3, 2 from
# epoch 4):
#   1. nnUNetTrainerSAAT_SEAT: SAAT with SEAT's gradient measure (the perturbation's) and its per-patch window,
#      the published period 3, gamma 1.1, eps 8/255, Free-AT with m replays;
#   2. nnUNetTrainerPGDAT at SAAT's mean m: the same eps 8/255 and PGD-AT's step rule (2.5 eps / steps), with
#      steps = SAAT's mean m over the epochs (read from its checkpoint's log), rounded;
#   3. the clean model trained on for as long (nnU-Net's training at lr 0.01), the baseline of "recovered";
# then evaluates the three in one report at the training budget, 8/255: clean Dice, the L-inf worst case
# (PGD-10, APGD-ROG, SegPGD-10, CosPGD-10) and the checks.
#
#   bash benchmarks/claim_saat.sh WORK_FOLDER [SEED ...]        (default seeds: 0 1)
#
# Resumable: a finished training is reused (an unfinished one continues with --c), the evaluation resumes with
# --continue. Writes WORK_FOLDER/claims/saat/sS/ (report.md, summary.json), claims/saat/saat_m_sS.txt and logs.
source "$(dirname "$0")/claim_env.sh"
mkdir -p claims/saat
for seed in $seeds; do
  finetune=ep-12_its-50_valits-2_valsteps-1_seed-$seed
  saved=save-1_$finetune  # a checkpoint every epoch (nnU-Net: every 50), so a stopped run continues with --c
  clean_model "$seed"
  saat=nnUNetTrainerSAAT_SEAT_$saved
  train_once "$saat" "logs/claim_saat_train_saat_s$seed.log" "${pretrained[@]}"
  # m used in each epoch, as the trainer logged it (nnU-Net keeps the log in the checkpoint); beside the
  # report folder, which nnUNetv2_adv_evaluate wants new or its own
  m_file=claims/saat/saat_m_s$seed.txt
  python - "results/$dataset/${saat}__nnUNetPlans__2d/fold_0/checkpoint_final.pth" > "$m_file" <<'PY'
import sys, torch
m = torch.load(sys.argv[1], map_location="cpu", weights_only=False)["logging"]["saat_m"]
print("m per epoch:", " ".join(str(int(v)) for v in m))
print(f"mean m: {sum(m) / len(m):.3f}")
steps = max(1, round(sum(m) / len(m)))
print(f"PGD-AT at the mean m: steps-{steps}_alphaeps-{2.5 / steps:g}")  # PGD-AT's step rule: 2.5 eps / steps
PY
  pgdat=nnUNetTrainerPGDAT_eps-8_$(sed -n 's/^PGD-AT at the mean m: //p' "$m_file")_$saved
  train_once "$pgdat" "logs/claim_saat_train_pgdat_s$seed.log" "${pretrained[@]}"
  baseline=nnUNetTrainerClean_lr-0.01_$finetune
  train_once "$baseline" "logs/claim_saat_train_baseline_s$seed.log" "${pretrained[@]}"
  evaluate "claims/saat/s$seed" "logs/claim_saat_eval_s$seed.log" "$seed" -tr "$baseline" "$saat" "$pgdat" \
    --attacks $(linf_attacks 8)
done
