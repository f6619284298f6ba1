#!/bin/bash
# Submit pretraining, then its evaluation (runs only if pretraining succeeds); prints both job ids.
#
#   slurm/submit.sh --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu --account me \
#       --config configs/cifar10.yaml --output-dir out/run1 -- train.epochs=200 data.train=parquet:/x/*.parquet
#
# Options: --nodes N  --gpus-per-node G (0: CPU tasks)  --tasks-per-node T (default G, or 1)
#          --cpus-per-task C  --time T  --partition P  --account A  --config YAML  --output-dir DIR
#          --eval-config YAML  --no-eval  --wait ; everything after -- is passed to train.py.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
nodes=1 gpus=0 tasks="" cpus=8 time="" partition="" account="" config="" out="out/run" wait=""
eval_config="" run_eval=1
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) nodes="$2"; shift 2 ;;
        --gpus-per-node) gpus="$2"; shift 2 ;;
        --tasks-per-node) tasks="$2"; shift 2 ;;
        --cpus-per-task) cpus="$2"; shift 2 ;;
        --time) time="$2"; shift 2 ;;
        --partition) partition="$2"; shift 2 ;;
        --account) account="$2"; shift 2 ;;
        --config) config="$2"; shift 2 ;;
        --output-dir) out="$2"; shift 2 ;;
        --eval-config) eval_config="$2"; shift 2 ;;
        --no-eval) run_eval=0; shift ;;
        --wait) wait=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "submit.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$tasks" ] || tasks=$(( gpus > 0 ? gpus : 1 ))
common=(--nodes="$nodes" --ntasks-per-node="$tasks" --cpus-per-task="$cpus" --chdir="$repo")
[ "$gpus" -gt 0 ] && common+=(--gpus-per-node="$gpus")
[ -n "$time" ] && common+=(--time="$time")
[ -n "$partition" ] && common+=(--partition="$partition")
[ -n "$account" ] && common+=(--account="$account")
mkdir -p "$repo/logs"
train_args=(output_dir="$out")
[ -n "$config" ] && train_args=(--config "$config" "${train_args[@]}")

pretrain=$(sbatch --parsable "${common[@]}" "$here/pretrain.sbatch" "${train_args[@]}" "$@")
echo "pretrain job: $pretrain"
last="$pretrain"
if [ "$run_eval" -eq 1 ]; then
    eval_args=(--checkpoint "$out" output_dir="$out/eval")
    [ -n "$eval_config" ] && eval_args=(--checkpoint "$out" --config "$eval_config" output_dir="$out/eval")
    evaluation=$(sbatch --parsable "${common[@]}" --dependency=afterok:"$pretrain" "$here/eval.sbatch" "${eval_args[@]}")
    echo "eval job: $evaluation"
    last="$evaluation"
fi
if [ -n "$wait" ]; then  # block until the last job has left the queue (tests, scripts)
    while squeue -h -j "$last" 2>/dev/null | grep -q .; do sleep 2; done
fi
