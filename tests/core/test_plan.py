"""Plans: names resolved against the registry, recipes resolved per network (per-model lr, --recipe
for the student only, the teacher's own), and the identities derived from a plan."""

import pytest

from kdbench.contracts import Recipe
from kdbench.core import plugins
from kdbench.core.plan import RunConfig, make_plan
from kdbench.errors import KdbenchError


def plan_for(**config):
    return make_plan(RunConfig(**config), plugins.registry())


def test_per_model_lr_reaches_the_plan_like_the_reference(env):
    # RepDistiller trains MobileNetV2/ShuffleNet at 0.01, everything else at 0.05 (batch 64)
    mobile = plan_for(method="kd", dataset="cifar100", teacher="resnet32x4", student="mobilenetv2")
    assert (mobile.recipe.lr, mobile.teacher_recipe.lr) == (0.01, 0.05)
    wide = plan_for(method="kd", dataset="cifar100", teacher="resnet32x4", student="resnet8x4")
    assert (wide.recipe.lr, wide.teacher_recipe.lr) == (0.05, 0.05)
    shuffle = plan_for(method="vanilla", dataset="cifar100", student="shufflenetv2")
    assert shuffle.recipe.lr == 0.01
    # the table is for students: a MobileNetV2 *teacher* trains at 0.05, as in RepDistiller's train_teacher.py
    mobile_teacher = plan_for(method="kd", dataset="cifar100", teacher="mobilenetv2", student="resnet8")
    assert (mobile_teacher.teacher_recipe.lr, mobile_teacher.recipe.lr) == (0.05, 0.05)
    assert mobile_teacher.teacher_key() == plan_for(method="kd", dataset="cifar100", teacher="mobilenetv2",
                                                    student="wrn_16_2").teacher_key()
    # what is recorded and hashed is the lr used, not the table
    assert mobile.params()["recipe.lr"] == 0.01 and "recipe.model_lr" not in mobile.params()
    assert mobile.recipe.model_lr == () and "model_lr" not in mobile.recipe.as_dict()
    # an extra teacher is trained like the main one
    extra = plan_for(method="multi_teacher", dataset="cifar100", teacher="resnet32x4", student="resnet8x4",
                     teachers=("mobilenetv2",))
    assert extra.for_teacher(extra.extra_teachers[0]).teacher_recipe == extra.teacher_recipe


def test_a_datasets_teacher_recipe_gets_its_own_per_model_lr(env):
    from dataclasses import replace

    from kdbench.core.plan import teacher_recipe_of

    ds = plugins.registry().dataset("cifar100")
    teacher_table = Recipe(epochs=3, batch_size=32, lr=0.1, model_lr=(("vgg13", 0.02),))
    with_teacher = replace(ds, teacher_recipe=teacher_table)
    assert teacher_recipe_of(with_teacher, "vgg13").lr == 0.02 and teacher_recipe_of(with_teacher, "resnet56").lr == 0.1
    assert teacher_recipe_of(ds, "mobilenetv2").lr == 0.05 and teacher_recipe_of(ds, "mobilenetv2").model_lr == ()


def test_named_recipe_replaces_the_students_only(env):
    std = plan_for(method="kd", dataset="cifar100", teacher="resnet32x4", student="mobilenetv2")
    fast = plan_for(method="kd", dataset="cifar100", teacher="resnet32x4", student="mobilenetv2",
                    recipe_name="cifar100-fast")
    assert (fast.recipe.lr, fast.recipe.batch_size, fast.recipe.epochs, fast.recipe.schedule) == (0.04, 256, 60, "cosine")
    assert fast.teacher_recipe == std.teacher_recipe and fast.teacher_key() == std.teacher_key()
    assert fast.config_hash("t") != std.config_hash("t")
    assert plan_for(method="kd", dataset="cifar100", student="resnet8x4", recipe_name="cifar100-fast",
                    recipe={"epochs": 6}).recipe.epochs == 6
    with pytest.raises(KdbenchError, match="unknown recipe 'cifar100-fats'.*cifar100-fast"):
        plan_for(method="kd", recipe_name="cifar100-fats")


def test_config_hash_and_teacher_key_are_stable(env):
    # cached teachers and resumable suites are found by these values: a change here retrains and
    # reruns everything, so it must be deliberate (config hashes: protocol 2, issue 17; the
    # teacher key is the one teachers always had)
    plan = make_plan(RunConfig(), plugins.registry())
    assert (plan.config_hash(), plan.config_hash("abc"), plan.teacher_key()) == (
        "fd195ae64b4fc22f", "4b6a6560cf4da958", "5969a0ddff8ea296")
    # (a combination's changed on 2026-11-28: at's part gets at's embedded defaults, p 1 — as at alone)
    combined = make_plan(RunConfig(method="at+kd", hparams={"kd.alpha": 0.5, "at.beta": 100}), plugins.registry())
    assert combined.config_hash() == "dbd038d2ae92ff6d" and combined.teacher_key() == plan.teacher_key()
    multi = make_plan(RunConfig(method="multi_teacher", teachers=("cnn1d_4x16",)), plugins.registry())
    assert [multi.for_teacher(e).teacher_key() for e in multi.extra_teachers] == ["62e444e4b10a380f"]


def test_data_options_a_dataset_does_not_take_are_one_line(env):
    with pytest.raises(KdbenchError) as info:
        plan_for(method="kd", data_options={"data_dir": "/data"})
    assert str(info.value) == "dataset 'mnist1d' takes no option 'data_dir' (its load takes none); drop --data-dir"
    with pytest.raises(KdbenchError, match=r"takes no option 'size' \(its load takes none\); drop --data-option size=…"):
        plan_for(method="kd", data_options={"size": "64"})
    assert plan_for(method="kd", dataset="cifar100", data_options={"data_dir": "/data"}).config.data_options
