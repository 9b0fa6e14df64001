#!/usr/bin/env bash
# Dual BN's claim (Han et al. 2021): adversarial training with separate normalisation for clean and
# adversarial inputs keeps clean accuracy, and its saliency maps are more interpretable. Issue 18 item 4,
# docs/claims.md. On the work folder of benchmarks/evidence_rerun.sh (Dataset910, the study's clean model of
# each seed and its clean-continued and PGD-AT fine-tunes), this fine-tunes nnUNetTrainerDualBN and
# nnUNetTrainerDualNorm from the same clean model with the study's schedule, settings and seed (3 x 50
# iterations, PGD-3 at the paper's eps 0.005 of the window, about 1.3/255, where PGD-AT trains at 4/255: exactly
# what `nnUNetv2_adv_study --recipes nnUNetTrainerDualBN nnUNetTrainerDualNorm` trains), then evaluates the
# four models in one report:
#   - clean Dice and the L-inf worst case at 4/255 (PGD-10, APGD-ROG, SegPGD-10, CosPGD-10) with the checks,
#   - --saliency: each model's share of the input-gradient saliency inside the labelled structures, and the
#     maps side by side (saliency.png).
#
#   bash benchmarks/claim_dualbn.sh WORK_FOLDER [SEED ...]        (default seeds: 0 1)
#
# Resumable: a finished training is reused (an unfinished one continues with --c), the evaluation resumes
# with --continue. Writes WORK_FOLDER/claims/dualbn/sS/ (report.md, summary.json, saliency.png) and logs.
source "$(dirname "$0")/claim_env.sh"
mkdir -p claims/dualbn
for seed in $seeds; do
  study_finetunes "$seed" dualbn steps-3_alphaeps-0.833 nnUNetTrainerDualBN nnUNetTrainerDualNorm
  evaluate "claims/dualbn/s$seed" "logs/claim_dualbn_eval_s$seed.log" "$seed" -tr "$baseline" "$pgdat" "${trained[@]}" \
    --saliency --attacks $(linf_attacks 4)
done
