#!/usr/bin/env bash
# VAFT's claim (Hanif et al., MICCAI 2023): VAFT keeps Dice under VAFA where PGD-AT does not, and clean Dice
# rises. Issue 18 item 2, docs/claims.md. On the work folder of benchmarks/evidence_rerun.sh (Dataset910, the
# study's clean model of each seed and its clean-continued and PGD-AT fine-tunes), this fine-tunes, from the same
# clean model with the study's schedule and seed (3 x 50 iterations):
#   - nnUNetTrainerVAFT against the VAFA that hurts these models: the authors' code's variant (`-ref`: per-tile
#     slice rescale, a table per tile, DiceCE, window clip) on tiles smaller than a slice (rescaletile-20: 20
#     voxels, half the 40-voxel slice; the authors' 96-voxel tiles are 0.19 of a 512-voxel CT slice), with the
#     published 20 steps, q_max 20, SSIM term, FC weight 1. The 2d configuration crafts the 2D variant per slice
#     (blocks of 8 x 8, the largest of 32/16/8 dividing the 40 x 40 patch); the paper is 3D only.
#   - nnUNetTrainerVAFA (the paper's "M_VAFA", VAFA-AT without the clean and FC terms), the same attack;
# then evaluates them with the study's clean-continued and PGD-AT models in two reports (claims/vaft/sS/vafa, linf):
#   - the authors' VAFA in 3D on whole volumes, with tiles smaller than a slice (block 8, 20^3 tiles: the VAFA
#     that takes 0.39 of the clean model's Dice) and at the authors' defaults (block 32, their 144 x 144 x 192 mm
#     tile, which covers each 40 mm volume whole);
#   - clean Dice and the L-inf worst case at 4/255 (PGD-10, APGD-ROG, SegPGD-10, CosPGD-10) with the checks.
#
#   bash benchmarks/claim_vaft.sh WORK_FOLDER [SEED ...]        (default seeds: 0 1)
#
# Resumable: a finished training is reused (an unfinished one continues with --c), the evaluation resumes with
# --continue. Writes WORK_FOLDER/claims/vaft/sS/{linf,vafa}/ (report.md, summary.json) and logs. On a fresh
# work folder it first makes the demo dataset and trains the study's models of the seed (claim_env.sh).
source "$(dirname "$0")/claim_env.sh"
mkdir -p claims/vaft
for seed in $seeds; do
  # save-1: a checkpoint every epoch (nnU-Net: every 50); an epoch takes long here and a stopped run continues
  study_finetunes "$seed" vaft variant-ref_rescaletile-20_save-1 nnUNetTrainerVAFT nnUNetTrainerVAFA
  # two reports, one per threat model: the checks' convergence re-run takes the strongest attack of its report,
  # which in a report mixing the two is VAFA (unbounded in L-inf), not one of the 4/255 attacks
  models=(-tr "$baseline" "$pgdat" "${trained[@]}")
  evaluate "claims/vaft/s$seed/linf" "logs/claim_vaft_eval_linf_s$seed.log" "$seed" "${models[@]}" \
    --attacks $(linf_attacks 4)
  evaluate "claims/vaft/s$seed/vafa" "logs/claim_vaft_eval_vafa_s$seed.log" "$seed" "${models[@]}" \
    --attacks "vafa-3d-ref:block_size=8,rescale_tile=20" "vafa-3d-ref" --no_checks
done
