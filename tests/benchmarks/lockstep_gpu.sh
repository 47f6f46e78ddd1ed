#!/usr/bin/env bash
# lockstep_epoch.py on a CUDA machine that has only PyTorch: resnet32x4 -> resnet8x4, 8 methods,
# synthetic CIFAR-shaped data, bf16; lockstep (the group's step one CUDA graph, one teacher
# forward per batch) vs separate runs with CUDA graphs (the GPU default), at batch 64 and 256, and
# lockstep with eager steps vs separate graphs at 64. Figures in
# $OUT/lockstep_*.json. Installs kdbench as gpu_check.sh does (pluggy from .gpu_deps/ if needed).
#   OUT=/tmp/ls bash tests/benchmarks/lockstep_gpu.sh
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-/tmp/kdbench-lockstep}"; mkdir -p "$OUT"
PY="${PYTHON:-python}"
if [ -d .gpu_deps ]; then export PYTHONPATH="$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"; fi
if ! $PY -c "import importlib.metadata as m; assert any(e.name.startswith('builtin') for e in m.entry_points(group='kdbench'))" 2>/dev/null; then
  if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1; then
    SHIM="$OUT/shim"; mkdir -p "$SHIM/kdbench-0.0.0.dist-info"
    printf 'Metadata-Version: 2.1\nName: kdbench\nVersion: 0.0.0\n' > "$SHIM/kdbench-0.0.0.dist-info/METADATA"
    printf '[kdbench]\nbuiltin-methods = kdbench_builtin.methods\nbuiltin-models = kdbench_builtin.models\nbuiltin-datasets = kdbench_builtin.datasets\n' \
      > "$SHIM/kdbench-0.0.0.dist-info/entry_points.txt"
    export PYTHONPATH="$PWD:$PWD/plugins:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
run() {  # name, then lockstep_epoch.py arguments
  local name=$1; shift
  echo "== $name"
  timeout "${PART_S:-240}" $PY tests/benchmarks/lockstep_epoch.py --device cuda --scale cifar --rounds 1 \
    --epochs 3 --json "$OUT/lockstep_$name.json" "$@" 2>&1 | tail -12
}
run b64_graphs --batch-size 64 --samples 6400 --capture graphs
run b256_graphs --batch-size 256 --samples 12800 --capture graphs
run b64_eager_vs_graphs --batch-size 64 --samples 6400 --capture none --separate-capture graphs
