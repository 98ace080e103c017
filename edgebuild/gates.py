"""Release gates that build nothing: `edgebuild check` (bundles vs lock and budgets) and
`edgebuild report --baseline` (growth against an older report)."""
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .fsutil import bundle_bytes, bundle_download_bytes, read_json, sha256_file
from .manifest import Manifest
from .policy import judge, problems, target_limits
from .reasons import candidate_reason
from .units import format_size


@dataclass
class CheckResult:
    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _read_json_file(path: Path, label: str, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{what} not found; run `edgebuild build` first", file=label)
    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} is not valid JSON ({exc})", file=label) from None


def _intact(manifest: Manifest, entry: dict | None, target_name: str, found: list[str]) -> bool:
    """Whether every file the lock records for a target is there with its recorded hash."""
    if entry is None or not entry["files"]:
        found.append(f"target {target_name}: no bundle in edgebuild.lock")
        return False
    intact = True
    for name, digest in sorted(entry["files"].items()):
        path = manifest.root / name
        if not path.is_file():
            found.append(f"{name}: missing")
            intact = False
        elif (actual := sha256_file(path)) != digest:
            found.append(f"{name}: sha256 mismatch (lock {digest[:12]}…, file {actual[:12]}…)")
            intact = False
    return intact


def _inputs_unchanged(locked: dict, current: dict, target_name: str, found: list[str]) -> bool:
    """Whether the target was built from the inputs the manifest reads now."""
    before = len(found)
    for name, digest in current.items():
        if name not in locked:
            found.append(f"target {target_name}: {name} is not in edgebuild.lock; its bundle was built from other inputs")
        elif digest != locked[name]:
            found.append(f"target {target_name}: {name} changed since its bundle was built "
                         "(sha256 differs from edgebuild.lock)")
    return len(found) == before


def _measured(bundle: Path, reported: dict) -> dict:
    """What `check` judges: bytes measured now, metric and latency as the build measured them."""
    chosen = reported["chosen"]
    candidate = next((c for c in reported["candidates"] if c["technique"] == chosen["technique"]), {})
    return {"bytes": bundle_bytes(bundle), "download_bytes": bundle_download_bytes(bundle),
            "metric": chosen["metric"], "metrics": chosen["metrics"], "latency_ms": chosen["latency_ms"],
            "latency_note": candidate.get("latency_note")}


def check_bundles(build) -> CheckResult:
    """Verify the built bundles against edgebuild.lock and the manifest's current constraints, judged by
    the same policy as selection (size, download, store, latency, accuracy)."""
    manifest, registry = build.manifest, build.registry
    result = CheckResult()
    lock = _read_json_file(manifest.lock_file, manifest.relative(manifest.lock_file), "edgebuild.lock")
    report_path = manifest.output / "report.json"
    report = _read_json_file(report_path, manifest.relative(report_path), "report.json")
    current = {manifest.relative(path): sha256_file(path) for path in build.input_files()}
    reported = {t["name"]: t for t in report.get("targets", [])}
    for target in manifest.targets:
        entry = lock.get("targets", {}).get(target.name)
        if not _intact(manifest, entry, target.name, result.problems):
            continue
        # Per target: a --target/--platform build leaves the other targets built from older inputs.
        fresh = _inputs_unchanged(entry.get("inputs", lock.get("inputs", {})), current, target.name, result.problems)
        bundle = manifest.root / entry["bundle"]
        summary = reported.get(target.name) or {}
        if summary.get("chosen") is None:
            result.problems.append(f"target {target.name}: report.json has no chosen candidate")
            continue
        limits = target_limits(target, registry.metrics, manifest.gate.name, summary["baseline"]["metric"],
                               build.backend(target).platform)
        failed = problems(judge(limits, _measured(bundle, summary)))
        if failed:
            result.problems.append(f"target {target.name}: no longer meets its constraints: "
                                   + candidate_reason({"status": "fail", "failed": failed}, exact=True))
        elif fresh:
            result.ok.append(f"target {target.name}: {bundle.relative_to(manifest.root).as_posix()} "
                             f"{format_size(bundle_bytes(bundle))} matches edgebuild.lock and its budgets")
    return result


def parse_percent(text: str) -> float:
    value = text.strip().removesuffix("%")
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"expected a percentage such as 5%, got {text!r}", field="--fail-on-growth") from None
    if number < 0:
        raise InputError(f"expected a percentage of at least 0, got {text!r}", field="--fail-on-growth")
    return number


def _delta(old, new) -> dict:
    if old is None or new is None:
        return {"old": old, "new": new, "delta": None, "percent": None}
    percent = (new - old) / old * 100.0 if old else None
    return {"old": old, "new": new, "delta": new - old, "percent": percent}


def compare_reports(current: dict, baseline: dict, baseline_label: str) -> dict:
    """Per-target deltas of chosen bytes, download bytes and metric against an older report."""
    old_targets = {t["name"]: t for t in baseline.get("targets", [])}
    rows = []
    for target in current["targets"]:
        old = (old_targets.get(target["name"]) or {}).get("chosen") or {}
        new = target["chosen"] or {}
        rows.append({"name": target["name"],
                     "bytes": _delta(old.get("bytes"), new.get("bytes")),
                     "download_bytes": _delta(old.get("download_bytes"), new.get("download_bytes")),
                     "metric": _delta(old.get("metric"), new.get("metric"))})
    return {"path": baseline_label, "targets": rows}


def growth_violations(comparison: dict, limit_percent: float) -> list[str]:
    problems = []
    for row in comparison["targets"]:
        for key, label in (("bytes", "bytes"), ("download_bytes", "download bytes")):
            delta = row[key]
            if delta["percent"] is not None and delta["percent"] > limit_percent:
                problems.append(f"target {row['name']}: {label} grew {delta['percent']:.1f}% "
                                f"({delta['old']} → {delta['new']}), limit {limit_percent:g}%")
    return problems


def load_report(path: Path, label: str) -> dict:
    report = _read_json_file(path, label, "report")
    if not isinstance(report, dict) or report.get("schema_version") != 1 or "targets" not in report:
        raise InputError("not an edgebuild report.json (schema_version 1)", file=label)
    return report

