#!/usr/bin/env bash
# What only a GPU machine can show, in one short run (under 8 minutes on one H200):
#   1. every test marked gpu or apex: plain vs Lightning bitwise on CUDA; apex O0 vs plain
#      32-true bitwise; apex O1/O2 vs plain 16-mixed within the stated tolerance; an injected
#      inf gradient skipped by both plain and apex;
#   2. a short compare of the three implementations at 32-true and 16-mixed on synthetic data.
# Everything lands in one folder (default runs/gpu-check): env.txt, gpu-tests.log, the
# compare folder with report.md, results.csv, summary.json and benchmark.png.
#
# Needs present (installs nothing, reaches no network): python with a CUDA build of torch,
# torchvision, pytorch-lightning, click, rich, matplotlib and pytest. NVIDIA apex 25.04 (with
# apex.amp) is optional: without it the apex tests are skipped with a reason and apex shows as
# "unavailable" in the compare table. Runs from the source tree (PYTHONPATH=.).
#
# Usage: scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-check}
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device here; these checks need one" >&2
  exit 2
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv || true
  "$PY" -c 'import torch, torchvision, pytorch_lightning as pl; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, "lightning", pl.__version__)'
  "$PY" -c 'import apex.amp, importlib.metadata as m; print("apex", m.version("apex"))' 2>&1 | tail -n 1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 270 "$PY" -m pytest -p no:cacheprovider -q -rs -m "gpu or apex" tests 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 180 "$PY" -m ampcompare compare --dataset synthetic --model resnet18 --synthetic-size 10000 \
  --epochs 3 --repeats 1 --precisions 32-true,16-mixed --out-dir "$OUT" 2>&1 | tee "$OUT/compare.log"
compare_rc=${PIPESTATUS[0]}

echo "gpu tests: exit $tests_rc; compare: exit $compare_rc; results in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$compare_rc" -eq 0 ]
