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
from ..fsutil import read_tree, remove_path, replace_path, write_tree
from .machine import LEDGER_VARIABLE
from .remote import RETRIES, cluster_cpu_count


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
    from .graph import run_task
    from .layout import Build

    os.environ.update(environment)
    with tempfile.TemporaryDirectory(prefix="edgebuild-stage-") as scratch:
        root = Path(scratch)
        write_tree(root, files)
        log = io.StringIO()
        returned, error = None, None
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                returned = run_task(Build(*load_project(root / manifest)), task_name)
            except EdgebuildError as exc:
                error = isolated.error_record(exc)
            except Exception as exc:
                traceback.print_exc(file=log)
                error = {"kind": "unexpected", "message": first_line(exc)}
        return {"returned": returned, "error": error, "outputs": read_tree([root / name for name in outputs], root),
                "log": log.getvalue(),
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
        return cluster_cpu_count(self.ray)

    def run(self, build, task_name: str, inputs: list[Path], outputs: list[Path], log: Path):
        """Run one stage as a Ray task; put the files it wrote in place; return what it returned."""
        from . import isolated

        root = build.manifest.root
        files = read_tree(inputs, root)
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
        # Each output as the task left it: a file or a whole folder replaced atomically, one the
        # stage did not write removed. Written under the build's staging folder first (the same
        # file system, cleared if the build is killed), then moved.
        staging = build.staging / f"ray-{uuid.uuid4().hex[:8]}"
        try:
            write_tree(staging, result["outputs"])
            for name in relative_outputs:
                written = staging / name
                if written.exists():
                    (root / name).parent.mkdir(parents=True, exist_ok=True)
                    replace_path(written, root / name)
                else:
                    remove_path(root / name)
        finally:
            remove_path(staging)
        return result["returned"]
