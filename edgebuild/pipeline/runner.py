"""Runs the task graph with doit: progress on stderr, toolchain noise into per-task logs, one lock."""
import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
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
from ..fsutil import atomic_write_json, read_json, remove_path
from . import isolated, machine
from .cache import FROM_CACHE
from .evaluation import jobs
from .executor import RayExecutor
from .graph import Graph, stage_files
from .layout import EXECUTOR_VARIABLE, RAY_ADDRESS_VARIABLE, Build, executor_name
from .stages.deliver import target_summary

HEAVY_STAGES = ("export", "reference", "convert", "compress", "evaluate", "search", "qat")
PR_SET_PDEATHSIG = 1
_forking = {"parallel": False, "parent": None}  # set while doit's workers are being forked


def _before_fork() -> None:
    _forking["parent"] = os.getpid()


def _worker_dies_with_its_parent() -> None:
    """A doit worker forked by a parallel build is killed with the build (SIGKILL, CI timeout):
    it must not outlive it holding the project lock it inherited, or write after it."""
    if not _forking["parallel"]:
        return
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != _forking["parent"]:  # the parent died before the line above
        os._exit(1)


os.register_at_fork(before=_before_fork, after_in_child=_worker_dies_with_its_parent)


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
    cached: list[str] = field(default_factory=list)  # outputs fetched from the shared cache, not run
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


def _make_reporter(result: RunResult, console: Console, build: Build):
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
                if not _forking["parallel"]:  # a worker says it when the stage really starts
                    console.print(f"[cyan]▶[/cyan] {_stage_name(task.name)}", highlight=False)

        def add_success(self, task):
            if task.name in self.started:
                elapsed = task.values.get("seconds", time.perf_counter() - self.started[task.name])
                if task.values.get("cached"):
                    result.cached.append(_stage_name(task.name))
                    console.print(f"  [green]from the cache[/green] {_stage_name(task.name)} ({elapsed:.1f}s)",
                                  highlight=False)
                    return
                result.executed.append(_stage_name(task.name))
                console.print(f"  [green]done[/green] {_stage_name(task.name)} ({elapsed:.1f}s)", highlight=False)

        def add_failure(self, task, fail):
            if isinstance(fail, UnmetDependency):  # not run because a stage it needs failed
                result.blocked.append(_stage_name(task.name))
                return
            result.failed.append(_stage_name(task.name))
            record = _error_file(build, _stage_name(task.name))
            if record.is_file():  # the stage ran in a worker process: its error came back in a file
                result.errors.append(isolated.error_from(read_json(record)))
                record.unlink()
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


def _error_file(build: Build, task_name: str) -> Path:
    return build.staging / "errors" / f"{task_name}.json"


def _stage_wrapper(build: Build, result: RunResult, model_bytes: int, executor: RayExecutor | None, graphs: list):
    """`wrap(task_name, stage)` for the task graph: the stage's toolchain output goes to its log, a
    large model's heavy stage runs in a process of its own, a heavy stage of a parallel build waits
    for its core and memory, with a remote executor a heavy stage runs there, and errors are
    collected, never raised."""
    isolate = isolated.wanted(model_bytes)
    memory = machine.stage_memory(model_bytes)
    runner = os.getpid()

    def collect(task_name: str, exc: EdgebuildError) -> None:
        if os.getpid() == runner:
            result.errors.append(exc)
        else:  # a doit worker: the runner reads it back when it reports the failure
            atomic_write_json(_error_file(build, task_name), isolated.error_record(exc))

    def wrap(task_name: str, stage: Callable) -> Callable:
        log = build.log(task_name)
        heavy = task_name.startswith(HEAVY_STAGES)

        def action(*args):
            ledger = machine.Ledger.current()
            remote = heavy and executor is not None
            try:
                booked = ledger.admitted(task_name, memory) if heavy and ledger else contextlib.nullcontext()
                # Heavy stages talk to C++ toolchains that write straight to fd 2; keep stdout clean.
                context = native_output_to(log) if heavy and not remote else contextlib.nullcontext()
                with booked:
                    if os.getpid() != runner:  # a worker: the runner would hear of it late
                        os.write(2, f"▶ {_stage_name(task_name)}\n".encode())
                    begin = time.perf_counter()  # once its core and memory are free
                    with context:
                        if remote:  # the worker gets what the stage reads and sends back what it wrote
                            reads, writes = stage_files(graphs[0], task_name)
                            returned = executor.run(build, task_name, reads, writes, log)
                        elif heavy and isolate:  # a large model: the stage's memory goes when it ends
                            returned = isolated.run(build.manifest.path, task_name, build.state)
                        else:
                            returned = stage(*args)
                # doit keeps what an action returns as the task's values and sends it back from a worker.
                return {"seconds": time.perf_counter() - begin, "cached": returned == FROM_CACHE}
            except EdgebuildError as exc:
                if isinstance(exc, ToolchainError) and exc.log is None:
                    _append_traceback(log)
                    exc = ToolchainError(exc.reason, stage=exc.stage, target=exc.target, technique=exc.technique,
                                         op=exc.op, log=build.manifest.relative(log))
                collect(task_name, exc)
                return False
            except Exception as exc:  # a bug or an unforeseen toolchain failure: name the stage, keep the trace
                _append_traceback(log)
                reason = str(exc) if isinstance(exc, isolated.StageCrashed) else first_line(exc)
                collect(task_name, ToolchainError(f"unexpected error: {reason}", stage=task_name.split(":")[0],
                                                  log=build.manifest.relative(log)))
                return False

        return action

    return wrap


def run_pipeline(build: Build, *, console: Console, wait: bool = True, only: list[str] | None = None) -> RunResult:
    """Run every stage that is not up to date, independent ones at once as far as the cores and
    memory allow; `only` names tasks (e.g. 'convert:tflite') to run just those and whatever they
    need (bench/llm_scale.py measures stages one per process)."""
    result = RunResult()
    model_bytes = sum(path.stat().st_size for path in build.model_sources() if path.is_file())
    executor = None
    if executor_name(build.manifest) == "ray":
        os.environ[EXECUTOR_VARIABLE] = "ray"  # the stages' tasks read it (evaluation shards go to the cluster)
        executor = RayExecutor(os.environ.get(RAY_ADDRESS_VARIABLE), machine.stage_memory(model_bytes))
    graphs = []  # the wrapper ships a remote stage the files the graph says it reads: filled below
    graph = Graph(build, _stage_wrapper(build, result, model_bytes, executor, graphs))
    graphs.append(graph)
    tasks = graph.tasks()

    def task_edgebuild():
        yield from tasks

    build.state.mkdir(parents=True, exist_ok=True)
    namespace = {
        "task_edgebuild": task_edgebuild,
        "DOIT_CONFIG": {
            "dep_file": str(build.state / "doit.sqlite"),
            "backend": "edgebuild-sqlite",
            "reporter": _make_reporter(result, console, build),
            "continue": True,  # a failing stage of one backend must not stop the others
            "verbosity": 0,
        },
    }
    cores = jobs()
    workers = machine.parallel_stages(cores, model_bytes)
    # doit points sys.stdout/stderr at its capture buffers while an action runs; with threads (the
    # Ray executor) that is while the reporter prints, and the swaps of two threads can interleave.
    streams = sys.stdout, sys.stderr
    if executor is not None:
        console.file = streams[1]
    with project_lock(build, wait, console):
        _clear_leftovers(build)
        cwd = os.getcwd()
        saved = os.environ.get(machine.LEDGER_VARIABLE)
        try:
            os.chdir(build.manifest.root)
            backends = {"BACKEND": {"edgebuild-sqlite": f"{__name__}:DurableSqliteDB"}}
            selection = [f"edgebuild:{name}" for name in only or []]
            parallel = []
            if executor is not None:
                # Stages run on the cluster: the driver only waits for them, in one thread each.
                parallel = ["-n", str(max(2, executor.cpus())), "-P", "thread"]
            elif workers > 1:
                # doit's process runner forks one worker per slot; the runner keeps the state (sqlite,
                # committed per stage) and the reporting, the ledger shares cores and memory.
                ledger = build.state / "ledger.json"
                machine.Ledger.create(ledger, cores, machine.memory_for_stages() or 2**62)
                os.environ[machine.LEDGER_VARIABLE] = str(ledger)
                parallel = ["-n", str(workers), "-P", "process"]
                _forking["parallel"] = True
            code = DoitMain(ModuleTaskLoader(namespace), extra_config=backends).run(["run", *parallel, *selection])
        finally:
            sys.stdout, sys.stderr = streams
            _forking["parallel"] = False
            if saved is None:
                os.environ.pop(machine.LEDGER_VARIABLE, None)
            else:
                os.environ[machine.LEDGER_VARIABLE] = saved
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
