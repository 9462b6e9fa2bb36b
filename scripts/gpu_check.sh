#!/usr/bin/env bash
# What a lent GPU should run, in one call, within 8 minutes including set-up (one H200 here):
#   1. every test marked gpu or apex: plain, Lightning, Fabric and Accelerate (16-mixed with its
#      GradScaler too) bitwise on CUDA; apex O0
#      bitwise with plain 32-true, O1/O2 within the stated tolerance, O1 resumed bitwise; an
#      inf gradient skipped by plain and apex; the GPU crops equal to the CPU's;
#   2. compare: ResNet-18 at batch 256 on the synthetic set, 32-true against 16-mixed and
#      bf16-mixed, for plain, Lightning, Fabric, Accelerate and apex (O1), and apex O2 at
#      16-mixed;
#   3. one report of both, and the targets beside the reference benchmark's figures
#      (scripts/gpu_targets.py): speed (step times, with the interval: CUDA events), activation
#      memory, allocator peak, MFU, data wait, skipped fp16 steps.
# Everything lands in OUT_DIR ($OUT when set, else runs/gpu-check): env.txt, gpu-tests.log,
# the compare folders, report/ (report.md, results.csv, summary.json, benchmark.png),
# targets.txt.
#
# Needs present (reaches no network, installs nothing but the project and apex): python with a
# CUDA build of torch, torchvision, pytorch-lightning, accelerate, numpy, click, rich, matplotlib
# and pytest. With APEX_WHEEL=<path to apex-0.1-py3-none-any.whl>, apex 25.04 (python-only) is
# installed first; without it the apex tests are skipped with a reason and apex is an
# "unavailable" row.
#
# Usage: [PYTHON=python3] [AMPCOMPARE="python3 -m ampcompare"] scripts/gpu_check.sh [--cpu] [OUT_DIR]
#   --cpu: the same steps on the CPU with a tiny model and a few batches (the tests of step 1
#   are left to make test, which runs this mode), so that the script cannot rot without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; shift; fi
OUT=${1:-${OUT:-runs/gpu-check}}
PY=${PYTHON:-python3}
read -r -a AMP <<< "${AMPCOMPARE:-$PY -m ampcompare}"  # the command, its words split on spaces
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the source tree: torch untouched
if [ "$MODE" = gpu ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device here; run scripts/gpu_check.sh --cpu for the CPU mode" >&2
  exit 2
fi
mkdir -p "$OUT"
if [ -n "${APEX_WHEEL:-}" ]; then
  "$PY" -m pip install --quiet --no-deps --no-index "$APEX_WHEEL" || echo "gpu_check: apex did not install" >&2
fi

{
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import torch, torchvision, pytorch_lightning as pl, accelerate; print("torch", torch.__version__, "cuda", torch.version.cuda, "torchvision", torchvision.__version__, "lightning", pl.__version__, "accelerate", accelerate.__version__)'
  "$PY" -c 'import apex.amp, importlib.metadata as m; print("apex", m.version("apex"))' 2>&1 | tail -n 1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

tests_rc=0
if [ "$MODE" = gpu ]; then
  timeout -k 10 170 "$PY" -m pytest -p no:cacheprovider -q -rs -m "gpu or apex" tests 2>&1 | tee "$OUT/gpu-tests.log"
  tests_rc=${PIPESTATUS[0]}
  # 14 processes (apex has no bf16) of about 10 s start-up and 3 short epochs each; at the limit
  # compare stops the running arm, records it and reports the rest.
  RUN=(--dataset synthetic --model resnet18 --synthetic-size 5000 --batch-size 256 --epochs 3)
  PRECISIONS=32-true,16-mixed,bf16-mixed
  IMPLS=plain,lightning,fabric,accelerate,apex
  LIMIT=230
  O2_LIMIT=45
else
  RUN=(--dataset synthetic --model small --synthetic-size 256 --batch-size 32 --epochs 2
       --limit-train-batches 2 --limit-test-batches 1 --accelerator cpu)
  PRECISIONS=32-true,bf16-mixed
  IMPLS=plain  # every step of the script at the least cost (apex: its O2 row, unavailable)
  LIMIT=120
  O2_LIMIT=60
fi

# Budget (GPU): tests 170 s + compare 230 s + O2 45 s + report: under 8 minutes with set-up.
# One repeat and no control arm, to fit the time: its speed figures come with their intervals and
# the words "not enough runs to tell" (a verdict needs repeats: docs/benchmark.md).
timeout -k 30 "$LIMIT" "${AMP[@]}" compare "${RUN[@]}" --precisions "$PRECISIONS" \
  --impls "$IMPLS" --no-control --out-dir "$OUT" --quiet > "$OUT/log-compare.txt" 2>&1
compare_rc=$?
timeout -k 15 "$O2_LIMIT" "${AMP[@]}" compare "${RUN[@]}" --precisions 16-mixed --impls apex \
  --opt-level O2 --no-control --no-warmup --out-dir "$OUT" --quiet \
  > "$OUT/log-compare-apex-o2.txt" 2>&1
o2_rc=$?

"${AMP[@]}" report "$OUT"/compare-*/ --out "$OUT/report" > "$OUT/report.log" 2>&1
report_rc=$?
cat "$OUT/report/report.md" 2>/dev/null
"$PY" scripts/gpu_targets.py "$OUT/report/summary.json" | tee "$OUT/targets.txt"

echo "gpu_check ($MODE): tests exit $tests_rc; compare exit $compare_rc; apex O2 exit $o2_rc;" \
     "report exit $report_rc; everything in $OUT"
# compare exits 1 when an arm failed (its row says why); 0 or 1 is a measurement, not a crash.
[ "$tests_rc" -eq 0 ] && [ "$compare_rc" -le 1 ] && [ "$o2_rc" -le 1 ] && [ "$report_rc" -eq 0 ]
