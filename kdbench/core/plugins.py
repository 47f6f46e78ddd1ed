"""Plugin discovery: entry points in the ``kdbench`` group, loaded one by one with pluggy.

Built-ins come through the same path as third-party packages; the only thing the core knows about
them is its own distribution name (``kdbench``), so ``KDBENCH_PLUGINS=`` (empty) can fall back to
them when a third-party plugin is broken.

Environment:
  ``KDBENCH_PLUGINS``  unset: load every plugin. Otherwise a comma list of entry-point or
                       distribution names to load besides kdbench's own (empty: built-ins only).
  ``KDBENCH_DISABLE``  a comma list of entry-point or distribution names never to load.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from importlib.metadata import EntryPoint, entry_points

import pluggy

from kdbench import API_VERSION, hookspecs
from kdbench.contracts import Dataset, Method, Model, ModelSource
from kdbench.errors import KdbenchError, closest

GROUP = "kdbench"
CORE_DIST = "kdbench"
KINDS = {"methods": Method, "models": Model, "datasets": Dataset}


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
    status: str  # loaded | failed | disabled


@dataclass
class Registry:
    methods: dict[str, Entry] = field(default_factory=dict)
    models: dict[str, Entry] = field(default_factory=dict)
    datasets: dict[str, Entry] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    plugins: list[PluginInfo] = field(default_factory=list)
    model_sources: dict[str, Entry] = field(default_factory=dict)  # prefix -> ModelSource entry

    def entry(self, kind: str, name: str) -> Entry:
        table: dict[str, Entry] = getattr(self, kind)
        if name not in table and kind == "models" and ":" in name:
            return self._from_source(name)
        if name not in table:
            singular = kind[:-1]
            hint = closest(name, table)
            raise KdbenchError(
                f"unknown {singular} {name!r}{hint} (see `kdbench list {kind}`)"
            )
        return table[name]

    def _from_source(self, name: str) -> Entry:
        """``PREFIX:NAME`` from a registered :class:`ModelSource`, resolved once and kept."""
        prefix, rest = name.split(":", 1)
        if prefix not in self.model_sources:
            known = ", ".join(f"{p}:NAME" for p in self.model_sources) or "none registered"
            raise KdbenchError(f"unknown model source {prefix!r} in {name!r} (model sources: {known})")
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
    for ep in eps:
        dist, version = _dist_of(ep)
        info = dict(plugin=ep.name, dist=dist, version=version, module=ep.value)
        if not _wanted(ep, dist, disable, only):
            reg.plugins.append(PluginInfo(**info, hooks=(), status="disabled"))
            continue
        error, hooks = _load_one(pm, ep, reg, dist, version)
        if error:
            reg.failures.append(Failure(ep.name, dist, version, error))
        reg.plugins.append(PluginInfo(**info, hooks=hooks, status="failed" if error else "loaded"))
    return reg


def _load_one(pm, ep, reg: Registry, dist: str, version: str) -> tuple[str | None, tuple]:
    try:
        module = ep.load()
    except Exception as exc:  # a plugin that fails to import must not take kdbench down
        return f"import failed: {type(exc).__name__}: {exc}", ()
    problem = _api_problem(module)
    if problem:
        return problem, ()
    try:
        pm.register(module, name=f"{dist}:{ep.name}")
        pm.check_pending()
    except Exception as exc:
        if pm.is_registered(module):
            pm.unregister(module)
        return f"invalid hooks: {exc}", ()
    impls = [
        (kind, impl)
        for kind in KINDS
        for impl in getattr(pm.hook, f"register_{kind}").get_hookimpls()
        if impl.plugin is module
    ]
    errors = []
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
            table = reg.model_sources if isinstance(obj, ModelSource) else getattr(reg, kind)
            name = name.removesuffix(":*")
            if name in table:
                other = table[name]
                errors.append(
                    f"{kind[:-1]} {name!r} is already provided by {other.source}; refused "
                    f"(rename it, or disable one with KDBENCH_DISABLE={ep.name})"
                )
            else:
                table[name] = Entry(obj, ep.name, dist, version)
    return ("; ".join(errors) or None), tuple(f"register_{kind}" for kind, _ in impls)


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
    if key in staged:
        raise ValueError(f"{kind[:-1]} {key!r} registered twice by {dist}")
    staged[key] = obj


_REGISTRY: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load()
    return _REGISTRY


def reset() -> None:
    """Forget the loaded registry (tests, or after changing KDBENCH_* variables)."""
    global _REGISTRY
    _REGISTRY = None
