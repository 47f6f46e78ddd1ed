"""Damaged cache files and checkpoints: named, set aside and rebuilt, in one line, never with
advice to unpickle untrusted data (issue 15, items 10 and 12)."""
import logging
import os
import subprocess
import sys

import numpy as np
import torch

from kdbench.core import engine, plugins
from kdbench.core.plan import RunConfig, make_plan
from kdbench.data import cache_dir
from kdbench.workflows import teachers
from kdbench.workflows.tracking import Tracker


def test_damaged_teacher_cache_is_set_aside(env, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "own-cache"))
    plan = make_plan(RunConfig(recipe={"epochs": 1}), plugins.registry())
    path = teachers.teacher_cache_path(plan.teacher_key())
    path.parent.mkdir(parents=True)
    path.write_bytes(os.urandom(500))
    with caplog.at_level(logging.WARNING, logger="kdbench"):
        got = teachers.cached_teacher(plan, torch.device("cpu"), Tracker(f"sqlite:///{env}/mlflow.db"))
    assert got is None  # the caller trains the teacher again
    assert not path.exists()
    aside = list(path.parent.glob(path.name + ".damaged-*"))
    assert len(aside) == 1 and aside[0].stat().st_size == 500
    [record] = [r for r in caplog.records if r.name == "kdbench"]
    line = record.getMessage()
    assert str(path) in line and "trained again" in line and "\n" not in line and "weights_only" not in line


def test_teacher_cache_of_another_net_is_set_aside(env, monkeypatch, tmp_path):
    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "own-cache"))
    plan = make_plan(RunConfig(recipe={"epochs": 1}), plugins.registry())
    path = teachers.teacher_cache_path(plan.teacher_key())
    path.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.zeros(3)}}, path)
    assert teachers.cached_teacher(plan, torch.device("cpu"), Tracker(f"sqlite:///{env}/mlflow.db")) is None
    assert not path.exists()


def test_damaged_dataset_cache_is_regenerated(env, monkeypatch, tmp_path, caplog):
    from kdbench_builtin.datasets import mnist1d

    monkeypatch.setenv("KDBENCH_CACHE_DIR", str(tmp_path / "own-cache"))
    good = mnist1d.load("val")
    path = cache_dir() / "data" / f"{mnist1d.GENERATOR_VERSION}.npz"
    path.write_bytes(path.read_bytes()[:300])  # truncated
    with caplog.at_level(logging.WARNING, logger="kdbench"):
        again = mnist1d.load("val")
    assert torch.equal(again[0], good[0]) and torch.equal(again[1], good[1])
    assert len(list(path.parent.glob(path.name + ".damaged-*"))) == 1
    assert any(str(path) in r.getMessage() and "generated again" in r.getMessage() for r in caplog.records)
    with np.load(path) as blob:
        assert set(blob.files) == {"x", "y", "x_test", "y_test"}


def test_corrupt_checkpoint_is_one_line_without_unsafe_advice(env):
    (env / "bad.pt").write_bytes(os.urandom(400))
    torch.save({"model": {"w": torch.zeros(1)}}, env / "ok.pt")
    (env / "cut.pt").write_bytes((env / "ok.pt").read_bytes()[:200])
    for name in ("bad.pt", "cut.pt"):
        proc = subprocess.run([sys.executable, "-m", "kdbench", "run", "--epochs", "1", "--teacher-checkpoint", name],
                              cwd=env, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert name in lines[0] and "could not be read" in lines[0] and "weights_only" not in lines[0]
    assert engine  # the checkpoint reader lives in the engine
