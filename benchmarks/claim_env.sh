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
