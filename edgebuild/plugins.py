"""Loads plugins through the `edgebuild` entry-point group and collects what they register."""
import hashlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pluggy

from . import hookspecs
from .api import Backend, Metric, Technique

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
    strategies: dict = field(default_factory=dict)
    origin: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin name
    plugins: list[dict] = field(default_factory=list)

    def techniques_for(self, backend: str) -> list[Technique]:
        return [t for (b, _), t in self.techniques.items() if b == backend]


def collect(pm: pluggy.PluginManager) -> Registry:
    """Call every register_* hook, one plugin at a time, so each item knows its origin."""
    registry = Registry()

    def keyed(kind, store, key_of):
        def register_for(plugin_name):
            def register(*args):
                key, value = key_of(*args)
                store[key] = value
                registry.origin[(kind, key if isinstance(key, str) else "/".join(key))] = plugin_name
            return register
        return register_for

    hooks = {
        "register_loaders": keyed("loader", registry.loaders, lambda name, load: (name, load)),
        "register_backends": keyed("backend", registry.backends, lambda b: (b.name, b)),
        "register_techniques": keyed("technique", registry.techniques, lambda t: ((t.backend, t.name), t)),
        "register_metrics": keyed("metric", registry.metrics, lambda m: (m.name, m)),
        "register_packagers": keyed("packager", registry.packagers, lambda fmt, p: (fmt, p)),
        "register_reporters": keyed("reporter", registry.reporters, lambda name, r: (name, r)),
        "register_search_strategies": keyed("strategy", registry.strategies, lambda name, s: (name, s)),
    }
    for hook_name, register_for in hooks.items():
        # get_hookimpls() is in registration order: a later plugin overrides an earlier one's names.
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            impl.function(register=register_for(impl.plugin_name))

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
    import edgebuild
    import edgebuild_templates

    roots = {Path(edgebuild.__file__).parent, Path(edgebuild_templates.__file__).parent}
    files = {plugin["name"]: plugin["file"] for plugin in registry.plugins}
    for item in items:
        plugin = registry.origin.get(item)
        if plugin and files.get(plugin):
            roots.add(_plugin_root(files[plugin]))
    return hashlib.sha256("".join(_tree_hash(root) for root in sorted(roots)).encode()).hexdigest()


@cache
def default_registry() -> Registry:
    return collect(make_plugin_manager())
