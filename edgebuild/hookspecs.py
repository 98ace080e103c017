"""The hooks plugins implement. Each receives a `register` callable and calls it once per item.

A name another plugin registered already is refused unless `register(..., replace=True)`.
"""
import pluggy

hookspec = pluggy.HookspecMarker("edgebuild")
hookimpl = pluggy.HookimplMarker("edgebuild")


@hookspec
def register_loaders(register):
    """Register model loaders: register(name, load) for `model.source: name`."""


@hookspec
def register_backends(register):
    """Register backends: register(backend) for `format: backend.name`."""


@hookspec
def register_techniques(register):
    """Register compression techniques: register(Technique(...)) for one backend."""


@hookspec
def register_metrics(register):
    """Register evaluation metrics: register(Metric(...)) for `metric: name`."""


@hookspec
def register_packagers(register):
    """Register packagers: register(format, package) to lay a chosen bundle out in `output`."""


@hookspec
def register_reporters(register):
    """Register reporters: register(name, write) producing one report file from the build result."""


@hookspec
def register_search_strategies(register):
    """Register mixed-precision search strategies: register(SearchStrategy(...)) for `search.strategy`."""


@hookspec
def register_graph_rewrites(register):
    """Register fp32-exact rewrites of the exported program: register(GraphRewrite(...)); `model.rewrites` switches them off."""
