"""Jinja2 environments for generated source code (Kotlin, Swift), with safe string literals."""
from functools import cache

from jinja2 import Environment, PackageLoader, StrictUndefined

# What must be escaped inside a double-quoted string literal, per language. Kotlin also
# interpolates `$name`; Swift interpolates `\(...)`, which escaping the backslash disarms.
_ESCAPES = {
    "kotlin": {"\\": "\\\\", '"': '\\"', "$": "\\$", "\n": "\\n", "\r": "\\r"},
    "swift": {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"},
}


@cache
def code_environment(language: str, folder: str) -> Environment:
    """Templates under `templates/<folder>`; `| literal` escapes a value for a `"..."` literal."""
    escapes = _ESCAPES[language]
    environment = Environment(loader=PackageLoader("edgebuild_templates", folder), undefined=StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    environment.filters["literal"] = lambda value: "".join(escapes.get(c, c) for c in str(value))
    return environment
