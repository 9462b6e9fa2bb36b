#!/usr/bin/env bash
# What a lent GPU should run, in one call of at most 10 minutes including set-up, with no network:
#   1. every test marked gpu or apex: plain, Lightning, Fabric and Accelerate (16-mixed with its
#      GradScaler too) bitwise on CUDA, Accelerate's FSDP2 too (torchrun, one process); apex O0
#      bitwise with plain 32-true, O1/O2 within the stated tolerance, O1 resumed bitwise; an
#      inf gradient skipped by plain and apex; the GPU crops equal to the CPU's;
#   2. compare: ResNet-18 at batch 256 on the synthetic set, 32-true against 16-mixed and
#      bf16-mixed, for plain, Lightning, Fabric, Accelerate and apex (O1; it has no bf16); the
#      rest of the precision ladder with the plain loop (bf16-true, 16-true, and 32-true with
#      TF32 on, the first compare's being off); apex O2 (fp16 model, fp32 master weights) and
#      O3 (16-true); FSDP (--strategy fsdp) in one process at the device's mixed precision;
#   3. one report of them all, and the targets beside the reference benchmark's figures
#      (scripts/gpu_targets.py).
# Each step has a time limit. A compare stopped at its limit is "partial": the runs it finished
# are kept, the running one records what it measured, and the report covers them.
#
# Everything lands in a work folder (WORK, default runs/gpu-check-<UTC time>). With OUT_DIR (or
# $OUT, which the lent machine sets), the work folder is then packed there in 7 files, as such a
# machine sends back at most 8: gpu-check.tar.gz (everything but checkpoints and locks),
# summary.txt, report.md, targets.txt, env.txt, gpu-tests.log and log-compare.txt. The output
# ends with the summary: the tests' outcomes, the compares' ends, the targets and the verdict.
#
# Needs present: python (PYTHON, default python3) with a CUDA build of torch, torchvision,
# pytorch-lightning, accelerate, numpy, click, rich, matplotlib and pytest. APEX_WHEEL=<path to
# apex-0.1-py3-none-any.whl> (inside the working tree: nothing else reaches the lent machine)
# installs apex 25.04 into the work folder (pip --target, so a read-only environment cannot
# stop it); a wheel given that then does not import fails the check. Without APEX_WHEEL the apex
# tests are skipped with a reason and apex is an "unavailable" row.
#
# Usage: [PYTHON=python3] [APEX_WHEEL=...] [WORK=...] scripts/gpu_check.sh [--cpu] [OUT_DIR]
#   --cpu: the same steps on the CPU with a tiny model and a few batches (the gpu tests skip,
#   with their reasons), so that the script cannot rot without a GPU; make test runs it.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; shift; fi
PACK=${1:-${OUT:-}}
PY=${PYTHON:-python3}
read -r -a AMP <<< "${AMPCOMPARE:-$PY -m ampcompare}"  # the command, its words split on spaces
WORK=${WORK:-runs/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the source tree: torch untouched
if [ "$MODE" = gpu ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device here; run scripts/gpu_check.sh --cpu for the CPU mode" >&2
  exit 2
fi
echo "gpu_check ($MODE): working in $WORK"
keep() {  # a step's files go to the pack as soon as they exist: a call cut short keeps them
  [ -n "$PACK" ] || return 0
  mkdir -p "$PACK" && for f in "$@"; do [ -f "$f" ] && cp "$f" "$PACK/"; done
  return 0
}

# --- set-up: apex from the wheel, and what this machine is ----------------------------------
apex_line="apex: no APEX_WHEEL given"
apex_ok=1
if [ -n "${APEX_WHEEL:-}" ]; then
  apex_ok=0
  if [ ! -f "$APEX_WHEEL" ]; then
    apex_line="apex: APEX_WHEEL=$APEX_WHEEL is not a file here (does it travel with the tree?)"
  elif ! "$PY" -m pip install --quiet --no-deps --no-index --target "$WORK/site" "$APEX_WHEEL" \
      > "$WORK/apex-install.log" 2>&1 \
      && ! "$PY" -m zipfile -e "$APEX_WHEEL" "$WORK/site" >> "$WORK/apex-install.log" 2>&1; then
    # (a python-only wheel is a zip of the package: without pip, it is unpacked instead)
    apex_line="apex: could not install $APEX_WHEEL: $(tail -n 1 "$WORK/apex-install.log")"
  else
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
    if why=$("$PY" -W ignore -c 'import apex.amp' 2>&1); then
      apex_line="apex: installed from $APEX_WHEEL into $WORK/site"
      apex_ok=1
    else
      apex_line="apex: installed, but import apex.amp failed: $(tail -n 1 <<< "$why")"
    fi
  fi
fi
# Every package the check needs, with its version; one missing ends the check here, in one line.
NEEDS="torch torchvision pytorch_lightning accelerate numpy click rich matplotlib pytest"
probe=$("$PY" - $NEEDS 2>&1 <<'EOF'
import importlib.metadata as m, importlib, sys
found = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        print(f"cannot import {name} ({type(e).__name__}: {e})")
        sys.exit(1)
    found.append(f"{name} {m.version(name.replace('_', '-'))}")
import torch
print("python", sys.version.split()[0], "cuda", torch.version.cuda, ";", ", ".join(found))
EOF
)
probe_rc=$?
{
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "$probe"
  echo "$apex_line"
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt"
keep "$WORK/env.txt"
if [ "$probe_rc" -ne 0 ]; then
  echo "gpu_check ($MODE): FAILED: $(tail -n 1 <<< "$probe"); nothing was run" | tee -a "$WORK/env.txt"
  keep "$WORK/env.txt"
  exit 2
fi

# --- the steps, each within its limit ---------------------------------------------------------
if [ "$MODE" = gpu ]; then
  # 20 batches of 256 (no ragged batch: one shape less for cuDNN to tune), a warm-up epoch and
  # one timed epoch of 20 steps; no checkpoints (135 MB written and fsynced per epoch otherwise)
  RUN=(--dataset synthetic --model resnet18 --synthetic-size 5120 --batch-size 256 --epochs 2
       --no-checkpoint)
  PRECISIONS=32-true,16-mixed,bf16-mixed
  IMPLS=plain,lightning,fabric,accelerate,apex
  FSDP_PRECISION=16-mixed FSDP_IMPLS=plain,lightning,fabric  # 16-mixed: Lightning's refuses
  # the limits add up, with each one's grace period, set-up and the report, to about 565 s
  TESTS_LIMIT=100 LIMIT=180 LADDER_LIMIT=45 TF32_LIMIT=30 APEX_LIMIT=50 FSDP_LIMIT=40
  TEST_WORKERS=(-n "${GPU_TEST_WORKERS:-4}")
  WARMUP=()
else
  RUN=(--dataset synthetic --model small --synthetic-size 256 --batch-size 32 --epochs 2
       --limit-train-batches 2 --limit-test-batches 1 --accelerator cpu --no-checkpoint)
  PRECISIONS=32-true,bf16-mixed
  IMPLS=plain  # every step of the script at the least cost (apex: its O2 row, unavailable)
  FSDP_PRECISION=bf16-mixed FSDP_IMPLS=plain
  TESTS_LIMIT=120 LIMIT=120 LADDER_LIMIT=90 TF32_LIMIT=60 APEX_LIMIT=60 FSDP_LIMIT=60
  TEST_WORKERS=()
  WARMUP=(--no-warmup)  # it checks that every step runs, not how fast: no untimed run first
fi
"$PY" -c 'import xdist' 2> /dev/null || TEST_WORKERS=()

echo "gpu_check: tests (limit ${TESTS_LIMIT}s)"
# SIGINT at the limit, not SIGTERM: pytest then still prints its short summary of outcomes
timeout -s INT -k 20 "$TESTS_LIMIT" "$PY" -m pytest -p no:cacheprovider -q -rfEs --tb=short \
  "${TEST_WORKERS[@]}" -m "gpu or apex" tests > "$WORK/gpu-tests.log" 2>&1
tests_rc=$?
keep "$WORK/gpu-tests.log"

# One repeat and no control arm, to fit the time: its speed figures come with their intervals and
# the words "not enough runs to tell" (a verdict needs repeats: docs/benchmark.md).
echo "gpu_check: compare (limit ${LIMIT}s)"
timeout -k 30 "$LIMIT" "${AMP[@]}" compare "${RUN[@]}" --precisions "$PRECISIONS" \
  --impls "$IMPLS" --no-control "${WARMUP[@]}" --out-dir "$WORK" --quiet \
  > "$WORK/log-compare.txt" 2>&1
compare_rc=$?
keep "$WORK/log-compare.txt"
# The rest of the ladder with the plain loop (the gpu tests prove the other arms the same there)
echo "gpu_check: ladder (limit ${LADDER_LIMIT}s)"
timeout -k 10 "$LADDER_LIMIT" "${AMP[@]}" compare "${RUN[@]}" --precisions bf16-true,16-true \
  --impls plain --no-control --no-warmup --out-dir "$WORK" --quiet \
  > "$WORK/log-compare-ladder.txt" 2>&1
ladder_rc=$?
# A run that diverged is a measurement of its rung (16-true with Adam: its eps of 1e-8 is 0 in
# fp16), which the report shows with its step; only another ending fails the check.
ladder_dir=$(ls -dt "$WORK"/compare-*/ 2> /dev/null | head -n 1)
ladder_diverged=
if [ "$ladder_rc" -eq 1 ] && [ -n "$ladder_dir" ] && "$PY" - "$ladder_dir" <<'EOF'
import json, pathlib, sys
found = pathlib.Path(sys.argv[1]).glob("*/result.json")
statuses = {json.loads(p.read_text())["status"] for p in found}
sys.exit(0 if "diverged" in statuses and statuses <= {"ok", "diverged"} else 1)
EOF
then
  ladder_rc=0 ladder_diverged=1
fi
echo "gpu_check: 32-true with TF32 on (limit ${TF32_LIMIT}s)"
timeout -k 10 "$TF32_LIMIT" "${AMP[@]}" compare "${RUN[@]}" --precisions 32-true --tf32 \
  --impls plain --no-control --no-warmup --out-dir "$WORK" --quiet \
  > "$WORK/log-compare-tf32.txt" 2>&1
tf32_rc=$?
echo "gpu_check: apex O2 and O3 (limit ${APEX_LIMIT}s)"
timeout -k 10 "$APEX_LIMIT" "${AMP[@]}" compare "${RUN[@]}" --precisions 16-mixed,16-true \
  --impls apex --opt-level O2 --no-control --no-warmup --out-dir "$WORK" --quiet \
  > "$WORK/log-compare-apex.txt" 2>&1
apex_rc=$?
# FSDP with a world of one (a process group of one): the sharding's code path, policy and
# checkpoints on the device; on a GPU its mixed precision is 16-mixed, which plain runs and
# Lightning's and Fabric's ModelParallelStrategy refuse (their rows say so).
echo "gpu_check: FSDP in one process (limit ${FSDP_LIMIT}s)"
timeout -k 10 "$FSDP_LIMIT" "${AMP[@]}" compare "${RUN[@]}" --strategy fsdp \
  --precisions "$FSDP_PRECISION" --impls "$FSDP_IMPLS" --no-control --no-warmup \
  --out-dir "$WORK" --quiet > "$WORK/log-compare-fsdp.txt" 2>&1
fsdp_rc=$?

timeout -k 10 60 "${AMP[@]}" report "$WORK"/compare-*/ --out "$WORK/report" \
  > "$WORK/report.log" 2>&1
report_rc=$?
timeout -k 10 30 "$PY" scripts/gpu_targets.py "$WORK/report/summary.json" > "$WORK/targets.txt" 2>&1
keep "$WORK/report/report.md" "$WORK/targets.txt"

# --- the summary: what the output ends with -------------------------------------------------
ended() {  # how a compare ended, from its exit code
  case "$1" in
    0) echo "ok" ;;
    1) echo "an arm failed (its row says why)" ;;
    124 | 137) echo "partial: stopped at its limit; what it measured is kept and reported" ;;
    *) echo "failed (exit $1): see its log" ;;
  esac
}
passed=1
[ "$tests_rc" -eq 0 ] || passed=0
for rc in "$compare_rc" "$ladder_rc" "$tf32_rc" "$apex_rc" "$fsdp_rc"; do  # partial is a measurement
  case "$rc" in 0 | 124 | 137) ;; *) passed=0 ;; esac
done
[ "$report_rc" -eq 0 ] || passed=0
[ "$apex_ok" -eq 1 ] || passed=0
{
  echo "== gpu_check ($MODE) summary =="
  cat "$WORK/env.txt"
  echo "-- tests (exit $tests_rc) --"
  # pytest's short summary (failures, errors and skips, one line each) and its count, within
  # about 5,000 characters, so that the whole summary fits in the 12,000 that come back
  if grep -q 'short test summary info' "$WORK/gpu-tests.log"; then
    sed -n '/short test summary info/,$p' "$WORK/gpu-tests.log" | tail -n +2 > "$WORK/.short"
  else
    tail -n 5 "$WORK/gpu-tests.log" > "$WORK/.short"
  fi
  lines=$(wc -l < "$WORK/.short")
  head -n 24 "$WORK/.short" | cut -c1-200
  [ "$lines" -gt 25 ] && echo "... $((lines - 25)) more lines in gpu-tests.log"
  [ "$lines" -gt 24 ] && tail -n 1 "$WORK/.short" | cut -c1-200
  rm -f "$WORK/.short"
  echo "-- compare: $(ended "$compare_rc"); ladder: $(ended "$ladder_rc")${ladder_diverged:+ (a rung diverged: its row says where)};" \
    "TF32: $(ended "$tf32_rc");" \
    "apex O2 and O3: $(ended "$apex_rc"); FSDP: $(ended "$fsdp_rc"); report exit $report_rc --"
  "$PY" - "$WORK/report/results.csv" "$WORK"/compare-*/compare.json <<'EOF' 2>/dev/null \
    || echo "no results.csv"
import collections, csv, os, sys
from ampcompare import plan
from ampcompare.run import IMPLS
rows = list(csv.DictReader(open(sys.argv[1], newline="")))
planned = sum(len(plan.read(os.path.dirname(p), IMPLS).arms()) for p in sys.argv[2:])
count = collections.Counter(r["status"] for r in rows)
print(f"runs: {planned} planned, {len(rows)} recorded:", ", ".join(f"{n} {s}" for s, n in count.most_common()))
if len(rows) < planned:
    print(f"  {planned - len(rows)} never started: the compare stopped at its limit")
for r in rows:
    if r["status"] not in ("ok",):
        print(f"  {r['impl']} {r['precision']}: {r['status']}: {(r.get('error') or '')[:200]}")
EOF
  echo "-- targets --"
  cat "$WORK/targets.txt"
  if [ -n "$PACK" ]; then
    echo "packed into $PACK: gpu-check.tar.gz (everything but checkpoints and locks)" \
         "summary.txt report.md targets.txt env.txt gpu-tests.log log-compare.txt"
  fi
  if [ "$passed" -eq 1 ]; then verdict=PASSED; else verdict=FAILED; fi
  case " $compare_rc $ladder_rc $tf32_rc $apex_rc $fsdp_rc " in
    *" 124 "* | *" 137 "*) verdict="$verdict (partial)" ;;
  esac
  echo "gpu_check ($MODE): $verdict: tests exit $tests_rc; compare exit $compare_rc;" \
       "ladder exit $ladder_rc; TF32 exit $tf32_rc; apex O2 and O3 exit $apex_rc;" \
       "FSDP exit $fsdp_rc;" \
       "report exit $report_rc; $apex_line"
} > "$WORK/summary.txt"

# --- the pack: 7 files, as a lent machine sends back at most 8 -------------------------------
if [ -n "$PACK" ]; then
  mkdir -p "$PACK"
  tar -czf "$PACK/gpu-check.tar.gz" -C "$(dirname "$WORK")" --exclude='*.pt' --exclude='*.lock' \
    --exclude="$(basename "$WORK")/site" "$(basename "$WORK")"
  for name in summary.txt report/report.md targets.txt env.txt gpu-tests.log log-compare.txt; do
    [ -f "$WORK/$name" ] && cp "$WORK/$name" "$PACK/"
  done
fi
cat "$WORK/summary.txt"
[ "$passed" -eq 1 ]
