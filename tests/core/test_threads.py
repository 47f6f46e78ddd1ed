"""Threads per training process: a fair share of the cores that follows other processes."""
import os
import subprocess
import sys

import pytest
import torch

from kdbench.core import threads
from kdbench.errors import KdbenchError


@pytest.fixture
def four_cores(env, monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 4)
    monkeypatch.delenv(threads.ENV, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _other_process():
    """A live process registered as training (as another `kdbench run` would be)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (threads.registry() / str(proc.pid)).touch()
    return proc


def test_fair_share_follows_processes_that_start_and_end(four_cores):
    share = threads.take_share()
    assert share.threads == 4 and torch.get_num_threads() == 4  # alone: every core
    others = [_other_process(), _other_process()]
    try:
        assert threads.rebalance(share) == 1 and torch.get_num_threads() == 1  # 3 processes on 4 cores
        others[0].kill()
        others[0].wait()
        assert threads.rebalance(share) == 2  # the dead one no longer counts: 2 processes on 4 cores
    finally:
        for proc in others:
            proc.kill()
            proc.wait()
    # the killed processes' entries are stale: ignored and removed
    assert threads.rebalance(share) == 4 and torch.get_num_threads() == 4
    assert sorted(p.name for p in threads.registry().iterdir()) == [str(os.getpid())]
    threads.release(share)
    assert not share.entry.exists()


def test_explicit_threads_are_kept_and_capped(four_cores, monkeypatch):
    other = _other_process()
    try:
        share = threads.take_share(3)
        assert share.threads == 3 and threads.rebalance(share) == 3  # not re-shared
        assert threads.take_share(16).threads == 4  # never more threads than cores
        monkeypatch.setenv(threads.ENV, "2")
        assert threads.take_share().threads == 2
    finally:
        other.kill()
        other.wait()


def test_bad_thread_counts_are_one_line_errors(four_cores, monkeypatch):
    with pytest.raises(KdbenchError, match="--threads must be at least 1, got 0"):
        threads.take_share(0)
    monkeypatch.setenv(threads.ENV, "many")
    with pytest.raises(KdbenchError, match="KDBENCH_THREADS='many' is not a whole number"):
        threads.take_share()


def test_run_and_tune_take_the_threads_option(env):
    from click.testing import CliRunner

    from kdbench.cli import main

    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(main, ["run", "--method", "vanilla", "--epochs", "1", "--threads", "1"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
        bad = CliRunner().invoke(main, ["tune", "--method", "kd", "--trials", "1", "--threads", "0"])
        assert bad.exit_code == 1 and "--threads must be at least 1, got 0" in bad.output
    finally:
        torch.set_num_threads(before)
