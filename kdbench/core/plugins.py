"""Plugin discovery: entry points in the ``kdbench`` group, loaded one by one with pluggy.

Built-ins come through the same path as third-party packages; the only thing the core knows about
them is its own distribution name (``kdbench``), so ``KDBENCH_PLUGINS=`` (empty) can fall back to
them when a third-party plugin is broken.

Environment:
  ``KDBENCH_PLUGINS``  unset: load every plugin. Otherwise a comma list of entry-point or
                       distribution names to load besides kdbench's own (empty: built-ins only).
  ``KDBENCH_DISABLE``  a comma list of entry-point or distribution names never to load.

Names: a method, model or dataset registered by one distribution is used by its name. A name
registered by several distributions is *contested*: using it plainly is an error that names them
all (kdbench's own built-ins excepted: their plain name stays kdbench's), and every command that
loads the plugins warns while the conflict lasts. ``DIST:NAME`` (``kdbench-lskd:lskd``) always
names the one from distribution ``DIST``.

Catalog cache: ``kdbench list``, ``plugins`` and ``show`` store what they print in
``$KDBENCH_CACHE_DIR/catalog``, keyed by :func:`catalog_fingerprint` (the entry points and the files
behind them), and print it from there while nothing changed, without importing a plugin (or torch).
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import re
import site
import sys
import tempfile
from dataclasses import dataclass, field, replace
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pluggy

import kdbench
from kdbench import API_VERSION, hookspecs
from kdbench.contracts import Dataset, Leaderboard, Method, Model, ModelSource
from kdbench.errors import KdbenchError, closest

GROUP = "kdbench"
CORE_DIST = "kdbench"
KINDS = {"methods": Method, "models": Model, "datasets": Dataset, "leaderboards": Leaderboard}
HOOKS = tuple(f"register_{kind}" for kind in KINDS)

log = logging.getLogger("kdbench.plugins")


def normalize(dist: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``Kdbench_LSKD`` → ``kdbench-lskd``."""
    return re.sub(r"[-_.]+", "-", dist).lower()


class _FromDistribution:
    """``source``: the distribution and version a record with ``dist`` and ``version`` came from."""

    dist: str
    version: str

    @property
    def source(self) -> str:
        return f"{self.dist} {self.version}"


@dataclass(frozen=True)
class Entry(_FromDistribution):
    """A registered thing and where it came from."""

    obj: object
    plugin: str  # entry-point name
    dist: str
    version: str


@dataclass(frozen=True)
class PluginRef(_FromDistribution):
    """A plugin: its entry-point name and the distribution that provides it."""

    plugin: str
    dist: str
    version: str


@dataclass(frozen=True)
class Failure(PluginRef):
    """A plugin that could not be loaded, and why."""

    error: str

    def line(self) -> str:
        return f"{self.plugin} ({self.source}): {self.error}"


@dataclass(frozen=True)
class PluginInfo(PluginRef):
    """A discovered plugin: its module, the hooks it implements, and whether it loaded."""

    module: str
    hooks: tuple[str, ...]
    status: str  # loaded | empty (loaded, registered nothing) | failed | disabled


@dataclass
class Registry:
    """What the plugins registered. ``methods``/``models``/``datasets`` map each usable plain name
    to its :class:`Entry`; a contested name (see the module's doc) is absent from them (unless
    kdbench's own: then it maps to kdbench's) and kept, with every provider, in ``contested``.
    :meth:`entry` also takes ``DIST:NAME``; :meth:`listing` gives the names to show."""

    methods: dict[str, Entry] = field(default_factory=dict)
    models: dict[str, Entry] = field(default_factory=dict)
    datasets: dict[str, Entry] = field(default_factory=dict)
    leaderboards: dict[str, Entry] = field(default_factory=dict)  # suites plugins ship (Leaderboard)
    failures: list[Failure] = field(default_factory=list)
    plugins: list[PluginInfo] = field(default_factory=list)
    model_sources: dict[str, Entry] = field(default_factory=dict)  # prefix -> ModelSource entry
    #: (kind, name) -> every provider, in load order, of a name registered by several distributions
    contested: dict[tuple[str, str], list[Entry]] = field(default_factory=dict)
    #: one line each: contested names, plugins that registered nothing (see :func:`warn`)
    warnings: list[str] = field(default_factory=list)

    def entry(self, kind: str, name: str) -> Entry:
        table: dict[str, Entry] = getattr(self, kind)
        if name in table:
            return table[name]
        if (kind, name) in self.contested:
            raise KdbenchError(contested_error(kind, name, self.contested[kind, name]))
        if ":" in name:
            prefix = name.split(":", 1)[0]
            if normalize(prefix) in self._dists():
                return self._qualified(kind, name)
            if kind == "models":
                return self._from_source(name)
        singular = kind[:-1]
        raise KdbenchError(
            f"unknown {singular} {name!r}{closest(name, table)} (see `kdbench list {kind}`)"
            + self._failure_hint(name)
        )

    def listing(self, kind: str) -> list[tuple[str, Entry]]:
        """(the name to use, entry) for everything of ``kind``, sorted: plain names, and
        ``DIST:NAME`` for each provider of a contested name whose plain name is not its own."""
        rows = dict(getattr(self, kind))
        for (contested_kind, name), entries in self.contested.items():
            if contested_kind == kind:
                for entry in entries:
                    if rows.get(name) is not entry:
                        rows[f"{entry.dist}:{name}"] = entry
        return sorted(rows.items())

    def _dists(self) -> dict[str, str]:
        """normalized name -> name of every distribution that has a plugin entry point."""
        return {normalize(plugin.dist): plugin.dist for plugin in self.plugins}

    def _qualified(self, kind: str, name: str) -> Entry:
        """``DIST:NAME``: the ``NAME`` that distribution ``DIST`` registered."""
        prefix, plain = name.split(":", 1)
        dist = normalize(prefix)
        providers = self.contested.get((kind, plain)) or [
            entry for entry in [getattr(self, kind).get(plain)] if entry is not None
        ]
        for entry in providers:
            if normalize(entry.dist) == dist:
                return entry
        singular = kind[:-1]
        failed = [failure.line() for failure in self.failures if normalize(failure.dist) == dist]
        if failed:
            raise KdbenchError(f"unknown {singular} {name!r}: a plugin of {self._dists()[dist]} failed to "
                               f"load: {'; '.join(failed)}")
        own = sorted(plain_name for plain_name, entry in self.listing(kind) if normalize(entry.dist) == dist)
        raise KdbenchError(
            f"unknown {singular} {name!r}: {self._dists()[dist]} registers no {singular} {plain!r} "
            f"(its {kind}: {', '.join(own) or 'none'})"
        )

    def _failure_hint(self, name: str) -> str:
        """``; plugin … failed to load: …`` for the failed plugins that may have provided ``name``
        (those whose entry point, distribution or error names it; else every failed one)."""
        if not self.failures:
            return ""
        plain = name.split(":", 1)[-1]
        related = [failure for failure in self.failures
                   if plain in (failure.plugin, normalize(failure.dist).removeprefix("kdbench-"))
                   or repr(plain) in failure.error]
        shown = related or self.failures
        label = "it may come from a plugin that failed to load" if related else \
            f"{len(shown)} plugin(s) failed to load and may provide it"
        return f"; {label}: " + "; ".join(failure.line() for failure in shown)

    def _from_source(self, name: str) -> Entry:
        """``PREFIX:NAME`` from a registered :class:`ModelSource`, resolved once and kept."""
        prefix, rest = name.split(":", 1)
        if prefix not in self.model_sources:
            known = ", ".join(f"{p}:NAME" for p in self.model_sources) or "none registered"
            raise KdbenchError(f"unknown model source {prefix!r} in {name!r} (model sources: {known})"
                               + self._failure_hint(prefix))
        src = self.model_sources[prefix]
        try:
            model = src.obj.resolve(rest)
        except KdbenchError:
            raise
        except Exception as exc:
            raise KdbenchError(f"model {name!r} could not be resolved by {src.source}: "
                               f"{type(exc).__name__}: {exc}") from None
        if not isinstance(model, Model):
            raise KdbenchError(f"model source {prefix!r} returned {type(model).__name__} for {name!r}, not a Model")
        entry = Entry(replace(model, name=name), src.plugin, src.dist, src.version)
        self.models[name] = entry
        return entry

    def method(self, name: str) -> Method:
        return self.entry("methods", name).obj

    def model(self, name: str) -> Model:
        return self.entry("models", name).obj

    def dataset(self, name: str) -> Dataset:
        return self.entry("datasets", name).obj


def _choices(name: str, entries: list[Entry]) -> str:
    return " or ".join(f"`{entry.dist}:{name}`" for entry in entries)


def contested_error(kind: str, name: str, entries: list[Entry]) -> str:
    """The error for a plain contested name: who provides it, and how to pick one."""
    sources = " and ".join(entry.source for entry in entries)
    others = ",".join(entry.dist for entry in entries[1:])
    return (f"{kind[:-1]} {name!r} is registered by {len(entries)} distributions, {sources}: name the "
            f"one you mean, {_choices(name, entries)}, or uninstall or disable the other "
            f"(e.g. KDBENCH_DISABLE={others})")


def contested_warning(kind: str, name: str, entries: list[Entry], winner: Entry | None) -> str:
    """The one-line warning shown by every command while ``name`` is contested."""
    sources = " and ".join(entry.source for entry in entries)
    if winner is not None:
        others = [entry for entry in entries if entry is not winner]
        return (f"{kind[:-1]} {name!r} is registered by {sources}; {name!r} is {winner.dist}'s own, "
                f"the other is {_choices(name, others)} (disable it: KDBENCH_DISABLE="
                f"{','.join(entry.dist for entry in others)})")
    return (f"{kind[:-1]} {name!r} is registered by {sources}; plain {name!r} is refused until one "
            f"is uninstalled or disabled (KDBENCH_DISABLE=DIST) — use {_choices(name, entries)}")


def _split_env(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "?"
    return dist.name, dist.version


def _wanted(ep: EntryPoint, dist: str, disable=(), only=None) -> bool:
    disabled = (_split_env("KDBENCH_DISABLE") or set()) | set(disable)
    if ep.name in disabled or dist in disabled:
        return False
    env_only = _split_env("KDBENCH_PLUGINS")
    if env_only is not None:
        only = env_only if only is None else set(only) & env_only
    if only is None or dist == CORE_DIST:
        return True
    return ep.name in only or dist in only


def _api_problem(module) -> str | None:
    target = getattr(module, "KDBENCH_API", API_VERSION)
    if not isinstance(target, int) or target != API_VERSION:
        return (
            f"targets kdbench plugin API {target!r}, this kdbench provides API {API_VERSION}; "
            "upgrade the plugin or kdbench"
        )
    return None


def load(eps=None, *, disable=(), only=None) -> Registry:
    """Discover and load every plugin; failures are recorded, never raised.

    ``disable`` (entry-point or distribution names) and ``only`` (load just these besides
    kdbench's own; empty: built-ins only) add to ``KDBENCH_DISABLE`` / ``KDBENCH_PLUGINS``."""
    reg = Registry()
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    eps = list(entry_points(group=GROUP) if eps is None else eps)
    # kdbench's own plugins first, then the rest in a stable order: collisions are deterministic.
    eps.sort(key=lambda ep: (_dist_of(ep)[0] != CORE_DIST, _dist_of(ep)[0], ep.name))
    providers: dict[tuple[str, str], list[Entry]] = {}
    for ep in eps:
        dist, version = _dist_of(ep)
        info = dict(plugin=ep.name, dist=dist, version=version, module=ep.value)
        if not _wanted(ep, dist, disable, only):
            reg.plugins.append(PluginInfo(**info, hooks=(), status="disabled"))
            continue
        error, hooks, count = _load_one(pm, ep, reg, providers, dist, version)
        if error:
            reg.failures.append(Failure(ep.name, dist, version, error))
        status = "failed" if error else "loaded" if count else "empty"
        if status == "empty":
            what = ("implements none of kdbench's hooks (" + ", ".join(HOOKS) + ") — mark them with "
                    "@kdbench.hookimpl" if not hooks else f"{', '.join(hooks)} registered nothing — call "
                    "register(...) once per thing it provides")
            reg.warnings.append(f"plugin {ep.name} ({dist} {version}, module {ep.value}) {what}")
        reg.plugins.append(PluginInfo(**info, hooks=hooks, status=status))
    _settle(reg, providers)
    reg.warnings += _unknown_selection(eps, disable, only)
    return reg


def _unknown_selection(eps: list[EntryPoint], disable=(), only=None) -> list[str]:
    """A warning for each name of the plugin selection (``--disable``, ``KDBENCH_DISABLE``,
    ``KDBENCH_PLUGINS``, ``only``) that is neither an installed entry point's nor a distribution's:
    a typo there would otherwise leave the plugin it meant loaded (or not loaded) without a word."""
    known = {ep.name for ep in eps} | {_dist_of(ep)[0] for ep in eps}
    named = [("--disable", set(disable)), ("KDBENCH_DISABLE", _split_env("KDBENCH_DISABLE") or set()),
             ("KDBENCH_PLUGINS", _split_env("KDBENCH_PLUGINS") or set()), ("load(only=...)", set(only or ()))]
    return [f"{where} names {name!r}, which is no installed plugin (entry points and distributions: "
            f"{', '.join(sorted(known))}; `kdbench plugins` lists them)"
            for where, names in named for name in sorted(names - known)]


def _settle(reg: Registry, providers: dict[tuple[str, str], list[Entry]]) -> None:
    """Fill the name tables: a name of one distribution is used plainly; one of several is
    contested (kdbench's own keeps its plain name) and warned about."""
    for (kind, name), entries in providers.items():
        table = getattr(reg, kind)
        if len(entries) == 1:
            table[name] = entries[0]
            continue
        reg.contested[kind, name] = entries
        winner = next((entry for entry in entries if entry.dist == CORE_DIST), None)
        if winner is not None:
            table[name] = winner
        reg.warnings.append(contested_warning(kind, name, entries, winner))


def _hook_problem(module) -> str | None:
    """One line for a hook pluggy would refuse with several: an unknown hook name, or a hook
    whose argument is not ``register``."""
    for attr in dir(module):
        function = getattr(module, attr, None)
        if not callable(function) or getattr(function, f"{GROUP}_impl", None) is None:
            continue
        if attr not in HOOKS:
            return (f"{attr} is not a kdbench hook (kdbench's hooks: {', '.join(HOOKS)}); "
                    "rename it or drop its @hookimpl")
        try:
            params = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return None  # let pluggy decide
        args = [p.name for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if tuple(args) not in ((), ("register",)):
            return f"{attr}({', '.join(args)}): a kdbench hook takes one argument, named `register`"
    return None


def _load_one(pm, ep, reg: Registry, providers: dict, dist: str,
              version: str) -> tuple[str | None, tuple, int]:
    """Load one entry point; (error or None, the hooks it implements, how many things it registered)."""
    try:
        module = ep.load()
    except Exception as exc:  # a plugin that fails to import must not take kdbench down
        return f"import failed: {type(exc).__name__}: {exc}", (), 0
    problem = _api_problem(module) or _hook_problem(module)
    if problem:
        return problem, (), 0
    try:
        pm.register(module, name=f"{dist}:{ep.name}")
        pm.check_pending()
    except Exception as exc:
        if pm.is_registered(module):
            pm.unregister(module)
        first = str(exc).strip().splitlines()
        return f"invalid hooks: {first[0] if first else type(exc).__name__}", (), 0
    impls = [
        (kind, impl)
        for kind in KINDS
        for impl in getattr(pm.hook, f"register_{kind}").get_hookimpls()
        if impl.plugin is module
    ]
    errors = []
    count = 0
    for kind, impl in impls:
        staged: dict[str, object] = {}

        def register(obj, _kind=kind, _staged=staged):
            _register(reg, _kind, obj, _staged, dist)

        try:
            impl.function(register=register)
        except Exception as exc:
            errors.append(f"register_{kind} raised {type(exc).__name__}: {exc}")
            continue
        for name, obj in staged.items():
            entry = Entry(obj, ep.name, dist, version)
            if isinstance(obj, ModelSource):
                name = name.removesuffix(":*")
                if name in reg.model_sources:
                    errors.append(f"model source {name!r} is already provided by "
                                  f"{reg.model_sources[name].source}; refused (rename its prefix, or "
                                  f"disable one with KDBENCH_DISABLE={ep.name})")
                else:
                    reg.model_sources[name] = entry
                    count += 1
                continue
            same = [other for other in providers.get((kind, name), []) if other.dist == dist]
            if same:
                errors.append(f"{kind[:-1]} {name!r} is already provided by {same[0].plugin} of the "
                              f"same distribution ({dist}); refused (rename one)")
                continue
            providers.setdefault((kind, name), []).append(entry)
            count += 1
    return ("; ".join(errors) or None), tuple(f"register_{kind}" for kind, _ in impls), count


def _register(reg: Registry, kind: str, obj, staged: dict, dist: str) -> None:
    expected = KINDS[kind]
    if isinstance(obj, ModelSource) and kind == "models":
        if not obj.prefix.isidentifier():
            raise ValueError(f"model source prefix {obj.prefix!r} is not an identifier")
        key = obj.prefix + ":*"
    elif isinstance(obj, expected):
        key = obj.name
    else:
        extra = " or ModelSource" if kind == "models" else ""
        raise TypeError(f"register() expects a kdbench.contracts.{expected.__name__}{extra}, got {obj!r}")
    if isinstance(obj, Method):
        obj.validate_declaration()
    if isinstance(obj, Leaderboard) and not Path(obj.path).is_file():
        raise ValueError(f"leaderboard {obj.name!r}: no suite file at {obj.path}")
    if key in staged:
        raise ValueError(f"{kind[:-1]} {key!r} registered twice by {dist}")
    staged[key] = obj


_REGISTRY: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, loaded on first use (its warnings logged then, once)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load()
        warn(_REGISTRY)
    return _REGISTRY


def loaded() -> Registry | None:
    """The process-wide registry if it is loaded already, else None (nothing is loaded)."""
    return _REGISTRY


def warn(reg: Registry) -> None:
    """Log the registry's warnings, one line each, on the ``kdbench`` logger (the CLI prints
    them as ``warning: …`` on stderr)."""
    for line in reg.warnings:
        log.warning(line)


def reset() -> None:
    """Forget the loaded registry (tests, or after changing KDBENCH_* variables)."""
    global _REGISTRY
    _REGISTRY = None


# --------------------------------------------------------------------------- catalog cache
#
# `kdbench list`, `plugins` and `show` print what the plugins registered. Loading them imports every
# plugin module, and with them torch (≈1.5 s of a 1.7 s `kdbench list`). So the first catalog command
# stores what it printed, keyed by a fingerprint of everything the output depends on, and the next
# ones print it from there without importing a plugin. Any other command loads the plugins for real.

CATALOG_FORMAT = 1


def catalog_fingerprint(*, disable=(), only=None) -> str:
    """A digest of what the plugins' description depends on: the ``kdbench`` entry points (their
    distributions, versions and values), the size and modification time of every file of the
    packages behind them (an edited editable plugin changes it) and of kdbench's own files, the
    installed packages (the site-packages folders' modification times: an install or uninstall changes
    them), Python's version, and the plugin selection (``KDBENCH_PLUGINS``, ``KDBENCH_DISABLE``,
    ``disable``, ``only``). Nothing is imported: a plugin's files are found by their module's spec."""
    eps = sorted(entry_points(group=GROUP), key=lambda ep: (_dist_of(ep), ep.name, ep.value))
    roots = {ep.value.split(":", 1)[0].split(".", 1)[0] for ep in eps}
    parts = {
        "format": CATALOG_FORMAT,
        "python": sys.version,
        "kdbench": [kdbench.__version__, API_VERSION, _file_stats([Path(kdbench.__file__).parent])],
        "selection": [os.environ.get("KDBENCH_PLUGINS"), os.environ.get("KDBENCH_DISABLE"),
                      sorted(disable), None if only is None else sorted(only)],
        "entry_points": [[*_dist_of(ep), ep.name, ep.value] for ep in eps],
        "modules": {root: _file_stats(_module_paths(root)) for root in sorted(roots)},
        "site": [[path, _mtime(path)] for path in getattr(site, "getsitepackages", list)()],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _module_paths(name: str) -> list[Path]:
    """The file or package folders of top-level module ``name``, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [Path(location) for location in spec.submodule_search_locations]
    return [Path(spec.origin)] if spec.origin and os.path.exists(spec.origin) else []


def _file_stats(paths: list[Path]) -> list:
    """(path, size, mtime in ns) of each file under ``paths`` (byte-code caches left out)."""
    stats = []
    for path in paths:
        walked = os.walk(path) if path.is_dir() else [(str(path.parent), [], [path.name])]
        for root, dirs, files in walked:
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                try:
                    st = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                stats.append([os.path.join(root, name), st.st_size, st.st_mtime_ns])
    return stats


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _catalog_file(key: str) -> Path:
    # kdbench.data.cache_dir() says the same, but importing kdbench.data imports torch
    root = Path(os.environ.get("KDBENCH_CACHE_DIR") or Path.home() / ".cache" / "kdbench")
    return root / "catalog" / f"{key[:32]}.json"


@dataclass
class CatalogCache:
    """What the catalog commands printed for one fingerprint: ``blocks`` of output lines by name
    (the CLI decides which), and the registry's warnings, shown again whenever they are used."""

    key: str
    blocks: dict[str, list[str]]
    warnings: list[str]


def read_catalog(key: str) -> CatalogCache | None:
    """The stored catalog of fingerprint ``key``; None when there is none or it is unreadable
    (damaged, another format): the caller loads the plugins and stores it again."""
    try:
        doc = json.loads(_catalog_file(key).read_text(encoding="utf-8"))
        if doc["format"] != CATALOG_FORMAT or doc["key"] != key:
            return None
        blocks = {str(name): [str(line) for line in lines] for name, lines in doc["blocks"].items()}
        return CatalogCache(key, blocks, [str(line) for line in doc["warnings"]])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_catalog(cache: CatalogCache) -> None:
    """Store ``cache`` (atomically: a reader sees the old file or the new one); a cache folder that
    cannot be written is not an error, the next catalog command just loads the plugins again."""
    path = _catalog_file(cache.key)
    doc = {"format": CATALOG_FORMAT, "key": cache.key, "warnings": cache.warnings, "blocks": cache.blocks}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".catalog-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from others sharing the cache folder
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        _prune(path.parent, keep=8)
    except OSError:
        pass


def _prune(folder: Path, keep: int) -> None:
    """Remove all but the ``keep`` most recently written catalogs (one per installation state and
    plugin selection, so old ones are never read again)."""
    files = sorted(folder.glob("*.json"), key=lambda p: _mtime(str(p)) or 0, reverse=True)
    for old in files[keep:]:
        try:
            old.unlink()
        except OSError:
            pass
