"""Running a leaderboard suite (:mod:`.suites`): cells (pair × method × seed) → MLflow runs.

``tune_trials = N``: before its cells run, the method is tuned for each pair with ``kdbench tune``
(N trials on the validation split, study ``<suite>-<teacher>-><student>-<method>`` in the default
Optuna storage next to the tracking store, resumable); its cells then run with the best trial's
parameters (``params`` stay fixed on top) and are tagged ``tuned=true``. Until its study has a
best trial a method runs with ``params`` and is reported as *not yet tuned*.

A cell's identity is the run's config hash (:meth:`Plan.config_hash` with the teacher id the
runner will use), computed before anything runs: a cell with a FINISHED run of that hash is
done, so an interrupted suite resumes and a finished one is a no-op.

Progress is reported as events (:class:`TuningStarted`, :class:`ClusterReady`, :class:`SuitePlanned`,
:class:`TeacherStarted`, :class:`TeacherFailed`, :class:`CellFinished`, :class:`SuiteProgress`) passed to
``on_event``. How the jobs run (local processes or Ray tasks) is :mod:`.executors`'s business.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from kdbench.core.plan import RunConfig, make_plan
from kdbench.errors import KdbenchError
from kdbench.workflows import tune
from kdbench.workflows.executors import Progress, in_ray_task
from kdbench.workflows.studies import best_params
from kdbench.workflows.suites import MethodSpec, Pair, Suite
from kdbench.workflows.teachers import checkpoint_id, checkpoint_sha256
from kdbench.workflows.tracking import Tracker


@dataclass(frozen=True, kw_only=True)
class Cell:
    pair: Pair
    method: MethodSpec
    seed: int
    config: RunConfig
    config_hash: str | None  # None when the plan cannot be made (the cell will fail)
    teacher_id: str | None
    plan_error: str | None = None

    @property
    def key(self) -> str:
        return cell_key(self.pair, self.method, self.seed)


def cell_key(pair: Pair, method: MethodSpec, seed: int) -> str:
    """``teacher->student/method/sSEED``: a cell's name in tags and messages."""
    return f"{pair.label}/{method.name}/s{seed}"


@dataclass(kw_only=True)
class CellResult:
    """How a cell's run ended: its run id and test top-1, or why it failed."""
    cell_key: str
    ok: bool
    run_id: str | None = None
    top1: float | None = None
    reason: str | None = None
    seconds: float = 0.0
    skipped: bool = False  # claimed by another live process: not run here


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, kw_only=True)
class TuningStarted:
    """A method's tuning study for a pair starts (or resumes)."""
    method: str
    pair: str
    trials: int


@dataclass(frozen=True, kw_only=True)
class SuitePlanned:
    """The suite's cells are planned: how many there are, how many are finished already."""
    suite: str
    cells: int
    finished: int
    to_run: int
    jobs: int
    executor: str = "local"


@dataclass(frozen=True, kw_only=True)
class ClusterReady:
    """The Ray cluster the cells will run on (``--executor ray``)."""
    address: str
    nodes: int
    cpus: float
    gpus: float
    dashboard_url: str | None


#: Event: where the whole suite stands after a cell ended, counted in cells (the executors' own
#: progress counts jobs: teachers and lockstep groups); the ETA is None before the first cell ends.
SuiteProgress = Progress


@dataclass(frozen=True, kw_only=True)
class TeacherStarted:
    """A teacher is loaded or trained before the cells fan out."""
    teacher: str
    teacher_id: str


@dataclass(frozen=True, kw_only=True)
class TeacherFailed:
    """A teacher could not be obtained: its cells will fail with ``reason``."""
    teacher_id: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class CellFinished:
    """A cell ran (or failed)."""
    result: CellResult
    done: int  # cells finished so far, this one included
    total: int


def _ignore(event) -> None:
    pass


# --------------------------------------------------------------------------- tuning


def study_name(suite: Suite, pair: Pair, method: MethodSpec) -> str:
    return f"{suite.name}-{pair.label}-{method.name}"


def tuned_params(suite: Suite, pair: Pair, method: MethodSpec, uri: str | None) -> dict | None:
    """The best hyperparameters of the method's tuning study for this pair, or None (no study yet)."""
    if not method.tune_trials or uri is None:
        return None
    try:
        return best_params(study_name(suite, pair, method), None, uri)["hparams"]
    except KdbenchError:
        return None


def tune_methods(suite: Suite, uri: str, on_event: Callable = _ignore) -> None:
    """Run (or resume) the tuning study of every method with ``tune_trials`` for every pair."""
    for pair in suite.pairs:
        recipe = suite.recipe_for(pair.student)
        for method in (spec for spec in suite.methods if spec.tune_trials):
            on_event(TuningStarted(method=method.name, pair=pair.label, trials=method.tune_trials))
            tune.run_study(tune.TuneConfig(
                method=method.name, dataset=suite.dataset, teacher=pair.teacher, students=(pair.student,),
                trials=method.tune_trials, recipe=dict(recipe), study=study_name(suite, pair, method),
                retrain=False, teacher_checkpoint=pair.checkpoint, tracking_uri=uri,
            ))


# --------------------------------------------------------------------------- planning


def verify_checkpoint(pair: Pair) -> str:
    """The checkpoint's teacher id (as the runner computes it) after checking its sha256."""
    if not Path(pair.checkpoint).is_file():
        raise KdbenchError(f"teacher checkpoint {pair.checkpoint!r} does not exist")
    sha = checkpoint_sha256(pair.checkpoint)
    if not sha.startswith(pair.sha256) or len(pair.sha256) < 16:
        raise KdbenchError(f"teacher checkpoint {pair.checkpoint!r} has sha256 {sha}, the leaderboard "
                           f"expects {pair.sha256} (at least 16 hex digits)")
    return checkpoint_id(sha)


def _checked_checkpoint(pair: Pair) -> tuple[str | None, str | None]:
    """(teacher id, None) for a verified checkpoint, (None, error) for a bad one, (None, None) without."""
    if not pair.checkpoint:
        return None, None
    try:
        return verify_checkpoint(pair), None
    except KdbenchError as exc:
        return None, str(exc)


def cell_config(suite: Suite, pair: Pair, method: MethodSpec, seed: int, recipe: dict,
                tuned: dict | None) -> RunConfig:
    """The run of one cell, tagged with the suite, the cell and (for tuned methods) its study."""
    tags = {"leaderboard": suite.name, "leaderboard_cell": cell_key(pair, method, seed),
            "leaderboard_pair": pair.label}
    if method.tune_trials:
        tags.update(tune_trials=str(method.tune_trials), tuned=str(tuned is not None).lower())
        if tuned is not None:
            tags["study"] = study_name(suite, pair, method)
    return RunConfig(
        method=method.name, dataset=suite.dataset, teacher=pair.teacher, student=pair.student,
        hparams={**(tuned or {}), **method.params}, recipe=dict(recipe), seed=seed,
        teacher_seed=suite.teacher_seed, teacher_checkpoint=pair.checkpoint, tags=tags,
        precision=suite.precision,
    )


def _plan_cell(pair: Pair, method: MethodSpec, seed: int, config: RunConfig, reg,
               checkpoint: tuple[str | None, str | None]) -> Cell:
    """The cell with its config hash, or with the reason it cannot run."""
    def failing(reason: str) -> Cell:
        return Cell(pair=pair, method=method, seed=seed, config=config, config_hash=None, teacher_id=None,
                    plan_error=reason)

    try:
        plan = make_plan(config, reg)
    except KdbenchError as exc:
        return failing(str(exc))
    ckpt_id, ckpt_error = checkpoint
    if plan.teacher is None:
        teacher_id = None
    elif pair.checkpoint:
        if ckpt_error:
            return failing(ckpt_error)
        teacher_id = ckpt_id
    else:
        teacher_id = plan.teacher_key()
    return Cell(pair=pair, method=method, seed=seed, config=config, config_hash=plan.config_hash(teacher_id),
                teacher_id=teacher_id)


def plan_cells(suite: Suite, reg=None, uri: str | None = None) -> list[Cell]:
    """Every (pair, method, seed) cell with its config hash, vanilla cells first. With the
    tracking ``uri``, methods to be tuned take their study's best parameters."""
    if reg is None:
        from kdbench.core import plugins

        reg = plugins.registry()
    cells = []
    for pair in suite.pairs:
        checkpoint = _checked_checkpoint(pair)
        recipe = suite.recipe_for(pair.student)
        for method in suite.methods:
            tuned = tuned_params(suite, pair, method, uri)
            for seed in suite.seeds:
                config = cell_config(suite, pair, method, seed, recipe, tuned)
                cells.append(_plan_cell(pair, method, seed, config, reg, checkpoint))
    cells.sort(key=lambda cell: (cell.method.name != "vanilla",))  # stable: vanilla first, order kept
    return cells


# --------------------------------------------------------------------------- resumption


def finished_hashes(tracker, suite: Suite) -> dict[str, str]:
    """config_hash -> run id of FINISHED student runs in the suite's dataset experiment."""
    runs = tracker.search(suite.dataset, "attributes.status = 'FINISHED' AND tags.role = 'student'")
    out = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        config_hash = r.data.tags.get("config_hash")
        if config_hash:
            out[config_hash] = r.info.run_id
    return out


def pending(cells: list[Cell], done: dict[str, str]) -> list[Cell]:
    return [c for c in cells if c.config_hash is None or c.config_hash not in done]


def suite_runs(tracker, suite: Suite) -> list:
    """The suite's FINISHED student runs: those whose config hash is one of its cells'."""
    hashes = {c.config_hash for c in plan_cells(suite, uri=tracker.uri) if c.config_hash}
    runs = tracker.search(suite.dataset, "attributes.status = 'FINISHED' AND tags.role = 'student'")
    return [r for r in runs if r.data.tags.get("config_hash") in hashes]


# --------------------------------------------------------------------------- running


def _record_failure(tracker, cell: Cell, reason: str, started: float) -> str:
    """The cell's FAILED run: the runner's own if it created one, else one made here."""
    runs = tracker.search(
        cell.config.dataset,
        f"tags.leaderboard_cell = '{cell.key}' AND tags.leaderboard = '{cell.config.tags['leaderboard']}' "
        f"AND attributes.status != 'FINISHED'",
    )
    runs = [r for r in runs if (r.info.start_time or 0) >= started * 1000 - 1000]
    if runs:
        run_id = runs[0].info.run_id
        if runs[0].info.status == "RUNNING":
            tracker.finish(run_id, "FAILED", reason)
        return run_id
    tags = _claim_tags(cell)
    if cell.config_hash:
        tags["config_hash"] = cell.config_hash
    run_id = tracker.start(cell.config.dataset, _run_name(cell), tags, {})
    tracker.finish(run_id, "FAILED", reason)
    return run_id


def run_cell(cell: Cell, uri: str, threads: int | None = None, wait: bool | None = None) -> CellResult:
    """Run one cell (in this process); failures are recorded, never raised (except Ctrl-C).

    The cell is claimed first (its RUNNING run, :meth:`Tracker.claim`): a cell whose run is held
    by a live process (another ``kdbench bench`` of the suite) is skipped, not run twice. With
    ``wait`` (default: in a Ray task, which may be the re-run of a cell whose worker died on
    another machine, where only the heartbeat tells that the holder is dead) the claim is retried
    until the holder has finished or its heartbeat is stale."""
    from kdbench.workflows import run as runner

    if threads:
        import torch

        torch.set_num_threads(threads)
    tracker = Tracker(uri)
    t0 = time.time()
    run_id = None
    try:
        if cell.plan_error:
            raise KdbenchError(cell.plan_error)
        if cell.config_hash:
            run_id, held = claim_cell(tracker, cell, in_ray_task() if wait is None else wait)
            if run_id is None:
                return CellResult(cell_key=cell.key, ok=True, skipped=True, seconds=time.time() - t0, reason=held)
        outcome = runner.run(cell.config, tracker, run_id=run_id)
    except KeyboardInterrupt:
        if run_id and tracker.client.get_run(run_id).info.status == "RUNNING":
            tracker.finish(run_id, "KILLED", "KeyboardInterrupt")
        raise
    except BaseException as exc:  # noqa: BLE001 - a failing cell must not stop the suite
        reason = f"{type(exc).__name__}: {exc}".strip()
        run_id = _record_failure(tracker, cell, reason, t0)
        return CellResult(cell_key=cell.key, ok=False, run_id=run_id, reason=reason, seconds=time.time() - t0)
    return CellResult(cell_key=cell.key, ok=True, run_id=outcome.run_id, top1=outcome.metrics.get("test_top1"),
                      seconds=time.time() - t0)


def claim_cell(tracker, cell: Cell, wait: bool) -> tuple[str | None, str]:
    """Claim ``cell``'s run: (run id, '') or (None, who holds it). With ``wait`` the claim is
    retried until the holder has finished or its heartbeat is stale (see :func:`run_cell`)."""
    from kdbench.workflows import claims

    deadline = time.time() + (claims.STALE + 2 * claims.INTERVAL if wait else 0)
    while True:
        run_id, held = tracker.claim(cell.config.dataset, cell.config_hash, _run_name(cell), _claim_tags(cell))
        if run_id is not None or held.startswith("finished") or time.time() >= deadline:
            return run_id, held
        time.sleep(min(claims.INTERVAL, 5.0))


def _run_name(cell: Cell) -> str:
    return f"{cell.method.name}-{cell.pair.student}-s{cell.seed}"


def _claim_tags(cell: Cell) -> dict:
    return {**cell.config.tags, "role": "student", "method": cell.method.name, "student": cell.pair.student,
            "teacher": cell.pair.teacher, "dataset": cell.config.dataset, "seed": cell.seed}


@dataclass(frozen=True, kw_only=True)
class TeacherOutcome:
    """A teacher job's result: its id, and why it could not be obtained (None: it is ready)."""
    teacher_id: str
    reason: str | None = None


def obtain_teacher_job(cell: Cell, uri: str, threads: int | None = None) -> TeacherOutcome:
    """Load or train the cell's teacher (once per teacher id; its weights go to the cache and to
    its MLflow run, where workers on other machines fetch them). Failures are returned, not raised."""
    from kdbench.core import engine, plugins
    from kdbench.workflows.teachers import obtain_teacher

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        plan = make_plan(cell.config, plugins.registry())
        obtain_teacher(plan, engine.select_device(cell.config.device), Tracker(uri), lambda e: None)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - its cells fail with the reason, others go on
        return TeacherOutcome(teacher_id=cell.teacher_id, reason=f"teacher failed: {type(exc).__name__}: {exc}")
    return TeacherOutcome(teacher_id=cell.teacher_id)


def run_cell_job(cell: Cell, uri: str, threads: int | None, *needed) -> CellResult:
    """:func:`run_cell` once the jobs it needs have ended: a failed teacher fails the cell with its
    reason (the results of vanilla cells are only waited for: the others' Δ needs them)."""
    for outcome in needed:
        if isinstance(outcome, TeacherOutcome) and outcome.reason:
            cell = replace(cell, plan_error=outcome.reason)
    return run_cell(cell, uri, threads)


def suite_jobs(cells: list[Cell], uri: str, threads: int | None) -> list:
    """The executor's jobs: one per distinct teacher, then one per cell needing its teacher and the
    vanilla cells of its student (the others' Δ vs vanilla needs finished vanilla runs)."""
    from kdbench.workflows.executors import Job

    jobs, teachers = [], {}
    for cell in cells:
        if cell.teacher_id and not cell.plan_error and cell.teacher_id not in teachers:
            teachers[cell.teacher_id] = Job(key="teacher:" + cell.teacher_id, fn=obtain_teacher_job,
                                            args=(cell, uri, threads), payload=cell)
    jobs.extend(teachers.values())
    vanilla: dict[str, list[str]] = {}
    for cell in cells:
        if cell.method.name == "vanilla":
            vanilla.setdefault(cell.pair.student, []).append("cell:" + cell.key)
    for cell in cells:
        needs = [] if cell.plan_error or not cell.teacher_id else ["teacher:" + cell.teacher_id]
        if cell.method.name != "vanilla":
            needs += vanilla.get(cell.pair.student, [])
        jobs.append(Job(key="cell:" + cell.key, fn=run_cell_job, args=(cell, uri, threads), needs=tuple(needs),
                        payload=cell))
    return jobs


def connect(executor, uri: str):
    """Check the executor options and, for Ray, connect and check that every node reaches the
    tracking store; (cluster or None, the URI the workers use). Nothing is recorded before this."""
    from kdbench.workflows import executors

    executors.check_config(executor)
    if executor.kind != "ray":
        return None, uri
    uri = executors.absolute_uri(uri)
    cluster = executors.connect_ray(executor.ray_address)
    try:
        executors.check_workers_reach(uri, cluster)
    except BaseException:
        executors.shutdown_ray()
        raise
    return cluster, uri


def run_suite(
    suite: Suite,
    uri: str,
    jobs: int = 1,
    on_event: Callable = _ignore,
    cells: list[Cell] | None = None,
    executor=None,
    make_jobs: Callable | None = None,
) -> list[CellResult]:
    """Run the suite's pending cells; return one result per cell run (failures included).

    ``executor`` (:class:`~kdbench.workflows.executors.ExecutorConfig`, default: ``jobs`` local
    processes) only changes how the jobs run; which cells run, and how failures are recorded, is
    decided here for both. ``make_jobs(cells, uri, threads)``: the jobs of the pending cells
    instead of :func:`suite_jobs` (``--lockstep``: :func:`kdbench.workflows.lockstep.suite_jobs`,
    whose group jobs return a list of results)."""
    from kdbench.workflows import executors

    executor = executor or executors.ExecutorConfig(jobs=jobs)
    cluster, uri = connect(executor, uri)  # bad options and unreachable clusters: before anything is recorded
    try:
        return _run_suite(suite, uri, executor, cluster, on_event, cells, make_jobs)
    finally:
        if cluster is not None:
            executors.shutdown_ray()


def _run_suite(suite: Suite, uri: str, executor, cluster, on_event: Callable, cells,
               make_jobs: Callable | None = None) -> list[CellResult]:
    from kdbench.workflows import executors

    tracker = Tracker(uri)
    if cluster is not None:
        on_event(ClusterReady(address=cluster.address, nodes=cluster.nodes, cpus=cluster.cpus, gpus=cluster.gpus,
                              dashboard_url=cluster.dashboard_url))
    if any(spec.tune_trials for spec in suite.methods):
        tune_methods(suite, uri, on_event)
        cells = None  # the tuned parameters change the cells
    cells = plan_cells(suite, uri=uri) if cells is None else cells
    todo = pending(cells, finished_hashes(tracker, suite))
    on_event(SuitePlanned(suite=suite.name, cells=len(cells), finished=len(cells) - len(todo),
                          to_run=len(todo), jobs=executor.jobs, executor=executor.kind))
    if not todo:
        return []
    results: list[CellResult] = []
    started = time.time()

    def report(result: CellResult) -> None:
        results.append(result)
        on_event(CellFinished(result=result, done=len(results), total=len(todo)))

    def on_done(job, result) -> None:
        if isinstance(result, TeacherOutcome):
            if result.reason:
                on_event(TeacherFailed(teacher_id=result.teacher_id, reason=result.reason))
            return
        for one in result if isinstance(result, list) else [result]:  # a lockstep group: several
            report(one)

    def on_lost(job, reason: str):
        """The job's process (or node) was lost for good: a cell's failure is recorded here."""
        if isinstance(job.payload, list):  # a lockstep group: each of its cells
            return [on_lost(replace(job, payload=cell), reason) for cell in job.payload]
        cell = job.payload
        if job.key.startswith("teacher:"):
            outcome = TeacherOutcome(teacher_id=cell.teacher_id, reason=f"teacher failed: {reason}")
            on_event(TeacherFailed(teacher_id=cell.teacher_id, reason=outcome.reason))
            return outcome
        result = CellResult(cell_key=cell.key, ok=False, reason=reason,
                            run_id=_record_failure(tracker, cell, reason, 0))
        report(result)
        return result

    def on_progress(progress) -> None:
        left = len(todo) - len(results)
        done = len(results)
        failed = sum(not r.ok for r in results)
        on_event(SuiteProgress(done=done, running=min(progress.running, left), failed=failed, left=left,
                               eta_seconds=executors.eta(started, done, left)))

    jobs = (make_jobs or suite_jobs)(todo, uri, executors.job_threads(executor, cluster))
    for job in jobs:
        if job.key.startswith("teacher:"):
            on_event(TeacherStarted(teacher=job.payload.pair.teacher, teacher_id=job.payload.teacher_id))
    if cluster is not None:
        executors.run_ray(jobs, executor, cluster, on_done, on_lost, on_progress)
    else:
        executors.run_local(jobs, executor, on_done, on_lost, on_progress)
    return results
