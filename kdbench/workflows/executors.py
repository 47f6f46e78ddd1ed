"""Two small ways to run a suite's jobs (teachers and cells): processes on this machine, or Ray tasks.

What runs is decided elsewhere (:mod:`.bench`: planning, resumption, failure recording); an executor
gets a list of :class:`Job` — a picklable function, its arguments and the keys of the jobs it needs —
and reports each job's return value (``on_done``) or, when the process running it was lost for good,
why (``on_lost``). A job's function receives the results of the jobs it needs as extra arguments.

* ``local`` (the default, no Ray needed): jobs run level by level (a level's jobs need only earlier
  levels) in ``jobs`` spawned worker processes, or in this process for ``jobs=1``. On a machine with
  GPUs each worker is pinned to one GPU by ``CUDA_VISIBLE_DEVICES``, round-robin over the visible
  GPUs, at most ``runs_per_gpu`` workers per GPU. A worker that dies takes the pool's other jobs
  in flight with it (Python's process pool): they are re-run in a new pool, and the job whose
  worker died is charged one of its ``max_retries``.
* ``ray``: each job is a Ray task; needs are Ray task dependencies (a cell starts when its teacher's
  task has returned, no polling). A GPU job asks for ``1/runs_per_gpu`` of a GPU, a CPU job for one
  CPU; Ray places them. A task whose worker process or node dies is re-run by Ray (``max_retries``);
  the lost attempt's MLflow run is ended KILLED by the claim's liveness check (:mod:`.claims`).

Ray is imported only inside the functions that use it (``pip install 'kdbench[ray]'``).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError
from kdbench.workflows import interrupts

EXECUTORS = ("local", "ray")
#: runs packed on one GPU. 1: with captured steps (the default on CUDA) one run keeps the GPU busy —
#: measured on an H200 (r32x4 → r8x4 KD, batch 64, graphs): K=2 1.03x and K=4 1.02x the samples/s
#: of K=1. Packing pays for eager runs only (H200: K=2 1.77x; H100, earlier: K=4 3.35x), and one
#: captured run (26,600 samples/s) still does 3.5x what two packed eager runs do (7,600).
DEFAULT_RUNS_PER_GPU = 1
#: Ray re-runs a task whose worker died this many times (deterministic failures are not retried:
#: a cell records its own failure and returns)
MAX_RETRIES = 3
#: environment variables a Ray worker gets from the driver (plugin selection, heartbeat, baseline)
FORWARDED_ENV = ("KDBENCH_PLUGINS", "KDBENCH_DISABLE", "KDBENCH_HEARTBEAT_SECONDS", "KDBENCH_BASELINE")


class ExecutorError(KdbenchError):
    """A usage error of the executor options (exit status 2): nothing has been recorded yet."""


@dataclass(frozen=True, kw_only=True)
class ExecutorConfig:
    kind: str = "local"
    jobs: int = 1  # local: worker processes
    ray_address: str | None = None  # ray: None = $RAY_ADDRESS, else a local Ray instance
    runs_per_gpu: int = DEFAULT_RUNS_PER_GPU
    max_retries: int = MAX_RETRIES


@dataclass(frozen=True, kw_only=True)
class Job:
    key: str
    fn: Callable
    args: tuple = ()
    needs: tuple[str, ...] = ()  # keys of jobs whose results are appended to ``args``
    payload: Any = None  # what the caller wants back in on_done/on_lost (e.g. the cell)


@dataclass(frozen=True, kw_only=True)
class Progress:
    """Where the whole run stands: jobs done (failed included), running, failed, left, ETA."""
    done: int
    running: int
    failed: int
    left: int
    eta_seconds: float | None


@dataclass(frozen=True, kw_only=True)
class ClusterInfo:
    """The Ray cluster the jobs run on."""
    address: str
    nodes: int
    cpus: float
    gpus: float
    dashboard_url: str | None


def check_config(config: ExecutorConfig) -> None:
    """Refuse bad executor options in one line before anything runs."""
    if config.kind not in EXECUTORS:
        raise ExecutorError(f"unknown --executor {config.kind!r}; choose one of: {', '.join(EXECUTORS)}")
    if config.runs_per_gpu < 1:
        raise ExecutorError(f"--runs-per-gpu must be at least 1, got {config.runs_per_gpu}")
    if config.jobs < 1:
        raise ExecutorError(f"--jobs must be at least 1, got {config.jobs}")


def levels(jobs: list[Job]) -> list[list[Job]]:
    """The jobs in dependency levels: a job's needs are all in earlier levels (order kept)."""
    level_of: dict[str, int] = {}
    remaining = list(jobs)
    while remaining:
        ready = [job for job in remaining if all(need in level_of for need in job.needs)]
        if not ready:
            raise ValueError(f"jobs with unknown or cyclic needs: {[job.key for job in remaining]}")
        for job in ready:
            level_of[job.key] = 1 + max((level_of[need] for need in job.needs), default=-1)
        remaining = [job for job in remaining if job.key not in level_of]
    out: list[list[Job]] = [[] for _ in range(1 + max(level_of.values(), default=-1))]
    for job in jobs:
        out[level_of[job.key]].append(job)
    return out


def eta(started: float, done: int, left: int) -> float | None:
    """Seconds to go at the rate observed so far (which includes the parallelism)."""
    if not done or not left:
        return None if left else 0.0
    return (time.time() - started) / done * left


# --------------------------------------------------------------------------- local processes


def visible_gpus() -> list[str]:
    """The GPUs this machine lets us use: ``$CUDA_VISIBLE_DEVICES`` when set, else all of torch's."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def gpu_slots(gpus: list[str], workers: int, runs_per_gpu: int) -> list[str | None]:
    """The GPU of each local worker: round-robin over ``gpus``, at most ``runs_per_gpu`` per GPU
    (so at most ``len(gpus) * runs_per_gpu`` workers); all None without GPUs."""
    if not gpus:
        return [None] * workers
    return [gpus[i % len(gpus)] for i in range(min(workers, len(gpus) * runs_per_gpu))]


#: in a local worker: Ctrl-C was pressed (it runs no further job) / a job is running / the job
#: was sent its KeyboardInterrupt
_interrupted = False
_in_job = False
_delivered = False
_started = None  # a local worker's queue of (job key, pid): which worker runs which job


def _on_ctrl_c(signum, frame) -> None:
    """A local worker's SIGINT handler. Ctrl-C in a terminal reaches every process of the group:
    the job running here is interrupted (once: its run is being ended KILLED, which a second Ctrl-C
    must not cut short), an idle worker just stops taking jobs (Python's default would end it with
    a KeyboardInterrupt traceback); the parent cancels what is left and shuts the pool down."""
    global _interrupted, _delivered
    _interrupted = True
    if _in_job and not _delivered:
        _delivered = True
        raise KeyboardInterrupt


def _rearm() -> None:
    """The job's KeyboardInterrupt was raised inside a finalizer, which swallowed it: it is
    delivered again (:func:`interrupts.keep_ctrl_c`), so :func:`_on_ctrl_c` raises it once more."""
    global _delivered
    _delivered = False


def _run_job(key: str, fn: Callable, *args):
    """A job in a local worker: none starts after Ctrl-C (those already queued for this worker).
    Says which worker runs it (:func:`_charged`)."""
    global _in_job
    if _started is not None:
        _started.put((key, os.getpid()))
    if _interrupted:
        raise KeyboardInterrupt
    _in_job = True
    try:
        return fn(*args)
    finally:
        _in_job = False
        if _terminated:  # SIGTERM during the job: its run has been ended by now (_on_sigterm)
            _die_of_sigterm()


@contextlib.contextmanager
def _ctrl_c_held():
    """Hold off Ctrl-C while this thread starts a worker: the worker begins with SIGINT blocked
    (the mask is inherited) until :func:`_local_worker_init` has set its handler, so a Ctrl-C during
    its start-up is handled, not a traceback; and this process finishes handing the worker its
    start-up data (a KeyboardInterrupt half-way left it a truncated pipe and an EOFError
    traceback), then raises the KeyboardInterrupt."""
    import threading

    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield  # Windows, or not the main thread (which alone gets KeyboardInterrupt)
        return
    with interrupts.held():  # a Ctrl-C while the mask is lifted again is handled at the end
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _local_worker_init(parent_pid: int, slots, threads: int, started=None) -> None:
    """In each local worker: take a GPU slot (``CUDA_VISIBLE_DEVICES``, before CUDA starts), set
    the threads, handle Ctrl-C (:func:`_on_ctrl_c`) and SIGTERM (:func:`_on_sigterm`), and die with the parent (a thread marks this
    worker's runs KILLED first). ``started``: where each job says which worker runs it."""
    import threading

    global _started
    _started = started
    signal.signal(signal.SIGINT, _on_ctrl_c)
    interrupts.keep_ctrl_c(_rearm)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by _ctrl_c_held
    gpu = slots.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    os.environ["OMP_NUM_THREADS"] = str(threads)

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                _end_own_runs("the kdbench bench process died")
                os._exit(1)

    threading.Thread(target=watch, name="kdbench-parent-watch", daemon=True).start()
    signal.signal(signal.SIGTERM, _on_sigterm)


def _end_own_runs(reason: str) -> None:
    """This worker's runs ended KILLED, from a thread given at most 5 s (a store that hangs must not
    keep a dying worker alive)."""
    import threading

    from kdbench.workflows import claims

    done = threading.Event()
    threading.Thread(target=lambda: (claims.end_owned_runs(reason), done.set()), daemon=True).start()
    done.wait(5)


#: seconds a worker stopped by SIGTERM gives its job to unwind before it ends its runs and dies anyway
SIGTERM_GRACE = 20.0
_terminated = False  # in a local worker: SIGTERM came during a job, which is unwinding


def _on_sigterm(signum, frame) -> None:
    """A local worker's SIGTERM handler: SIGTERM reaches a worker when its pool breaks (Python ends
    the other workers so) or when the whole process group is stopped (systemd, Slurm, ``kill
    -TERM -PGID``). Its run in flight must end KILLED (it stayed RUNNING until a later command found
    its process gone). The job is interrupted as by Ctrl-C, so its own error path ends the run in
    this thread — ending it from another thread could wait, to its time limit, for a store lock
    (SQLite's) that this thread held when the signal came — and the worker then dies of SIGTERM
    (:func:`_run_job`), its exit status -SIGTERM, which :func:`_charged` reads. More SIGTERMs while
    the job unwinds (the pool ending its workers once another has died) change nothing. An idle
    worker dies at once; a job that does not unwind in :data:`SIGTERM_GRACE` s is cut short."""
    import threading

    global _terminated, _interrupted, _delivered
    if not _in_job:
        _die_of_sigterm()
    if _terminated:
        return
    _terminated = _interrupted = True

    def cut_short():
        time.sleep(SIGTERM_GRACE)
        _end_own_runs("the worker was stopped (SIGTERM)")
        os.kill(os.getpid(), signal.SIGKILL)  # this thread cannot restore SIGTERM's default action

    threading.Thread(target=cut_short, name="kdbench-sigterm", daemon=True).start()
    if not _delivered:  # else a Ctrl-C already interrupted the job
        _delivered = True
        raise KeyboardInterrupt


def _die_of_sigterm() -> None:
    """In the worker's main thread: end its runs still open KILLED, then die of SIGTERM."""
    _end_own_runs("the worker was stopped (SIGTERM)")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _charged(broken: list[Job], processes: dict, job_starts) -> list[Job]:
    """The jobs of a broken pool charged a retry: the one whose worker died of itself — Python
    ends the pool's other workers with SIGTERM — when that can be told, else every job in flight
    (the pool does not say whose worker died; each break still charges at least one job, so a job
    that kills its worker every time cannot keep the others going round for ever)."""
    worker_of = {}
    while not job_starts.empty():
        key, pid = job_starts.get()
        worker_of[key] = pid
    died = {pid for pid, proc in processes.items() if proc.exitcode not in (None, -signal.SIGTERM)}
    culprits = [job for job in broken if worker_of.get(job.key) in died]
    return culprits or broken


def run_local(jobs: list[Job], config: ExecutorConfig, on_done: Callable, on_lost: Callable,
              on_progress: Callable = lambda progress: None) -> None:
    """Run the jobs level by level: in this process (``jobs=1``) or in worker processes."""
    import multiprocessing as mp

    results: dict[str, Any] = {}
    started, state = time.time(), {"done": 0, "failed": 0}
    total = len(jobs)

    def finish(job: Job, result=None, lost: str | None = None) -> None:
        state["done"] += 1
        if lost is None:
            results[job.key] = result
            state["failed"] += int(getattr(result, "ok", True) is False)
            on_done(job, result)
        else:
            state["failed"] += 1
            results[job.key] = on_lost(job, lost)
        left = total - state["done"]
        on_progress(Progress(done=state["done"], running=0, failed=state["failed"], left=left,
                             eta_seconds=eta(started, state["done"], left)))

    if config.jobs <= 1:
        for level in levels(jobs):
            for job in level:
                finish(job, job.fn(*job.args, *(results[need] for need in job.needs)))
        return
    slots_list = gpu_slots(visible_gpus(), config.jobs, config.runs_per_gpu)
    workers = len(slots_list)
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")  # not fork: forking after torch has run (OpenMP threads) can deadlock

    def new_pool() -> tuple[ProcessPoolExecutor, Any]:
        slots = ctx.Queue()  # each worker takes its GPU slot from here: a fresh queue per pool
        for gpu in slots_list:
            slots.put(gpu)
        job_starts = ctx.SimpleQueue()  # (job key, worker pid) as each job starts
        return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_local_worker_init,
                                   initargs=(os.getpid(), slots, threads, job_starts)), job_starts

    # A worker that dies (kill -9, the OOM killer) breaks the whole pool: Python ends the other
    # workers and fails every job in flight with BrokenProcessPool. As Ray does for a lost worker,
    # each such job is run again in a new pool; the one whose worker died is charged a retry
    # (:func:`_charged`) and recorded lost past ``max_retries``; the lost attempts' runs are ended
    # KILLED by the claims' liveness check.
    lost_times: dict[str, int] = {}
    pool, job_starts = new_pool()
    try:
        for level in levels(jobs):
            todo = list(level)
            while todo:
                futures, broken = {}, []
                for job in todo:
                    try:
                        with _ctrl_c_held():  # submit may start a worker
                            future = pool.submit(_run_job, job.key, job.fn, *job.args,
                                                 *(results[need] for need in job.needs))
                        futures[future] = job
                    except BrokenProcessPool as exc:
                        broken.append((job, exc))
                waiting = set(futures)
                while waiting:
                    finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                    for future in finished:
                        try:
                            result = future.result()
                        except BrokenProcessPool as exc:
                            broken.append((futures[future], exc))
                        except Exception as exc:  # noqa: BLE001 - the job could not run: record and go on
                            finish(futures[future], lost=f"{type(exc).__name__}: {exc}")
                        else:
                            finish(futures[future], result)
                todo = []
                if broken:
                    processes = dict(getattr(pool, "_processes", None) or {})  # exit codes once joined
                    pool.shutdown(wait=True, cancel_futures=True)
                    charged = _charged([job for job, _ in broken], processes, job_starts)
                    pool, job_starts = new_pool()
                for job, exc in broken:
                    if any(job is c for c in charged):
                        lost_times[job.key] = lost_times.get(job.key, 0) + 1
                    if lost_times.get(job.key, 0) > config.max_retries:
                        finish(job, lost=f"a worker process died {lost_times[job.key]} times running it "
                                         f"({type(exc).__name__})")
                    else:
                        todo.append(job)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- Ray


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray, which is not installed: "
                            "pip install 'kdbench[ray]' (or pip install ray)") from None
    return ray


def _probe_address(address: str) -> None:
    """Fail in seconds, in one line, when a Ray head at ``host:port`` does not answer."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"Ray address {address!r} is not HOST:PORT (e.g. 10.0.0.1:6379 or ray://10.0.0.1:10001)")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise ExecutorError(f"the Ray cluster at {address} does not answer ({exc.strerror or exc}); start it "
                            "(`ray start --head --port=6379` on the head machine) or pass another "
                            "--ray-address") from None


def connect_ray(address: str | None) -> ClusterInfo:
    """Connect to the Ray cluster at ``address`` (else ``$RAY_ADDRESS``), or start a local one."""
    ray = _import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    if address:
        _probe_address(address)
    if not ray.is_initialized():
        try:
            context = ray.init(address=address or "local", runtime_env={"env_vars": env} if env else None,
                               logging_level="WARNING", log_to_driver=False,
                               **({} if address else {"include_dashboard": False}))
        except ConnectionError as exc:
            raise ExecutorError(f"cannot connect to the Ray cluster at {address}: "
                                f"{(str(exc).strip().splitlines() or [''])[0]}") from None
    else:
        context = None
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    resources = ray.cluster_resources()
    dashboard = getattr(context, "dashboard_url", None) if context is not None else None
    return ClusterInfo(address=address or "local", nodes=len(nodes), cpus=resources.get("CPU", 0.0),
                       gpus=resources.get("GPU", 0.0), dashboard_url=f"http://{dashboard}" if dashboard else None)


def check_workers_reach(uri: str, cluster: ClusterInfo) -> None:
    """With several machines the tracking store must be a server they all reach: refuse a local
    ``sqlite:``/file store, and ask every node to open the store (one line naming the first that
    cannot)."""
    ray = _import_ray()
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if cluster.nodes > 1 and scheme in ("sqlite", "file"):
        raise ExecutorError(
            f"a Ray cluster of {cluster.nodes} machines cannot share the local tracking store {uri}: start a "
            "tracking server (mlflow server --backend-store-uri postgresql://USER:PASS@HOST/DB "
            "--artifacts-destination DIR --host 0.0.0.0 --port 5000) and pass --tracking-uri http://HOST:5000")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_probe_store)
    # keyed by node id: several nodes may share one address (one machine, or one NAT address)
    refs = {f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]})": probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(uri)
        for node in ray.nodes() if node.get("Alive")}
    for where, ref in refs.items():
        try:
            error = ray.get(ref, timeout=120)
        except Exception as exc:  # noqa: BLE001 - the node cannot run a task (no Python env, timeout)
            error = _ray_reason(exc)
        if error:
            raise ExecutorError(f"the Ray workers on {where} cannot use the tracking store: {error}")


def absolute_uri(uri: str | None) -> str | None:
    """A relative ``sqlite:///`` path made absolute: Ray workers run in another working directory."""
    if uri and uri.lower().startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def _probe_store(uri: str) -> str | None:
    from kdbench.workflows.tracking import check_store

    try:
        check_store(uri)
    except KdbenchError as exc:
        return str(exc)
    return None


def _task_options(gpu: bool, config: ExecutorConfig, cluster: ClusterInfo) -> dict:
    """A GPU job takes 1/K of a GPU (K = runs per GPU) when the cluster has GPUs, else one CPU."""
    if gpu and cluster.gpus > 0:
        return {"num_gpus": 1.0 / config.runs_per_gpu, "num_cpus": 1, "max_retries": config.max_retries}
    return {"num_cpus": 1, "max_retries": config.max_retries}


def run_ray(jobs: list[Job], config: ExecutorConfig, cluster: ClusterInfo, on_done: Callable,
            on_lost: Callable, on_progress: Callable = lambda progress: None,
            gpu: Callable[[Job], bool] = lambda job: True) -> None:
    """Submit every job as a Ray task (needs as task dependencies), report them as they end."""
    ray = _import_ray()
    refs: dict[str, Any] = {}
    remote: dict[Callable, Any] = {}  # one Ray function per Python function
    for level in levels(jobs):
        for job in level:
            if job.fn not in remote:
                remote[job.fn] = ray.remote(job.fn)
            task = remote[job.fn].options(**_task_options(gpu(job), config, cluster))
            refs[job.key] = task.remote(*job.args, *(refs[need] for need in job.needs))
    by_ref = {ref: job for job, ref in ((job, refs[job.key]) for job in jobs)}
    waiting, done_keys, failed = list(by_ref), set(), 0
    started = time.time()
    slots = max(1, int(cluster.cpus))
    if cluster.gpus:
        slots = max(1, int(cluster.gpus * config.runs_per_gpu))
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=None)
        for ref in ready:
            job = by_ref[ref]
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - retries used up (worker/node lost) or a need failed
                failed += 1
                on_lost(job, _ray_reason(exc))
            else:
                failed += int(getattr(result, "ok", True) is False)
                on_done(job, result)
            done_keys.add(job.key)
        runnable = [by_ref[ref] for ref in waiting if all(need in done_keys for need in by_ref[ref].needs)]
        left = len(waiting)
        on_progress(Progress(done=len(done_keys), running=min(slots, len(runnable)), failed=failed, left=left,
                             eta_seconds=eta(started, len(done_keys), left)))


def job_threads(config: ExecutorConfig, cluster: ClusterInfo | None) -> int | None:
    """CPU threads of each job's process, so that concurrent jobs do not oversubscribe the cores
    (two default-thread trainings on 2 cores ran 50-100x slower than one): a Ray task has the one
    CPU it asked for; local workers share the cores; one job in this process keeps the default."""
    if config.kind == "ray":
        return 1
    if config.jobs <= 1:
        return None
    workers = len(gpu_slots(visible_gpus(), config.jobs, config.runs_per_gpu))
    return max(1, (os.cpu_count() or 1) // workers)


def in_ray_task() -> bool:
    """Whether this code runs inside a Ray task (not the driver, not a local worker)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().get_task_id() is not None
    except Exception:  # noqa: BLE001 - an older Ray or an odd context: not a task
        return False


def _ray_reason(exc: BaseException) -> str:
    """One line for a failed Ray task: the task's own exception (a RayTaskError carries it as
    ``cause``; its own first line only names the task and the worker's pid)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:1000]


def shutdown_ray() -> None:
    """Disconnect this driver (a local instance started by it stops)."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
