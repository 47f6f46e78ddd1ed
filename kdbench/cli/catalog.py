"""What is installed: `kdbench list` (methods, models, datasets, recipes), `kdbench plugins` (the
plugin entry points) and `kdbench show` (one method, model or dataset in detail)."""
from __future__ import annotations

import click

from kdbench.cli.options import KIND, KINDS


def _registry():
    from kdbench.core import plugins

    return plugins.registry()


# --------------------------------------------------------------------------- list


@click.command("list")
@click.argument("kind", required=False, type=click.Choice(KINDS + ("recipes",)))
def list_cmd(kind):
    """List registered methods, models and datasets, the named recipes, and broken plugins."""
    registry = _registry()
    if kind == "recipes" or kind is None:
        _echo_recipes()
        if kind == "recipes":
            return
    for shown in [kind] if kind else KINDS:
        _echo_kind(registry, shown)
    _echo_failures(registry)


def _echo_kind(registry, kind: str) -> None:
    click.echo(f"{kind}:")
    for name, entry in registry.listing(kind):
        obj = entry.obj
        extra = _method_summary(obj) if kind == "methods" else ""
        click.echo(f"  {name:<16} {obj.description}{extra}  ({entry.source})")
    if kind == "models":
        for prefix, entry in sorted(registry.model_sources.items()):
            click.echo(f"  {prefix + ':NAME':<16} {entry.obj.description}  ({entry.source})")


def _method_summary(method) -> str:
    defaults = ", ".join(f"{hparam.name}={hparam.default}" for hparam in method.hparams)
    taps = method.taps if not callable(method.taps) else ["(dynamic)"]
    return f" [{method.citation}; taps: {', '.join(taps) or 'logits'}; {defaults or 'no hparams'}]"


def _echo_recipes() -> None:
    from kdbench import recipes

    click.echo("recipes (kdbench run --recipe NAME):")
    for name in recipes.names():
        recipe = recipes.load_recipe(name)
        lrs = ", ".join(f"{model} {lr}" for model, lr in recipe.model_lr)
        click.echo(f"  {name:<18} {recipes.read(name).get('description', '')}"
                   + (f" [lr per model: {lrs}]" if lrs else ""))


def _echo_failures(registry) -> None:
    if registry.failures:
        click.echo("broken plugins:")
        for failure in registry.failures:
            click.echo(f"  {failure.line()}")


# --------------------------------------------------------------------------- plugins


@click.command("plugins")
@click.option("--disable", multiple=True, metavar="NAME",
              help="Skip this plugin (entry-point or distribution name; repeatable). "
                   "For every command: KDBENCH_DISABLE=a,b.")
@click.option("--no-third-party", is_flag=True,
              help="Load only kdbench's own plugins. For every command: KDBENCH_PLUGINS= (empty).")
def plugins_cmd(disable, no_third_party):
    """Installed plugin entry points: distribution, version, status (loaded, empty: registered
    nothing, failed, disabled), hooks; then load failures."""
    from kdbench.core import plugins

    if disable or no_third_party:
        registry = plugins.load(disable=disable, only=set() if no_third_party else None)
        plugins.warn(registry)
    else:
        registry = _registry()
    click.echo(f"{'plugin':<20} {'distribution':<28} {'status':<9} {'module':<28} hooks")
    for plugin in registry.plugins:
        hooks = ", ".join(plugin.hooks) or "-"
        dist = f"{plugin.dist} {plugin.version}"
        click.echo(f"{plugin.plugin:<20} {dist:<28} {plugin.status:<9} {plugin.module:<28} {hooks}")
    _echo_failures(registry)


# --------------------------------------------------------------------------- show


@click.command("show")
@click.argument("kind", type=KIND)
@click.argument("name")
@click.option("--dataset", default=None, metavar="NAME",
              help="For a model: list its taps as built for this dataset [default: the first "
                   "registered dataset it builds for, the default one first].")
def show_cmd(kind, name, dataset):
    """Details of one method (hyperparameters, defaults, search space), model (feature taps and
    their shapes) or dataset."""
    registry = _registry()
    entry = registry.entry(kind + "s", name)
    obj = entry.obj
    click.echo(f"{name} — {obj.description}  ({entry.source})")
    if kind == "method":
        _show_method(obj)
    elif kind == "dataset":
        _show_dataset(obj)
    else:
        click.echo(f"kwargs: {dict(obj.kwargs)}")
        _show_taps(registry, obj, dataset)


def _show_method(method) -> None:
    click.echo(f"citation: {method.citation or '-'}")
    click.echo(f"taps: {'(dynamic)' if callable(method.taps) else ', '.join(method.taps) or 'logits only'}")
    click.echo(f"needs teacher: {'yes' if method.needs_teacher else 'no'}"
               + ("; reads the extra teachers (--teachers)" if method.uses_teachers else ""))
    for hparam in method.hparams:
        click.echo(f"  {hparam.name:<12} default {hparam.default!r:<10} valid {_valid_range(hparam):<14} "
                   f"search {hparam.describe_space():<22} {hparam.help}")


def _valid_range(hparam) -> str:
    """The values a hyperparameter accepts: ``{a, b}``, ``any float`` or an interval."""
    if hparam.choices is not None:
        return "{" + ", ".join(map(str, hparam.choices)) + "}"
    if hparam.low is None and hparam.high is None:
        return "any " + hparam.kind.__name__
    low = ("(" if hparam.open_low else "[") + ("-inf" if hparam.low is None else str(hparam.low))
    high = "inf)" if hparam.high is None else f"{hparam.high}]"
    return f"{low}, {high}"


def _show_taps(registry, model, dataset_name: str | None) -> None:
    """The model's taps (what ``Method.taps`` may name), with the module each reads and its
    per-sample shape, on a network built for ``dataset_name`` (or the first dataset it builds for)."""
    import torch

    from kdbench.core.plan import default_dataset
    from kdbench.core.taps import Tapped
    from kdbench.errors import KdbenchError

    if dataset_name:
        candidates = [registry.entry("datasets", dataset_name)]
    else:
        try:
            first = [default_dataset(registry)]
        except KdbenchError:
            first = []
        names = first + [name for name in registry.datasets if name not in first]
        candidates = [registry.datasets[name] for name in names]
    refused = []
    for entry in candidates:
        ds = entry.obj
        shape, classes = tuple(ds.input_shape), max(ds.num_classes, 2)
        try:
            net = model.make(classes, shape).eval()
            taps = model.taps_of(net)
            tapped = Tapped(net, taps, list(taps), f"model {model.name!r}")
            with torch.no_grad():
                feats = tapped(torch.zeros((2, *shape))).feats
        except Exception as exc:  # noqa: BLE001 - a shape the model refuses, told as one line
            refused.append(f"{ds.name}: {' '.join(str(exc).split()) or type(exc).__name__}")
            continue
        click.echo(f"taps (built for {ds.name}, input {shape}; name them in Method.taps):")
        for tap_name, tap in taps.items():
            where = f"input of {tap.module}" if tap.input else tap.module
            click.echo(f"  {tap_name:<12} {where:<28} {tuple(feats[tap_name].shape[1:])}")
        if not taps:
            click.echo("  none (methods that need features cannot use it)")
        return
    click.echo("taps: the model builds for no registered dataset"
               + (f" ({'; '.join(refused)})" if refused else ""))


def _show_dataset(dataset) -> None:
    shape = (f"classes {dataset.num_classes}, input {dataset.input_shape}" if dataset.resolve is None else
             "classes and input shape read from its files (--data-dir, --data-option)")
    click.echo(f"{shape}, default pair {dataset.default_teacher} → {dataset.default_student}")
    click.echo(f"recipe: {dataset.recipe}")
