"""Built-in reporters: report.json (the contract), report.md (PR comment), junit.xml (CI), report.html."""
import json
import os
from pathlib import Path

from edgebuild.fsutil import atomic_write_text
from edgebuild.hookspecs import hookimpl
from edgebuild.units import format_size


def candidate_reason(candidate: dict) -> str:
    """Why a candidate was not chosen, in one line."""
    if candidate["status"] == "skipped":
        return f"skipped: {candidate['reason']}"
    if candidate["status"] == "error":
        error = candidate["error"]
        return f"{error['stage']} failed: {error['message']}"
    reasons = []
    for failure in candidate.get("failed", []):
        if failure["constraint"] in ("size", "download", "store"):
            reasons.append(f"{failure['constraint']} {format_size(failure['actual'])} > {format_size(failure['limit'])}")
        elif failure["constraint"] == "latency":
            reasons.append(f"latency {failure['actual']:.3f} ms > {failure['limit']:.3f} ms")
        else:
            reasons.append(f"{failure['constraint']} {failure['actual']:.4f} < {failure['limit']:.4f}")
    return "; ".join(reasons)


def write_json(report: dict, output: Path) -> Path:
    path = output / "report.json"
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return path


def render_markdown(report: dict) -> str:
    from .render import environment

    return environment().get_template("report.md.j2").render(report=report)


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
    from .html import write_html
    from .junit import write_junit

    register("json", write_json)
    register("md", write_markdown)
    register("junit", write_junit)
    register("html", write_html)
