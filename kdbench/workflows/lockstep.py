"""Lockstep runs of a suite (issue 17): the cells of one (dataset, teacher, student, recipe, seed,
precision, device) whose methods use the teacher only through its forward pass are trained
together in one process (:mod:`kdbench.core.lockstep`), one teacher forward per batch, and each
is recorded as its own MLflow run exactly as :func:`kdbench.workflows.run.run` records one: the
same config hash, params, tags (plus ``lockstep`` = the group's size) and metrics (timing
metrics are the group's share: docs/PERFORMANCE.md).

:func:`plan_groups` says which cells group and which run alone, and why; :func:`run_group` runs
one group as one callable (one task for an executor): ``run_group(cells, uri) -> [CellResult]``.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from kdbench.core.plan import make_plan
from kdbench.errors import KdbenchError
from kdbench.workflows import bench
from kdbench.workflows.bench import Cell, CellResult
from kdbench.workflows.executors import in_ray_task
from kdbench.workflows.tracking import Tracker

#: the share of the device's free memory a group may plan to use (the rest: the teacher, the
#: data, the allocator's slack)
MEMORY_SHARE = 0.8


@dataclass(kw_only=True)
class GroupPlan:
    """A suite's pending cells for ``--lockstep``: the groups (two cells or more each) and the
    cells that run alone, each with why."""
    groups: list[list[Cell]] = field(default_factory=list)
    alone: list[tuple[Cell, str]] = field(default_factory=list)

    @property
    def grouped(self) -> int:
        return sum(len(group) for group in self.groups)


@dataclass(frozen=True, kw_only=True)
class LockstepPlanned:
    """Event: how the pending cells were grouped (``groups`` 0: nothing to group)."""
    groups: int
    grouped: int
    alone: int


@dataclass(frozen=True, kw_only=True)
class GroupSplit:
    """Event: a group did not fit in device memory and runs as ``chunks`` smaller groups."""
    label: str
    cells: int
    chunks: list[int]
    need_mb: float
    free_mb: float


def group_label(cells: list[Cell]) -> str:
    """``teacher->student/sSEED`` of a group (all its cells share them)."""
    return f"{cells[0].pair.label}/s{cells[0].seed}"


def _group_key(plan, cell: Cell) -> str:
    """What a group's cells share: teacher (its id), dataset, student, recipe, seed, precision, device."""
    config = plan.config
    return json.dumps([cell.teacher_id, plan.dataset_obj.name, plan.dataset_obj.version, config.data_options,
                       plan.student_obj.name, dict(plan.student_obj.kwargs), plan.recipe.as_dict(), config.seed,
                       config.precision, config.device, config.capture], sort_keys=True, default=str)


def plan_groups(cells: list[Cell], reg=None) -> GroupPlan:
    """Group the cells that can share a teacher forward; the rest run alone, with the reason."""
    from kdbench.core import lockstep, plugins

    reg = plugins.registry() if reg is None else reg
    out = GroupPlan()
    buckets: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        if cell.plan_error:
            out.alone.append((cell, "cannot be planned"))
            continue
        plan = make_plan(cell.config, reg)
        reason = lockstep.alone_reason(plan)
        if reason:
            out.alone.append((cell, f"its method {reason}"))
        else:
            buckets[_group_key(plan, cell)].append(cell)
    for bucket in buckets.values():
        if len(bucket) > 1:
            out.groups.append(bucket)
        else:
            out.alone.append((bucket[0], "no other method of its pair, recipe and seed to share the teacher with"))
    return out


def suite_jobs(cells: list[Cell], uri: str, threads: int | None, on_event: Callable = lambda event: None) -> list:
    """The executor's jobs for ``--lockstep``: :func:`kdbench.workflows.bench.suite_jobs` for the
    cells that run alone, and one job per group (:func:`run_group_job`) needing its teacher's job
    and the vanilla cells of its student (the Δ vs vanilla needs them). Reports how the cells were
    grouped (:class:`LockstepPlanned`)."""
    from kdbench.workflows.executors import Job

    grouping = plan_groups(cells)
    on_event(LockstepPlanned(groups=len(grouping.groups), grouped=grouping.grouped, alone=len(grouping.alone)))
    jobs = bench.suite_jobs([cell for cell, _ in grouping.alone], uri, threads)
    keys = {job.key for job in jobs}
    vanilla: dict[str, list[str]] = defaultdict(list)
    for cell, _ in grouping.alone:
        if cell.method.name == "vanilla":
            vanilla[cell.pair.student].append("cell:" + cell.key)
    for group in grouping.groups:
        teacher = "teacher:" + group[0].teacher_id
        if teacher not in keys:
            keys.add(teacher)
            jobs.insert(0, Job(key=teacher, fn=bench.obtain_teacher_job, args=(group[0], uri, threads),
                               payload=group[0]))
        needs = (teacher, *vanilla[group[0].pair.student])
        jobs.append(Job(key="group:" + group_label(group), fn=run_group_job, args=(group, uri, threads),
                        needs=needs, payload=group))
    return jobs


def run_group_job(cells: list[Cell], uri: str, threads: int | None, *needed) -> list[CellResult]:
    """:func:`run_group` once its teacher (and the vanilla cells) are done: a failed teacher fails
    every cell of the group with its reason. A split for memory is said on stderr (a worker
    process has no other way to the terminal)."""
    import sys
    from dataclasses import replace

    for outcome in needed:
        if isinstance(outcome, bench.TeacherOutcome) and outcome.reason:
            return [bench.run_cell(replace(cell, plan_error=outcome.reason), uri, threads) for cell in cells]
    return run_group(cells, uri, threads, on_event=lambda event: print(split_line(event), file=sys.stderr))


def split_line(event: GroupSplit) -> str:
    """The one line a split group is reported with."""
    return (f"lockstep group {event.label}: {event.cells} students need about {event.need_mb:.0f} MB, "
            f"{event.free_mb:.0f} MB free: split into groups of {', '.join(map(str, event.chunks))}")


def run_group(cells: list[Cell], uri: str, threads: int | None = None,
              on_event: Callable = lambda event: None) -> list[CellResult]:
    """Train ``cells`` (one group of :func:`plan_groups`) in lockstep in this process; one result
    per cell, in order. Each cell is claimed first (a cell held by another live process is
    skipped); failures are recorded on the cell's run, never raised (except Ctrl-C)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    tracker = Tracker(uri)
    t0 = time.time()
    results: dict[str, CellResult] = {}
    claimed: list[tuple[Cell, str]] = []
    wait = in_ray_task()  # a re-run of a group whose worker died elsewhere: as run_cell waits
    for cell in cells:
        run_id, held = bench.claim_cell(tracker, cell, wait)
        if run_id is None:
            results[cell.key] = CellResult(cell_key=cell.key, ok=True, skipped=True, reason=held)
        else:
            claimed.append((cell, run_id))
    try:
        if claimed:
            results.update(_train(claimed, tracker, t0, on_event))
    except KeyboardInterrupt:
        _end_running(tracker, claimed, "KILLED", "KeyboardInterrupt")
        raise
    except BaseException as exc:  # noqa: BLE001 - e.g. the teacher failed: every cell fails with it
        reason = f"{type(exc).__name__}: {exc}".strip()
        _end_running(tracker, claimed, "FAILED", reason)
        for cell, run_id in claimed:
            results.setdefault(cell.key, CellResult(cell_key=cell.key, ok=False, run_id=run_id, reason=reason,
                                                    seconds=time.time() - t0))
    return [results[cell.key] for cell in cells]


def _end_running(tracker: Tracker, claimed: list[tuple[Cell, str]], status: str, reason: str) -> None:
    for _cell, run_id in claimed:
        if tracker.client.get_run(run_id).info.status == "RUNNING":
            tracker.finish(run_id, status, reason)


@dataclass
class _Entry:
    cell: Cell
    run_id: str
    plan: object
    setup: object
    member: object
    config_hash: str


def _train(claimed: list[tuple[Cell, str]], tracker: Tracker, t0: float, on_event: Callable) -> dict[str, CellResult]:
    from kdbench.core import engine, lockstep, plugins
    from kdbench.workflows import run as runner
    from kdbench.workflows.teachers import obtain_teacher

    reg = plugins.registry()
    plans = [make_plan(cell.config, reg) for cell, _ in claimed]
    device = engine.select_device(plans[0].config.device)
    teacher = obtain_teacher(plans[0], device, tracker, lambda e: None)
    results: dict[str, CellResult] = {}
    entries: list[_Entry] = []
    for (cell, run_id), plan in zip(claimed, plans):
        try:
            reason = lockstep.alone_reason(plan)
            if reason:
                raise KdbenchError(f"method {plan.method_obj.name!r} cannot run in lockstep: it {reason}")
            setup = engine.setup_student(plan, teacher.net, device)
            if entries:  # one copy of the data for the group
                setup.splits = entries[0].setup.splits
            tags = {**runner.student_tags(plan, device, teacher, [], setup), "lockstep": str(len(claimed))}
            tracker.fill(run_id, tags, plan.params())
            member = lockstep.member(plan, setup, device, tracker.epoch_logger(run_id, lambda e: None))
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - this cell fails, the others train
            runner.end_failed_run(tracker, run_id, plan.config, exc)
            results[cell.key] = CellResult(cell_key=cell.key, ok=False, run_id=run_id,
                                           reason=f"{type(exc).__name__}: {exc}".strip(), seconds=time.time() - t0)
            continue
        entries.append(_Entry(cell, run_id, plan, setup, member, tags["config_hash"]))
    if not entries:
        return results
    group = lockstep.share_teacher([e.setup for e in entries], teacher.net,
                                   entries[0].plan.teacher_obj.taps_of(teacher.net),
                                   f"teacher {entries[0].plan.teacher_obj.name!r}")
    try:
        for chunk in _memory_chunks(entries, device, on_event):
            outcomes = lockstep.fit_group([entries[i].member for i in chunk], group, device)
            for i, outcome in zip(chunk, outcomes):
                results[entries[i].cell.key] = _record(entries[i], outcome, tracker, teacher, t0)
    finally:
        group.tapped.remove()  # the teacher network may outlive the group (a cached one)
    return results


def _memory_chunks(entries: list[_Entry], device, on_event: Callable) -> list[list[int]]:
    """The group as it fits in the device's free memory: one chunk, or several (with one event)."""
    from kdbench.core import capture as capturing
    from kdbench.core import lockstep
    from kdbench.core.precision import resolve_precision

    free = lockstep.free_device_bytes(device)
    if free is None:  # the CPU: no device memory to check
        return [list(range(len(entries)))]
    sizes = [lockstep.member_bytes(e.setup, e.plan.recipe.batch_size, e.plan.dataset_obj.input_shape, device,
                                   resolve_precision(e.plan.config.precision, device),
                                   eval_batch_size=e.plan.recipe.eval_batch_size
                                   if capturing.resolve(e.plan.config.capture, device) in capturing.GRAPHED else 0)
             for e in entries]
    budget = int(free * MEMORY_SHARE)
    chunks = lockstep.split_by_memory(sizes, budget)
    if len(chunks) > 1:
        on_event(GroupSplit(label=group_label([e.cell for e in entries]), cells=len(entries),
                            chunks=[len(c) for c in chunks], need_mb=sum(sizes) / 2**20, free_mb=free / 2**20))
    return chunks


def _record(entry: _Entry, outcome, tracker: Tracker, teacher, t0: float) -> CellResult:
    """End the member's run as :func:`kdbench.workflows.run.run` ends a separate one."""
    from kdbench.workflows import run as runner

    if outcome.error is not None:
        runner.end_failed_run(tracker, entry.run_id, entry.plan.config, outcome.error)
        return CellResult(cell_key=entry.cell.key, ok=False, run_id=entry.run_id,
                          reason=f"{type(outcome.error).__name__}: {outcome.error}".strip(), seconds=time.time() - t0)
    result = outcome.result
    if result.tags:
        tracker.set_tags(entry.run_id, result.tags)
    final, _vanilla = runner.final_metrics(tracker, entry.plan, teacher, result.metrics, True)
    tracker.log_metrics(entry.run_id, final)
    if result.state_dict is not None:
        runner.save_student(tracker, entry.run_id, entry.plan, result, entry.config_hash)
    tracker.finish(entry.run_id)
    return CellResult(cell_key=entry.cell.key, ok=True, run_id=entry.run_id, top1=final.get("test_top1"),
                      seconds=time.time() - t0)
