#!/usr/bin/env bash
# The GPU measurements issues 13 and 17 still need, in one call on a CUDA machine that has only
# PyTorch (installs kdbench as lockstep_gpu.sh does). Parts in priority order, each with its own
# time limit (PART_S, default 150 s; about 9 minutes in all on an H100/H200); figures in $OUT/*.json:
#   1. lockstep (issue 17): 8 methods, r32x4 -> r8x4, batch 64 and 256, the group graph's members
#      on parallel streams vs one after the other vs separate runs (graphs), and how far the
#      parallel and serial curves differ (the same kernels: they should not);
#   2. batch 1024 (issue 13): eager, graphs and compile with the top kernels of each
#      (--profile), achieved TFLOP/s and share of the bf16 peak;
#   3. batch 1024 with the teacher's BatchNorm folded into its convolutions (an experiment);
#   4. every built-in method through a 1-epoch fit with --capture compile+graphs (before it can
#      be the default), batch 64 step time of compile+graphs vs graphs;
#   5. batch 1024 with torch.compile mode max-autotune-no-cudagraphs (slow to compile: last).
# After part 1: evaluation eager vs replayed as CUDA graphs (same accuracy? ms per pass).
#   OUT=/tmp/next bash tests/benchmarks/gpu_next.sh          (SMOKE=1: a CPU check of the arguments)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-/tmp/kdbench-next}"; mkdir -p "$OUT"
PY="${PYTHON:-python}"
PART_S="${PART_S:-150}"
if [ -d .gpu_deps ]; then export PYTHONPATH="$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"; fi
if ! $PY -c "import importlib.metadata as m; assert any(e.name.startswith('builtin') for e in m.entry_points(group='kdbench'))" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || echo "pip install failed: see $OUT/pip.log"
fi
START=$(date +%s)
part() {  # name, then the command
  local name=$1; shift
  echo "== [$(( $(date +%s) - START ))s] $name"
  timeout "$PART_S" "$@" > "$OUT/$name.log" 2>&1; echo "   exit $?"
  grep -v "^\s*$" "$OUT/$name.log" | grep -iv "warn" | tail -22
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
part lockstep_b64 $PY "${LS[@]}" --batch-size $B64 --samples $NL --json "$OUT/lockstep_b64.json"
part lockstep_b256 $PY "${LS[@]}" --batch-size $B256 --samples $(( NL * 2 )) --json "$OUT/lockstep_b256.json"
part eval_graphs $PY tests/benchmarks/cifar_epoch.py --device $DEV --eval --samples $(( N + N / 5 )) "${SMALL[@]}" --json "$OUT/eval_graphs.json"
part b1024_profile $PY "${CE[@]}" --batch-sizes $B1024 --captures none,$G,compile --profile 12 --json "$OUT/b1024_profile.json"
part b1024_folded $PY "${CE[@]}" --batch-sizes $B1024 --captures $G,compile --fold-teacher-bn --json "$OUT/b1024_folded.json"
part fits_compile_graphs $PY tests/benchmarks/cifar_epoch.py --device $DEV --fits --fit-capture $CG "${FITX[@]}" --json "$OUT/fits_compile_graphs.json"
part b64_compile_graphs $PY "${CE[@]}" --batch-sizes $B64 --captures $G,$CG --json "$OUT/b64_compile_graphs.json"
part b1024_max_autotune $PY "${CE[@]}" --batch-sizes $B1024 --captures compile --compile-mode $MODE --json "$OUT/b1024_max_autotune.json"
echo "== [$(( $(date +%s) - START ))s] done"
