"""Where heavy stages run: in the build's own processes (local), or as Ray tasks (issue #18).

With `--executor ray` the doit graph, its state, the project lock and the reports stay on the
driver; each heavy stage (export, reference, convert, compress, evaluate, search, qat) becomes
one Ray task with a resource request (a CPU, memory from the model's size). Nothing assumes the
worker sees the driver's disk: the task receives the files the stage reads (the project's inputs,
the exported program, its file_dep and the bundles those records name) through Ray's object
store, rebuilds the project in a scratch folder, runs the stage exactly as a local build would,
and returns the files it wrote, which the driver puts in place atomically. With a shared cache the
worker also fetches from and stores to it, so other clones and runners reuse the work.

A worker that dies mid-task is retried by Ray (`max_retries`); a stage is a pure function of the
files it receives, so a retry gives the same bytes.
"""
import os
import tempfile
import uuid
from pathlib import Path

from ..errors import InputError
from ..fsutil import remove_path, replace_path
from .machine import LEDGER_VARIABLE

RETRIES = 3  # a task whose worker dies is run again this many times


def _files_under(path: Path, root: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return {path.relative_to(root).as_posix(): path.read_bytes()} if path.is_file() else {}


def _stage_in_scratch(manifest: str, files: dict[str, bytes], task_name: str, outputs: list[str],
                      environment: dict[str, str]) -> dict:
    """The Ray task: the project rebuilt from `files` in a scratch folder, one stage run in it.
    Returns the stage's return value or error, the files it wrote under `outputs`, and its log."""
    import contextlib
    import io
    import traceback

    from ..errors import EdgebuildError, first_line
    from ..manifest import load_project
    from . import isolated
    from .graph import Graph
    from .layout import Build

    os.environ.update(environment)
    with tempfile.TemporaryDirectory(prefix="edgebuild-stage-") as scratch:
        root = Path(scratch)
        for relative, content in files.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        log = io.StringIO()
        returned, error = None, None
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                build = Build(*load_project(root / manifest))
                task = next(t for t in Graph(build, lambda name, stage: stage).tasks() if t["name"] == task_name)
                action, args = task["actions"][0]
                returned = action(*args)
            except EdgebuildError as exc:
                error = isolated.error_record(exc)
            except Exception as exc:
                traceback.print_exc(file=log)
                error = {"kind": "unexpected", "message": first_line(exc)}
        written = {}
        for relative in outputs:
            written.update(_files_under(root / relative, root))
        return {"returned": returned, "error": error, "outputs": written, "log": log.getvalue(),
                "node": os.uname().nodename, "pid": os.getpid()}


class RayExecutor:
    """Heavy stages as Ray tasks; see the module's docstring."""

    def __init__(self, address: str | None, memory_per_stage: int):
        try:
            import ray
        except ImportError:
            raise InputError("--executor ray needs Ray: pip install 'edgebuild[ray]'", field="--executor") from None
        self.ray = ray
        if not ray.is_initialized():
            try:
                ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                         configure_logging=False, ignore_reinit_error=True)
            except Exception as exc:
                raise InputError(f"cannot reach the Ray cluster {address or '(a local one)'}: {exc}",
                                 field="--ray-address") from None
        self.memory = memory_per_stage
        self.remote = ray.remote(_stage_in_scratch)

    def cpus(self) -> int:
        return max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def describe(self) -> str:
        return f"ray {self.ray.__version__} ({self.cpus()} CPUs)"

    def run(self, build, task_name: str, inputs: list[Path], outputs: list[Path], log: Path):
        """Run one stage as a Ray task; put the files it wrote in place; return what it returned."""
        from . import isolated

        root = build.manifest.root
        files = {}
        for path in inputs:
            files.update(_files_under(path, root))
        relative_outputs = [Path(os.path.relpath(p, root)).as_posix() for p in outputs]
        environment = {key: value for key, value in os.environ.items() if key.startswith("EDGEBUILD_")}
        environment["EDGEBUILD_JOBS"] = "1"  # the task holds one CPU; results do not depend on it
        environment["EDGEBUILD_ISOLATE_STAGES"] = "0"  # the task is already a process of its own
        environment.pop(LEDGER_VARIABLE, None)  # the driver's ledger means nothing on a worker
        reference = self.remote.options(num_cpus=1, memory=self.memory, max_retries=RETRIES,
                                        retry_exceptions=False).remote(
            build.manifest.path.name, files, task_name, relative_outputs, environment)
        result = self.ray.get(reference)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"[ray task on {result['node']}, pid {result['pid']}]\n{result['log']}", encoding="utf-8")
        if result["error"] is not None:
            raise isolated.error_from(result["error"])
        self._put_in_place(root, relative_outputs, result["outputs"])
        return result["returned"]

    @staticmethod
    def _put_in_place(root: Path, outputs: list[str], written: dict[str, bytes]) -> None:
        """Each output as the task left it: a file or a whole folder replaced atomically, one the
        stage did not write removed."""
        for name in outputs:
            members = {relative: content for relative, content in written.items()
                       if relative == name or relative.startswith(name + "/")}
            destination = root / name
            if not members:
                remove_path(destination)
                continue
            temporary = destination.with_name(f".{destination.name}.tmp-ray-{uuid.uuid4().hex[:8]}")
            try:
                for relative, content in members.items():
                    path = temporary if relative == name else temporary / relative[len(name) + 1:]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(content)
                replace_path(temporary, destination)
            finally:
                remove_path(temporary)
