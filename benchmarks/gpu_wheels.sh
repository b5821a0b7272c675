#!/usr/bin/env bash
# The wheels a GPU device image lacks, built HERE (where the package registries are reachable)
# into one folder under 64 MiB, to carry to a device that has no registry (docs/gpu.md).
#
#   bash benchmarks/gpu_wheels.sh                          # -> gpu-wheels/, for CPython 3.12 x86_64
#   bash benchmarks/gpu_wheels.sh --python-version 3.11 --out /tmp/w   # for another interpreter (tests)
#
# The image has torch, transformers, accelerate, peft and pytest (and what they need: numpy,
# pyyaml, psutil, safetensors, tokenizers, packaging, tqdm, pluggy, setuptools...).  It lacks:
#   * DeepSpeed, published as a source distribution only: built into a wheel here with no
#     prebuilt ops (DS_BUILD_OPS=0; its ops JIT-compile on first use, which ftbench does
#     before the first cell), and its dependencies hjson, msgpack, ninja, py-cpuinfo, einops,
#     nvidia-ml-py and pydantic (with pydantic-core, a compiled wheel for the image's Python,
#     annotated-types, typing-inspection, typing-extensions);
#   * what `ftbench run` imports beyond the image: click, rich (markdown-it-py, mdurl,
#     pygments), tabulate and jsonschema (the record schema checks every line written and read;
#     pandas, matplotlib and scipy serve report/compare only and are in the image);
# The image's own setuptools builds the editable install: a carried one is refused by pip's
# resolver next to the image's torch 2.11, which pins it (seen on the first GPU run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=gpu-wheels
PYV=3.12
DEEPSPEED=0.19.8
PY=${PYTHON:-python3}
LIMIT_MIB=64
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --python-version) PYV=$2; shift 2 ;;
    --deepspeed) DEEPSPEED=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
ABI=cp${PYV/./}
mkdir -p "$OUT"
rm -f "$OUT"/*.whl

echo "== DeepSpeed $DEEPSPEED: wheel built from its sdist (no prebuilt ops)"
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-binary deepspeed "deepspeed==$DEEPSPEED" -w "$OUT"

echo "== dependencies, as wheels for CPython $PYV manylinux x86_64"
# pip resolves their own dependencies (pydantic's exact pydantic-core, rich's markdown-it-py...)
# for the target interpreter and platform; none of these pulls torch.
"$PY" -m pip download --quiet --only-binary=:all: --python-version "$PYV" --implementation cp --abi "$ABI" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$OUT" \
  hjson msgpack ninja py-cpuinfo einops nvidia-ml-py "pydantic>=2" \
  click rich tabulate "jsonschema>=4.18"

bytes=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
ls -1 "$OUT"
echo "== $OUT: $(ls "$OUT"/*.whl | wc -l) wheels, $mib MiB (limit $LIMIT_MIB MiB)"
if [ "$bytes" -ge $(( LIMIT_MIB * 1048576 )) ]; then
  echo "gpu_wheels.sh: $OUT is over $LIMIT_MIB MiB: it cannot be carried in one call" >&2
  exit 1
fi
cat <<MSG
Carry it with the checkout (the device tool's carry list): ["$OUT"], then on the device:
  python3 -m pip install --no-index --find-links $OUT $OUT/*.whl && python3 -m pip install --no-build-isolation --no-deps -e . && python3 benchmarks/gpu_check.py --budget 360 --out gpu-check
MSG
