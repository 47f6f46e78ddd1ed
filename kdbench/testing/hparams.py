"""Checks of a method's hyperparameter declarations: default, valid range, choices and search
space, and the values Optuna samples from that space."""
from __future__ import annotations

from kdbench.contracts import HParam, Method
from kdbench.errors import KdbenchError
from kdbench.testing.common import Fail


def _who(hparam: HParam) -> str:
    return f"hyperparameter {hparam.name!r}"


def check_hparam(fail: Fail, hparam: HParam) -> None:
    """Check one declaration; a tunable one also by its choices or its search space."""
    _check_default(fail, hparam)
    if not hparam.tune:
        return
    if hparam.choices is not None:
        _check_choices(fail, hparam)
        return
    if hparam.kind in (bool, str):
        return  # searched only with choices
    _check_space(fail, hparam)


def _check_default(fail: Fail, hparam: HParam) -> None:
    """The name, the default and the valid range (low/high)."""
    who = _who(hparam)
    fail.require(isinstance(hparam, HParam), f"hparams must hold kdbench.contracts.HParam, got {hparam!r}")
    fail.require(hparam.name.isidentifier(), f"{who}: the name must be a Python identifier (it is read as step.hp.{hparam.name})")
    try:
        hparam.check(hparam.default)
    except KdbenchError as exc:
        raise fail(f"{who}: the default {hparam.default!r} is not valid ({exc}) — change the default or low/high") from None
    if hparam.low is not None and hparam.high is not None:
        fail.require(hparam.low <= hparam.high, f"{who}: valid range low={hparam.low} > high={hparam.high} — swap them")


def _check_choices(fail: Fail, hparam: HParam) -> None:
    who = _who(hparam)
    fail.require(len(hparam.choices) > 0, f"{who}: choices=() is empty — list the values to search, or tune=False")
    for choice in hparam.choices:
        try:
            hparam.check(choice)
        except KdbenchError as exc:
            raise fail(f"{who}: choice {choice!r} is not valid ({exc}) — keep choices within the valid range") from None


def _check_space(fail: Fail, hparam: HParam) -> None:
    """A numeric search space: a non-empty (low, high) tuple of valid values, positive if log."""
    who = _who(hparam)
    if hparam.space is None:
        raise fail(f"{who} is tunable but has no search space — give space=(low, high), or tune=False")
    fail.require(
        isinstance(hparam.space, tuple) and len(hparam.space) == 2,
        f"{who}: space must be a (low, high) tuple, got {hparam.space!r}",
    )
    lo, hi = hparam.space
    fail.require(lo < hi, f"{who} search space {hparam.space} is empty — give space=(low, high) with low < high")
    if hparam.log:
        fail.require(lo > 0, f"{who}: log search space {hparam.space} must be positive — raise low above 0, or log=False")
    for end in (lo, hi):
        try:
            hparam.check(end)
        except KdbenchError as exc:
            raise fail(
                f"{who} search space {hparam.space} reaches {end}, which is not a valid value ({exc}) — "
                "keep space inside the valid range (low/high)"
            ) from None


def sample_hparams(fail: Fail, method: Method, trials: int, seed: int) -> list[dict]:
    """Sample ``trials`` Optuna trials of the method's search space; check each value."""
    import optuna

    space = method.search_space()
    if not space:
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    sampled = []
    for _ in range(trials):
        trial = study.ask()
        values = {hparam.name: _sample_value(fail, hparam, trial) for hparam in space}
        study.tell(trial, 0.0)
        sampled.append(values)
    return sampled


def _sample_value(fail: Fail, hparam: HParam, trial):
    try:
        value = hparam.suggest(trial)
    except Exception as exc:
        raise fail(f"{_who(hparam)}: Optuna cannot sample its space {hparam.describe_space()} ({exc})") from None
    try:
        return hparam.check(value)
    except KdbenchError as exc:
        raise fail(
            f"{_who(hparam)}: Optuna sampled {value!r} from its search space "
            f"{hparam.describe_space()}, which is not valid ({exc}) — keep space inside the valid range"
        ) from None
