#!/usr/bin/env bash
# The GPU check, in one go and under 8 minutes on an H100: the CUDA tests, then the figures
# (bf16 matmul peak, 124M-model training MFU with and without activation checkpointing, packed
# attention through FlexAttention against the dense mask, generate tokens/s). Needs PyTorch with CUDA and the usual scientific packages; no network, no install:
# it runs from the repository with PYTHONPATH=src.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")'
echo "== CUDA tests"
python -m pytest -p no:cacheprovider tests/test_cuda.py tests/test_model.py -x
echo "== figures"
python benchmarks/gpu_check.py "$@"
