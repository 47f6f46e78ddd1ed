#!/usr/bin/env bash
# The GPU measurements issues 13 and 17 still need, in one call on a CUDA machine that has only
# PyTorch (installs kdbench as lockstep_gpu.sh does). Parts in priority order, each with its own
# time limit, all inside TOTAL_S (default 540 s, so one 600 s device call always returns): a part
# gets min(its limit, the time left) and is skipped under 20 s. Logs and figures (*.json) go to
# $WORK and, after every part, into one archive $OUT/next.tgz (a device call returns 8 files at most):
#   1. lockstep (issue 17): 8 methods, r32x4 -> r8x4, batch 64 and 256, the group graph's members
#      on parallel streams vs one after the other vs separate runs (graphs), and how far the
#      parallel and serial curves differ (the same kernels: they should not);
#   2. batch 1024 (issue 13): eager, graphs and compile with the top kernels of each
#      (--profile), achieved TFLOP/s and share of the bf16 peak;
#   3. batch 1024 with the teacher's BatchNorm folded into its convolutions (an experiment);
#   4. batch 64 step time of compile+graphs vs graphs (the <= 2 ms target);
#   5. built-in methods through a 1-epoch fit with --capture compile+graphs (before it can be the
#      default), then batch 1024 with compile mode max-autotune-no-cudagraphs, as time allows.
# After part 1: evaluation eager vs replayed as CUDA graphs (same accuracy? ms per pass).
#   OUT=/tmp/next bash tests/benchmarks/gpu_next.sh          (SMOKE=1: a CPU check of the arguments)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-/tmp/kdbench-next}"; mkdir -p "$OUT"
WORK="${WORK:-/tmp/kdbench-next-work}"; mkdir -p "$WORK"
PY="${PYTHON:-python}"
TOTAL_S="${TOTAL_S:-540}"
if [ -d .gpu_deps ]; then export PYTHONPATH="$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"; fi
if ! $PY -c "import importlib.metadata as m; assert any(e.name.startswith('builtin') for e in m.entry_points(group='kdbench'))" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/pip.log" 2>&1 || { echo "pip install failed:"; tail -5 "$WORK/pip.log"; }
fi
START=$(date +%s)
part() {  # name, its time limit in seconds, then the command
  local name=$1 limit=$2; shift 2
  local left=$(( TOTAL_S - ($(date +%s) - START) - 5 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "== $name skipped: ${left}s left of TOTAL_S=$TOTAL_S"; return; fi
  echo "== [$(( $(date +%s) - START ))s] $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1; echo "   exit $?"
  grep -v "^\s*$" "$WORK/$name.log" | grep -iv "warn" | tail -22
  tar czf "$OUT/next.tgz" -C "$WORK" .
}
# SMOKE=1: the same commands on the CPU with tiny sizes (graphs -> none, compile+graphs -> compile,
# resnet8 pair, aot_eager), to check every part's arguments before spending GPU time (~3 min)
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; G=none; CG=compile; B64=16; B256=32; B1024=32; N=128; NL=96; SMALL=(--teacher resnet8 --student resnet8)
  LSX=(--methods kd,at --threads 1); CEX=(--compile-backend aot_eager); FITX=(--only kd,at --compile-backend aot_eager)
  MODE=default; export OMP_NUM_THREADS=1
else
  DEV=cuda; G=graphs; CG=compile+graphs; B64=64; B256=256; B1024=1024; N=8192; NL=6400; SMALL=()
  LSX=(); CEX=(); FITX=(); MODE=max-autotune-no-cudagraphs
fi
LS=(tests/benchmarks/lockstep_epoch.py --device $DEV --scale cifar --rounds 1 --epochs 3 --capture $G --streams both "${LSX[@]}")
CE=(tests/benchmarks/cifar_epoch.py --device $DEV --steps --epochs 3 --samples $N "${SMALL[@]}" "${CEX[@]}")
part lockstep_b64 120 $PY "${LS[@]}" --batch-size $B64 --samples $NL --json "$WORK/lockstep_b64.json"
part lockstep_b256 100 $PY "${LS[@]}" --batch-size $B256 --samples $(( NL * 2 )) --json "$WORK/lockstep_b256.json"
part eval_graphs 45 $PY tests/benchmarks/cifar_epoch.py --device $DEV --eval --samples $(( N + N / 5 )) "${SMALL[@]}" --json "$WORK/eval_graphs.json"
part b1024_profile 110 $PY "${CE[@]}" --batch-sizes $B1024 --captures $G,compile --profile 12 --json "$WORK/b1024_profile.json"
part b64_compile_graphs 75 $PY "${CE[@]}" --batch-sizes $B64 --captures $G,$CG --json "$WORK/b64_compile_graphs.json"
part b1024_folded 80 $PY "${CE[@]}" --batch-sizes $B1024 --captures compile --fold-teacher-bn --json "$WORK/b1024_folded.json"
part fits_compile_graphs 150 $PY tests/benchmarks/cifar_epoch.py --device $DEV --fits --fit-capture $CG "${FITX[@]}" --json "$WORK/fits_compile_graphs.json"
part b1024_max_autotune 150 $PY "${CE[@]}" --batch-sizes $B1024 --captures compile --compile-mode $MODE --json "$WORK/b1024_max_autotune.json"
echo "== [$(( $(date +%s) - START ))s] done"
