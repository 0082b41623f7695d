#!/usr/bin/env bash
# Check mergeline's GPU path and time its merge kernels on a CUDA GPU (for docs/benchmarks.md).
#   bash benchmarks/gpu.sh [--params 1B] [--experts 4] [--repeats 3]
# First runs tests/test_gpu.py (CUDA against the slow reference and the CPU) where boto3, pyyaml,
# hypothesis and pytest import; then benchmarks/gpu.py, which reports GB/s merged per method, and
# benchmarks/gpu_units.py, a GPU worker's merge of whole layer units from files (writes ~10 GB of
# checkpoints to /dev/shm once; --params and --experts apply to both).
# Needs no network and no Prefect. Uses the first Python that has a CUDA torch: $PYTHON,
# .venv/bin/python, python3, python; if none has, tries `make setup` and the venv again.
# Results: $OUT (or .bench/) gpu-results.md/.json and gpu-units.md/.json. Exits non-zero if a test fails.
set -u
cd "$(dirname "$0")/.."

units_args() {  # the options gpu_units.py shares with gpu.py
    while [ $# -gt 0 ]; do
        case "$1" in --params|--experts) echo "$1 $2"; shift 2 ;; *) shift ;; esac
    done
}

run_with_cuda_python() {
    for py in "${PYTHON:-}" .venv/bin/python python3 python; do
        [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
        if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
            echo "using $py: $("$py" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))')"
            tests=0
            if "$py" -c 'import boto3, yaml, hypothesis, pytest' >/dev/null 2>&1; then
                PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$py" -m pytest tests/test_gpu.py --noconftest -q \
                    -p no:cacheprovider || tests=$?
            else
                echo "skipping tests/test_gpu.py: it needs boto3, pyyaml, hypothesis and pytest" >&2
            fi
            "$py" benchmarks/gpu.py "$@" || exit
            "$py" benchmarks/gpu_units.py $(units_args "$@") || exit
            exit "$tests"
        fi
    done
}

run_with_cuda_python "$@"
if command -v make >/dev/null 2>&1; then
    echo "no Python with a CUDA torch yet; trying make setup" >&2
    timeout 600 make setup >&2 || echo "make setup failed (no network?)" >&2
    run_with_cuda_python "$@"
fi
echo "no Python here has a torch that sees a CUDA GPU (tried \$PYTHON, .venv/bin/python, python3, python)" >&2
exit 2
