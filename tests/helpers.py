"""Helpers shared by test modules (``tests`` is on the path: ``from helpers import make_dist``)."""
import textwrap
from pathlib import Path


def make_dist(root: Path, name: str, version: str, entry_points: dict, modules: dict) -> Path:
    """A minimal installed distribution (dist-info + modules) under ``root``, as pip would leave it."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    eps = "[kdbench]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(eps)
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))
    return root


SUITE = """
name = "{name}"
dataset = "mnist1d"
seeds = {seeds}
methods = [{methods}]
[recipe]
epochs = {epochs}
[[pairs]]
teacher = "cnn1d_4x32"
student = "cnn1d_2x16"
teacher_checkpoint = "t.pt"
teacher_sha256 = "{sha}"
"""


def teacher_checkpoint(folder: Path) -> str:
    """``t.pt`` in ``folder``: the embedded default teacher, untrained (seed 0; fast to load, nothing
    to train first); its sha256."""
    import hashlib

    import torch

    from kdbench.core import engine, plugins
    from kdbench.core.plan import RunConfig, make_plan

    torch.manual_seed(0)
    net = engine.build_teacher(make_plan(RunConfig(), plugins.registry()), torch.device("cpu"))
    torch.save({"model": net.state_dict()}, folder / "t.pt")
    return hashlib.sha256((folder / "t.pt").read_bytes()).hexdigest()


def checkpoint_suite(folder: Path, name: str, *, methods: str = '"vanilla", {name = "kd", params = {T = 2.0}}',
                     seeds: str = "[0, 1, 2]", epochs: int = 1) -> Path:
    """``NAME.toml`` in ``folder``: a suite of the embedded pair whose teacher is ``t.pt`` there
    (written by :func:`teacher_checkpoint` unless it exists)."""
    import hashlib

    sha = hashlib.sha256((folder / "t.pt").read_bytes()).hexdigest() if (folder / "t.pt").exists() \
        else teacher_checkpoint(folder)
    path = folder / f"{name}.toml"
    path.write_text(SUITE.format(name=name, seeds=seeds, methods=methods, epochs=epochs, sha=sha))
    return path


def job_sleep(seconds: float) -> str:
    """A local-executor job (importable by spawned workers): sleeps, then returns ``"done"``."""
    import time

    time.sleep(seconds)
    return "done"


def job_kill_own_worker(delay: float) -> None:
    """A local-executor job that kills its own worker process (as the OOM killer would)."""
    import os
    import signal
    import time

    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGKILL)
