"""Leaderboard suites: ``leaderboards/NAME.toml``, found by name or path, read and checked.

A suite file (read with tomllib)::

    name = "embedded"                 # default: the file's stem
    description = "..."
    dataset = "mnist1d"
    seeds = [0, 1, 2]                 # at least 3
    teacher_seed = 0                  # teachers are trained by the harness with this seed
    metric = "test_top1"              # ranking: test_top1 (last epoch) | test_top1_bestval
    methods = ["all"]                 # every built-in method, default hparams; "installed": every
                                      # registered method, third-party ones too; add names after it
    # or a list of tables: [[methods]] name = "kd", params = {T = 4}, tune_trials = 20
    [recipe]                          # optional: name = "cifar100-fast" and/or overrides (epochs = 1)
    [[pairs]]
    teacher = "cnn1d_4x32"            # or teacher_checkpoint = "t.pt", teacher_sha256 = "<hex>"
    student = "cnn1d_2x16"
    [published."wrn_40_2->wrn_16_2"]  # optional reference numbers (top-1 %), shown beside ours
    kd = 74.92

``tune_trials = N``: the method is tuned for each pair before its cells run (see
:mod:`kdbench.workflows.bench`).
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdbench.errors import KdbenchError, closest

MIN_SEEDS = 3
METRICS = ("test_top1", "test_top1_bestval")
BUILTIN_DIST = "kdbench"  # "all": the methods of this distribution (not kdbench-foo)
SUITE_KEYS = {"name", "description", "dataset", "seeds", "teacher_seed", "metric", "methods", "recipe",
              "pairs", "published", "published_note", "precision"}
PAIR_KEYS = {"teacher", "student", "teacher_checkpoint", "teacher_sha256"}
METHOD_KEYS = {"name", "params", "tune_trials"}


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    tune_trials: int = 0


@dataclass(frozen=True, kw_only=True)
class Pair:
    teacher: str
    student: str
    checkpoint: str | None = None
    sha256: str | None = None

    @property
    def label(self) -> str:
        return f"{self.teacher}->{self.student}"


@dataclass(frozen=True, kw_only=True)
class Suite:
    name: str
    path: Path
    dataset: str
    pairs: tuple[Pair, ...]
    methods: tuple[MethodSpec, ...]
    seeds: tuple[int, ...]
    teacher_seed: int = 0
    metric: str = "test_top1"
    recipe_name: str | None = None
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    published: dict[str, dict[str, float]] = field(default_factory=dict)
    published_note: str = ""
    precision: str | None = None  # RunConfig.precision of every cell; None: the device's default

    def recipe_for(self, student: str) -> dict[str, Any]:
        """The student recipe overrides handed to RunConfig.recipe for this student."""
        if not self.recipe_name:
            return dict(self.recipe_overrides)
        base = _load_named_recipe(self.recipe_name, student, self.path)
        recipe = base.with_(**self.recipe_overrides) if self.recipe_overrides else base
        return recipe.as_dict()


def _load_named_recipe(name: str, student: str | None, suite_path: Path):
    from kdbench.recipes import load_recipe

    if name.endswith(".toml") and not Path(name).is_absolute():
        name = str((suite_path.parent / name).resolve())
    return load_recipe(name, student)


# --------------------------------------------------------------------------- finding


def leaderboard_dirs() -> list[Path]:
    """Where suite names are looked up: ./leaderboards, then the checkout's leaderboards/."""
    return [Path.cwd() / "leaderboards", Path(__file__).resolve().parents[2] / "leaderboards"]


def find_suite(name: str) -> Path:
    if name.endswith(".toml") or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise KdbenchError(f"leaderboard file {name!r} does not exist")
        return path
    for folder in leaderboard_dirs():
        if (folder / f"{name}.toml").is_file():
            return folder / f"{name}.toml"
    from kdbench.core import plugins

    shipped = plugins.registry().leaderboards  # suites that installed plugins ship
    if name in shipped:
        return Path(shipped[name].obj.path)
    known = sorted({p.stem for folder in leaderboard_dirs() if folder.is_dir() for p in folder.glob("*.toml")}
                   | set(shipped))
    raise KdbenchError(f"unknown leaderboard {name!r} (known: {', '.join(known) or 'none'})")


# --------------------------------------------------------------------------- loading


def load_suite(name_or_path: str, reg=None) -> Suite:
    """Parse and check a suite file; errors are one line."""
    path = find_suite(name_or_path)
    doc = _read_toml(path)
    if reg is None:
        from kdbench.core import plugins

        reg = plugins.registry()
    where = f"leaderboard {path.name}"
    _check_keys(doc, where)
    _check_types(doc, where)
    dataset = _dataset(doc, reg, where)
    seeds = _seeds(doc, where)
    metric = _metric(doc, where)
    recipe_name, recipe_overrides = _recipe(doc, where)
    methods = tuple(_methods(doc.get("methods", ["all"]), reg, where))
    pairs = _pairs(doc, dataset, path, reg, where)
    suite = Suite(
        name=doc.get("name", path.stem), path=path, dataset=dataset, pairs=pairs, methods=methods,
        seeds=seeds, teacher_seed=doc.get("teacher_seed", 0), metric=metric,
        recipe_name=recipe_name, recipe_overrides=recipe_overrides,
        description=doc.get("description", ""), published=_published(doc, where),
        published_note=doc.get("published_note", ""), precision=_precision(doc, where),
    )
    check_suite(suite, reg, where)
    return suite


# --------------------------------------------------------------------------- checking as a whole


RECIPE_LIMITS = {"lr": (0.0, False), "batch_size": (1, True), "eval_batch_size": (1, True),
                 "weight_decay": (0.0, True), "momentum": (0.0, True), "gamma": (0.0, False)}


def check_suite(suite: Suite, reg, where: str) -> None:
    """Plan one cell per (pair, method) before anything runs, so a bad ``params``, ``[recipe]``
    or checkpoint stops the suite with one line naming the key, instead of failing every cell."""
    from kdbench.core.plan import RunConfig, make_plan

    for pair in suite.pairs:
        _check_checkpoint(pair, where)
        try:
            recipe = suite.recipe_for(pair.student)
        except KdbenchError as exc:
            raise KdbenchError(f"{where}: [recipe]: {exc}; fix the [recipe] table") from None
        for method in suite.methods:
            config = RunConfig(method=method.name, dataset=suite.dataset, teacher=pair.teacher,
                               student=pair.student, hparams=dict(method.params), recipe=dict(recipe))
            try:
                plan = make_plan(config, reg)
            except KdbenchError as exc:
                key = "params" if method.params and _params_at_fault(config, reg) else None
                if key:
                    raise KdbenchError(f"{where}: methods entry {method.name!r}, params {method.params}: {exc}; "
                                       "fix its params table") from None
                raise KdbenchError(f"{where}: [recipe] (for {pair.label}): {exc}; fix the [recipe] table") from None
            _check_recipe_values(plan.recipe, where, pair)


def _params_at_fault(config, reg) -> bool:
    """Whether the plan fails because of the method's params (it plans without them)."""
    from dataclasses import replace

    from kdbench.core.plan import make_plan

    try:
        make_plan(replace(config, hparams={}), reg)
    except KdbenchError:
        return False
    return True


def _check_recipe_values(recipe, where: str, pair: Pair) -> None:
    for name, (low, inclusive) in RECIPE_LIMITS.items():
        value = getattr(recipe, name, None)
        if value is None or not isinstance(value, (int, float)):
            continue
        if value < low or (value == low and not inclusive):
            rel = ">=" if inclusive else ">"
            raise KdbenchError(f"{where}: [recipe] {name} = {value} (for {pair.label}) must be {rel} {low}; "
                               "fix the [recipe] table")


def _check_checkpoint(pair: Pair, where: str) -> None:
    """A pair's teacher checkpoint exists and has the sha256 the suite states."""
    if not pair.checkpoint:
        return
    from kdbench.workflows.teachers import checkpoint_sha256

    label = f"{where}: pairs entry {pair.label}"
    if not Path(pair.checkpoint).is_file():
        raise KdbenchError(f"{label}: teacher_checkpoint {pair.checkpoint!r} does not exist; fix the path")
    sha = checkpoint_sha256(pair.checkpoint)
    if len(pair.sha256 or "") < 16 or not sha.startswith(pair.sha256):
        raise KdbenchError(f"{label}: teacher_sha256 {pair.sha256!r} does not match the checkpoint "
                           f"(its sha256 is {sha}; at least 16 hex digits); fix teacher_sha256 or the file")


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise KdbenchError(f"leaderboard {path} is not valid TOML: {exc}; fix the file") from None
    except UnicodeDecodeError:
        raise KdbenchError(f"leaderboard {path} is not a text (UTF-8) TOML file; pass a suite .toml "
                           "(see leaderboards/embedded.toml)") from None


def _check_keys(doc: dict, where: str) -> None:
    bad = sorted(set(doc) - SUITE_KEYS)
    if bad:
        raise KdbenchError(f"{where}: unknown key {bad[0]!r}{closest(bad[0], SUITE_KEYS)} "
                           f"(known: {', '.join(sorted(SUITE_KEYS))})")


#: top-level keys whose value must be a string (precision: see _precision)
STRING_KEYS = ("name", "description", "dataset", "metric", "published_note", "precision")


def _check_types(doc: dict, where: str) -> None:
    """The value types of the top-level keys, before any of them is used (a wrong type is one line
    naming the key and the type it needs, not a crash further on)."""
    from kdbench.recipes import is_int

    for key in STRING_KEYS:
        if key in doc and not isinstance(doc[key], str):
            raise KdbenchError(f"{where}: {key} must be a string, got {doc[key]!r}; fix {key}")
    if "teacher_seed" in doc and not is_int(doc["teacher_seed"]):
        raise KdbenchError(f"{where}: teacher_seed must be an integer, got {doc['teacher_seed']!r}; "
                           "fix teacher_seed (e.g. teacher_seed = 0)")
    seeds = doc.get("seeds", [])
    if not isinstance(seeds, list) or not all(is_int(seed) for seed in seeds):
        raise KdbenchError(f"{where}: seeds must be a list of integers, got {seeds!r}; "
                           f"fix seeds (e.g. seeds = [0, 1, 2])")
    methods = doc.get("methods", [])
    if not isinstance(methods, list):
        example = f'["{methods}"]' if isinstance(methods, str) else '["all"]'
        raise KdbenchError(f"{where}: methods must be a list of method names or tables, got {methods!r}; "
                           f"fix methods (e.g. methods = {example})")
    recipe = doc.get("recipe", {})
    if not isinstance(recipe, (str, dict)):
        raise KdbenchError(f"{where}: recipe must be a table ([recipe] with name and/or fields) or a recipe "
                           f"name, got {recipe!r}; fix recipe")
    pairs = doc.get("pairs", [])
    if not isinstance(pairs, list) or not all(isinstance(pair, dict) for pair in pairs):
        raise KdbenchError(f"{where}: pairs must be a list of tables ([[pairs]] with teacher and student), "
                           f"got {pairs!r}; fix pairs")
    published = doc.get("published", {})
    if not isinstance(published, dict) or not all(isinstance(v, dict) for v in published.values()):
        raise KdbenchError(f"{where}: published must be tables of method = top-1 % per pair "
                           f'([published."teacher->student"] kd = 74.92), got {published!r}; fix published')


def _precision(doc: dict, where: str) -> str | None:
    from kdbench.core.precision import check_precision

    try:
        return check_precision(doc.get("precision"))
    except KdbenchError as exc:
        raise KdbenchError(f"{where}: {exc}") from None


def _dataset(doc: dict, reg, where: str) -> str:
    dataset = doc.get("dataset")
    if not dataset:
        raise KdbenchError(f"{where}: 'dataset' is required")
    reg.entry("datasets", dataset)  # unknown dataset -> one-line error with suggestions
    return dataset


def _seeds(doc: dict, where: str) -> tuple[int, ...]:
    seeds = tuple(doc.get("seeds", ()))  # a list of integers (_check_types)
    if len(set(seeds)) < MIN_SEEDS:
        raise KdbenchError(f"{where}: needs at least {MIN_SEEDS} distinct seeds, got {list(seeds)}")
    return seeds


def _metric(doc: dict, where: str) -> str:
    metric = doc.get("metric", "test_top1")
    if metric not in METRICS:
        raise KdbenchError(f"{where}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return metric


def _recipe(doc: dict, where: str) -> tuple[str | None, dict[str, Any]]:
    """The named recipe (or None) and the field overrides on top of it, their values checked as a
    recipe file's are (:func:`kdbench.recipes.check_fields`); unknown fields are refused when the
    cells are planned (:func:`check_suite`)."""
    from kdbench.recipes import check_fields

    recipe = doc.get("recipe", {})
    if isinstance(recipe, str):
        recipe = {"name": recipe}
    recipe = dict(recipe)
    recipe_name = recipe.pop("name", None)
    if recipe_name is not None and (not isinstance(recipe_name, str) or not recipe_name):
        raise KdbenchError(f"{where}: [recipe] name must be a recipe name or a .toml path (a string), "
                           f"got {recipe_name!r}; fix the [recipe] table")
    return recipe_name, check_fields(recipe, f"{where}: [recipe]", "fix {key} in the [recipe] table")


def _published(doc: dict, where: str) -> dict[str, dict[str, float]]:
    published = doc.get("published", {})  # tables of tables (_check_types)
    for pair, numbers in published.items():
        for method, top1 in numbers.items():
            if isinstance(top1, bool) or not isinstance(top1, (int, float)):
                raise KdbenchError(f'{where}: published."{pair}" {method} must be a number (top-1 %), '
                                   f"got {top1!r}; fix the [published] table")
    return {pair: {method: float(top1) for method, top1 in numbers.items()}
            for pair, numbers in published.items()}


def _pairs(doc: dict, dataset: str, path: Path, reg, where: str) -> tuple[Pair, ...]:
    raw_pairs = doc.get("pairs")
    if not raw_pairs:
        ds = reg.entry("datasets", dataset).obj
        raw_pairs = [{"teacher": ds.default_teacher, "student": ds.default_student}]
    pairs = tuple(_pair(raw, path, reg, where) for raw in raw_pairs)
    if len({pair.label for pair in pairs}) != len(pairs):
        raise KdbenchError(f"{where}: a pair is listed twice")
    return pairs


def _pair(raw: dict, path: Path, reg, where: str) -> Pair:
    extra = sorted(set(raw) - PAIR_KEYS)
    if extra or "teacher" not in raw or "student" not in raw:
        raise KdbenchError(f"{where}: a pair needs teacher and student (and optionally "
                           f"teacher_checkpoint + teacher_sha256), got {raw}")
    for key in sorted(PAIR_KEYS & set(raw)):
        if not isinstance(raw[key], str):
            raise KdbenchError(f"{where}: pairs entry: {key} must be a string, got {raw[key]!r}; fix {key}")
    reg.entry("models", raw["teacher"])
    reg.entry("models", raw["student"])
    ckpt = raw.get("teacher_checkpoint")
    if ckpt and not raw.get("teacher_sha256"):
        raise KdbenchError(f"{where}: teacher_checkpoint {ckpt!r} needs its teacher_sha256")
    if ckpt and not Path(ckpt).is_absolute():
        ckpt = str((path.parent / ckpt).resolve())
    return Pair(teacher=raw["teacher"], student=raw["student"], checkpoint=ckpt,
                sha256=(raw.get("teacher_sha256") or "").lower() or None)


def _methods(raw, reg, where: str) -> list[MethodSpec]:
    specs: list[MethodSpec] = []
    for item in raw:
        if item in ("all", "installed"):  # built-in methods; every registered method
            specs += [MethodSpec(name=name) for name, entry in sorted(reg.methods.items())
                      if item == "installed" or entry.dist == BUILTIN_DIST]
            continue
        specs.append(_method(item, reg, where))
    by_name = {}
    for spec in specs:  # the last entry of a method wins ("all" then a specific entry overrides it)
        by_name[spec.name] = spec
    if not by_name:
        raise KdbenchError(f"{where}: no methods")
    # vanilla first: the runner computes Δ vs vanilla from finished vanilla runs
    return sorted(by_name.values(), key=lambda spec: (spec.name != "vanilla", spec.name))


def _method(item, reg, where: str) -> MethodSpec:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict):
        raise KdbenchError(f"{where}: methods entries must be method names or tables "
                           f"({{name = \"kd\", params = {{T = 4.0}}}}), got {item!r}; fix methods")
    extra = sorted(set(item) - METHOD_KEYS)
    if extra or "name" not in item:
        raise KdbenchError(f"{where}: a method entry has name, params, tune_trials; got {item}")
    if not isinstance(item["name"], str):
        raise KdbenchError(f"{where}: a methods entry's name must be a string, got {item['name']!r}; "
                           "fix methods")
    reg.entry("methods", item["name"])
    params, trials = item.get("params", {}), item.get("tune_trials", 0)
    if not isinstance(params, dict):
        raise KdbenchError(f"{where}: methods entry {item['name']!r}: params = {params!r} must be a table, "
                           "e.g. params = {T = 4.0}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise KdbenchError(f"{where}: methods entry {item['name']!r}: tune_trials = {trials!r} must be a whole "
                           "number >= 0 (0: not tuned); fix tune_trials")
    return MethodSpec(name=item["name"], params=dict(params), tune_trials=trials)
