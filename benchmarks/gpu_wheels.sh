#!/usr/bin/env bash
# Wheels and data for benchmarks/gpu_check.sh on a GPU machine without network whose image has torch
# (+ triton), numpy and pyarrow, maybe timm, pillow, fsspec, psutil, safetensors and pyyaml, but not the
# rest of what the check imports (deepspeed, datasets, pytest, matplotlib and their dependencies).
# Run here, from the repository root, with the project's virtual environment (.venv or $VENV); then carry
# the .whl folder (git-ignored) with the working tree: run(carry=[".whl"]).
#
#   bash benchmarks/gpu_wheels.sh                            # for CPython 3.12 (PYVER=3.11: another)
#   DEST=/tmp/w PYVER=3.11 bash benchmarks/gpu_wheels.sh     # elsewhere (e.g. to test an install here)
#
# * every wheel is pinned to the version installed in the virtual environment (the one the tests ran
#   with), for CPython $PYVER on manylinux x86_64, without dependencies (the list below is the closure);
# * DeepSpeed is built here as a wheel without its ops (PyPI has only its source, whose setup.py needs
#   nvcc when torch sees a GPU); the ops are JIT-built when used (the check uses none);
# * digits.parquet: the embedded digits (ifc_ds.data's sklearn:digits, 1,797 labelled 32x32 PNGs)
#   exported once, so that train.py runs on the GPU machine without scikit-learn / scipy (too big to carry).
# numpy, pyarrow and torch are not carried (too big): the image must have them. About 48 MB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
VPY=$VENV/bin/python
rm -rf "$DEST"
mkdir -p "$DEST"

# the distributions that `import deepspeed, datasets, timm, pytest, matplotlib` (and pytest-timeout,
# which pyproject.toml's pytest config uses) need beyond torch, numpy and pyarrow
NEEDED=(
    # datasets and huggingface-hub (hf-xet left out: only downloads use it)
    datasets huggingface_hub httpx2 httpcore2 anyio idna h11 truststore click dill multiprocess xxhash pandas
    python-dateutil tzdata filelock fsspec tqdm packaging pyyaml
    # deepspeed (built below)
    einops hjson msgpack ninja py-cpuinfo psutil pydantic pydantic_core annotated-types typing-inspection
    typing_extensions
    # the models and images
    timm safetensors pillow
    # the tests
    pytest pluggy iniconfig pygments pytest-timeout
    # train.py's plot_curves (and fonttools, below)
    matplotlib contourpy cycler kiwisolver pyparsing
)
mapfile -t PINS < <($VPY - "${NEEDED[@]}" <<'EOF'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    print(f"{name}=={md.version(name)}")  # fails if the venv lacks it: then nothing is downloaded
EOF
)
FONTTOOLS=$($VPY -c "import importlib.metadata as md; print(md.version('fonttools'))")
DEEPSPEED=$($VPY -c "import importlib.metadata as md; print(md.version('deepspeed'))")
echo "pins: ${PINS[*]} fonttools==$FONTTOOLS deepspeed==$DEEPSPEED"

quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }  # local index folders
get() {
    quiet $VPY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "$@" -d "$DEST"
}
get --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any "${PINS[@]}"
get --platform any "fonttools==$FONTTOOLS"  # the pure-Python wheel: 1 MB instead of 5
# DeepSpeed: a py3-none-any wheel without ops, built from its source here (DS_ACCELERATOR=cpu: nothing probes CUDA)
DS_BUILD_OPS=0 DS_ACCELERATOR=cpu quiet $VPY -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" \
    "deepspeed==$DEEPSPEED"

# the digits as parquet (image: PNG bytes, label: ClassLabel), for data.train / eval.train on the GPU machine
PYTHONPATH=$PWD $VPY - "$DEST/digits.parquet" <<'EOF'
import sys

from ifc_ds.data.loading import _embedded_digits

ds = _embedded_digits()
ds.to_parquet(sys.argv[1])
print(f"{sys.argv[1]}: {len(ds)} rows, {ds.features}")
EOF

ls -l "$DEST" | awk 'NR > 1 {printf "%8.1f KB  %s\n", $5 / 1024, $9}'
echo "$(ls "$DEST"/*.whl | wc -l) wheels"
du -sh "$DEST"
