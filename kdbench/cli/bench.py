"""`kdbench bench`: run a leaderboard suite, or with --dry-run list its cells and which would run."""
from __future__ import annotations

import os
import sys
import time

import click

from kdbench.cli.options import executor_flags, open_tracker, tracking_option


@click.command("bench")
@click.argument("suite")
@click.option("--dry-run", is_flag=True, help="List the cells and which would run; run nothing.")
@click.option("--jobs", "-j", type=click.IntRange(1), default=1, show_default=True,
              help="Local executor: cells run concurrently in worker processes (each teacher is trained once, "
                   "before its cells).")
@click.option("--lockstep", is_flag=True,
              help="Train the methods of one pair and seed together, one teacher forward per batch for all "
                   "(each still its own run); --dry-run shows the groups.")
@executor_flags
@tracking_option
def bench_cmd(suite, dry_run, jobs, tracking_uri, executor="local", ray_address=None, runs_per_gpu=1,
              lockstep=False):
    """Run a leaderboard suite (leaderboards/NAME.toml or a path): every (pair, method, seed)
    cell without a FINISHED MLflow run of the same config hash."""
    from kdbench.workflows import bench, executors, suites

    loaded = suites.load_suite(suite)
    tracker = open_tracker(tracking_uri)
    cells = bench.plan_cells(loaded, uri=tracker.uri)
    done = bench.finished_hashes(tracker, loaded)
    todo = bench.pending(cells, done)
    if dry_run:
        _echo_dry_run(loaded, cells, todo, done)
        if lockstep:
            _echo_groups(todo)
        return
    started = time.time()
    config = executors.ExecutorConfig(kind=executor, jobs=jobs, ray_address=ray_address, runs_per_gpu=runs_per_gpu)
    make_jobs = None
    if lockstep:
        import functools

        from kdbench.workflows import lockstep as lockstep_runs

        make_jobs = functools.partial(lockstep_runs.suite_jobs, on_event=_echo_event)
    try:
        results = bench.run_suite(loaded, tracker.uri, jobs=jobs, on_event=_echo_event, cells=cells,
                                  executor=config, make_jobs=make_jobs)
    except executors.ExecutorError as exc:  # a usage error: one line, exit 2, nothing recorded
        click.echo("error: " + " ".join(str(exc).split()), err=True)
        sys.exit(2)
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


def _echo_groups(todo) -> None:
    """``--lockstep --dry-run``: the groups the cells that would run form, and who runs alone, why."""
    from kdbench.workflows import lockstep

    grouping = lockstep.plan_groups(todo)
    if not grouping.groups:
        click.echo("lockstep: nothing to group; every cell runs alone")
    else:
        click.echo(f"lockstep: {grouping.grouped} cells in {len(grouping.groups)} groups, "
                   f"{len(grouping.alone)} cells alone")
    for group in grouping.groups:
        click.echo(f"  group {lockstep.group_label(group)}: {', '.join(cell.method.name for cell in group)}")
    for cell, reason in grouping.alone:
        click.echo(f"  alone {cell.key}: {reason}")


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
    from kdbench.workflows import bench, lockstep

    if isinstance(event, (lockstep.LockstepPlanned, lockstep.GroupSplit)):
        return _lockstep_line(event)
    if isinstance(event, bench.TuningStarted):
        return f"tuning {event.method} for {event.pair}: {event.trials} trials on validation"
    if isinstance(event, bench.ClusterReady):
        return (f"Ray cluster {event.address}: {event.nodes} node(s), {event.cpus:g} CPUs, {event.gpus:g} GPUs"
                + (f"; dashboard {event.dashboard_url}" if event.dashboard_url else ""))
    if isinstance(event, bench.SuitePlanned):
        how = f"jobs={event.jobs}" if event.executor == "local" else f"executor={event.executor}"
        return (f"{event.suite}: {event.cells} cells, {event.finished} already finished, {event.to_run} to run"
                f" ({how})")
    if isinstance(event, bench.SuiteProgress):
        eta = "" if event.eta_seconds is None else f", ETA {_duration(event.eta_seconds)}"
        return (f"  suite: {event.done} done, {event.running} running, {event.failed} failed, "
                f"{event.left} left{eta}")
    if isinstance(event, bench.TeacherStarted):
        return f"teacher {event.teacher} ({event.teacher_id}) ..."
    if isinstance(event, bench.TeacherFailed):
        return f"  failed: {event.reason}"
    result = event.result
    if result.skipped:
        return f"[{event.done}/{event.total}] {result.cell_key}  skipped: {result.reason}"
    state = f"{100 * result.top1:.2f} %" if result.ok and result.top1 is not None else f"FAILED: {result.reason}"
    return f"[{event.done}/{event.total}] {result.cell_key}  {state}  ({result.seconds:.0f} s)"


def _lockstep_line(event) -> str:
    from kdbench.workflows import lockstep

    if isinstance(event, lockstep.GroupSplit):
        return lockstep.split_line(event)
    if not event.groups:
        return "lockstep: nothing to group (no two methods of one pair and seed share a teacher forward); running normally"
    return (f"lockstep: {event.grouped} cells in {event.groups} groups, one teacher forward per batch each; "
            f"{event.alone} cells alone (see --dry-run --lockstep)")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
