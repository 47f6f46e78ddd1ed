"""Common random numbers (issue 17 item 1): every method of one seed trains its main stage on the
same batches from the same student initialisation, whatever its pre-stages drew."""
from dataclasses import replace

import pytest
import torch

from kdbench.core import engine, plugins
from kdbench.core.plan import RunConfig, make_plan

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher():
    """Any fixed teacher (untrained): the batch order and initialisation do not depend on it."""
    plan = make_plan(RunConfig(method="kd"), plugins.load())
    return engine.build_teacher(plan, CPU).eval().requires_grad_(False)


def _main_stage_draws(method: str, teacher, seed: int):
    """The student's weights as built, and the (indices, inputs) of every main-stage batch."""
    plan = make_plan(RunConfig(method=method, recipe={"epochs": 2}, seed=seed), plugins.registry())
    seen = []
    loss = plan.method_obj.loss

    def recording(step):
        seen.append((step.index.clone(), step.x.clone()))
        return loss(step)

    plan = replace(plan, method=replace(plan.method, obj=replace(plan.method_obj, loss=recording)))
    setup = engine.setup_student(plan, teacher, CPU)
    initial = {k: v.clone() for k, v in setup.trainee.student.model.state_dict().items()}
    engine.run_student(plan, setup, CPU, lambda e: None, with_test=False)
    return setup, initial, seen


def test_methods_of_one_seed_share_main_stage_batches_and_initialisation(env, teacher):
    kd_setup, kd_init, kd_batches = _main_stage_draws("kd", teacher, seed=5)
    fit_setup, fit_init, fit_batches = _main_stage_draws("fitnets", teacher, seed=5)
    assert not kd_setup.pre_stages
    assert [stage.name for stage, _ in fit_setup.pre_stages] == ["hint"]  # it draws batches first
    assert fit_setup.trainee.modules is not None  # and builds a connector after the student
    assert kd_init.keys() == fit_init.keys()
    assert all(torch.equal(kd_init[k], fit_init[k]) for k in kd_init)
    assert len(kd_batches) == len(fit_batches) > 2
    for (i_kd, x_kd), (i_fit, x_fit) in zip(kd_batches, fit_batches):
        assert torch.equal(i_kd, i_fit) and torch.equal(x_kd, x_fit)
    # and another seed draws another order (the check above can fail)
    _, other_init, other_batches = _main_stage_draws("kd", teacher, seed=6)
    assert not torch.equal(other_batches[0][0], kd_batches[0][0])
    assert not all(torch.equal(kd_init[k], other_init[k]) for k in kd_init)


def test_streams_are_independent_and_the_main_one_is_the_seed():
    # the main stream is the seed itself: teachers (no pre-stages) draw what they always drew,
    # so cached teachers stay valid (their key is unchanged: tests/core/test_plan.py)
    assert torch.equal(torch.randperm(50, generator=engine.stream(3, CPU)),
                       torch.randperm(50, generator=torch.Generator().manual_seed(3)))
    draws = {name: torch.randperm(50, generator=engine.stream(3, CPU, *name)).tolist()
             for name in [(), ("pre-stage", 0), ("pre-stage", 1)]}
    assert len({tuple(v) for v in draws.values()}) == 3
    assert torch.randperm(50, generator=engine.stream(3, CPU, "pre-stage", 0)).tolist() == draws[("pre-stage", 0)]


def test_the_protocol_version_moves_run_identities_but_not_teachers(env, monkeypatch):
    from kdbench.core import plan as planning

    plan = make_plan(RunConfig(method="fitnets"), plugins.registry())
    now = (plan.config_hash("t"), plan.teacher_key())
    monkeypatch.setattr(planning, "PROTOCOL_VERSION", 1)
    before = (plan.config_hash("t"), plan.teacher_key())
    assert planning.PROTOCOL_VERSION == 1 and now[0] != before[0]  # old runs are other cells
    assert now[1] == before[1] == "5969a0ddff8ea296"  # the teacher cache and its runs stay valid
