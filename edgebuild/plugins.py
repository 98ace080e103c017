"""Loads plugins through the `edgebuild` entry-point group and collects what they register."""
import hashlib
import importlib.util
import sys
import traceback
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pluggy

from . import hookspecs
from .api import Backend, GraphRewrite, Metric, SearchStrategy, Technique, missing_members
from .errors import InputError, first_line

ENTRY_POINT_GROUP = "edgebuild"
DISTRIBUTION = "edgebuild"  # the distribution whose entry points are the built-in plugins


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
    rewrites: dict[str, GraphRewrite] = field(default_factory=dict)
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
    "register_graph_rewrites": ("graph rewrite", "rewrites",
                                lambda r: (_checked("graph rewrite", r, GraphRewrite).name, r)),
}


def _located(plugin_name: str, local: dict[str, Path], frames) -> dict:
    """Where a plugin went wrong: a project-local plugin's file and line, else the plugin's name."""
    path = local.get(plugin_name)
    if path is None:
        return {"file": f"plugin {plugin_name!r}"}
    lines = [frame.lineno for frame in frames if Path(frame.filename) == path]
    return {"file": plugin_name, "line": lines[-1] if lines else None}


def collect(pm: pluggy.PluginManager, local: dict[str, Path] | None = None) -> Registry:
    """Call every register_* hook, one plugin at a time, so each item knows its origin.

    A name registered twice is refused unless the later plugin says `register(..., replace=True)`:
    a plugin never silently replaces a built-in. `edgebuild plugins` lists what was replaced.
    `local` maps project-local plugins' names to their files, so their errors name file and line.
    """
    registry = Registry()
    local = local or {}

    def register_for(hook_name: str, plugin_name: str):
        kind, store_name, key_of = HOOKS[hook_name]
        store = getattr(registry, store_name)

        def register(*args, replace: bool = False):
            def refuse(message: str) -> PluginError:  # located at the plugin's register(...) call
                return PluginError(message, **_located(plugin_name, local,
                                                       traceback.extract_stack(sys._getframe(2), limit=8)))

            try:
                key, value = key_of(*args)
            except TypeError as exc:
                raise refuse(f"{hook_name}: {exc}") from None
            label = key if isinstance(key, str) else "/".join(key)
            previous = registry.origin.get((kind, label))
            if previous is not None and not replace:
                raise refuse(f"registers {kind} {label!r}, which plugin {previous!r} already registered; "
                             f"pass replace=True to register() to replace it")
            if previous is not None:
                registry.replaced[(kind, label)] = previous
            store[key] = value
            registry.origin[(kind, label)] = plugin_name
        return register

    # Built-ins register first, then every other plugin in the order it was loaded: entry points
    # load in sys.path order, which must not decide whether a third party's replace=True replaces.
    built_in = {id(plugin) for plugin, dist in pm.list_plugin_distinfo() if dist.project_name == DISTRIBUTION}
    for hook_name in HOOKS:
        impls = getattr(pm.hook, hook_name).get_hookimpls()  # in registration order
        for impl in sorted(impls, key=lambda impl: id(impl.plugin) not in built_in):
            try:
                impl.function(register=register_for(hook_name, impl.plugin_name))
            except PluginError:
                raise
            except Exception as exc:
                where = _located(impl.plugin_name, local, traceback.extract_tb(exc.__traceback__))
                raise PluginError(f"{hook_name} failed: {first_line(exc)}", **where) from exc

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
    # Sorted by content, not by where each tree is installed: another runner's venv gives the same key.
    return hashlib.sha256("".join(sorted(_tree_hash(root) for root in roots)).encode()).hexdigest()


@cache
def default_registry() -> Registry:
    return collect(make_plugin_manager())


def import_local_plugin(path: Path, label: str):
    """Import a project's plugin file (repository code that runs, like `source: python`); an import
    error is one line naming the file and line."""
    name = "edgebuild_local_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise PluginError(f"cannot import the plugin: {exc.msg}", file=label, line=exc.lineno,
                          column=exc.offset) from None
    except Exception as exc:
        lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if Path(frame.filename) == path]
        raise PluginError(f"importing the plugin failed: {first_line(exc)}", file=label,
                          line=lines[-1] if lines else None) from None
    return module


def registry_with(files: dict[str, Path]) -> Registry:
    """The installed plugins, then the project's own plugin files (label -> path), in that order."""
    pm = make_plugin_manager()
    for label, path in files.items():
        module = import_local_plugin(path, label)
        try:
            pm.register(module, name=label)
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"not a valid edgebuild plugin: {first_line(exc)}", file=label) from None
    return collect(pm, local=files)
