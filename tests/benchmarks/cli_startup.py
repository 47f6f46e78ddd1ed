"""How fast the catalog commands start: wall time of `kdbench list`, `kdbench plugins`,
`kdbench show method at`, `kdbench show model cnn1d_4x32` and `kdbench --help`, each in a fresh
process, cold (empty cache folder: the plugins are loaded) and warm (the catalog stored by the
cold run is read), and whether torch got imported.

    python tests/benchmarks/cli_startup.py [--repeat 5]

The target (issue 18) is `kdbench list` at or under 0.3 s warm on the 2-core CI machine. Each
number is the median of --repeat runs; the cold runs each start from an empty cache folder.
To measure another checkout of kdbench (e.g. before a change), put it first on the path:
``--pythonpath /tmp/old:/tmp/old/plugins``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = (["list"], ["plugins"], ["show", "method", "at"], ["show", "model", "cnn1d_4x32"], ["--help"])

# runs the CLI as the `kdbench` script does, then says on stderr whether torch was imported
PROGRAM = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("\\ntorch imported: %s\\n" % ("torch" in sys.modules)))
from kdbench.cli import main
sys.argv = ["kdbench", *sys.argv[1:]]
main()
"""


def run_once(args: list[str], env: dict) -> tuple[float, bool]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROGRAM, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"kdbench {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return seconds, "torch imported: True" in proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pythonpath", default=None, help="put this first on PYTHONPATH (another checkout)")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="kdbench-cli-startup-")
    env = {**os.environ, "KDBENCH_CACHE_DIR": cache, "OMP_NUM_THREADS": "1"}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    print(f"{'command':<34} {'cold s':>7} {'warm s':>7} {'cold/warm':>9}  torch imported (cold, warm)")
    try:
        for command in COMMANDS:
            cold, warm = [], []
            for _ in range(args.repeat):
                shutil.rmtree(cache, ignore_errors=True)
                seconds, cold_torch = run_once(command, env)
                cold.append(seconds)
                seconds, warm_torch = run_once(command, env)
                warm.append(seconds)
            c, w = statistics.median(cold), statistics.median(warm)
            print(f"{'kdbench ' + ' '.join(command):<34} {c:7.3f} {w:7.3f} {c / w:9.1f}  "
                  f"{'yes' if cold_torch else 'no'}, {'yes' if warm_torch else 'no'}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
