"""Loads plugins through the `edgebuild` entry-point group and collects what they register."""
import hashlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pluggy

from . import hookspecs
from .api import Backend, Metric, SearchStrategy, Technique, missing_members
from .errors import InputError

ENTRY_POINT_GROUP = "edgebuild"


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("edgebuild")
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        # Built-in plugins come through here too: nothing is registered by import side effect.
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


@dataclass
class Registry:
    """Everything the loaded plugins registered, and which plugin registered it."""

    loaders: dict = field(default_factory=dict)
    backends: dict[str, Backend] = field(default_factory=dict)
    techniques: dict[tuple[str, str], Technique] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    packagers: dict = field(default_factory=dict)
    reporters: dict = field(default_factory=dict)
    strategies: dict[str, SearchStrategy] = field(default_factory=dict)
    origin: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin name
    replaced: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> the plugin replaced
    plugins: list[dict] = field(default_factory=list)

    def techniques_for(self, backend: str) -> list[Technique]:
        return [t for (b, _), t in self.techniques.items() if b == backend]


class PluginError(InputError):
    """A plugin registered something edgebuild cannot use; names the plugin and the item."""


def _checked(kind: str, value, expected: type):
    if not isinstance(value, expected):
        missing = missing_members(value, expected) if expected is Backend else []
        detail = f" (missing: {', '.join(missing)})" if missing else ""
        raise TypeError(f"a {kind} must be an edgebuild.api.{expected.__name__}, got {type(value).__name__}{detail}")
    return value


# hook -> (kind, the registry field it fills, register's arguments -> (key, item))
HOOKS = {
    "register_loaders": ("loader", "loaders", lambda name, load: (name, load)),
    "register_backends": ("backend", "backends", lambda b: (_checked("backend", b, Backend).name, b)),
    "register_techniques": ("technique", "techniques",
                            lambda t: ((_checked("technique", t, Technique).backend, t.name), t)),
    "register_metrics": ("metric", "metrics", lambda m: (_checked("metric", m, Metric).name, m)),
    "register_packagers": ("packager", "packagers", lambda fmt, p: (fmt, p)),
    "register_reporters": ("reporter", "reporters", lambda name, r: (name, r)),
    "register_search_strategies": ("strategy", "strategies",
                                   lambda s: (_checked("search strategy", s, SearchStrategy).name, s)),
}


def collect(pm: pluggy.PluginManager) -> Registry:
    """Call every register_* hook, one plugin at a time, so each item knows its origin.

    A name registered twice is refused unless the later plugin says `register(..., replace=True)`:
    a plugin never silently replaces a built-in. `edgebuild plugins` lists what was replaced.
    """
    registry = Registry()

    def register_for(hook_name: str, plugin_name: str):
        kind, store_name, key_of = HOOKS[hook_name]
        store = getattr(registry, store_name)

        def register(*args, replace: bool = False):
            try:
                key, value = key_of(*args)
            except TypeError as exc:
                raise PluginError(f"{hook_name}: {exc}", file=f"plugin {plugin_name!r}") from None
            label = key if isinstance(key, str) else "/".join(key)
            previous = registry.origin.get((kind, label))
            if previous is not None and not replace:
                raise PluginError(f"registers {kind} {label!r}, which plugin {previous!r} already registered; "
                                  f"pass replace=True to register() to replace it", file=f"plugin {plugin_name!r}")
            if previous is not None:
                registry.replaced[(kind, label)] = previous
            store[key] = value
            registry.origin[(kind, label)] = plugin_name
        return register

    for hook_name in HOOKS:
        # get_hookimpls() is in registration order: built-ins (entry points) before later plugins.
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            impl.function(register=register_for(hook_name, impl.plugin_name))

    distribution_of = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    for name, plugin in pm.list_name_plugin():
        dist = distribution_of.get(id(plugin))
        registry.plugins.append({
            "name": name,
            "module": getattr(plugin, "__name__", repr(plugin)),
            "file": getattr(plugin, "__file__", None),
            "distribution": f"{dist.project_name} {dist.version}" if dist else None,
        })
    return registry


CODE_SUFFIXES = {".py", ".yaml", ".yml", ".json", ".j2", ".gradle", ".kt", ".swift"}


@cache
def _tree_hash(root: Path) -> str:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in CODE_SUFFIXES)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root.parent)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _plugin_root(file: str) -> Path:
    path = Path(file)
    return path.parent if path.name == "__init__.py" else path


def code_fingerprint(registry: Registry, *items: tuple[str, str]) -> str:
    """A hash of edgebuild's own code and of the plugins that registered `items` ((kind, name) pairs).

    Part of a stage's cache key: a new release (or a local edit) of the code that produces a
    stage's output reruns that stage, and adding an unrelated plugin reruns nothing.
    """
    import edgebuild_templates

    roots = {Path(__file__).parent, Path(edgebuild_templates.__file__).parent}
    files = {plugin["name"]: plugin["file"] for plugin in registry.plugins}
    for item in items:
        plugin = registry.origin.get(item)
        if plugin and files.get(plugin):
            roots.add(_plugin_root(files[plugin]))
    return hashlib.sha256("".join(_tree_hash(root) for root in sorted(roots)).encode()).hexdigest()


@cache
def default_registry() -> Registry:
    return collect(make_plugin_manager())
