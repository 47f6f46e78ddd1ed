"""`kdbench bench` (run a leaderboard suite) and `kdbench ui` (the MLflow UI); ``COMMANDS`` is
added to the main group by kdbench.cli."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import click

from kdbench.errors import KdbenchError


def _tracker(uri):
    from kdbench.workflows.tracking import default_tracking_uri
    from kdbench.workflows.tracking import Tracker

    return Tracker(uri or default_tracking_uri())


tracking_option = click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
    help="MLflow tracking URI [default: sqlite:///mlflow.db in the working directory].",
)


@click.command("bench")
@click.argument("suite")
@click.option("--dry-run", is_flag=True, help="List the cells and which would run; run nothing.")
@click.option("--jobs", "-j", type=click.IntRange(1), default=1, show_default=True,
              help="Cells run concurrently in worker processes (teachers are trained first).")
@tracking_option
def bench_cmd(suite, dry_run, jobs, tracking_uri):
    """Run a leaderboard suite (leaderboards/NAME.toml or a path): every (pair, method, seed)
    cell without a FINISHED MLflow run of the same config hash."""
    from kdbench.workflows import bench

    s = bench.load_suite(suite)
    tracker = _tracker(tracking_uri)
    cells = bench.plan_cells(s, uri=tracker.uri)
    done = bench.finished_hashes(tracker, s)
    todo = bench.pending(cells, done)
    if dry_run:
        click.echo(f"{s.name}: {len(s.pairs)} pairs × {len(s.methods)} methods × {len(s.seeds)} seeds = "
                   f"{len(cells)} cells; {len(cells) - len(todo)} finished, {len(todo)} would run")
        for c in cells:
            state = "done" if c.config_hash in done else ("ERROR " + c.plan_error if c.plan_error else "run")
            tune = ""
            if c.method.tune_trials:
                tuned = c.config.tags.get("tuned") == "true"
                tune = (f" (tuned by study {c.config.tags['study']})" if tuned
                        else f" (to be tuned first: {c.method.tune_trials} trials)")
            click.echo(f"  {state:<5} {c.key:<44} {c.config_hash or '-'}{tune}")
        return
    t0 = time.time()
    results = bench.run_suite(s, tracker.uri, jobs=jobs, echo=click.echo, cells=cells)
    failed = [r for r in results if not r.ok]
    click.echo(f"\n{s.name}: ran {len(results)} cells in {time.time() - t0:.0f} s, "
               f"{len(results) - len(failed)} finished, {len(failed)} failed")
    for r in failed:
        click.echo(f"  FAILED {r.cell_key}: {r.reason}  (run {r.run_id})")
    click.echo(f"render: kdbench leaderboard {s.name}")
    if failed:
        sys.exit(1)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc=None) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.3)
    return False


@click.command("ui")
@click.option("--port", type=int, default=None, help="Port [default: a free one].")
@click.option("--host", default="127.0.0.1", show_default=True)
@tracking_option
def ui_cmd(port, host, tracking_uri):
    """Start the MLflow UI on the tracking store and print its URL (Ctrl-C stops it).
    Filter a leaderboard's runs with  tags.leaderboard = 'NAME'."""
    from kdbench.workflows.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--host", host, "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd)
    try:
        if not wait_for_port(host, port, 120, proc):
            raise KdbenchError(f"the MLflow UI did not start (exit {proc.poll()}): {' '.join(cmd)}")
        click.echo(f"MLflow UI: http://{host}:{port}  (store {uri}; filter runs: tags.leaderboard = 'NAME')",)
        sys.stdout.flush()
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


COMMANDS: list = [bench_cmd, ui_cmd]
