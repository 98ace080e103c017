"""Select, package, report, lock: the chosen candidate per target, laid out in `output`, the reports
release managers read, and edgebuild.lock for `edgebuild check`."""
import math
import os
import shutil
from datetime import datetime, timezone

from ... import __version__
from ...api import PackageInput
from ...fsutil import atomic_write_json, bundle_files, read_json, remove_dir, replace_dir, sha256_file
from ...manifest import Target
from ...policy import choose, is_judged, is_measured, judged, nearest, pareto_front, store_limit, target_checks
from ...units import format_size
from ..evaluation import limits, metrics, post_training_entries
from ..layout import Build, executor_name


def _candidates(build: Build, target: Target, search: dict | None,
                trained: dict | None) -> list[tuple[dict, str | None]]:
    """Every candidate of the target with the state path of its bundle (None where nothing was built):
    the post-training techniques in order, then the search's pick and the trained candidate."""
    key = build.variant(target).key
    # A faster form that was not built (the model has nothing to lay out otherwise) is no candidate.
    entries = [(entry, build.candidate_bundle(key, technique.name) if entry["status"] == "ok" else None)
               for technique, entry in post_training_entries(build, key)
               if not (technique.faster_form_of and entry["status"] == "skipped")]
    if search and search.get("candidate"):
        entries.append((search["candidate"], build.search_bundle(target)))
    if trained and trained.get("candidate"):
        entries.append((trained["candidate"], build.qat_bundle(target)))
    return [(entry, build.manifest.relative(bundle) if bundle else None) for entry, bundle in entries]


def _comparisons(build: Build, target: Target, by_name: dict) -> list[dict]:
    """What one knob bought: techniques against the one that differs from them in that knob alone."""
    rows = []
    for technique in build.registry.techniques_for(target.format):
        this, other = by_name.get(technique.name), by_name.get(technique.compare_with)
        if technique.compare_with and this and other and "metric" in this and "metric" in other:
            rows.append({"technique": technique.name, "compared_with": technique.compare_with,
                         "knob": technique.knob, "metric_delta": this["metric"] - other["metric"],
                         "bytes_delta": this["bytes"] - other["bytes"],
                         # A faster form is bought with bytes for time: None where either was not timed.
                         "latency_delta_ms": (this["latency_ms"] - other["latency_ms"]
                                              if this.get("latency_ms") is not None
                                              and other.get("latency_ms") is not None else None)})
    return rows


def _extras(search: dict | None, trained: dict | None) -> dict:
    """The search's and training's own records, for the reports."""
    extras = {}
    if trained is not None:
        extras["qat"] = {k: v for k, v in trained.items() if k != "candidate"}
    if search is not None:
        extras["search"] = {k: search[k] for k in ("strategy", "precisions", "layers", "evaluations",
                                                   "max_evaluations", "seconds", "notes", "chosen", "evaluated")}
    return extras


def select(build: Build, target: Target) -> None:
    """The smallest candidate meeting every constraint (policy.py); ties go to the better metric."""
    manifest = build.manifest
    metric = build.gate_metric
    target_limits = limits(build, target)
    baseline = read_json(build.baseline)
    # Each record read once: a search record of a large model holds every layer's table.
    search = read_json(build.search_record(target)) if build.searches(target) else None
    trained = read_json(build.qat_record(target)) if build.trains(target) else None
    candidates, sources = [], {}
    for entry, source in _candidates(build, target, search, trained):
        candidates.append(entry if entry["status"] in ("skipped", "error") else judged(entry, target_limits))
        sources[entry["technique"]] = source
    chosen = choose(candidates, metric.higher_is_better)
    bundle_path = build.target_output(target) / f"{manifest.model_name}{build.backend(target).extension}"
    measured = [c for c in candidates if is_measured(c)]
    selection = {
        "name": target.name,
        "format": target.format,
        "devices": target.devices,
        "status": "pass" if chosen else "fail",
        "budget": {"size": target.size, "download": target.download, "latency_ms": target.latency_ms},
        "store": store_limit(build.backend(target).platform, target.delivery),
        "accuracy": {"max_drop": target.max_drop, "floor": target.floor, "threshold": target_limits.accuracy},
        "constraints": target_checks(target_limits, candidates, chosen),
        "baseline": {"metric": baseline["value"], "metrics": baseline["metrics"],
                     **({"per_output": baseline["per_output"]} if baseline.get("per_output") else {})},
        "chosen": None if chosen is None else {
            "technique": chosen["technique"], "path": manifest.relative(bundle_path), "bytes": chosen["bytes"],
            "download_bytes": chosen["download_bytes"], "metric": chosen["metric"], "metrics": chosen["metrics"],
            "latency_ms": chosen["latency_ms"], "sha256": chosen["sha256"]},
        # Where package finds the chosen bundle: recorded here, never derived from a technique's name.
        "bundle_source": sources[chosen["technique"]] if chosen else None,
        "candidates": candidates,
        "comparisons": _comparisons(build, target, {c["technique"]: c for c in candidates}),
        "pareto_front": [{"technique": c["technique"], "bytes": c["bytes"], "metric": c["metric"]}
                         for c in pareto_front(measured, metric.higher_is_better)],
        **_extras(search, trained),
    }
    if chosen is None and any(is_judged(c) for c in candidates):
        selection["nearest"] = nearest(candidates)
    atomic_write_json(build.selection(target), selection)


def _built_at(build: Build, target: Target, record: dict) -> str:
    """When the target's output was laid out, as the reports mark it (UTC, to the second). Laying
    out the same files again keeps the time they were first built: the record stays byte-identical,
    so the report and the lock, which depend on it, do not rerun."""
    try:
        previous = read_json(build.packaged(target))
    except (OSError, ValueError):
        previous = {}
    if previous.get("built_at") and {k: previous.get(k) for k in record} == record:
        return previous["built_at"]
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def package(build: Build, target: Target) -> None:
    """Swap the chosen bundle into `output/<target>/`; a failing target leaves no bundle behind."""
    selection = read_json(build.selection(target))
    destination = build.target_output(target)
    if selection["chosen"] is None:
        remove_dir(destination, build.trash)
        atomic_write_json(build.packaged(target), {"files": [], "built_at": _built_at(build, target, {"files": []})})
        return
    staged = build.staging / target.name
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    backend = build.backend(target)
    written = build.registry.packagers[target.format](PackageInput(
        bundle=build.manifest.root / selection["bundle_source"], directory=staged,
        model_name=build.manifest.model_name, model_description=build.manifest.model.get("description", ""),
        manifest_file=build.manifest.path.name, target=target, chosen=selection["chosen"], backend=backend))
    files = [{"path": build.manifest.relative(destination / f.relative_to(staged)), "sha256": sha256_file(f),
              "bytes": f.stat().st_size} for p in sorted(written) for f in bundle_files(p)]
    bundle_path = next((p for p in sorted(written) if p.name.endswith(backend.extension)), None)
    replace_dir(staged, destination, build.trash)
    record = {"bundle": build.manifest.relative(destination / bundle_path.relative_to(staged)) if bundle_path else None,
              "files": files}
    atomic_write_json(build.packaged(target), {**record, "built_at": _built_at(build, target, record)})


def packaged_is_intact(build: Build, target: Target) -> bool:
    try:
        files = read_json(build.packaged(target))["files"]
    except (OSError, ValueError, KeyError):
        return False
    for entry in files:
        path = build.manifest.root / entry["path"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            return False
    return True


def _metric_entry(key: str, spec, metric) -> dict:
    entry = {"key": key, "name": metric.name, "description": metric.description, "unit": metric.unit,
             "higher_is_better": metric.higher_is_better}
    return {**entry, "output": spec.output} if spec.output else entry


def report_data(build: Build) -> dict:
    manifest = build.manifest
    meta = read_json(build.model_meta)
    entries = [_metric_entry(key, manifest.specs[key], metric) for key, metric in metrics(build).items()]
    # A --target/--platform build reports every target: the others as their last build left them.
    reported = build.reported_targets()
    targets = [summary for t in reported if (summary := target_summary(build, t)) is not None]
    return {
        "schema_version": 1,
        "edgebuild_version": __version__,
        "manifest": manifest.path.name,
        "model": {"name": manifest.model_name, "source": manifest.model["source"], "parameters": meta["parameters"],
                  "inputs": meta["inputs"], "outputs": meta["outputs"], "rewrites": meta.get("rewrites", []),
                  "interface": _interface_summary(manifest, meta)},
        "metric": entries[0],
        # The gating metric first, then those the manifest only reports, then the guards'.
        "metrics": entries,
        "warnings": read_json(build.baseline).get("warnings", [])
                    + [f"{t['name']}: {entry['text']}" for t in targets for entry in t["stored_twice"]],
        "toolchain": {name: build.registry.backends[name].version() for name in build.backends_in_use(reported)},
        "executor": executor_name(manifest),
        "targets": targets,
    }


def _interface_summary(manifest, meta: dict) -> dict:
    """What every bundle tells the platforms' tools: general info, labels per output (with their
    file), image inputs and their normalization."""
    interface = manifest.interface
    if interface is None:
        return {}
    labels = interface.labels_by_output([o["name"] for o in meta["outputs"]])
    return {**{key: value for key, value in (("description", interface.description), ("version", interface.version),
                                             ("author", interface.author), ("license", interface.license)) if value},
            "labels": [{"output": output, "classes": len(names), "file": manifest.relative(manifest.label_file(output))}
                       for output, names in labels.items()],
            "images": [{"input": name, **image.to_json()} for name, image in sorted(interface.images.items())]}


def target_summary(build: Build, target: Target) -> dict | None:
    """A target's selection as the reports show it, the chosen bundle's path as its packager laid it out,
    marked with when it was built and whether this build built it."""
    if not build.selection(target).is_file():
        return None
    summary = read_json(build.selection(target))
    summary.pop("bundle_source", None)  # state-folder detail, not part of the report
    packaged = read_json(build.packaged(target)) if build.packaged(target).is_file() else {}
    if summary["chosen"] is not None and packaged.get("bundle"):
        summary["chosen"]["path"] = packaged["bundle"]
    summary["built_at"] = packaged.get("built_at")
    summary["in_this_build"] = any(t.name == target.name for t in build.manifest.targets)
    summary["stored_twice"] = stored_twice(summary)
    return summary


def stored_twice(summary: dict) -> list[dict]:
    """The chosen bundle's weights stored more than once, each with the line every report shows."""
    chosen = summary["chosen"] and next((c for c in summary["candidates"]
                                         if c["technique"] == summary["chosen"]["technique"]), None)
    if not chosen:
        return []
    # A layer's weight and bias share a name: the copy is the tensor of that name and size.
    stored = {(layer["name"], math.prod(layer["shape"])): layer for layer in chosen.get("layers", [])}
    entries = []
    for copy in chosen.get("copies", []):
        layer = stored.get((copy["tensor"], copy["params"]), {})
        text = (f"stored twice: {copy['copy_of']} and {copy['tensor']} ({copy['relation']}), "
                f"{copy['params']:,} parameters, {format_size(layer.get('bytes', 0))} at {layer.get('dtype', '?')}")
        entries.append({**copy, "bytes": layer.get("bytes"), "dtype": layer.get("dtype"), "text": text})
    return entries


def write_reports(build: Build, reporters: list[str], data: dict | None = None) -> None:
    """Write each selected report format and record what was written, for the up-to-date check."""
    data = report_data(build) if data is None else data
    output = build.manifest.output
    output.mkdir(parents=True, exist_ok=True)
    # Reporters write into staging; each finished file is then renamed into `output`, so a crash
    # never leaves a half-written or temporary file there.
    staged = build.staging / "reports"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    written = []
    for name in reporters:
        path = build.registry.reporters[name](data, staged)
        os.replace(path, output / path.name)
        written.append(output / path.name)
    files = {build.manifest.relative(p): sha256_file(p) for p in written}
    try:
        previous = read_json(build.report_record)["files"]
    except (OSError, ValueError, KeyError):
        previous = {}
    for stale in set(previous) - set(files):  # a format dropped from `reports:` leaves no stale file
        (build.manifest.root / stale).unlink(missing_ok=True)
    atomic_write_json(build.report_record, {"files": files})


def reports_are_intact(build: Build) -> bool:
    try:
        files = read_json(build.report_record)["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((build.manifest.root / path).is_file() and sha256_file(build.manifest.root / path) == digest
               for path, digest in files.items())


LOCK_VERSION = 2  # 2: inputs per target (a --target build leaves the others built from older inputs)


def write_lock(build: Build) -> None:
    """edgebuild.lock: per target, the sha256 of every input it was built from and of every bundle file
    it emitted, for `edgebuild check`. Targets outside a --target/--platform selection keep their
    entries; targets no longer in the manifest are dropped. No timestamps: the lock is committed, and a
    clean rebuild of the same inputs writes the same lock."""
    manifest = build.manifest
    try:
        previous = read_json(build.manifest.lock_file)
    except (OSError, ValueError):
        previous = {}
    kept = {t.name for t in build.kept_targets()}
    targets = {name: entry for name, entry in previous.get("targets", {}).items() if name in kept}
    if previous.get("lock_version") == 1:  # v1 kept one set of inputs for every target
        targets = {name: {**entry, "inputs": previous.get("inputs", {})} for name, entry in targets.items()}
    inputs = {manifest.relative(path): sha256_file(path) for path in build.input_files()}
    for target in manifest.targets:
        selection = read_json(build.selection(target))
        packaged = read_json(build.packaged(target))
        targets[target.name] = {
            "status": selection["status"],
            "technique": selection["chosen"]["technique"] if selection["chosen"] else None,
            "bundle": packaged.get("bundle"),
            "files": {entry["path"]: entry["sha256"] for entry in packaged["files"]},
            "inputs": inputs,
        }
    atomic_write_json(build.manifest.lock_file, temp_dir=build.staging, value={
        "lock_version": LOCK_VERSION,
        "edgebuild_version": __version__,
        "manifest": manifest.path.name,
        "targets": {name: targets[name] for name in sorted(targets)},
    })
