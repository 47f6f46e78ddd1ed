"""SIGTERM — what ``kill``, systemd, Slurm, docker stop and Ray send — with real processes, handled
as Ctrl-C (:func:`kdbench.workflows.interrupts.sigterm_as_ctrl_c`): exit status 143 (128 + 15), one
line on stderr (no traceback), the interrupted MLflow runs KILLED (never left RUNNING), no process
left. The signal goes to the command's process alone, as ``kill PID`` and docker stop send it (its
workers hear of it only from kdbench), or to its whole process group, as systemd and Slurm send it
(each worker gets it too). Processes, stores and polling are test_ctrl_c's.
"""
import signal
import subprocess

from reliability import test_ctrl_c
from reliability.test_ctrl_c import start, statuses, stop, tag, training, wait_for, write_suite

cc = test_ctrl_c.cc  # the fixture: a working directory with a teacher checkpoint t.pt


def sigterm(proc: subprocess.Popen, to_group: bool = False) -> tuple[int, str, set[int]]:
    """SIGTERM to the command's process only (or to its whole group); then (exit status, stderr,
    processes of its group still alive ``GRACE`` s after it exited, killed here)."""
    code, _out, err, left = stop(proc, signal.SIGTERM, to_group=to_group)
    return code, err, left


def assert_one_line_sigterm(code: int, err: str) -> None:
    assert code == 143, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted by SIGTERM; the run is marked KILLED in MLflow", err


def test_sigterm_during_kdbench_run(cc):
    """`kdbench run --method kd` sent SIGTERM mid-training (it used to die with -15, its run left
    RUNNING): 143, one line, its run KILLED with the Ctrl-C path's failure_reason, no process left."""
    proc = start("run", "--method", "kd", "--epochs", 60, "--teacher-checkpoint", "t.pt", cwd=cc)
    [run_id] = wait_for("the student training", lambda: training(cc, role="student"), proc)
    code, err, left = sigterm(proc)
    assert_one_line_sigterm(code, err)
    assert left == set(), f"left behind: {left}"
    assert statuses(cc, role="student") == {run_id: "KILLED"}
    assert tag(cc, run_id, "failure_reason") == "KeyboardInterrupt: SIGTERM"
    assert "RUNNING" not in statuses(cc).values()


def test_sigterm_during_bench_with_workers(cc):
    """`kdbench bench --jobs 2` sent SIGTERM while cells train in its workers: the workers stop as
    on Ctrl-C (kdbench passes them the Ctrl-C), 143, one line, the runs in flight KILLED, no worker
    left."""
    write_suite(cc, '{name = "kd", params = {T = 2.0}}', epochs=30)
    proc = start("bench", "cc.toml", "--jobs", 2, cwd=cc)
    wait_for("a cell training", lambda: training(cc, role="student", leaderboard="cc"), proc)
    code, err, left = sigterm(proc)
    assert_one_line_sigterm(code, err)
    assert left == set(), f"left behind: {left}"
    ended = statuses(cc, role="student", leaderboard="cc")
    assert "KILLED" in ended.values() and set(ended.values()) <= {"FINISHED", "KILLED"}, ended
    assert all(tag(cc, run_id, "failure_reason").startswith("KeyboardInterrupt")
               for run_id, status in ended.items() if status == "KILLED")
    assert "RUNNING" not in statuses(cc).values()


def test_sigterm_to_the_whole_group_leaves_no_run_running(cc):
    """SIGTERM to the process group (systemd, Slurm, `kill -TERM -PGID`): each worker gets it
    directly, before kdbench can pass on a Ctrl-C, and ends its run in flight KILLED itself (it was
    left RUNNING until a later command found the worker gone); the command still exits 143."""
    write_suite(cc, '{name = "kd", params = {T = 2.0}}', epochs=30)
    proc = start("bench", "cc.toml", "--jobs", 2, cwd=cc)
    wait_for("a cell training", lambda: training(cc, role="student", leaderboard="cc"), proc)
    code, err, left = sigterm(proc, to_group=True)
    assert code == 143, err
    assert left == set(), f"left behind: {left}"
    ended = statuses(cc, role="student", leaderboard="cc")  # read without any kdbench command first
    assert "KILLED" in ended.values() and "RUNNING" not in ended.values(), (ended, err)
