"""Leaderboard suites: ``leaderboards/NAME.toml`` → cells (pair × method × seed) → MLflow runs.

A suite file (read with tomllib)::

    name = "embedded"                 # default: the file's stem
    description = "..."
    dataset = "mnist1d"
    seeds = [0, 1, 2]                 # at least 3
    teacher_seed = 0                  # teachers are trained by the harness with this seed
    metric = "test_top1"              # ranking: test_top1 (last epoch) | test_top1_bestval
    methods = ["all"]                 # every registered built-in method, default hparams
    # or a list of tables: [[methods]] name = "kd", params = {T = 4}, tune_trials = 20
    [recipe]                          # optional: name = "cifar100-fast" and/or overrides (epochs = 1)
    [[pairs]]
    teacher = "cnn1d_4x32"            # or teacher_checkpoint = "t.pt", teacher_sha256 = "<hex>"
    student = "cnn1d_2x16"
    [published."wrn_40_2->wrn_16_2"]  # optional reference numbers (top-1 %), shown beside ours
    kd = 74.92

``tune_trials = N``: before its cells run, the method is tuned for each pair with ``kdbench tune``
(N trials on the validation split, study ``<suite>-<teacher>-><student>-<method>`` in the default
Optuna storage next to the tracking store, resumable); its cells then run with the best trial's
parameters (``params`` stay fixed on top) and are tagged ``tuned=true``. Until its study has a
best trial a method runs with ``params`` and is reported as *not yet tuned*.

A cell's identity is the run's config hash (:meth:`Plan.config_hash` with the teacher id the
runner will use), computed before anything runs: a cell with a FINISHED run of that hash is
done, so an interrupted suite resumes and a finished one is a no-op.
"""
from __future__ import annotations

import hashlib
import os
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from kdbench.errors import KdbenchError
from kdbench.core.plan import RunConfig, make_plan

MIN_SEEDS = 3
METRICS = ("test_top1", "test_top1_bestval")
BUILTIN_SOURCE_PREFIX = "kdbench"


# --------------------------------------------------------------------------- definitions


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    tune_trials: int = 0


@dataclass(frozen=True)
class Pair:
    teacher: str
    student: str
    checkpoint: str | None = None
    sha256: str | None = None

    @property
    def label(self) -> str:
        return f"{self.teacher}->{self.student}"


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    dataset: str
    pairs: tuple[Pair, ...]
    methods: tuple[MethodSpec, ...]
    seeds: tuple[int, ...]
    teacher_seed: int = 0
    metric: str = "test_top1"
    recipe_name: str | None = None
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    published: dict[str, dict[str, float]] = field(default_factory=dict)
    published_note: str = ""

    def recipe_for(self, student: str) -> dict[str, Any]:
        """The student recipe overrides handed to RunConfig.recipe for this student."""
        if not self.recipe_name:
            return dict(self.recipe_overrides)
        base = _load_named_recipe(self.recipe_name, student, self.path)
        recipe = base.with_(**self.recipe_overrides) if self.recipe_overrides else base
        return recipe.as_dict()


@dataclass(frozen=True)
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
        return f"{self.pair.label}/{self.method.name}/s{self.seed}"


def _load_named_recipe(name: str, student: str | None, suite_path: Path):
    from kdbench.recipes import load_recipe

    if name.endswith(".toml") and not Path(name).is_absolute():
        name = str((suite_path.parent / name).resolve())
    return load_recipe(name, student)


def leaderboard_dirs() -> list[Path]:
    """Where suite names are looked up: ./leaderboards, then the checkout's leaderboards/."""
    return [Path.cwd() / "leaderboards", Path(__file__).resolve().parent.parent / "leaderboards"]


def find_suite(name: str) -> Path:
    if name.endswith(".toml") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise KdbenchError(f"leaderboard file {name!r} does not exist")
        return path
    for d in leaderboard_dirs():
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    known = sorted({p.stem for d in leaderboard_dirs() if d.is_dir() for p in d.glob("*.toml")})
    raise KdbenchError(f"unknown leaderboard {name!r} (known: {', '.join(known) or 'none'})")


def load_suite(name_or_path: str, reg=None) -> Suite:
    """Parse and check a suite file; errors are one line."""
    path = find_suite(name_or_path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise KdbenchError(f"leaderboard {path} is not valid TOML: {exc}") from None
    if reg is None:
        from kdbench.core import plugins

        reg = plugins.registry()
    where = f"leaderboard {path.name}"
    known = {"name", "description", "dataset", "seeds", "teacher_seed", "metric", "methods", "recipe",
             "pairs", "published", "published_note"}
    bad = sorted(set(doc) - known)
    if bad:
        raise KdbenchError(f"{where}: unknown key {bad[0]!r} (known: {', '.join(sorted(known))})")
    dataset = doc.get("dataset")
    if not dataset:
        raise KdbenchError(f"{where}: 'dataset' is required")
    reg.entry("datasets", dataset)  # unknown dataset -> one-line error with suggestions
    seeds = tuple(int(s) for s in doc.get("seeds", ()))
    if len(set(seeds)) < MIN_SEEDS:
        raise KdbenchError(f"{where}: needs at least {MIN_SEEDS} distinct seeds, got {list(seeds)}")
    metric = doc.get("metric", "test_top1")
    if metric not in METRICS:
        raise KdbenchError(f"{where}: metric must be one of {', '.join(METRICS)}, got {metric!r}")

    recipe = doc.get("recipe", {})
    if isinstance(recipe, str):
        recipe = {"name": recipe}
    recipe = dict(recipe)
    recipe_name = recipe.pop("name", None)
    if "milestones" in recipe:
        recipe["milestones"] = tuple(int(m) for m in recipe["milestones"])

    methods = _methods(doc.get("methods", ["all"]), reg, where)
    raw_pairs = doc.get("pairs")
    if not raw_pairs:
        ds = reg.entry("datasets", dataset).obj
        raw_pairs = [{"teacher": ds.default_teacher, "student": ds.default_student}]
    pairs = []
    for p in raw_pairs:
        extra = sorted(set(p) - {"teacher", "student", "teacher_checkpoint", "teacher_sha256"})
        if extra or "teacher" not in p or "student" not in p:
            raise KdbenchError(f"{where}: a pair needs teacher and student (and optionally "
                               f"teacher_checkpoint + teacher_sha256), got {p}")
        reg.entry("models", p["teacher"])
        reg.entry("models", p["student"])
        ckpt = p.get("teacher_checkpoint")
        if ckpt and not p.get("teacher_sha256"):
            raise KdbenchError(f"{where}: teacher_checkpoint {ckpt!r} needs its teacher_sha256")
        if ckpt and not Path(ckpt).is_absolute():
            ckpt = str((path.parent / ckpt).resolve())
        pairs.append(Pair(p["teacher"], p["student"], ckpt, (p.get("teacher_sha256") or "").lower() or None))
    if len({p.label for p in pairs}) != len(pairs):
        raise KdbenchError(f"{where}: a pair is listed twice")
    suite = Suite(
        name=doc.get("name", path.stem), path=path, dataset=dataset, pairs=tuple(pairs),
        methods=tuple(methods), seeds=seeds, teacher_seed=int(doc.get("teacher_seed", 0)),
        metric=metric, recipe_name=recipe_name, recipe_overrides=recipe,
        description=doc.get("description", ""),
        published={k: {m: float(v) for m, v in t.items()} for k, t in doc.get("published", {}).items()},
        published_note=doc.get("published_note", ""),
    )
    suite.recipe_for(pairs[0].student)  # a bad recipe name or field fails here, not mid-suite
    return suite


def _methods(raw, reg, where) -> list[MethodSpec]:
    out: list[MethodSpec] = []
    for item in raw:
        if item == "all":
            out += [MethodSpec(n) for n, e in sorted(reg.methods.items())
                    if e.source.startswith(BUILTIN_SOURCE_PREFIX)]
            continue
        if isinstance(item, str):
            item = {"name": item}
        extra = sorted(set(item) - {"name", "params", "tune_trials"})
        if extra or "name" not in item:
            raise KdbenchError(f"{where}: a method entry has name, params, tune_trials; got {item}")
        reg.entry("methods", item["name"])
        out.append(MethodSpec(item["name"], dict(item.get("params", {})), int(item.get("tune_trials", 0))))
    seen = {}
    for m in out:  # the last entry of a method wins ("all" then a specific entry overrides it)
        seen[m.name] = m
    if not seen:
        raise KdbenchError(f"{where}: no methods")
    # vanilla first: the runner computes Δ vs vanilla from finished vanilla runs
    return sorted(seen.values(), key=lambda m: (m.name != "vanilla", m.name))


# --------------------------------------------------------------------------- planning


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(pair: Pair) -> str:
    """The checkpoint's teacher id (as the runner computes it) after checking its sha256."""
    if not Path(pair.checkpoint).is_file():
        raise KdbenchError(f"teacher checkpoint {pair.checkpoint!r} does not exist")
    sha = file_sha256(pair.checkpoint)
    if not sha.startswith(pair.sha256) or len(pair.sha256) < 16:
        raise KdbenchError(f"teacher checkpoint {pair.checkpoint!r} has sha256 {sha}, the leaderboard "
                           f"expects {pair.sha256} (at least 16 hex digits)")
    return "ckpt:" + sha[:16]


def study_name(suite: Suite, pair: Pair, method: MethodSpec) -> str:
    return f"{suite.name}-{pair.label}-{method.name}"


def tuned_params(suite: Suite, pair: Pair, method: MethodSpec, uri: str | None) -> dict | None:
    """The best hyperparameters of the method's tuning study for this pair, or None (no study yet)."""
    if not method.tune_trials or uri is None:
        return None
    from kdbench.workflows.tune import best_params

    try:
        return best_params(study_name(suite, pair, method), None, uri)["hparams"]
    except KdbenchError:
        return None


def tune_methods(suite: Suite, uri: str, echo: Callable[[str], None] = lambda s: None) -> None:
    """Run (or resume) the tuning study of every method with ``tune_trials`` for every pair."""
    from kdbench.workflows.tune import TuneConfig, run_study

    for pair in suite.pairs:
        recipe = suite.recipe_for(pair.student)
        for method in (m for m in suite.methods if m.tune_trials):
            echo(f"tuning {method.name} for {pair.label}: {method.tune_trials} trials on validation")
            run_study(TuneConfig(
                method=method.name, dataset=suite.dataset, teacher=pair.teacher, students=(pair.student,),
                trials=method.tune_trials, recipe=dict(recipe), study=study_name(suite, pair, method),
                retrain=False, teacher_checkpoint=pair.checkpoint, tracking_uri=uri,
            ), echo=lambda line: None)


def plan_cells(suite: Suite, reg=None, uri: str | None = None) -> list[Cell]:
    """Every (pair, method, seed) cell with its config hash, vanilla cells first. With the
    tracking ``uri``, methods to be tuned take their study's best parameters."""
    if reg is None:
        from kdbench.core import plugins

        reg = plugins.registry()
    cells = []
    for pair in suite.pairs:
        ckpt_id, ckpt_error = None, None
        if pair.checkpoint:
            try:
                ckpt_id = verify_checkpoint(pair)
            except KdbenchError as exc:
                ckpt_error = str(exc)
        recipe = suite.recipe_for(pair.student)
        for method in suite.methods:
            tuned = tuned_params(suite, pair, method, uri)
            for seed in suite.seeds:
                tags = {"leaderboard": suite.name, "leaderboard_cell": f"{pair.label}/{method.name}/s{seed}",
                        "leaderboard_pair": pair.label}
                if method.tune_trials:
                    tags.update(tune_trials=str(method.tune_trials), tuned=str(tuned is not None).lower())
                    if tuned is not None:
                        tags["study"] = study_name(suite, pair, method)
                config = RunConfig(
                    method=method.name, dataset=suite.dataset, teacher=pair.teacher, student=pair.student,
                    hparams={**(tuned or {}), **method.params}, recipe=dict(recipe), seed=seed,
                    teacher_seed=suite.teacher_seed, teacher_checkpoint=pair.checkpoint, tags=tags,
                )
                try:
                    plan = make_plan(config, reg)
                except KdbenchError as exc:
                    cells.append(Cell(pair, method, seed, config, None, None, str(exc)))
                    continue
                if plan.teacher is None:
                    tid = None
                elif pair.checkpoint:
                    if ckpt_error:
                        cells.append(Cell(pair, method, seed, config, None, None, ckpt_error))
                        continue
                    tid = ckpt_id
                else:
                    tid = plan.teacher_key()
                cells.append(Cell(pair, method, seed, config, plan.config_hash(tid), tid))
    cells.sort(key=lambda c: (c.method.name != "vanilla",))  # stable: vanilla first, order kept
    return cells


def finished_hashes(tracker, suite: Suite) -> dict[str, str]:
    """config_hash -> run id of FINISHED student runs in the suite's dataset experiment."""
    runs = tracker.search(suite.dataset, "attributes.status = 'FINISHED' AND tags.role = 'student'")
    out = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        h = r.data.tags.get("config_hash")
        if h:
            out[h] = r.info.run_id
    return out


def pending(cells: list[Cell], done: dict[str, str]) -> list[Cell]:
    return [c for c in cells if c.config_hash is None or c.config_hash not in done]


# --------------------------------------------------------------------------- running


@dataclass
class CellResult:
    cell_key: str
    ok: bool
    run_id: str | None = None
    top1: float | None = None
    reason: str | None = None
    seconds: float = 0.0


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
    tags = {**cell.config.tags, "role": "student", "method": cell.method.name, "student": cell.pair.student,
            "teacher": cell.pair.teacher, "dataset": cell.config.dataset, "seed": cell.seed}
    if cell.config_hash:
        tags["config_hash"] = cell.config_hash
    run_id = tracker.start(cell.config.dataset, f"{cell.method.name}-{cell.pair.student}-s{cell.seed}", tags, {})
    tracker.finish(run_id, "FAILED", reason)
    return run_id


def run_cell(cell: Cell, uri: str, threads: int | None = None) -> CellResult:
    """Run one cell (in this process); failures are recorded, never raised (except Ctrl-C)."""
    from kdbench.workflows import run as runner
    from kdbench.workflows.tracking import Tracker

    if threads:
        import torch

        torch.set_num_threads(threads)
    tracker = Tracker(uri)
    t0 = time.time()
    try:
        if cell.plan_error:
            raise KdbenchError(cell.plan_error)
        outcome = runner.run(cell.config, tracker)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a failing cell must not stop the suite
        reason = f"{type(exc).__name__}: {exc}".strip()
        run_id = _record_failure(tracker, cell, reason, t0)
        return CellResult(cell.key, False, run_id, None, reason, time.time() - t0)
    return CellResult(cell.key, True, outcome.run_id, outcome.metrics.get("test_top1"), None, time.time() - t0)


def prepare_teachers(cells: list[Cell], uri: str, echo=lambda s: None) -> dict[str, str]:
    """Train (or load) each distinct teacher once, before fanning out; returns failures by id."""
    from kdbench.core import engine, plugins
    from kdbench.workflows import run as runner
    from kdbench.workflows.tracking import Tracker

    tracker = Tracker(uri)
    failures, seen = {}, set()
    for cell in cells:
        if cell.teacher_id is None or cell.teacher_id in seen or cell.plan_error:
            continue
        seen.add(cell.teacher_id)
        plan = make_plan(cell.config, plugins.registry())
        echo(f"teacher {cell.pair.teacher} ({cell.teacher_id}) ...")
        try:
            runner.obtain_teacher(plan, engine.select_device(cell.config.device), tracker, lambda e: None)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - its cells fail with the reason, others go on
            failures[cell.teacher_id] = f"teacher failed: {type(exc).__name__}: {exc}"
            echo(f"  failed: {failures[cell.teacher_id]}")
    return failures


def run_suite(
    suite: Suite,
    uri: str,
    jobs: int = 1,
    echo: Callable[[str], None] = lambda s: None,
    cells: list[Cell] | None = None,
) -> list[CellResult]:
    """Run the suite's pending cells; return one result per cell run (failures included)."""
    from kdbench.workflows.tracking import Tracker

    tracker = Tracker(uri)
    if any(m.tune_trials for m in suite.methods):
        tune_methods(suite, uri, echo)
        cells = None  # the tuned parameters change the cells
    cells = plan_cells(suite, uri=uri) if cells is None else cells
    todo = pending(cells, finished_hashes(tracker, suite))
    echo(f"{suite.name}: {len(cells)} cells, {len(cells) - len(todo)} already finished, {len(todo)} to run"
         f" (jobs={jobs})")
    if not todo:
        return []
    teacher_failures = prepare_teachers(todo, uri, echo)
    results: list[CellResult] = []
    runnable = []
    for cell in todo:
        if cell.teacher_id in teacher_failures:
            cell = replace(cell, plan_error=teacher_failures[cell.teacher_id])
        runnable.append(cell)

    def report(res: CellResult):
        results.append(res)
        state = f"{100 * res.top1:.2f} %" if res.ok and res.top1 is not None else f"FAILED: {res.reason}"
        echo(f"[{len(results)}/{len(runnable)}] {res.cell_key}  {state}  ({res.seconds:.0f} s)")

    if jobs <= 1:
        for cell in runnable:
            report(run_cell(cell, uri))
        return results
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // jobs)
    # spawn, not fork: forking after torch has trained the teacher (OpenMP threads) can deadlock
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        # vanilla cells first and alone: the others' Δ vs vanilla needs finished vanilla runs
        for group in ([c for c in runnable if c.method.name == "vanilla"],
                      [c for c in runnable if c.method.name != "vanilla"]):
            futures = {pool.submit(run_cell, c, uri, threads): c for c in group}
            for fut in as_completed(futures):
                try:
                    report(fut.result())
                except Exception as exc:  # noqa: BLE001 - a worker died: record and go on
                    cell = futures[fut]
                    reason = f"{type(exc).__name__}: {exc}"
                    report(CellResult(cell.key, False, _record_failure(tracker, cell, reason, 0), None, reason))
    return results


# --------------------------------------------------------------------------- rendering


def suite_runs(tracker, suite: Suite) -> list:
    """The suite's FINISHED student runs: those whose config hash is one of its cells'."""
    hashes = {c.config_hash for c in plan_cells(suite, uri=tracker.uri) if c.config_hash}
    runs = tracker.search(suite.dataset, "attributes.status = 'FINISHED' AND tags.role = 'student'")
    return [r for r in runs if r.data.tags.get("config_hash") in hashes]


def histories(tracker, run_ids, key: str = "val_top1") -> dict[str, list[tuple[int, float]]]:
    out = {}
    for run_id in run_ids:
        out[run_id] = [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, key)]
    return out


def log_summary(tracker, suite: Suite, images: dict[str, bytes], documents: dict[str, str]) -> str:
    """Log the figures and rendered documents on the suite's summary run (role=summary,
    leaderboard=NAME; one per leaderboard, reused and overwritten on every render)."""
    import tempfile

    found = tracker.search(suite.dataset, f"tags.role = 'summary' AND tags.leaderboard = '{suite.name}'", 1)
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = tracker.start(suite.dataset, f"leaderboard-{suite.name}",
                               {"role": "summary", "leaderboard": suite.name, "dataset": suite.dataset}, {})
        tracker.finish(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in images.items():
            (Path(tmp) / name).write_bytes(data)
        for name, text in documents.items():
            (Path(tmp) / name).write_text(text)
        tracker.client.log_artifacts(run_id, tmp, artifact_path="leaderboard")
    return run_id
