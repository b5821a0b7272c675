#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py; docs/gpu.md). Usage: bash benchmarks/gpu_check.sh --out DIR [...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 benchmarks/gpu_check.py "$@"
