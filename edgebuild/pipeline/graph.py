"""The doit task graph: plain dicts with file_dep, targets and uptodate, one function per stage.

This module decides *when* a stage runs; `stages/` says what it does. Changing one target's budget
changes only that target's search, qat, select and package config, so only they (and the report)
rerun; conversions and evaluations are keyed by model, data, toolchain and code.
"""
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

from doit.tools import config_changed

from ..data import shard_files
from ..fsutil import record_matches
from ..manifest import DATA_ROLES, INTERFACE_KEYS, Target
from .cache import Shared, sharing
from .evaluation import LATENCY_THREADS
from .layout import Build, executor_name
from .stages import candidates, deliver, model, qat, search


@dataclass
class Graph:
    """Builds the task dicts of one build; `wrap(task_name, stage)` adds logging and error capture."""

    build: Build
    wrap: Callable
    # task name -> (file_dep, targets, shared outputs): what a remote executor ships and brings back
    io: dict = field(default_factory=dict)

    def rel(self, path) -> str:
        # doit runs in the manifest's folder; relative paths keep the cache valid when the project moves.
        return os.path.relpath(path, self.build.manifest.root)

    def task(self, name: str, stage: Callable, *args, code: tuple = (), config: dict | None = None,
             shared: Shared | None = None, **fields) -> dict:
        # One config_changed per task (doit keeps a single slot for it): the settings that shape the
        # task's output, plus the code that produces it (edgebuild and the plugins named in `code`).
        key = {"code": self.build.code(*code), **(config or {})}
        fields["uptodate"] = [config_changed(key)] + fields.get("uptodate", [])
        if shared is not None:  # the same settings and inputs key its outputs in the shared cache
            stage = sharing(name, stage, key, fields.get("file_dep", []), shared)
        self.io[name] = (fields.get("file_dep", []), fields.get("targets", []), shared.outputs if shared else ())
        return {"name": name, "actions": [(self.wrap(name, stage), (self.build, *args))], "clean": True,
                "verbosity": 0, **fields}

    @cached_property
    def toolchain(self) -> dict[str, str]:
        registry = self.build.registry
        return {name: registry.backends[name].version() for name in self.build.backends_in_use()}

    @property
    def metric_code(self) -> tuple:
        return tuple(dict.fromkeys(("metric", spec.name) for spec in self.build.manifest.specs.values()))

    def data_files(self, role: str) -> list[str]:
        """The files a data role reads: its .npz, or each shard of its folder."""
        path = self.build.data(role)
        return [] if path is None else [self.rel(p) for p in shard_files(path)]

    @property
    def evaluation(self) -> list[str]:
        return self.data_files("evaluation")

    def sources(self) -> list[str]:
        return [self.rel(p) for p in self.build.model_sources()]

    # ---- load ----------------------------------------------------------------------------------

    def load(self) -> list[dict]:
        build, manifest, rel = self.build, self.build.manifest, self.rel
        tasks = [self.task(f"tokenize:{role}", model.tokenize, role,
                           # The model folder holds the tokenizer; unchanged tokens stop any rebuild here.
                           file_dep=[rel(build.data_source(role))] + self.sources(),
                           targets=[rel(build.data(role))],
                           config={"sequence_length": manifest.model.get("sequence_length")},
                           shared=Shared((build.data(role),)))
                 for role in DATA_ROLES if build.is_text(role)]
        return tasks + [
            # Graph rewrites are checked on the evaluation data, so it is an input of the export.
            self.task("export", model.export_model,
                      file_dep=self.sources() + self.evaluation,
                      targets=[rel(build.exported_program), rel(build.model_meta)],
                      code=(("loader", manifest.model["source"]),
                            *(("graph rewrite", name) for name in build.registry.rewrites)),
                      config={"model": {k: v for k, v in manifest.model.items() if k not in INTERFACE_KEYS}},
                      uptodate=[(record_matches, (build.model_meta, build.exported_program))],
                      shared=Shared((build.exported_program, build.model_meta))),
            self.task("reference", model.reference_outputs,
                      file_dep=[rel(build.exported_program), rel(build.model_meta)] + self.evaluation,
                      targets=[rel(build.reference)], shared=Shared((build.reference,))),
            self.task("baseline", model.baseline_metric,
                      file_dep=[rel(build.reference)] + self.evaluation, targets=[rel(build.baseline)],
                      code=self.metric_code, config={"metrics": manifest.metrics},
                      shared=Shared((build.baseline,))),
        ]

    # ---- convert / compress / evaluate ---------------------------------------------------------

    def candidates(self, key: str) -> list[dict]:
        build, rel = self.build, self.rel
        backend = build.variants[key].backend
        toolchain = self.toolchain[backend]
        tasks = [self.task(f"convert:{key}", candidates.convert, key,
                           file_dep=[rel(build.exported_program), rel(build.model_meta)],
                           targets=[rel(build.fp32_record(key))],
                           code=(("backend", backend),),
                           config={"toolchain": toolchain, "options": build.variants[key].options},
                           uptodate=[(record_matches, (build.fp32_record(key), build.fp32_bundle(key)))],
                           shared=Shared((build.fp32_record(key), build.fp32_bundle(key))))]
        for technique, skip in build.runnable_techniques(key):
            if skip:
                continue  # select() reports it as skipped, with the reason
            name = f"{key}:{technique.name}"
            calibration = self.data_files("calibration") if technique.needs_calibration else []
            valid = [(candidates.candidate_is_valid, (build, key, technique.name))]
            tasks.append(self.task(
                f"compress:{name}", candidates.compress, key, technique.name,
                file_dep=[rel(build.fp32_record(key))] + calibration,
                targets=[rel(build.candidate_record(key, technique.name))],
                code=(("backend", backend), ("technique", f"{backend}/{technique.name}")),
                config={"recipe": technique.recipe, "toolchain": toolchain, "options": build.variants[key].options},
                # A failed or tampered candidate is never up to date: it is rebuilt, not trusted.
                uptodate=valid,
                shared=Shared((build.candidate_record(key, technique.name), build.candidate_bundle(key, technique.name)),
                              keep=candidates.candidate_is_shareable)))
            tasks.append(self.task(
                f"evaluate:{name}", candidates.evaluate, key, technique.name,
                file_dep=[rel(build.candidate_record(key, technique.name)), rel(build.reference)] + self.evaluation,
                targets=[rel(build.evaluation(key, technique.name))],
                code=(("backend", backend),) + self.metric_code,
                config={"metrics": self.build.manifest.metrics, "threads": LATENCY_THREADS},
                # Budgets are not in the key (a budget edit reruns no evaluation); a candidate left out
                # as over budget is evaluated once a budget grows past it.
                uptodate=valid + [(candidates.evaluation_is_current, (build, key, technique.name))],
                shared=Shared((build.evaluation(key, technique.name),), keep=candidates.evaluation_is_shareable,
                              usable=candidates.evaluation_is_current)))
        return tasks

    # ---- search / qat / select / package, per target ---------------------------------------------

    def evaluations(self, target: Target) -> list[str]:
        key = self.build.variant(target).key
        return [self.rel(self.build.evaluation(key, t.name)) for t, skip in self.build.runnable_techniques(key)
                if not skip]

    def search(self, target: Target) -> dict:
        build, manifest, rel = self.build, self.build.manifest, self.rel
        data = [file for role in ("evaluation", "calibration") for file in self.data_files(role)]
        return self.task(
            f"search:{target.name}", search.run_search, target,
            file_dep=[rel(build.fp32_record(build.variant(target).key)), rel(build.reference),
                      rel(build.baseline)] + data,
            targets=[rel(build.search_record(target))],
            code=(("backend", target.format), ("strategy", manifest.search["strategy"])) + self.metric_code,
            config={"search": manifest.search, "target": target.raw, "metrics": manifest.metrics,
                    "toolchain": self.toolchain[target.format], "options": build.variant(target).options},
            uptodate=[(search.search_is_intact, (build, target))],
            shared=Shared((build.search_record(target), build.search_bundle(target),
                           build.sensitivity_cache(build.variant(target).key))))

    def qat(self, target: Target, evaluations: list[str]) -> dict:
        build, manifest, rel = self.build, self.build.manifest, self.rel
        data = [file for role in DATA_ROLES for file in self.data_files(role)]
        return self.task(
            f"qat:{target.name}", qat.run_qat, target,
            file_dep=sorted(set(evaluations + data + self.sources()
                                + [rel(build.reference), rel(build.baseline), rel(build.model_meta)])),
            targets=[rel(build.qat_record(target))],
            code=(("backend", target.format), ("loader", manifest.model["source"])) + self.metric_code,
            config={"qat": target.qat, "target": target.raw, "metrics": manifest.metrics,
                    "toolchain": self.toolchain[target.format], "options": build.variant(target).options},
            uptodate=[(qat.qat_is_intact, (build, target))],
            shared=Shared((build.qat_record(target), build.qat_bundle(target))))

    def deliver(self, target: Target) -> list[dict]:
        build, manifest, rel = self.build, self.build.manifest, self.rel
        evaluations = self.evaluations(target)
        tasks = []
        if build.searches(target):
            tasks.append(self.search(target))
            evaluations.append(rel(build.search_record(target)))
        if build.trains(target):
            tasks.append(self.qat(target, evaluations))
            evaluations.append(rel(build.qat_record(target)))
        tasks.append(self.task(f"select:{target.name}", deliver.select, target,
                               file_dep=evaluations + [rel(build.baseline)], targets=[rel(build.selection(target))],
                               code=self.metric_code,
                               config={"target": target.raw, "output": rel(manifest.output),
                                       "model": manifest.model_name}))
        tasks.append(self.task(f"package:{target.name}", deliver.package, target,
                               file_dep=[rel(build.selection(target))], targets=[rel(build.packaged(target))],
                               code=(("packager", target.format), ("backend", target.format)),
                               uptodate=[(deliver.packaged_is_intact, (build, target))]))
        return tasks

    # ---- report / lock ---------------------------------------------------------------------------

    def report(self) -> list[dict]:
        build, manifest, rel = self.build, self.build.manifest, self.rel
        # The reports and the lock cover every delivered target; a --target/--platform build keeps
        # the others' records as their last build wrote them.
        reported = build.reported_targets()
        selections = [rel(build.selection(t)) for t in reported]
        packaged = [rel(build.packaged(t)) for t in reported]
        names = {"targets": [t.name for t in manifest.targets], "kept": [t.name for t in build.kept_targets()]}
        return [
            self.task("report", deliver.write_reports, manifest.reports,
                      file_dep=selections + packaged + [rel(build.model_meta)], targets=[rel(build.report_record)],
                      code=tuple(("reporter", name) for name in manifest.reports),
                      config={"reporters": manifest.reports, "executor": executor_name(manifest), **names},
                      uptodate=[(deliver.reports_are_intact, (build,))]),
            self.task("lock", deliver.write_lock,
                      file_dep=sorted({rel(p) for p in build.input_files()}) + packaged,
                      targets=[rel(manifest.lock_file)], config=names),
        ]

    def tasks(self) -> list[dict]:
        tasks = self.load()
        for key in self.build.variants:
            tasks += self.candidates(key)
        for target in self.build.manifest.targets:
            tasks += self.deliver(target)
        return tasks + self.report()


def stage_files(graph: Graph, task_name: str) -> tuple[list, list]:
    """(files a stage reads, files it writes) for running it elsewhere. It reads the project's
    inputs, its file_dep and, for each file_dep another stage wrote, everything that stage writes
    and reads in turn (a candidate's record brings its bundle, and the fp32 conversion and the
    exported program it was made from). It writes its shared outputs."""
    build, root = graph.build, graph.build.manifest.root
    writer = {target: name for name, (_, targets, _) in graph.io.items() for target in targets}
    reads, seen, pending = set(build.input_files()), set(), [task_name]
    while pending:
        name = pending.pop()
        for relative in graph.io[name][0]:
            reads.add(root / relative)
            upstream = writer.get(relative)
            if upstream is not None and upstream not in seen:
                seen.add(upstream)
                reads.update(graph.io[upstream][2])
                pending.append(upstream)
    return sorted(p for p in reads if p.exists()), list(graph.io[task_name][2])


def run_task(build: Build, task_name: str):
    """Run one task's stage outside doit (an isolated process, a Ray worker); return what it returns."""
    task = next(t for t in Graph(build, lambda name, stage: stage).tasks() if t["name"] == task_name)
    action, args = task["actions"][0]
    return action(*args)


def build_tasks(build: Build, wrap: Callable) -> list[dict]:
    """All tasks for the manifest. `wrap(task_name, stage_fn)` adds logging and error capture."""
    return Graph(build, wrap).tasks()
