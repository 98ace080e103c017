"""report.html: one self-contained page (inline SVG and CSS, no network) for release managers."""
import math
from pathlib import Path

from edgebuild.fsutil import atomic_write_text
from edgebuild.policy import is_measured, pareto_front
from edgebuild.reasons import candidate_reason
from edgebuild.units import format_size

from .render import environment

WIDTH, HEIGHT, PAD = 640, 360, 56


def scatter(target: dict, higher_is_better: bool) -> dict:
    """Pixel geometry for the size-vs-metric plot: log bytes on x, metric on y."""
    points = [c for c in target["candidates"] if is_measured(c)]
    if not points:
        return {"points": [], "front": "", "lines": []}
    xs = [math.log10(p["bytes"]) for p in points]
    ys = [p["metric"] for p in points]
    budget = target["budget"]["size"]
    if budget:
        xs.append(math.log10(budget))
    ys.append(target["accuracy"]["threshold"])
    x_low, x_high = min(xs) - 0.05, max(xs) + 0.05
    y_low, y_high = min(ys), max(ys)
    margin = max((y_high - y_low) * 0.1, 1e-3)
    y_low, y_high = y_low - margin, y_high + margin

    def x(value):
        return PAD + (math.log10(value) - x_low) / (x_high - x_low) * (WIDTH - 2 * PAD)

    def y(value):
        return HEIGHT - PAD - (value - y_low) / (y_high - y_low) * (HEIGHT - 2 * PAD)

    chosen = target["chosen"]["technique"] if target["chosen"] else None
    front = pareto_front(points, higher_is_better)
    lines = [{"kind": "floor", "x1": PAD, "x2": WIDTH - PAD, "y1": y(target["accuracy"]["threshold"]),
              "y2": y(target["accuracy"]["threshold"]), "label": f"floor {target['accuracy']['threshold']:.4f}"}]
    if budget:
        lines.append({"kind": "budget", "x1": x(budget), "x2": x(budget), "y1": PAD, "y2": HEIGHT - PAD,
                      "label": f"budget {format_size(budget)}"})
    return {
        "width": WIDTH, "height": HEIGHT, "pad": PAD,
        "points": [{"x": x(p["bytes"]), "y": y(p["metric"]), "technique": p["technique"], "status": p["status"],
                    "chosen": p["technique"] == chosen, "bytes": p["bytes"], "metric": p["metric"],
                    "on_front": p in front} for p in points],
        "front": " ".join(f"{x(p['bytes']):.1f},{y(p['metric']):.1f}" for p in front),
        "lines": lines,
        "x_ticks": [{"x": x(10 ** v), "label": format_size(round(10 ** v))}
                    for v in _ticks(x_low, x_high)],
        "y_ticks": [{"y": y(v), "label": f"{v:.3f}"} for v in _linear_ticks(y_low, y_high)],
    }


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * (i + 0.5) / count for i in range(count)]


def _linear_ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def decision_log(target: dict) -> list[str]:
    """Why each candidate was or was not chosen, smallest first."""
    chosen = target["chosen"]
    judged = sorted(target["candidates"], key=lambda c: (c.get("bytes", math.inf), c["technique"]))
    lines = []
    for candidate in judged:
        if chosen and candidate["technique"] == chosen["technique"]:
            lines.append(f"{candidate['technique']}: chosen, the smallest candidate meeting every constraint")
        elif candidate["status"] == "pass" and candidate["bytes"] == chosen["bytes"]:
            lines.append(f"{candidate['technique']}: meets every constraint at the same size as "
                         f"{chosen['technique']}, which scores better")
        elif candidate["status"] == "pass":
            lines.append(f"{candidate['technique']}: meets every constraint but is larger than {chosen['technique']}")
        else:
            lines.append(f"{candidate['technique']}: {candidate_reason(candidate)}")
    return lines


def render_html(report: dict) -> str:
    higher = report["metric"]["higher_is_better"]
    views = []
    for target in report["targets"]:
        chosen = next((c for c in target["candidates"] if target["chosen"] and c["technique"] == target["chosen"]["technique"]), None)
        layers = chosen.get("layers", []) if chosen else []
        total = sum(layer["bytes"] for layer in layers) or 1
        views.append({"target": target, "plot": scatter(target, higher), "log": decision_log(target),
                      "layers": [{**layer, "share": layer["bytes"] / total} for layer in layers]})
    return environment().get_template("report.html.j2").render(report=report, views=views)


def write_html(report: dict, output: Path) -> Path:
    path = output / "report.html"
    atomic_write_text(path, render_html(report))
    return path
