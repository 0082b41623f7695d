#!/usr/bin/env bash
# Run mergeline's merge kernels on a CUDA GPU and report GB/s merged per method (for docs/benchmarks.md).
#   bash benchmarks/gpu.sh [--params 1B] [--experts 4] [--repeats 3]
# Needs no network and no Prefect: merge_ops is pure torch. Uses the first Python that has a CUDA
# torch: $PYTHON, .venv/bin/python, python3, python; if none has, tries `make setup` and the venv
# again. Results: $OUT (or .bench/) gpu-results.md and gpu-results.json.
set -u
cd "$(dirname "$0")/.."

run_with_cuda_python() {
    for py in "${PYTHON:-}" .venv/bin/python python3 python; do
        [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
        if "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
            echo "using $py: $("$py" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))')"
            exec "$py" benchmarks/gpu.py "$@"
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
