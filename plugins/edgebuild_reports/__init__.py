"""Built-in reporters: report.json (the machine-readable contract) and report.md (for a PR comment)."""
import json
import os
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined

from edgebuild.fsutil import atomic_write_text
from edgebuild.hookspecs import hookimpl
from edgebuild.units import format_size


def write_json(report: dict, output: Path) -> Path:
    path = output / "report.json"
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return path


def _why(candidate: dict) -> str:
    if candidate["status"] == "skipped":
        return f"skipped: {candidate['reason']}"
    if candidate["status"] == "error":
        error = candidate["error"]
        return f"{error['stage']} failed: {error['message']}".replace("|", "\\|")
    reasons = []
    for failure in candidate.get("failed", []):
        if failure["constraint"] in ("size", "download"):
            reasons.append(f"{failure['constraint']} {format_size(failure['actual'])} > {format_size(failure['limit'])}")
        else:
            reasons.append(f"{failure['constraint']} {failure['actual']:.4f} < {failure['limit']:.4f}")
    return "; ".join(reasons)


def render_markdown(report: dict) -> str:
    environment = Environment(loader=PackageLoader("edgebuild_templates", ""), undefined=StrictUndefined,
                              autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    environment.filters["size"] = format_size
    environment.filters["metric"] = lambda value: "n/a" if value is None else f"{value:.4f}"
    environment.filters["why"] = _why
    return environment.get_template("report.md.j2").render(report=report)


def write_markdown(report: dict, output: Path) -> Path:
    path = output / "report.md"
    text = render_markdown(report)
    atomic_write_text(path, text)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(text)
    return path


@hookimpl
def register_reporters(register):
    register("json", write_json)
    register("md", write_markdown)
