"""kdbench.testing: the import path plugin authors use, and the built-in plugins passing the kit."""
import kdbench.testing
from kdbench.testing import check_dataset, check_method, check_model


def test_public_names():
    assert kdbench.testing.__all__ == ["check_method", "check_model", "check_dataset", "make_step"]
    assert kdbench.testing.__doc__.startswith("A conformance kit for plugin authors")


def test_builtins_conform(env):
    check_method("kd")
    check_method("fitnets", loss_trials=1)  # a hint stage and a regressor module
    check_model("cnn1d_2x16")
    check_dataset("mnist1d")
