#!/usr/bin/env bash
# The GPU check of robustkit's own AutoAttack engine (issue 17), in one go, on a machine with a CUDA
# GPU and PyTorch but no internet: the CUDA tests, then the engine benchmark (reference vs rk vs fast)
# at n = 1,000 on every model, one repeat, writing eval/benchmarks/engines_gpu.{json,md,png}.
# Budget: under 8 minutes on one H100/H200-class GPU.
#
# Prepare on a machine with internet (packages and the real data to carry):
#   ../shared/tools/offline-bundle        # builds ./.offline/{site,data}
# then, on the GPU machine, from the repository root:
#   bash eval/benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD:$PWD/.offline/site${PYTHONPATH:+:$PYTHONPATH}"
export ROBUSTKIT_DATA="${ROBUSTKIT_DATA:-$PWD/.offline/data}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: torch sees no CUDA device')"
python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))"
start=$SECONDS
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py tests/test_engine_autoattack.py
# One batch per stage (batch 1,000): on a GPU, AutoAttack's sequential loops are latency-bound, so
# the fewer and fuller the batches, the better for every engine alike.
timeout 400 python eval/benchmarks/engines.py --device cuda --n-examples 1000 --batch-size 1000 --repeats 1 \
    --data-dir "$ROBUSTKIT_DATA" --out eval/benchmarks/engines_gpu.json || status=$?
echo "gpu_check.sh: $((SECONDS - start)) s in all"
exit "${status:-0}"
