"""The Jinja2 environment reports render with: shared filters, autoescaping for HTML/XML."""
from functools import cache

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from edgebuild.reasons import STATUS_MARK, candidate_reason, check_text
from edgebuild.units import format_size


@cache
def environment() -> Environment:
    env = Environment(loader=PackageLoader("edgebuild_templates", ""), undefined=StrictUndefined,
                      autoescape=select_autoescape(["html", "xml", "html.j2", "xml.j2"]),
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["size"] = format_size
    env.filters["metric"] = lambda value: "n/a" if value is None else f"{value:.4f}"
    env.filters["why"] = candidate_reason
    env.filters["check"] = check_text
    env.filters["mark"] = lambda status: STATUS_MARK.get(status, status)
    env.filters["signed"] = lambda value, digits=4: "n/a" if value is None else f"{value:+.{digits}f}"
    env.filters["ms"] = lambda value: "not measured" if value is None else f"{value:.3f} ms"
    env.filters["percent"] = lambda value: "n/a" if value is None else f"{value:+.1f}%"
    return env
