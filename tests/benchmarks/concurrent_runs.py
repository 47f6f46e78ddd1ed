"""Two `kdbench run` at once on this machine: training seconds with kdbench's fair share of the
cores (the default) vs every process taking all the cores (``KDBENCH_THREADS=<cores>``, torch's
own default before kdbench shared them). Prints the seconds of each and the ratio.

    python tests/benchmarks/concurrent_runs.py [--processes 2] [--epochs 5]

The teacher is trained once first (cached), so both variants time student training only.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from kdbench.core.threads import cores


def launch(n: int, epochs: int, env: dict, workdir: str) -> list[float]:
    """Start ``n`` runs at once; their reported training seconds."""
    procs = [subprocess.Popen([sys.executable, "-m", "kdbench", "run", "--method", "kd", "--epochs", str(epochs),
                               "--seed", str(seed)], cwd=workdir, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for seed in range(n)]
    seconds = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        found = re.search(r"training time\s+([\d.]+) s", out)
        if proc.returncode != 0 or not found:
            raise SystemExit(f"a run failed:\n{out[-2000:]}")
        seconds.append(float(found.group(1)))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "KDBENCH_CACHE_DIR": os.path.join(workdir, "cache"),
               "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db"}
        env.pop("KDBENCH_THREADS", None)
        env.pop("OMP_NUM_THREADS", None)
        launch(1, 1, env, workdir)  # trains and caches the teacher
        start = time.perf_counter()
        shared = launch(args.processes, args.epochs, env, workdir)
        shared_wall = time.perf_counter() - start
        start = time.perf_counter()
        greedy = launch(args.processes, args.epochs, {**env, "KDBENCH_THREADS": str(cores())}, workdir)
        greedy_wall = time.perf_counter() - start
    print(f"{args.processes} concurrent runs, {args.epochs} epochs each, {cores()} cores")
    print(f"  fair share (default):      training s {', '.join(f'{s:.1f}' for s in shared)}  wall {shared_wall:.1f} s")
    print(f"  every process all cores:   training s {', '.join(f'{s:.1f}' for s in greedy)}  wall {greedy_wall:.1f} s")
    print(f"  ratio (all cores / fair share, training seconds): {sum(greedy) / max(sum(shared), 1e-9):.1f}x")


if __name__ == "__main__":
    main()
