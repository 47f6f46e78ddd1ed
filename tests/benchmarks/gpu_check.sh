#!/usr/bin/env bash
# One prepared check of kdbench on a CUDA machine that has only PyTorch (no network needed):
#   1. every built-in method through a 1-epoch fit on the embedded dataset, eager and with
#      --capture graphs (ok/failed, first-epoch loss terms, eager-vs-captured gap, fallback tags);
#   2. ms per step eager vs CUDA graphs at batch 64/256/1024, r32x4 -> r8x4 KD, bf16, and the
#      240-epoch projection;
#   3. every built-in method's step time relative to KD (batch 64, graphs);
#   4. the bf16-vs-fp32 loss comparison (terms and gradient cosine; now, and with the loss under
#      autocast as before);
#   5. if time is left: torch.compile (default mode) alone and with graphs, at batch 64 and 1024.
# Each part has its own time limit (7 minutes in all; BUDGET_S caps the optional last part);
# figures go to $OUT/gpu_check.json (the
# parts' own files and logs next to it). Run from anywhere:
#
#   OUT=/tmp/gpu bash tests/benchmarks/gpu_check.sh
#
# kdbench is installed with `pip install --no-deps --no-build-isolation -e .` (nothing on the
# engine path imports mlflow or optuna); where that cannot run (no setuptools), a metadata shim
# registers the built-in plugins instead. The one other package the engine needs is pluggy (pure
# Python): when it is missing, put it in .gpu_deps/ first (cp -r .venv/lib/python3*/site-packages/pluggy .gpu_deps/).
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="${OUT:-/tmp/kdbench-gpu-check}"
mkdir -p "$OUT"
cd "$REPO"
PY="${PYTHON:-python}"
START=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_check.log"; }

if [ -d "$REPO/.gpu_deps" ]; then export PYTHONPATH="$REPO/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"; fi
if ! $PY -c "import kdbench_builtin.methods, importlib.metadata as m; assert any(e.name.startswith('builtin') for e in m.entry_points(group='kdbench'))" 2>/dev/null; then
  if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/gpu_check.log" 2>&1; then
    log "pip install -e . failed (see log); registering the built-in plugins with a metadata shim"
    SHIM="$OUT/shim"; mkdir -p "$SHIM/kdbench-0.0.0.dist-info"
    printf 'Metadata-Version: 2.1\nName: kdbench\nVersion: 0.0.0\n' > "$SHIM/kdbench-0.0.0.dist-info/METADATA"
    printf '[kdbench]\nbuiltin-methods = kdbench_builtin.methods\nbuiltin-models = kdbench_builtin.models\nbuiltin-datasets = kdbench_builtin.datasets\n' \
      > "$SHIM/kdbench-0.0.0.dist-info/entry_points.txt"
    export PYTHONPATH="$REPO:$REPO/plugins:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
$PY - <<'EOF' 2>&1 | tee -a "$OUT/gpu_check.log"
import sys, torch
import kdbench.core.engine
from kdbench.core import plugins
assert not {"mlflow", "optuna"} & set(sys.modules), "the engine imported mlflow/optuna"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE",
      "methods", len(plugins.load().methods))
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$OUT/nvidia_smi.csv" 2>/dev/null || true

BENCH="$PY $HERE/cifar_epoch.py --device cuda"
FITS="--fit-capture graphs"; STEPS="--samples 16384"; CAP=graphs; PAIR=""
if [ "${SMOKE:-0}" = 1 ]; then  # the script's own check on a CPU: tiny sizes, compile through aot_eager
  BENCH="$PY $HERE/cifar_epoch.py --device cpu --compile-backend aot_eager"
  FITS="--fit-capture compile"; STEPS="--samples 128"; CAP=compile; PAIR="--teacher resnet8 --student resnet8"
fi
part() {  # part NAME SECONDS ARGS...
  local name=$1 limit=$2; shift 2
  log "part $name (limit ${limit}s): $*"
  timeout "$limit" $BENCH "$@" --json "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  log "part $name: exit $? ($(tail -n 1 "$OUT/$name.log"))"
}
if [ "${SMOKE:-0}" = 1 ]; then B3=32,64; B1=32; else B3=64,256,1024; B1=64; fi
part fits 150 --fits $FITS --fit-epochs 1
part steps 100 --steps --captures none,$CAP --batch-sizes $B3 $STEPS --epochs 3 $PAIR
part methods 80 --methods --captures $CAP --batch-sizes $B1 --samples $([ "${SMOKE:-0}" = 1 ] && echo 64 || echo 2048) --epochs 2 $PAIR
part losses 30 --losses --batch-sizes $B1 --samples 1024 $PAIR
LEFT=$(( ${BUDGET_S:-420} - ($(date +%s) - START) ))
if [ "$LEFT" -gt 60 ] && [ "${SMOKE:-0}" != 1 ]; then
  part compile "$LEFT" --steps --captures none,compile,compile+graphs --batch-sizes 64,1024 --samples 16384 --epochs 3
fi

$PY - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
report = {}
for name in ("fits", "steps", "methods", "losses", "compile"):
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            part = json.load(f)
        report.setdefault("device", part.get("device")); report.setdefault("torch", part.get("torch"))
        report[name] = part.get({"compile": "steps"}.get(name, name))
    else:
        report[name] = "missing (timed out or failed: see its .log)"
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=2)
steps = report.get("steps")
if isinstance(steps, dict):
    for key, row in steps.items():
        print(key, {m: round(r["ms_per_step"], 2) for m, r in row.items() if isinstance(r, dict)})
fits = report.get("fits")
if isinstance(fits, dict):
    print("fits failed:", fits.get("failed"))
EOF
log "done: $OUT/gpu_check.json"
