"""`kdbench bench`: run a leaderboard suite, or with --dry-run list its cells and which would run."""
from __future__ import annotations

import os
import sys
import time

import click

from kdbench.cli.options import open_tracker, tracking_option


@click.command("bench")
@click.argument("suite")
@click.option("--dry-run", is_flag=True, help="List the cells and which would run; run nothing.")
@click.option("--jobs", "-j", type=click.IntRange(1), default=1, show_default=True,
              help="Cells run concurrently in worker processes (teachers are trained first).")
@tracking_option
def bench_cmd(suite, dry_run, jobs, tracking_uri):
    """Run a leaderboard suite (leaderboards/NAME.toml or a path): every (pair, method, seed)
    cell without a FINISHED MLflow run of the same config hash."""
    from kdbench.workflows import bench, suites

    loaded = suites.load_suite(suite)
    tracker = open_tracker(tracking_uri)
    cells = bench.plan_cells(loaded, uri=tracker.uri)
    done = bench.finished_hashes(tracker, loaded)
    todo = bench.pending(cells, done)
    if dry_run:
        _echo_dry_run(loaded, cells, todo, done)
        return
    started = time.time()
    results = bench.run_suite(loaded, tracker.uri, jobs=jobs, on_event=_echo_event, cells=cells)
    failed = [result for result in results if not result.ok]
    skipped = [result for result in results if result.skipped]
    click.echo(f"\n{loaded.name}: ran {len(results) - len(skipped)} cells in {time.time() - started:.0f} s, "
               f"{len(results) - len(failed) - len(skipped)} finished, {len(failed)} failed"
               + (f", {len(skipped)} skipped (run by another process)" if skipped else ""))
    for result in failed:
        click.echo(f"  FAILED {result.cell_key}: {result.reason}  (run {result.run_id})")
    by_path = suite.endswith(".toml") or os.sep in suite  # a suite given by its file is rendered by it
    click.echo(f"render: kdbench leaderboard {suite if by_path else loaded.name}")
    if failed:
        sys.exit(1)


def _echo_dry_run(suite, cells, todo, done) -> None:
    click.echo(f"{suite.name}: {len(suite.pairs)} pairs × {len(suite.methods)} methods × {len(suite.seeds)} seeds = "
               f"{len(cells)} cells; {len(cells) - len(todo)} finished, {len(todo)} would run")
    for cell in cells:
        state = "done" if cell.config_hash in done else ("ERROR " + cell.plan_error if cell.plan_error else "run")
        click.echo(f"  {state:<5} {cell.key:<44} {cell.config_hash or '-'}{_tuning_note(cell)}")


def _tuning_note(cell) -> str:
    """For a cell whose method is tuned: which study tuned it, or how many trials will."""
    if not cell.method.tune_trials:
        return ""
    if cell.config.tags.get("tuned") == "true":
        return f" (tuned by study {cell.config.tags['study']})"
    return f" (to be tuned first: {cell.method.tune_trials} trials)"


def _echo_event(event) -> None:
    click.echo(_event_line(event))


def _event_line(event) -> str:
    """A progress line of ``bench.run_suite``."""
    from kdbench.workflows import bench

    if isinstance(event, bench.TuningStarted):
        return f"tuning {event.method} for {event.pair}: {event.trials} trials on validation"
    if isinstance(event, bench.SuitePlanned):
        return (f"{event.suite}: {event.cells} cells, {event.finished} already finished, {event.to_run} to run"
                f" (jobs={event.jobs})")
    if isinstance(event, bench.TeacherStarted):
        return f"teacher {event.teacher} ({event.teacher_id}) ..."
    if isinstance(event, bench.TeacherFailed):
        return f"  failed: {event.reason}"
    result = event.result
    if result.skipped:
        return f"[{event.done}/{event.total}] {result.cell_key}  skipped: {result.reason}"
    state = f"{100 * result.top1:.2f} %" if result.ok and result.top1 is not None else f"FAILED: {result.reason}"
    return f"[{event.done}/{event.total}] {result.cell_key}  {state}  ({result.seconds:.0f} s)"
