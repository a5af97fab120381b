#!/usr/bin/env bash
# The checks that need a CUDA device, in one go: a GPU machine is lent to this project rarely
# and for minutes, so everything that needs one runs from this one script.
#   1. tests/test_cuda.py: no host-device wait in a babysat loop, the LR read back from the
#      updates, device losses kept and folded, the range test and a resume put back the
#      device's generator, fused, compiled and mixed-precision Adam, a one-rank NCCL close
#      (skipped on machines without CUDA, as in CI);
#   2. benchmarks/overhead.py on the GPU, both loops: bare, Panda, TensorBoard side by side.
# Usage: bash benchmarks/gpu_checks.sh [ROUNDS]; the log goes to ${OUT:-.}/gpu_checks.log.
# About 4 minutes on an H200 machine (its tiny-MLP step takes ~1 ms: kernel launches).
# Exits with the tests' status.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # panda, uninstalled
py=${PYTHON:-python3}
rounds=${1:-11}
exec > >(tee "${OUT:-.}/gpu_checks.log") 2>&1
nvidia-smi -L
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
"$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
status=$?
for loop in fast digits; do
    "$py" benchmarks/overhead.py --device cuda --loop "$loop" --rounds "$rounds" \
        --steps 1000 --warmup 100 --commands 0
done
exit $status
