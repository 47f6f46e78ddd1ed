"""What is installed: `kdbench list` (methods, models, datasets, recipes), `kdbench plugins` (the
plugin entry points) and `kdbench show` (one method, model or dataset in detail)."""
from __future__ import annotations

import json

import click

from kdbench.cli.options import KIND, KINDS


# --------------------------------------------------------------------------- output and its cache
#
# Each command prints named blocks of lines. They come from the plugins' registry or, when a
# previous catalog command stored them for the same installation (see
# kdbench.core.plugins.catalog_fingerprint), from the cache: then no plugin, and no torch, is
# imported. Both go through the same rendering, so the output is the same byte for byte.


def _echo_blocks(*names: str, disable=(), only=None) -> None:
    """Print the blocks ``names``, from the cache when it has them all; otherwise load the plugins
    (``disable``/``only`` as :func:`kdbench.core.plugins.load`), print, and store every block."""
    from kdbench.core import plugins

    selected = bool(disable) or only is not None
    in_process = None if selected else plugins.loaded()
    if in_process is not None:  # already loaded in this process (tests, embedding): no cache
        for name in names:
            _echo_lines(_render(in_process, name))
        return
    key = plugins.catalog_fingerprint(disable=disable, only=only)
    cached = plugins.read_catalog(key)
    if cached is not None and all(name in cached.blocks for name in names):
        for line in cached.warnings:
            plugins.log.warning(line)
        for name in names:
            _echo_lines(cached.blocks[name])
        return
    if selected:
        registry = plugins.load(disable=disable, only=only)
        plugins.warn(registry)
    else:
        registry = plugins.registry()
    blocks = {name: lines for name, lines in (cached.blocks.items() if cached else ())
              if name.startswith('["taps"')}  # computed on demand: kept
    blocks.update(_render_all(registry))
    try:
        for name in names:
            if name not in blocks:
                blocks[name] = _render(registry, name)  # raises what the command would raise
            _echo_lines(blocks[name])
    finally:
        plugins.write_catalog(plugins.CatalogCache(key, blocks, list(registry.warnings)))


def _echo_lines(lines: list[str]) -> None:
    for line in lines:
        click.echo(line)


def _block(*parts: str) -> str:
    """A block's name: its parts (what, then e.g. a kind and a name given on the command line, which
    may hold any character) as a JSON list."""
    return json.dumps(parts)


def _render_all(registry) -> dict[str, list[str]]:
    """Every block a catalog command may print, but model taps (those build networks, so they are
    rendered when first asked for). A block whose rendering fails is left out: the command that
    prints it then loads the plugins and fails as it would without the cache."""
    names = [_block("recipes")] + [_block("list", kind) for kind in KINDS] + [_block("failures"), _block("plugins")]
    names += [_block("show", kind[:-1], name) for kind in KINDS for name, _ in registry.listing(kind)]
    blocks = {}
    for name in names:
        try:
            blocks[name] = _render(registry, name)
        except Exception:  # noqa: BLE001 - see the docstring
            continue
    return blocks


def _render(registry, name: str) -> list[str]:
    """The lines of block ``name`` (see :func:`_block`): ``recipes``, ``list KIND``, ``failures``,
    ``plugins``, ``show KIND NAME`` (a method, model or dataset; unknown names raise the registry's
    error) or ``taps MODEL DATASET`` (DATASET empty: the first one the model builds for)."""
    what, *args = json.loads(name)
    if what == "list":
        return _kind_lines(registry, args[0])
    if what == "recipes":
        return _recipe_lines()
    if what == "failures":
        return _failure_lines(registry)
    if what == "plugins":
        return _plugin_lines(registry)
    if what == "show":
        kind, shown = args
        if kind == "method" and "+" in shown:  # a combination, as `kdbench run --method a+b` builds it
            from kdbench.core.plan import resolve_method

            entry = resolve_method(shown, registry)
        else:
            entry = registry.entry(kind + "s", shown)
        return _show_lines(kind, shown, entry)
    if what == "taps":
        model, dataset = args
        return _taps_lines(registry, registry.entry("models", model).obj, dataset or None)
    raise ValueError(f"unknown catalog block {name!r}")


# --------------------------------------------------------------------------- list


@click.command("list")
@click.argument("kind", required=False, type=click.Choice(KINDS + ("recipes",)))
def list_cmd(kind):
    """List registered methods, models and datasets, the named recipes, and broken plugins."""
    names = [_block("recipes")] if kind in (None, "recipes") else []
    if kind != "recipes":
        names += [_block("list", shown) for shown in ([kind] if kind else KINDS)] + [_block("failures")]
    _echo_blocks(*names)


def _kind_lines(registry, kind: str) -> list[str]:
    lines = [f"{kind}:"]
    for name, entry in registry.listing(kind):
        obj = entry.obj
        extra = _method_summary(obj) if kind == "methods" else ""
        lines.append(f"  {name:<16} {obj.description}{extra}  ({entry.source})")
    if kind == "models":
        for prefix, entry in sorted(registry.model_sources.items()):
            lines.append(f"  {prefix + ':NAME':<16} {entry.obj.description}  ({entry.source})")
    return lines


def _method_summary(method) -> str:
    defaults = ", ".join(f"{hparam.name}={hparam.default}" for hparam in method.hparams)
    taps = method.taps if not callable(method.taps) else ["(dynamic)"]
    return f" [{method.citation}; taps: {', '.join(taps) or 'logits'}; {defaults or 'no hparams'}]"


def _recipe_lines() -> list[str]:
    from kdbench import recipes

    lines = ["recipes (kdbench run --recipe NAME):"]
    for name in recipes.names():
        recipe = recipes.load_recipe(name)
        lrs = ", ".join(f"{model} {lr}" for model, lr in recipe.model_lr)
        lines.append(f"  {name:<18} {recipes.read(name).get('description', '')}"
                     + (f" [lr per model: {lrs}]" if lrs else ""))
    return lines


def _failure_lines(registry) -> list[str]:
    if not registry.failures:
        return []
    return ["broken plugins:"] + [f"  {failure.line()}" for failure in registry.failures]


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
    _echo_blocks(_block("plugins"), _block("failures"),
                 disable=disable, only=set() if no_third_party else None)


def _plugin_lines(registry) -> list[str]:
    lines = [f"{'plugin':<20} {'distribution':<28} {'status':<9} {'module':<28} hooks"]
    for plugin in registry.plugins:
        hooks = ", ".join(plugin.hooks) or "-"
        dist = f"{plugin.dist} {plugin.version}"
        lines.append(f"{plugin.plugin:<20} {dist:<28} {plugin.status:<9} {plugin.module:<28} {hooks}")
    return lines


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
    blocks = [_block("show", kind, name)]
    if kind == "model":
        blocks.append(_block("taps", name, dataset or ""))
    _echo_blocks(*blocks)


def _show_lines(kind: str, name: str, entry) -> list[str]:
    obj = entry.obj
    lines = [f"{name} — {obj.description}  ({entry.source})"]
    if kind == "method":
        lines += _method_lines(obj)
    elif kind == "dataset":
        lines += _dataset_lines(obj)
    else:
        lines.append(f"kwargs: {dict(obj.kwargs)}")
        if obj.fuse is not None:
            lines.append("fused as a frozen teacher at bf16 on CUDA (Model.fuse; a run reading a tap the "
                         "fused network does not keep runs it unfused)")
    return lines


def _method_lines(method) -> list[str]:
    lines = [
        f"citation: {method.citation or '-'}",
        f"taps: {'(dynamic)' if callable(method.taps) else ', '.join(method.taps) or 'logits only'}",
        f"needs teacher: {'yes' if method.needs_teacher else 'no'}"
        + ("; reads the extra teachers (--teachers)" if method.uses_teachers else ""),
    ]
    for hparam in method.hparams:
        lines.append(f"  {hparam.name:<12} default {hparam.default!r:<10} valid {_valid_range(hparam):<14} "
                     f"search {hparam.describe_space():<22} {hparam.help}")
    return lines + _defaults_lines(method)


def _defaults_lines(method) -> list[str]:
    """The method's per-dataset/pair defaults (``Method.defaults_for``; a combination's are its
    parts', namespaced as its hyperparameters are), in the order a run matches them."""
    parts = getattr(method, "parts", ())
    entries = ([(f"{part.name}.", entry) for part in parts for entry in part.defaults_for] if parts
               else [("", entry) for entry in method.defaults_for])
    if not entries:
        return []
    lines = ["defaults for (dataset teacher -> student; the first match wins, --set overrides):"]
    for prefix, entry in entries:
        values = ", ".join(f"{prefix}{key}={value!r}" for key, value in entry.values.items())
        where = f"{entry.dataset} {entry.teacher} -> {entry.student}"
        lines.append(f"  {where:<36} {values}" + (f"  ({entry.source})" if entry.source else ""))
    return lines


def _valid_range(hparam) -> str:
    """The values a hyperparameter accepts: ``{a, b}``, ``any float`` or an interval."""
    if hparam.choices is not None:
        return "{" + ", ".join(map(str, hparam.choices)) + "}"
    if hparam.low is None and hparam.high is None:
        return "any " + hparam.kind.__name__
    low = ("(" if hparam.open_low else "[") + ("-inf" if hparam.low is None else str(hparam.low))
    high = "inf)" if hparam.high is None else f"{hparam.high}]"
    return f"{low}, {high}"


def _taps_lines(registry, model, dataset_name: str | None) -> list[str]:
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
    refused, lines = [], []
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
        lines.append(f"taps (built for {ds.name}, input {shape}; name them in Method.taps):")
        for tap_name, tap in taps.items():
            where = f"input of {tap.module}" if tap.input else tap.module
            lines.append(f"  {tap_name:<12} {where:<28} {tuple(feats[tap_name].shape[1:])}")
        if not taps:
            lines.append("  none (methods that need features cannot use it)")
        return lines
    reasons = f" ({'; '.join(refused)})" if refused else ""
    return [f"taps: the model builds for no registered dataset{reasons}"]


def _dataset_lines(dataset) -> list[str]:
    shape = (f"classes {dataset.num_classes}, input {dataset.input_shape}" if dataset.resolve is None else
             "classes and input shape read from its files (--data-dir, --data-option)")
    return [f"{shape}, default pair {dataset.default_teacher} → {dataset.default_student}",
            f"recipe: {dataset.recipe}"]
