"""The doit task graph: plain dicts with file_dep, targets and uptodate, one per stage and item.

Changing one target's budget changes only that target's `select`/`package` config, so only
they (and the report) rerun; conversions and evaluations are keyed by model, data and toolchain.
"""
import functools
import os
from pathlib import Path
from typing import Callable

from doit.tools import config_changed

from ..manifest import DATA_ROLES, ENTRY_PATTERN
from ..plugins import code_fingerprint
from . import qat, search, stages
from .layout import Build


def model_sources(build: Build) -> list[Path]:
    """Files whose change must re-export the model.

    A python entry may read anything beside it (weights, configs, sibling modules), so its whole
    folder counts; unchanged re-exports produce identical bytes and stop the rebuild there.
    """
    manifest = build.manifest
    if manifest.model["source"] != "python":
        path = (manifest.root / manifest.model["path"]).resolve()
        # A Hugging Face model is a folder: every file in it (weights, config, tokenizer) counts.
        return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    entry = (manifest.root / ENTRY_PATTERN.match(manifest.model["entry"])["file"]).resolve()
    skip = {manifest.state_dir, manifest.output, manifest.lock_file}
    files = []
    for path in sorted(entry.parent.rglob("*")):
        if not path.is_file() or any(s == path or s in path.parents for s in skip):
            continue
        relative = path.relative_to(entry.parent).parts
        if any(part.startswith(".") or part == "__pycache__" for part in relative):
            continue
        files.append(path)
    return files


def _task(name: str, action: Callable, *args, registry, code: tuple = (), config: dict | None = None,
          **fields) -> dict:
    # One config_changed per task (doit keeps a single slot for it): the settings that shape the
    # task's output, plus the code that produces it (edgebuild and the plugins named in `code`).
    key = {"code": code_fingerprint(registry, *code), **(config or {})}
    fields["uptodate"] = [config_changed(key)] + fields.get("uptodate", [])
    return {"name": name, "actions": [(action, args)], "clean": True, "verbosity": 0, **fields}


def build_tasks(build: Build, wrap: Callable) -> list[dict]:
    """All tasks for the manifest. `wrap(task_name, stage_fn)` adds logging and error capture."""
    manifest, registry = build.manifest, build.registry

    def rel(path) -> str:
        # doit runs in the manifest's folder; relative paths keep the cache valid when the project moves.
        return os.path.relpath(path, manifest.root)

    toolchain = {name: registry.backends[name].version() for name in build.backends_in_use()}
    task = functools.partial(_task, registry=registry)
    metric_code = tuple(("metric", name) for name in manifest.metrics)
    metrics = {"metrics": manifest.metrics}
    evaluation = rel(build.data("evaluation"))
    tasks = [task(f"tokenize:{role}", wrap(f"tokenize:{role}", stages.tokenize), build, role,
                  # The model folder holds the tokenizer; unchanged tokens stop any rebuild here.
                  file_dep=[rel(build.data_source(role))] + [rel(p) for p in model_sources(build)],
                  targets=[rel(build.data(role))],
                  config={"sequence_length": manifest.model.get("sequence_length")})
             for role in DATA_ROLES if build.is_text(role)]
    tasks += [
        task("export", wrap("export", stages.export_model), build,
              file_dep=[rel(p) for p in model_sources(build)],
              targets=[rel(build.exported_program), rel(build.model_meta)],
              code=(("loader", manifest.model["source"]),), config={"model": manifest.model},
              uptodate=[(stages.output_is_intact, (build.model_meta, build.exported_program))]),
        task("reference", wrap("reference", stages.reference_outputs), build,
              file_dep=[rel(build.exported_program), rel(build.model_meta), evaluation],
              targets=[rel(build.reference)]),
        task("baseline", wrap("baseline", stages.baseline_metric), build,
              file_dep=[rel(build.reference), evaluation],
              targets=[rel(build.baseline)],
              code=metric_code, config=metrics),
    ]
    for key, variant in build.variants.items():
        backend = variant.backend
        tasks.append(task(f"convert:{key}", wrap(f"convert:{key}", stages.convert), build, key,
                          file_dep=[rel(build.exported_program)],
                          targets=[rel(build.fp32_record(key))],
                          code=(("backend", backend),),
                          config={"toolchain": toolchain[backend], "options": variant.options},
                          uptodate=[(stages.output_is_intact, (build.fp32_record(key), build.fp32_bundle(key)))]))
        for technique, skip in stages.runnable_techniques(build, key):
            if skip:
                continue  # select() reports it as skipped, with the reason
            name = f"{key}:{technique.name}"
            calibration = [rel(build.data("calibration"))] if technique.needs_calibration else []
            tasks.append(task(
                f"compress:{name}", wrap(f"compress:{name}", stages.compress), build, key, technique.name,
                file_dep=[rel(build.fp32_record(key))] + calibration,
                targets=[rel(build.candidate_record(key, technique.name))],
                code=(("backend", backend), ("technique", f"{backend}/{technique.name}")),
                config={"recipe": technique.recipe, "toolchain": toolchain[backend]},
                # A failed or tampered candidate is never up to date: it is rebuilt, not trusted.
                uptodate=[(stages.candidate_is_valid, (build, key, technique.name))]))
            tasks.append(task(
                f"evaluate:{name}", wrap(f"evaluate:{name}", stages.evaluate), build, key, technique.name,
                file_dep=[rel(build.candidate_record(key, technique.name)), rel(build.reference), evaluation],
                targets=[rel(build.evaluation(key, technique.name))],
                code=(("backend", backend),) + metric_code,
                config={**metrics, "threads": stages.LATENCY_THREADS},
                uptodate=[(stages.candidate_is_valid, (build, key, technique.name))]))
    for target in manifest.targets:
        key = build.variant(target).key
        evaluations = [rel(build.evaluation(key, t.name)) for t, skip in stages.runnable_techniques(build, key)
                       if not skip]
        if search.search_runs(build, target):
            data = [rel(build.data(role)) for role in ("evaluation", "calibration") if build.data(role)]
            tasks.append(task(
                f"search:{target.name}", wrap(f"search:{target.name}", search.run_search), build, target,
                file_dep=[rel(build.fp32_record(key)), rel(build.reference), rel(build.baseline)] + data,
                targets=[rel(build.search_record(target))],
                code=(("backend", target.format), ("strategy", manifest.search["strategy"])) + metric_code,
                config={"search": manifest.search, "target": target.raw, **metrics,
                        "toolchain": toolchain[target.format]},
                uptodate=[(search.search_is_intact, (build, target))]))
            evaluations.append(rel(build.search_record(target)))
        if target.qat is not None:
            data = [rel(build.data(role)) for role in DATA_ROLES if build.data(role)]
            tasks.append(task(
                f"qat:{target.name}", wrap(f"qat:{target.name}", qat.run_qat), build, target,
                file_dep=sorted(set(evaluations + data + [rel(p) for p in model_sources(build)]
                                    + [rel(build.reference), rel(build.baseline), rel(build.model_meta)])),
                targets=[rel(build.qat_record(target))],
                code=(("backend", target.format), ("loader", manifest.model["source"])) + metric_code,
                config={"qat": target.qat, "target": target.raw, **metrics,
                        "toolchain": toolchain[target.format]},
                uptodate=[(qat.qat_is_intact, (build, target))]))
            evaluations.append(rel(build.qat_record(target)))
        tasks.append(task(f"select:{target.name}", wrap(f"select:{target.name}", stages.select), build, target,
                           file_dep=evaluations + [rel(build.baseline)],
                           targets=[rel(build.selection(target))],
                           config={"target": target.raw, "output": rel(manifest.output),
                                   "model": manifest.model_name}))
        tasks.append(task(f"package:{target.name}", wrap(f"package:{target.name}", stages.package), build, target,
                           file_dep=[rel(build.selection(target))],
                           targets=[rel(build.packaged(target))],
                           code=(("packager", target.format), ("backend", target.format)),
                           uptodate=[(stages.packaged_is_intact, (build, target))]))
    tasks.append(task("report", wrap("report", stages.write_reports), build, manifest.reports,
                       file_dep=[rel(build.selection(t)) for t in manifest.targets]
                       + [rel(build.packaged(t)) for t in manifest.targets] + [rel(build.model_meta)],
                       targets=[rel(build.report_record)],
                       code=tuple(("reporter", name) for name in manifest.reports),
                       config={"reporters": manifest.reports, "targets": [t.name for t in manifest.targets]},
                       uptodate=[(stages.reports_are_intact, (build,))]))
    inputs = sorted({rel(p) for p in input_files(build)})
    tasks.append(task("lock", wrap("lock", stages.write_lock), build,
                      file_dep=inputs + [rel(build.packaged(t)) for t in manifest.targets],
                      targets=[rel(manifest.lock_file)],
                      config={"targets": [t.name for t in manifest.targets]}))
    return tasks


def input_files(build: Build) -> list[Path]:
    """Every file a build reads: the manifest, the model's files, the data."""
    manifest = build.manifest
    files = {manifest.path, manifest.evaluation, *model_sources(build)}
    files.update(p for p in (manifest.calibration, manifest.train) if p)
    return sorted(files)
