"""The ``kdbench`` command line. Every bad input is one line on stderr and a non-zero exit;
``--debug`` shows the traceback."""
from __future__ import annotations

import sys

import click

from kdbench import __version__
from kdbench.errors import KdbenchError

KINDS = ("methods", "models", "datasets")


class Group(click.Group):
    """Turns every error into one line (and exit 1) unless --debug."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; the run is marked KILLED in MLflow", err=True)
            sys.exit(130)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if isinstance(exc, KdbenchError):
                click.echo(f"error: {exc}", err=True)
            else:
                text = str(exc).strip().splitlines()
                click.echo(
                    f"error: {type(exc).__name__}: {text[0] if text else ''} "
                    "(a plugin or kdbench failed; rerun with --debug for the traceback)",
                    err=True,
                )
            sys.exit(1)


@click.group(cls=Group)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="kdbench")
@click.pass_context
def main(ctx, debug):
    """kdbench: benchmark knowledge-distillation methods."""
    ctx.obj = {"debug": debug}


def _registry():
    from kdbench.core import plugins

    return plugins.registry()


def _tracker(uri):
    from kdbench.workflows.tracking import default_tracking_uri
    from kdbench.workflows.tracking import Tracker

    return Tracker(uri or default_tracking_uri())


tracking_option = click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
    help="MLflow tracking URI [default: sqlite:///mlflow.db in the working directory].",
)


# --------------------------------------------------------------------------- list / show


@main.command("list")
@click.argument("kind", required=False, type=click.Choice(KINDS + ("recipes",)))
def list_cmd(kind):
    """List registered methods, models and datasets, the named recipes, and broken plugins."""
    reg = _registry()
    if kind == "recipes" or kind is None:
        _echo_recipes()
        if kind == "recipes":
            return
    for k in [kind] if kind else KINDS:
        click.echo(f"{k}:")
        for name, entry in sorted(getattr(reg, k).items()):
            obj = entry.obj
            extra = ""
            if k == "methods":
                defaults = ", ".join(f"{h.name}={h.default}" for h in obj.hparams)
                taps = obj.taps if not callable(obj.taps) else ["(dynamic)"]
                extra = f" [{obj.citation}; taps: {', '.join(taps) or 'logits'}; {defaults or 'no hparams'}]"
            click.echo(f"  {name:<16} {obj.description}{extra}  ({entry.source})")
        if k == "models":
            for prefix, entry in sorted(reg.model_sources.items()):
                click.echo(f"  {prefix + ':NAME':<16} {entry.obj.description}  ({entry.source})")
    _echo_failures(reg)


def _echo_recipes():
    from kdbench import recipes

    click.echo("recipes (kdbench run --recipe NAME):")
    for name in recipes.names():
        r = recipes.load_recipe(name)
        lrs = ", ".join(f"{m} {lr}" for m, lr in r.model_lr)
        click.echo(f"  {name:<18} {recipes.read(name).get('description', '')}"
                   + (f" [lr per model: {lrs}]" if lrs else ""))


def _echo_failures(reg):
    if reg.failures:
        click.echo("broken plugins:")
        for f in reg.failures:
            click.echo(f"  {f.line()}")


@main.command("plugins")
@click.option("--disable", multiple=True, metavar="NAME",
              help="Skip this plugin (entry-point or distribution name; repeatable). "
                   "For every command: KDBENCH_DISABLE=a,b.")
@click.option("--no-third-party", is_flag=True,
              help="Load only kdbench's own plugins. For every command: KDBENCH_PLUGINS= (empty).")
def plugins_cmd(disable, no_third_party):
    """Installed plugin entry points: distribution, version, status, hooks; then load failures."""
    from kdbench.core import plugins

    reg = plugins.load(disable=disable, only=set() if no_third_party else None) if (
        disable or no_third_party) else _registry()
    click.echo(f"{'plugin':<20} {'distribution':<28} {'status':<9} {'module':<28} hooks")
    for p in reg.plugins:
        hooks = ", ".join(p.hooks) or "-"
        dist = f"{p.dist} {p.version}"
        click.echo(f"{p.plugin:<20} {dist:<28} {p.status:<9} {p.module:<28} {hooks}")
    _echo_failures(reg)


@main.command("show")
@click.argument("kind", type=click.Choice(["method", "model", "dataset"]))
@click.argument("name")
def show_cmd(kind, name):
    """Details of one method (hyperparameters, defaults, search space), model or dataset."""
    reg = _registry()
    entry = reg.entry(kind + "s", name)
    obj = entry.obj
    click.echo(f"{name} — {obj.description}  ({entry.source})")
    if kind == "method":
        click.echo(f"citation: {obj.citation or '-'}")
        click.echo(f"taps: {'(dynamic)' if callable(obj.taps) else ', '.join(obj.taps) or 'logits only'}")
        click.echo(f"needs teacher: {'yes' if obj.needs_teacher else 'no'}")
        for h in obj.hparams:
            if h.choices is not None:
                rng = "{" + ", ".join(map(str, h.choices)) + "}"
            elif h.low is None and h.high is None:
                rng = "any " + h.kind.__name__
            else:
                rng = ("(" if h.open_low else "[") + ("-inf" if h.low is None else str(h.low)) + ", " + (
                    "inf)" if h.high is None else f"{h.high}]")
            click.echo(f"  {h.name:<12} default {h.default!r:<10} valid {rng:<14} search {h.describe_space():<22} {h.help}")
    elif kind == "dataset":
        shape = (f"classes {obj.num_classes}, input {obj.input_shape}" if obj.resolve is None else
                 "classes and input shape read from its files (--data-dir, --data-option)")
        click.echo(f"{shape}, default pair {obj.default_teacher} → {obj.default_student}")
        click.echo(f"recipe: {obj.recipe}")
    else:
        click.echo(f"kwargs: {dict(obj.kwargs)}")


# --------------------------------------------------------------------------- run


def _parse_sets(pairs, option: str = "--set") -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise KdbenchError(f"{option} expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def data_options(data_dir, pairs) -> dict:
    """``--data-dir`` and ``--data-option KEY=VALUE`` as the dataset's load options."""
    out = _parse_sets(pairs, "--data-option")
    if data_dir:
        out["data_dir"] = data_dir
    return out


class Progress:
    """A progress bar per (network, stage), showing the latest validation accuracy."""

    def __init__(self):
        self.key = None
        self.bar = None

    def __call__(self, e):
        key = (e.role, e.stage)
        if key != self.key:
            self.close()
            self.key = key
            label = f"{e.role:<7} {e.stage}"
            self.bar = click.progressbar(length=e.epochs, label=label, show_pos=True, file=sys.stderr,
                                         item_show_func=lambda s: s)
            self.bar.__enter__()
        acc = e.metrics.get("val_top1")
        loss = next((v for k, v in e.metrics.items() if k.endswith("loss")), None)
        info = f"loss {loss:.3f}" + (f" val {100 * acc:.2f}%" if acc is not None else "")
        self.bar.update(1, info)

    def close(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@main.command("run")
@click.option("--method", "-m", default="kd", show_default=True, help="Distillation method (see `kdbench list methods`).")
@click.option("--dataset", "-d", default=None, help="Dataset [default: the embedded one].")
@click.option("--teacher", default=None, help="Teacher model [default: the dataset's].")
@click.option("--teachers", default="", help="Extra teachers, comma-separated (for methods using several, e.g. multi_teacher).")
@click.option("--student", default=None, help="Student model [default: the dataset's].")
@click.option("--epochs", type=int, default=None, help="Student epochs [default: the recipe's].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--teacher-seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:N [default: CUDA if available].")
@click.option("--teacher-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="Load the teacher from {'model': state_dict} or a bare state dict.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Method hyperparameter (repeatable).")
@click.option("--data-dir", default=None, help="Where the dataset's files are (datasets that read files).")
@click.option("--data-option", "data_opts", multiple=True, metavar="KEY=VALUE",
              help="A dataset option (repeatable), e.g. size=64 for image_folder.")
@click.option("--recipe", "recipe_name", default=None, metavar="NAME|FILE.toml",
              help="Train the student with this recipe instead of the dataset's (e.g. cifar100-fast).")
@click.option("--params-from", "params_from", default=None, metavar="STUDY",
              help="Use the best params of a `kdbench tune` study (--set still wins).")
@click.option("--storage", default=None, help="Optuna storage of --params-from [default: as kdbench tune].")
@tracking_option
def run_cmd(method, dataset, teacher, student, epochs, seed, teacher_seed, device,
            teacher_checkpoint, sets, data_dir, data_opts, recipe_name, params_from, storage, tracking_uri,
            teachers):
    """Train a student with a distillation method and record it in MLflow."""
    from kdbench.core.plan import RunConfig
    from kdbench.workflows.run import run

    hparams, recipe = {}, {}
    if params_from:
        from kdbench.workflows.tune import best_params

        best = best_params(params_from, storage, tracking_uri)
        if best["method"] and best["method"] != method:
            raise KdbenchError(f"study {params_from!r} tuned method {best['method']!r}, not {method!r}; "
                               f"pass --method {best['method']}")
        hparams, recipe = dict(best["hparams"]), dict(best["recipe"])
        student = student or best["student"]
    hparams.update(_parse_sets(sets))
    if epochs:
        recipe["epochs"] = epochs
    config = RunConfig(
        method=method, dataset=dataset, teacher=teacher, student=student,
        hparams=hparams, recipe=recipe,
        seed=seed, teacher_seed=teacher_seed, device=device,
        teacher_checkpoint=teacher_checkpoint,
        data_options=data_options(data_dir, data_opts),
        teachers=tuple(t.strip() for t in teachers.split(",") if t.strip()),
        recipe_name=recipe_name,
    )
    tracker = _tracker(tracking_uri)
    progress = Progress()
    try:
        outcome = run(config, tracker, on_epoch=progress)
    finally:
        progress.close()
    click.echo(summary(outcome, tracker.uri))


def summary(o, uri: str) -> str:
    m, plan = o.metrics, o.plan
    pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    rows = [
        ("method", f"{plan.method_obj.name} {plan.hp or ''}".strip()),
        ("dataset", plan.dataset_obj.name),
        ("teacher → student", f"{'+'.join([plan.teacher_obj.name] + [e.obj.name for e in plan.extra_teachers]) if o.teacher else '(none)'} → {plan.student_obj.name}"),
        ("test top-1 (last epoch)", pct(m.get("test_top1"))),
        ("test top-1 (best val epoch " + str(int(m["best_val_epoch"])) + ")", pct(m.get("test_top1_bestval"))),
        ("test top-5 (last / best val)", f"{pct(m.get('test_top5'))} / {pct(m.get('test_top5_bestval'))}"),
        ("teacher test top-1", pct(o.teacher.metrics.get("test_top1")) if o.teacher else "-"),
        ("vanilla test top-1 (mean)", pct(o.vanilla_top1)),
        ("Δ vs vanilla", "-" if m.get("delta_vs_vanilla") is None else f"{100 * m['delta_vs_vanilla']:+.2f} pts"),
        ("teacher gap closed", "-" if m.get("gap_closed") is None else f"{m['gap_closed']:.2f}"),
        ("epochs to 90/95/99 % of final", f"{m['epochs_to_90']} / {m['epochs_to_95']} / {m['epochs_to_99']}"),
        ("seconds to 95 % of final", f"{m['seconds_to_95']:.1f}"),
        ("val curve AUC (normalised)", f"{m['auc']:.4f}"),
        ("params student / extra / teacher", f"{m['params_student']:,} / {m['params_extra']:,} / {m['params_teacher']:,}"),
        ("FLOPs/sample student / teacher", f"{m['flops_student']:,} / {m.get('flops_teacher', 0):,}"),
        ("training time", f"{m['train_seconds']:.1f} s ({m['throughput']:.0f} samples/s)"),
        ("peak memory", f"{m['peak_mem_mb']:.0f} MB"),
        ("MLflow run", f"{o.run_id}  ({uri})"),
    ]
    peers = sorted((k for k in m if k.startswith("peer") and k.endswith("_test_top1")), key=lambda k: int(k[4:-10]))
    if peers:
        rows.insert(4, ("peers' test top-1 (last epoch)", " / ".join(pct(m[k]) for k in peers)))
    if not m.get("train_split_loaded", 1):
        rows.insert(4, ("training data", "synthesised by the method (train split never loaded)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------- leaderboard


@main.command("leaderboard")
@click.argument("name", required=False)
@click.option("--dataset", "-d", default=None, help="Only this dataset (without NAME).")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "html"]), default="table",
              show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write here instead of stdout.")
@click.option("--no-summary", is_flag=True, help="Do not log the figures on the MLflow summary run (NAME only).")
@tracking_option
def leaderboard_cmd(name, dataset, fmt, output, no_summary, tracking_uri):
    """Tables from MLflow: per (dataset, teacher, student), each method's test top-1 mean ± std.

    With NAME (leaderboards/NAME.toml or a path): only that suite's runs, ranked by its metric,
    with published numbers where it has them; the figures are logged on its summary run."""
    from kdbench.workflows import bench
    from kdbench.workflows.leaderboard import aggregate, plots, render, runs_frame

    tracker = _tracker(tracking_uri)
    suite = None
    if name:
        suite = bench.load_suite(name)
        runs = bench.suite_runs(tracker, suite)
    else:
        runs = tracker.search(dataset, "attributes.status = 'FINISHED' AND tags.role = 'student'")
    metric = suite.metric if suite else "test_top1"
    tables = aggregate(runs_frame(runs), metric, suite.published if suite else None)
    if not tables:
        hint = f"`kdbench bench {name}`" if name else "`kdbench run`"
        raise KdbenchError(f"no finished student runs in {tracker.uri}; run {hint} first")
    images = None
    if fmt == "html" or (suite and not no_summary):
        ids = [r for t in tables.values() for ids in t.run_ids for r in ids]
        images = plots(tables, metric, bench.histories(tracker, ids))
    text = render(fmt, tables, metric, suite, images)
    if suite and not no_summary:
        docs = {"leaderboard.md": render("markdown", tables, metric, suite),
                "leaderboard.csv": render("csv", tables, metric, suite),
                "leaderboard.html": render("html", tables, metric, suite, images)}
        bench.log_summary(tracker, suite, images, docs)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


# --------------------------------------------------------------------------- commands by area


def _add_area_commands() -> None:
    from kdbench.cli import bench as cli_bench, data as cli_data, plugin as cli_plugin, tune as cli_tune

    for module in (cli_tune, cli_bench, cli_plugin, cli_data):
        for command in module.COMMANDS:
            main.add_command(command)


_add_area_commands()
