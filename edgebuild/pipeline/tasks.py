"""The doit task graph: plain dicts with file_dep, targets and uptodate, one per stage and item.

Changing one target's budget changes only that target's `select`/`package` config, so only
they (and the report) rerun; conversions and evaluations are keyed by model, data and toolchain.
"""
import os
from pathlib import Path
from typing import Callable

from doit.tools import config_changed

from .. import __version__
from ..manifest import ENTRY_PATTERN
from . import stages
from .layout import Build

REPORTERS = ["json", "md"]


def model_sources(build: Build) -> list[Path]:
    """Files whose change must re-export the model.

    A python entry may read anything beside it (weights, configs, sibling modules), so its whole
    folder counts; unchanged re-exports produce identical bytes and stop the rebuild there.
    """
    manifest = build.manifest
    if manifest.model["source"] != "python":
        return [manifest.root / manifest.model["path"]]
    entry = (manifest.root / ENTRY_PATTERN.match(manifest.model["entry"])["file"]).resolve()
    skip = {manifest.state_dir, manifest.output}
    files = []
    for path in sorted(entry.parent.rglob("*")):
        if not path.is_file() or any(s == path or s in path.parents for s in skip):
            continue
        relative = path.relative_to(entry.parent).parts
        if any(part.startswith(".") or part == "__pycache__" for part in relative):
            continue
        files.append(path)
    return files


def _task(name: str, action: Callable, *args, **fields) -> dict:
    return {"name": name, "actions": [(action, args)], "clean": True, "verbosity": 0, **fields}


def build_tasks(build: Build, wrap: Callable) -> list[dict]:
    """All tasks for the manifest. `wrap(task_name, stage_fn)` adds logging and error capture."""
    manifest, registry = build.manifest, build.registry

    def rel(path) -> str:
        # doit runs in the manifest's folder; relative paths keep the cache valid when the project moves.
        return os.path.relpath(path, manifest.root)

    toolchain = {name: registry.backends[name].version() for name in build.backends_in_use()}
    data_files = [manifest.evaluation] + ([manifest.calibration] if manifest.calibration else [])
    tasks = [
        _task("export", wrap("export", stages.export_model), build,
              file_dep=[rel(p) for p in model_sources(build)],
              targets=[rel(build.exported_program), rel(build.model_meta)],
              uptodate=[config_changed({"model": manifest.model, "edgebuild": __version__})]),
        _task("reference", wrap("reference", stages.reference_outputs), build,
              file_dep=[rel(build.exported_program), rel(build.model_meta), rel(manifest.evaluation)],
              targets=[rel(build.reference)]),
        _task("baseline", wrap("baseline", stages.baseline_metric), build,
              file_dep=[rel(build.reference), rel(manifest.evaluation)],
              targets=[rel(build.baseline)],
              uptodate=[config_changed({"metric": manifest.metric})]),
    ]
    for backend in build.backends_in_use():
        tasks.append(_task(f"convert:{backend}", wrap(f"convert:{backend}", stages.convert), build, backend,
                           file_dep=[rel(build.exported_program)],
                           targets=[rel(build.fp32_bundle(backend))],
                           uptodate=[config_changed({"toolchain": toolchain[backend]})]))
        for technique in registry.techniques_for(backend):
            if technique.needs_calibration and manifest.calibration is None:
                continue  # select() reports it as skipped
            key = f"{backend}:{technique.name}"
            calibration = [rel(manifest.calibration)] if technique.needs_calibration else []
            tasks.append(_task(
                f"compress:{key}", wrap(f"compress:{key}", stages.compress), build, backend, technique.name,
                file_dep=[rel(build.fp32_bundle(backend))] + calibration,
                targets=[rel(build.candidate_record(backend, technique.name))],
                # A failed or tampered candidate is never up to date: it is rebuilt, not trusted.
                uptodate=[config_changed({"recipe": technique.recipe, "toolchain": toolchain[backend]}),
                          (stages.candidate_is_valid, (build, backend, technique.name))]))
            tasks.append(_task(
                f"evaluate:{key}", wrap(f"evaluate:{key}", stages.evaluate), build, backend, technique.name,
                file_dep=[rel(build.candidate_record(backend, technique.name)), rel(build.reference),
                          rel(manifest.evaluation)],
                targets=[rel(build.evaluation(backend, technique.name))],
                uptodate=[config_changed({"metric": manifest.metric, "threads": stages.LATENCY_THREADS}),
                          (stages.candidate_is_valid, (build, backend, technique.name))]))
    for target in manifest.targets:
        evaluations = [rel(build.evaluation(target.format, t.name)) for t in registry.techniques_for(target.format)
                       if not (t.needs_calibration and manifest.calibration is None)]
        tasks.append(_task(f"select:{target.name}", wrap(f"select:{target.name}", stages.select), build, target,
                           file_dep=evaluations + [rel(build.baseline)],
                           targets=[rel(build.selection(target))],
                           uptodate=[config_changed({"target": target.raw, "output": rel(manifest.output),
                                                     "model": manifest.model_name})]))
        tasks.append(_task(f"package:{target.name}", wrap(f"package:{target.name}", stages.package), build, target,
                           file_dep=[rel(build.selection(target))],
                           targets=[rel(build.packaged(target))],
                           uptodate=[(stages.packaged_is_intact, (build, target))]))
    report_files = [rel(manifest.output / f) for f in ("report.json", "report.md")]
    tasks.append(_task("report", wrap("report", stages.write_reports), build, REPORTERS,
                       file_dep=[rel(build.selection(t)) for t in manifest.targets]
                       + [rel(build.packaged(t)) for t in manifest.targets] + [rel(build.model_meta)],
                       targets=report_files,
                       uptodate=[config_changed({"reporters": REPORTERS, "targets": [t.name for t in manifest.targets]})]))
    return tasks
