"""Runs the task graph with doit: progress on stderr, toolchain noise into per-task logs, one lock."""
import contextlib
import fcntl
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from doit.cmd_base import ModuleTaskLoader
from doit.dependency import SqliteDB
from doit.doit_cmd import DoitMain
from doit.exceptions import UnmetDependency
from rich.console import Console

from .. import progress
from ..errors import EdgebuildError, InputError, ToolchainError, first_line
from ..fsutil import remove_path
from . import isolated
from .graph import build_tasks
from .layout import Build
from .stages.deliver import target_summary

HEAVY_STAGES = ("export", "reference", "convert", "compress", "evaluate", "search", "qat")


class DurableSqliteDB(SqliteDB):
    """doit's sqlite3 state, committed after every change instead of once at the end.

    A build killed halfway (CI timeout, SIGKILL) keeps the record of every stage it finished,
    so the next build reuses them; sqlite's journal keeps the file consistent at any moment.
    """

    desc = "sqlite3, committed per change"

    def __init__(self, name, codec, *, module_name=None):
        super().__init__(name, codec, module_name=module_name)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")

    def set(self, task_id, dependency, value):
        super().set(task_id, dependency, value)
        self._conn.execute("insert or replace into doit values (?,?)", (task_id, self.codec.encode(self._cache[task_id])))
        self._conn.commit()
        self._dirty.discard(task_id)

    def remove(self, task_id):
        super().remove(task_id)
        self._conn.commit()


@dataclass
class RunResult:
    executed: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    errors: list[EdgebuildError] = field(default_factory=list)


@contextlib.contextmanager
def native_output_to(log: Path):
    """Send fd 1 and 2 (C++ toolchain logs too, not just Python's) to `log` for the duration."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    # doit swaps sys.stdout/err for capture objects; libraries that bind a stream on first import
    # (absl logging) must get the real ones, which now lead to the log.
    saved_streams = sys.stdout, sys.stderr
    with open(log, "w", encoding="utf-8") as handle:
        progress.attach(saved[1])  # long stages still show progress on the user's stderr
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        try:
            yield
        finally:
            progress.detach()
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def project_lock(build: Build, wait: bool, console: Console):
    """One build per project at a time; the second waits, or with wait=False fails naming the holder."""
    build.state.mkdir(parents=True, exist_ok=True)
    path = build.state / "lock"
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            if not wait:
                raise InputError(f"another build ({holder}) holds {build.manifest.relative(path)}; "
                                 "retry later or drop --no-wait", file=build.manifest.path.name) from None
            console.print(f"[yellow]waiting for another build ({holder}) to finish[/yellow]")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _make_reporter(result: RunResult, console: Console):
    class Reporter:
        """doit reporter that prints a line per stage to stderr and remembers what ran."""

        desc = "edgebuild progress"

        def __init__(self, outstream, options):
            self.started = {}

        def initialize(self, tasks, selected_tasks):
            pass

        def get_status(self, task):
            pass

        def execute_task(self, task):
            if task.actions:
                self.started[task.name] = time.perf_counter()
                console.print(f"[cyan]▶[/cyan] {_stage_name(task.name)}", highlight=False)

        def add_success(self, task):
            if task.name in self.started:
                result.executed.append(_stage_name(task.name))
                elapsed = time.perf_counter() - self.started[task.name]
                console.print(f"  [green]done[/green] {_stage_name(task.name)} ({elapsed:.1f}s)", highlight=False)

        def add_failure(self, task, fail):
            if isinstance(fail, UnmetDependency):  # not run because a stage it needs failed
                result.blocked.append(_stage_name(task.name))
                return
            result.failed.append(_stage_name(task.name))
            console.print(f"  [red]failed[/red] {_stage_name(task.name)}", highlight=False)

        def skip_uptodate(self, task):
            if task.actions:
                result.up_to_date.append(_stage_name(task.name))

        def skip_ignore(self, task):
            pass

        def cleanup_error(self, exception):
            pass

        def runtime_error(self, msg):
            result.errors.append(ToolchainError(msg.strip().splitlines()[-1][:300], stage="task graph"))

        def teardown_task(self, task):
            pass

        def complete_run(self):
            pass

    return Reporter


def _stage_name(task_name: str) -> str:
    return task_name.removeprefix("edgebuild:")


def _stage_wrapper(build: Build, result: RunResult):
    """`wrap(task_name, stage)` for the task graph: the stage's toolchain output goes to its log, a
    large model's heavy stage runs in a process of its own, and errors are collected, never raised."""
    model_bytes = sum(path.stat().st_size for path in build.model_sources() if path.is_file())
    isolate = isolated.wanted(model_bytes)

    def wrap(task_name: str, stage: Callable) -> Callable:
        log = build.log(task_name)
        heavy = task_name.startswith(HEAVY_STAGES)

        def action(*args):
            try:
                # Heavy stages talk to C++ toolchains that write straight to fd 2; keep stdout clean.
                context = native_output_to(log) if heavy else contextlib.nullcontext()
                with context:
                    if heavy and isolate:  # a large model: the stage's memory goes when it ends
                        isolated.run(build.manifest.path, task_name, build.state)
                    else:
                        stage(*args)
                return True
            except EdgebuildError as exc:
                if isinstance(exc, ToolchainError) and exc.log is None:
                    _append_traceback(log)
                    exc = ToolchainError(exc.reason, stage=exc.stage, target=exc.target, technique=exc.technique,
                                         op=exc.op, log=build.manifest.relative(log))
                result.errors.append(exc)
                return False
            except Exception as exc:  # a bug or an unforeseen toolchain failure: name the stage, keep the trace
                _append_traceback(log)
                reason = str(exc) if isinstance(exc, isolated.StageCrashed) else first_line(exc)
                result.errors.append(ToolchainError(f"unexpected error: {reason}", stage=task_name.split(":")[0],
                                                    log=build.manifest.relative(log)))
                return False

        return action

    return wrap


def run_pipeline(build: Build, *, console: Console, wait: bool = True, only: list[str] | None = None) -> RunResult:
    """Run every stage that is not up to date; `only` names tasks (e.g. 'convert:tflite') to run
    just those and whatever they need (bench/llm_scale.py measures stages one per process)."""
    result = RunResult()
    tasks = build_tasks(build, _stage_wrapper(build, result))

    def task_edgebuild():
        yield from tasks

    build.state.mkdir(parents=True, exist_ok=True)
    namespace = {
        "task_edgebuild": task_edgebuild,
        "DOIT_CONFIG": {
            "dep_file": str(build.state / "doit.sqlite"),
            "backend": "edgebuild-sqlite",
            "reporter": _make_reporter(result, console),
            "continue": True,  # a failing stage of one backend must not stop the others
            "verbosity": 0,
        },
    }
    with project_lock(build, wait, console):
        _clear_leftovers(build)
        cwd = os.getcwd()
        try:
            os.chdir(build.manifest.root)
            backends = {"BACKEND": {"edgebuild-sqlite": f"{__name__}:DurableSqliteDB"}}
            selection = [f"edgebuild:{name}" for name in only or []]
            code = DoitMain(ModuleTaskLoader(namespace), extra_config=backends).run(["run", *selection])
        finally:
            os.chdir(cwd)
    if code == 3:  # doit could not even start (an invalid task graph): that is our bug, say so
        raise ToolchainError("doit refused the task graph (see messages above)", stage="task graph")
    return result


def _clear_leftovers(build: Build) -> None:
    """Remove what a killed build left half-done: staging and trash folders, temporary files."""
    for folder in (build.staging, build.trash):
        shutil.rmtree(folder, ignore_errors=True)
    for leftover in build.state.rglob(".*.tmp-*"):
        remove_path(leftover)


def _append_traceback(log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as handle:
        handle.write("\n--- edgebuild: traceback ---\n")
        handle.write(traceback.format_exc())


def read_targets(build: Build) -> list[dict]:
    """Selections that exist for the manifest's targets (a fatal stage error leaves some missing)."""
    summaries = [target_summary(build, target) for target in build.manifest.targets]
    return [summary for summary in summaries if summary is not None]
