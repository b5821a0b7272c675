#!/usr/bin/env bash
# The prepared GPU check: every CUDA path of ftbench in under 10 minutes on one GPU.
# Usage: bash benchmarks/gpu_check.sh [--device cuda|cpu] [--out DIR]   (see docs/gpu.md)
set -euo pipefail
cd "$(dirname "$0")/.."
# The script skips what is left once its --budget (default 540 s) is spent, so the table always prints.
exec python benchmarks/gpu_check.py "$@"
