"""Heavy stages of a large model, each in a fresh process.

One process that runs every stage keeps what each toolchain imported and allocated: for a
100M-parameter LLM a whole build then peaks near 4.7x the fp32 weight bytes, while no single
stage needs more than about 3x (bench/llm_scale.py). For models of ISOLATE_BYTES and up, the
runner runs export, reference, convert, compress, evaluate, search and qat here instead:

  python -m edgebuild.pipeline.isolated MANIFEST TASK RESULT.json

The child rebuilds the same task graph, runs the one task's stage and writes how it ended; the
runner raises the same error it would have raised in-process.
"""
import os
import subprocess
import sys
import traceback
from pathlib import Path

from ..errors import EdgebuildError, InputError, ToolchainError, first_line
from ..fsutil import atomic_write_json, read_json

ISOLATE_BYTES = 128 * 2**20  # model files this large (weights, a Hugging Face folder) or larger
SETTING = "EDGEBUILD_ISOLATE_STAGES"  # "1" or "0" overrides the size rule


def wanted(model_bytes: int) -> bool:
    setting = os.environ.get(SETTING)
    if setting in ("0", "1"):
        return setting == "1"
    return model_bytes >= ISOLATE_BYTES


def error_record(exc: EdgebuildError) -> dict:
    if isinstance(exc, ToolchainError):
        return {"kind": "toolchain", "reason": exc.reason, "stage": exc.stage, "target": exc.target,
                "technique": exc.technique, "op": exc.op, "log": exc.log}
    if isinstance(exc, InputError):
        return {"kind": "input", "reason": exc.reason, "file": exc.file, "line": exc.line, "column": exc.column,
                "field": exc.field}
    return {"kind": "other", "message": exc.message}


class StageCrashed(Exception):
    """A stage raised something other than an EdgebuildError in its process; the message names it."""


def error_from(record: dict) -> Exception:
    kind = record["kind"]
    if kind == "toolchain":
        return ToolchainError(record["reason"], stage=record["stage"], target=record["target"],
                              technique=record["technique"], op=record["op"], log=record["log"])
    if kind == "input":
        return InputError(record["reason"], file=record["file"], line=record["line"], column=record["column"],
                          field=record["field"])
    if kind == "unexpected":
        return StageCrashed(record["message"])
    return EdgebuildError(record["message"])


def run(manifest: Path, task_name: str, state: Path):
    """Run one task in a child process; return what the stage returned there (a JSON value), raise
    what it raised."""
    result = state / "staging" / f"isolated-{task_name.replace(':', '-')}-{os.getpid()}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    try:
        # stdout and stderr are inherited: the runner has pointed them at the task's log.
        done = subprocess.run([sys.executable, "-m", __name__, str(manifest), task_name, str(result)])
        if not result.is_file():
            raise StageCrashed(f"the stage's process ended with exit code {done.returncode} and no result")
        record = read_json(result)
    finally:
        result.unlink(missing_ok=True)
    if not record["ok"]:
        raise error_from(record["error"])
    return record.get("returned")


def main(manifest: str, task_name: str, result: str) -> int:
    from ..manifest import load_project
    from .graph import run_task
    from .layout import Build

    try:
        outcome = {"ok": True, "returned": run_task(Build(*load_project(manifest)), task_name)}
    except EdgebuildError as exc:
        outcome = {"ok": False, "error": error_record(exc)}
    except Exception as exc:  # the runner logs it as an unexpected error; the traceback goes to the log here
        traceback.print_exc()
        outcome = {"ok": False, "error": {"kind": "unexpected", "message": first_line(exc)}}
    atomic_write_json(Path(result), outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
