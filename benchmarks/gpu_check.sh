#!/usr/bin/env bash
# The GPU check: one GPU, one command, done in under 9 minutes (a global deadline, BUDGET_S=540: every
# step's timeout is capped at what is left; a step with under 20 s left is skipped and says so). From
# the repository root on a machine with CUDA; results (logs and tables) in $OUT, default
# benchmarks/results/gpu.
#
#   bash benchmarks/gpu_wheels.sh          # first, HERE (network): .whl/ = wheels + digits.parquet
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)   # the device machine
#   PYTHON=/path/to/python3 bash benchmarks/gpu_check.sh    # default: python3 (python if only it has torch)
#
# .whl is git-ignored: the run call needs carry: [".whl"] (it holds the wheels and .whl/digits.parquet,
# the embedded digits for step 2, so the GPU machine needs no scikit-learn). Nothing here uses the network
# (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1).
#
# 0. install + preflight: the wheels of .whl that fit this Python and that the image lacks (or has older;
#    deepspeed, datasets, huggingface-hub, dill, multiprocess, pydantic(-core) and timm always, at the
#    pinned versions) into /tmp/site; then `import deepspeed, datasets, timm, triton, pytest, matplotlib`
#    (exit 1 if any is missing) and a Triton smoke kernel on CUDA (if it fails: --fused never /
#    classifier.fused=never below, and no fused variants in step 4);
# 1. benchmarks/gpu_train.py: ResNet-50 at 224 px, zero2_bf16, on 16,384 generated JPEGs (320x256, ~15 KB)
#    with a classifier of N = 1,281,167 rows (ImageNet's scale): the step on tensors in memory vs end to
#    end (CPU decode in workers, and nvJPEG), the classifier's share, peak memory;
# 2. a short end-to-end `deepspeed train.py` on the digits (5 epochs), kNN at the end; its metrics.jsonl,
#    eval.json, training.png copied to $OUT/train_digits;
# 3. the CUDA tests only (-k "cuda or hopper": classifier exactness with bf16 features, the fused Triton
#    kernels on CUDA and compiled for sm_90, device views on CUDA vs the CPU);
# 4. benchmarks/classifier.py: fp32 inputs at N = 1M (the trainer's classifier operands), bf16 at
#    N = 1M, B = 512 and 4,096 (block loops, fused kernels, bare GEMMs), bf16 N = 10M at B = 4,096 fused.
# The steps run in this order of value, so that the last ones are those starved if time runs short.
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=$((SECONDS + ${BUDGET_S:-540}))
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the interpreter that has torch: python3, else python
    PY=python3
    for c in python3 python; do
        if command -v "$c" >/dev/null && "$c" -c "import torch" 2>/dev/null; then PY=$c; break; fi
    done
fi
SITE=${SITE:-/tmp/site}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-/tmp/ifc_ds_hf_datasets} MPLCONFIGDIR=${MPLCONFIGDIR:-/tmp/ifc_ds_mpl}
SUMMARY=()
step() { echo; echo "=== $1 ($(date +%T), $((DEADLINE - SECONDS)) s left)"; }

# capped MAX_S LOG PATTERN CMD...: CMD under `timeout min(MAX_S, time left)`, its output in LOG, the lines
# matching PATTERN shown as they come; skipped (exit 125) with under 20 s left. Returns CMD's exit code.
capped() {
    local max=$1 log=$2 pattern=$3 left=$((DEADLINE - SECONDS)) start=$SECONDS rc
    shift 3
    if [ "$left" -lt 20 ]; then
        echo "SKIPPED: ${left} s left before the deadline: $*" | tee "$log"
        SUMMARY+=("$(basename "$log"): skipped (deadline)")
        return 125
    fi
    [ "$left" -lt "$max" ] && max=$left
    timeout -k 5 "$max" "$@" 2>&1 | tee "$log" | grep --line-buffered -E "$pattern"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) ;;
        124|137) echo "TIMEOUT after ${max} s: $*" | tee -a "$log" ;;
        *) echo "FAILED (exit $rc): $*; last lines of $log:"; tail -n 8 "$log" ;;
    esac
    SUMMARY+=("$(basename "$log"): exit $rc in $((SECONDS - start)) s")
    return "$rc"
}

step "0. install + preflight"
echo "$($PY -V 2>&1) at $(command -v "$PY")" | tee "$OUT/gpu.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$OUT/gpu.txt"
echo "cores: $(nproc), /dev/shm: $(df -h /dev/shm 2>/dev/null | awk 'NR == 2 {print $2 " (" $4 " free)"}')" \
    | tee -a "$OUT/gpu.txt"  # the DataLoader workers' batches pass through /dev/shm
if ls .whl/*.whl >/dev/null 2>&1; then
    # which wheels: those this interpreter supports, and that the image lacks, or has at an older
    # version; FORCE: ours whatever the image has (versions that must match each other); KEEP: the
    # image's whatever its version (compiled against the image's numpy)
    cat > /tmp/ifc_ds_pick.py <<'EOF'
import importlib.metadata as md
import os
import sys

try:
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:
    try:
        from pip._vendor.packaging.tags import sys_tags
        from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
        from pip._vendor.packaging.version import Version
    except ImportError:  # neither: take them all, the preflight tells what does not import
        print("\n".join(sys.argv[3:]))
        sys.exit(0)
force, keep = set(sys.argv[1].split()), set(sys.argv[2].split())
supported = set(sys_tags())
for path in sys.argv[3:]:
    name, version, _, tags = parse_wheel_filename(os.path.basename(path))
    if not tags & supported:
        print(f"skip {os.path.basename(path)}: not for this Python / platform", file=sys.stderr)
        continue
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    try:
        newer = have is not None and Version(have) >= version
    except ValueError:  # an unparsable version: ours
        newer = False
    if have is not None and name not in force and (name in keep or newer):
        print(f"keep the image's {name} {have} (wheel: {version})", file=sys.stderr)
        continue
    print(f"install {name} {version}" + (f" over the image's {have}" if have else ""), file=sys.stderr)
    print(path)
EOF
    FORCE="deepspeed datasets huggingface-hub dill multiprocess pydantic pydantic-core timm"
    KEEP="pandas matplotlib contourpy pillow"
    mapfile -t PICK < <($PY /tmp/ifc_ds_pick.py "$FORCE" "$KEEP" .whl/*.whl 2>>"$OUT/install.txt")
    mkdir -p "$SITE"
    if [ "${#PICK[@]}" -gt 0 ]; then
        if $PY -m pip --version >/dev/null 2>&1; then
            # all at once; if that fails, one by one, so that one bad wheel costs only itself
            if ! timeout 180 $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
                    "${PICK[@]}" >>"$OUT/install.txt" 2>&1; then
                echo "pip failed on the whole set: wheel by wheel" | tee -a "$OUT/install.txt"
                for w in "${PICK[@]}"; do
                    timeout 60 $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
                        "$w" >>"$OUT/install.txt" 2>&1 || echo "skip $w" | tee -a "$OUT/install.txt"
                done
            fi
        else  # no pip in the image: a wheel is a zip of the package folders (their scripts are not needed)
            for w in "${PICK[@]}"; do
                $PY -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$w" "$SITE" \
                    || echo "skip $w" | tee -a "$OUT/install.txt"
            done
        fi
    fi
    grep -E "^(install|keep|skip)" "$OUT/install.txt" | paste -sd ';' | sed 's/;/; /g'
    export PYTHONPATH=$SITE:${PYTHONPATH:-}
else
    echo "no .whl folder: using the image's packages as they are (was the run called with carry: [\".whl\"]?)"
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
DIGITS=.whl/digits.parquet
if [ -f "$DIGITS" ]; then DIGITS="parquet:$PWD/$DIGITS"; else DIGITS="sklearn:digits"; fi

cat > /tmp/ifc_ds_preflight.py <<'EOF'
import importlib
import sys

missing = []
for name in ("torch", "deepspeed", "datasets", "timm", "triton", "pytest", "matplotlib", "pytest_timeout",
             "ifc_ds.trainer"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '')} ({getattr(module, '__file__', '')})")
    except Exception as exc:
        print(f"MISSING {name}: {type(exc).__name__}: {exc}")
        if name != "pytest_timeout":  # only the tests' per-test timeout
            missing.append(name)
cuda = False
if "torch" not in missing:
    import torch

    cuda = torch.cuda.is_available()
    print("cuda", torch.version.cuda, "available", cuda, "devices", torch.cuda.device_count())
if missing or not cuda:
    print("preflight FAILED:", ", ".join(missing) or "no CUDA device")
    sys.exit(1)
print("preflight OK")
EOF
cat > /tmp/ifc_ds_triton_smoke.py <<'EOF'
import torch
import triton
import triton.language as tl


@triton.jit
def _add(x, y, out, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + i, tl.load(x + i, mask=i < n) + tl.load(y + i, mask=i < n), mask=i < n)


x, y = torch.randn(1000, device="cuda"), torch.randn(1000, device="cuda")
out = torch.empty_like(x)
_add[(triton.cdiv(1000, 256),)](x, y, out, 1000, BLOCK=256)
torch.cuda.synchronize()
assert torch.equal(out, x + y), "wrong sums"
print("triton smoke kernel OK, triton", triton.__version__)
EOF
if ! capped 90 "$OUT/preflight.txt" "." $PY /tmp/ifc_ds_preflight.py; then
    cat "$OUT/preflight.txt" >> "$OUT/gpu.txt"
    echo "preflight failed: the steps need these imports; stopping (install log: $OUT/install.txt)"
    tail -n 20 "$OUT/install.txt"
    exit 1
fi
cat "$OUT/preflight.txt" >> "$OUT/gpu.txt"
FUSED=auto
if ! capped 60 "$OUT/triton_smoke.txt" "." $PY /tmp/ifc_ds_triton_smoke.py; then
    FUSED=never
    echo "Triton does not run here: the classifier runs its block loops (--fused never, classifier.fused=never)"
fi

step "1. ResNet-50 224 px zero2_bf16: data path vs step in memory (fused=$FUSED)"
capped 240 "$OUT/gpu_train.txt" "^\||share|JPEGs|warning|Error" \
    $PY benchmarks/gpu_train.py --images 16384 --instances 1281167 --batch 256 --steps 10 --fused "$FUSED"

step "2. deepspeed train.py, digits ($DIGITS), 1 GPU"
rm -rf /tmp/ifc_ds_gpu_digits
capped 150 "$OUT/train.txt" "kNN|failed|Error|exit code" \
    $PY -m deepspeed.launcher.runner --num_gpus 1 train.py --config configs/default.yaml \
    output_dir=/tmp/ifc_ds_gpu_digits resume=none log.progress=false train.ds_config=ds_configs/zero2_bf16.json \
    "data.train=$DIGITS" "eval.train=$DIGITS" "classifier.fused=$FUSED"
mkdir -p "$OUT/train_digits"
for f in metrics.jsonl eval.json training.png config.yaml; do
    [ -f "/tmp/ifc_ds_gpu_digits/$f" ] && cp "/tmp/ifc_ds_gpu_digits/$f" "$OUT/train_digits/"
done
echo "last metrics: $(tail -n 1 /tmp/ifc_ds_gpu_digits/metrics.jsonl 2>/dev/null || echo none)"
$PY -c "import json, sys; e = json.load(open(sys.argv[1])); print(f\"kNN top-1 {e['knn_top1']:.2%} (untrained \
{(e.get('knn_top1_untrained') or 0):.2%}, k={e['k']})\")" /tmp/ifc_ds_gpu_digits/eval.json 2>/dev/null \
    || echo "no eval.json"

step "3. CUDA tests"
TIMEOUT_PLUGIN=()
$PY -c "import pytest_timeout" 2>/dev/null && TIMEOUT_PLUGIN=(-p pytest_timeout)
# the image's own pytest plugins stay out (PYTEST_DISABLE_PLUGIN_AUTOLOAD); the CPU-only tests (Triton
# interpreter, gloo ranks) are deselected: the CPU machines run them
capped 120 "$OUT/tests.txt" "passed|failed|error|skipped|FAILED|ERROR" \
    env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $PY -m pytest -q ${TIMEOUT_PLUGIN[@]+"${TIMEOUT_PLUGIN[@]}"} -k "cuda or hopper" -rs \
    tests/test_classifier.py tests/test_fused_loss.py tests/test_augment.py

step "4. classifier: fused vs block loops vs bare GEMMs"
VARIANTS=(gemm3 layer layer_fused)
[ "$FUSED" = never ] && VARIANTS=(gemm3 layer)
capped 100 "$OUT/classifier_fp32.txt" "^\||x 3-GEMM" \
    $PY benchmarks/classifier.py --device cuda --ranks 1 --sizes 1000000 --batch 512 --steps 10 \
    --variants "${VARIANTS[@]}"
capped 150 "$OUT/classifier.txt" "^\||x 3-GEMM" \
    $PY benchmarks/classifier.py --device cuda --ranks 1 --sizes 1000000 --batch 512 4096 --steps 10 \
    --variants "${VARIANTS[@]}" --bf16
if [ "$FUSED" = never ]; then
    echo "N = 10M skipped: it needs the fused kernels (the block loops' logits would not fit)"
else
    capped 90 "$OUT/classifier_10m.txt" "^\||x 3-GEMM" \
        $PY benchmarks/classifier.py --device cuda --ranks 1 --sizes 10000000 --batch 4096 --steps 5 \
        --variants gemm3 layer_fused --bf16
fi

echo; echo "=== summary ($(date +%T), $((DEADLINE - SECONDS)) s left before the deadline)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
echo "logs in $OUT"
