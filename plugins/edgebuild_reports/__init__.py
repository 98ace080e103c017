"""Built-in reporters: report.json (the contract), report.md (PR comment), junit.xml (CI), report.html."""
import json
import os
from pathlib import Path

from edgebuild.fsutil import atomic_write_text
from edgebuild.hookspecs import hookimpl


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
