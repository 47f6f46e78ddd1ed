"""Fixtures of the workflow tests: a tiny suite whose teacher is a checkpoint (an untrained net)."""
import pytest
from helpers import checkpoint_suite


@pytest.fixture
def suite(env):
    """``tiny.toml`` in the working directory, next to its teacher checkpoint ``t.pt``."""
    return checkpoint_suite(env, "tiny", methods='"vanilla", {name = "kd", params = {T = 2.0}, tune_trials = 7}')
