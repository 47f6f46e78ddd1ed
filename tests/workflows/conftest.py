"""Fixtures of the workflow tests: a tiny suite whose teacher is a checkpoint (an untrained net)."""
import hashlib

import pytest
import torch

from kdbench.core import engine, plugins
from kdbench.core.plan import RunConfig, make_plan

SUITE = """
name = "tiny"
dataset = "mnist1d"
seeds = [0, 1, 2]
methods = ["vanilla", {{name = "kd", params = {{T = 2.0}}, tune_trials = 7}}]
[recipe]
epochs = 1
[[pairs]]
teacher = "cnn1d_4x32"
student = "cnn1d_2x16"
teacher_checkpoint = "t.pt"
teacher_sha256 = "{sha}"
"""


@pytest.fixture
def suite(env):
    """``tiny.toml`` in the working directory, next to its teacher checkpoint ``t.pt``."""
    torch.manual_seed(0)
    net = engine.build_teacher(make_plan(RunConfig(), plugins.registry()), torch.device("cpu"))
    torch.save({"model": net.state_dict()}, env / "t.pt")
    sha = hashlib.sha256((env / "t.pt").read_bytes()).hexdigest()
    path = env / "tiny.toml"
    path.write_text(SUITE.format(sha=sha))
    return path
