#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh on a GPU machine without network whose image has torch, timm,
# numpy, pyarrow, pillow, fsspec, psutil, safetensors and pyyaml but not the rest of pyproject.toml:
# run here, from the repository root, then carry .whl (git-ignored) with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
get() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$@"
}
get datasets dill multiprocess xxhash hjson pydantic pydantic-core annotated-types typing-inspection \
    accelerate scikit-learn
python3 -m pip download -q --no-deps --no-binary=:all: -d .whl deepspeed  # source only on PyPI
du -sh .whl
