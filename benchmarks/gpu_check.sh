#!/usr/bin/env bash
# The GPU check: one GPU, under 10 minutes, from the repository root on a machine with CUDA.
#
#   bash benchmarks/gpu_check.sh              # results (logs and tables) in $OUT, default benchmarks/results/gpu
#
# 1. the CUDA tests (classifier exactness with bf16 features, the fused Triton kernels, device views on
#    CUDA vs the CPU);
# 2. benchmarks/classifier.py, bf16: N = 1M at B = 512 and 4,096 (block loops, fused kernels, bare GEMMs),
#    N = 10M at B = 4,096 fused, and fp32 inputs at N = 1M (issue 14's rows);
# 3. benchmarks/gpu_train.py: ResNet-50 at 224 px, zero2_bf16, on 4,096 generated JPEGs with a classifier
#    of N = 1,281,167 rows (ImageNet's scale): the step on
#    tensors in memory vs end to end (CPU decode in workers, and nvJPEG), the classifier's share, peak memory;
# 4. a short end-to-end `deepspeed train.py` on the digits, kNN at the end.
#
# A machine without network: make wheels here first (`bash benchmarks/gpu_wheels.sh`: the packages of
# pyproject.toml that a CUDA image with torch lacks, for Python 3.12) and carry the .whl folder; this
# script installs them into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/* >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    for sdist in .whl/*.tar.gz; do  # DeepSpeed ships as source only: build it without its ops (JIT later)
        [ -e "$sdist" ] && DS_BUILD_OPS=0 $PY -m pip install -q --no-index --no-deps --no-build-isolation \
            --target /tmp/site "$sdist"
    done
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
step() { echo; echo "=== $1 ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, deepspeed, datasets, timm; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__,
'datasets', datasets.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

step "1. CUDA tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_classifier.py tests/test_fused_loss.py \
    tests/test_augment.py 2>&1 | tee "$OUT/tests.txt" | tail -5

step "2. classifier: fused vs block loops vs bare GEMMs"
timeout 150 $PY benchmarks/classifier.py --device cuda --ranks 1 --sizes 1000000 --batch 512 4096 --steps 10 \
    --variants gemm3 layer layer_fused --bf16 2>&1 | tee "$OUT/classifier.txt" | grep -E "^\||x 3-GEMM"
timeout 90 $PY benchmarks/classifier.py --device cuda --ranks 1 --sizes 10000000 --batch 4096 --steps 5 \
    --variants gemm3 layer_fused --bf16 2>&1 | tee "$OUT/classifier_10m.txt" | grep -E "^\||x 3-GEMM"
timeout 60 $PY benchmarks/classifier.py --device cuda --ranks 1 --sizes 1000000 --batch 512 --steps 10 \
    --variants gemm3 layer layer_fused 2>&1 | tee "$OUT/classifier_fp32.txt" | grep -E "^\||x 3-GEMM"

step "3. ResNet-50 224 px zero2_bf16: data path vs step in memory"
timeout 300 $PY benchmarks/gpu_train.py --images 4096 --instances 1281167 --batch 256 --steps 10 2>&1 | tee "$OUT/gpu_train.txt" \
    | grep -E "^\||share|JPEGs"

step "4. deepspeed train.py, digits, 1 GPU"
timeout 150 $PY -m deepspeed.launcher.runner --num_gpus 1 train.py --config configs/default.yaml \
    output_dir=/tmp/ifc_ds_gpu_digits resume=none log.progress=false train.ds_config=ds_configs/zero2_bf16.json \
    2>&1 | tee "$OUT/train.txt" | grep -E "kNN|images/s|failed|Error" | tail -5
tail -c 300 /tmp/ifc_ds_gpu_digits/metrics.jsonl 2>/dev/null
echo; echo "done $(date +%T); logs in $OUT"
