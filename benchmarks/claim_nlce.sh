#!/usr/bin/env bash
# NLCE's claim (He et al., AAAI 2019): the network itself is more robust under targeted I-FGSM. Issue 18
# item 5, docs/claims.md. On the work folder of benchmarks/evidence_rerun.sh (Dataset910 and the study's
# clean model of each seed, nnUNetTrainerClean_ep-20_its-50_valits-2_valsteps-1_seed-S, plain nnU-Net
# network), this trains nnUNetTrainerNLCE with the same schedule and seed from scratch (1000 iterations of
# clean training, one NLCE module at the bottleneck), then evaluates both models with
#   - the paper's attack: targeted I-FGSM (target: the inverted label, NLCEN's step count from eps) over
#     eps 0.5 ... 32 (x/255 of the window),
#   - the L-inf worst case at 4/255 (PGD-10, APGD-ROG, SegPGD-10, CosPGD-10) with the checks.
#
#   bash benchmarks/claim_nlce.sh WORK_FOLDER [SEED ...]        (default seeds: 0 1)
#
# Resumable: a finished training is reused (an unfinished one continues with --c), the evaluation
# resumes with --continue. Writes WORK_FOLDER/claims/nlce/sS/ (report.md, summary.json) and a log.
source "$(dirname "$0")/claim_env.sh"
mkdir -p claims/nlce
for seed in $seeds; do
  schedule=ep-20_its-50_valits-2_valsteps-1_seed-$seed
  clean_model "$seed"  # the plain network: the study's clean model, trained as long as NLCE below
  nlce=nnUNetTrainerNLCE_$schedule
  train_once "$nlce" "logs/claim_nlce_train_s$seed.log"
  evaluate "claims/nlce/s$seed" "logs/claim_nlce_eval_s$seed.log" "$seed" -tr "$clean" "$nlce" \
    --attacks $(linf_attacks 4) --sweep_attack ifgsm-targeted --eps_sweep 0.5 1 2 4 8 16 32
done
