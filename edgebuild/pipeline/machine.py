"""The machine's cores and memory, shared by the stages of one build that run at once.

The runner runs independent stages at once in doit's worker processes. Every running stage has an
entry in a ledger file in the build's state: its process, the memory reserved for it (from the
model's size, `stage_memory`) and the cores it holds. A stage starts only when its memory fits
beside the others' (`admitted`); a stage alone always starts. An accuracy run or a batch of torch
probes takes its stage's own core plus whatever the other stages leave free (`cores`), and splits
its work so that its results do not depend on how many it got. Entries of processes that are gone
are dropped when the ledger is read, so a killed build leaves nothing that blocks the next one.
"""
import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

LEDGER_VARIABLE = "EDGEBUILD_LEDGER"   # the ledger's path, set by the runner for parallel stages
ENTRY_VARIABLE = "EDGEBUILD_LEDGER_ENTRY"  # the entry of the stage this process works for
MEMORY_VARIABLE = "EDGEBUILD_MEMORY"   # bytes the build may use (default: MemAvailable at its start)
# What a stage holds besides the model: torch, the converters and a runtime imported (about 0.9 GB
# resident on this machine), with room for the runtime's arenas.
STAGE_BASE_BYTES = 3 << 29
# The fp32 weights held at once by a stage: the exported program, the fp32 bundle, a compressed
# copy and the runtime's (bench/llm_scale.py measured at most 3x for an LLM's heaviest stage).
STAGE_MODEL_COPIES = 4
WAIT_SECONDS = 0.2


def stage_memory(model_bytes: int) -> int:
    """The memory reserved for one heavy stage of a model whose files take `model_bytes`."""
    return STAGE_BASE_BYTES + STAGE_MODEL_COPIES * model_bytes


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def memory_for_stages() -> int | None:
    """EDGEBUILD_MEMORY if set, else what the kernel says is available now (Linux); None if unknown."""
    value = os.environ.get(MEMORY_VARIABLE, "").strip()
    return int(value) if value.isdigit() else available_memory()


def parallel_stages(cores: int, model_bytes: int) -> int:
    """How many stages may run at once: one per core, as many as the memory holds."""
    memory = memory_for_stages()
    fitting = cores if memory is None else memory // stage_memory(model_bytes)
    return max(1, min(cores, fitting))


class Ledger:
    """The file the stages of one build book cores and memory in, under an exclusive lock."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, path: Path, cores: int, memory: int) -> "Ledger":
        path.parent.mkdir(parents=True, exist_ok=True)
        ledger = cls(path)
        with ledger._locked() as state:
            state.clear()
            state.update({"cores": cores, "memory": memory, "stages": {}})
        return ledger

    @classmethod
    def current(cls) -> "Ledger | None":
        path = os.environ.get(LEDGER_VARIABLE)
        return cls(Path(path)) if path else None

    @contextlib.contextmanager
    def _locked(self):
        with open(self.path.with_suffix(".lock"), "a+", encoding="utf-8") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = json.loads(self.path.read_text()) if self.path.is_file() else {}
                stages = state.get("stages", {})
                state["stages"] = {key: entry for key, entry in stages.items() if _alive(int(key))}
                yield state
                temporary = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
                temporary.write_text(json.dumps(state, sort_keys=True))
                os.replace(temporary, self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def admitted(self, task: str, memory: int):
        """Hold a core and `memory` bytes for this process's stage; wait until they fit."""
        key = str(os.getpid())
        while True:
            with self._locked() as state:
                stages = state["stages"]
                used = sum(entry["memory"] for entry in stages.values())
                busy = sum(entry["cores"] for entry in stages.values())
                if not stages or (used + memory <= state["memory"] and busy < state["cores"]):
                    stages[key] = {"task": task, "memory": memory, "cores": 1}
                    break
            time.sleep(WAIT_SECONDS)
        saved = os.environ.get(ENTRY_VARIABLE)
        os.environ[ENTRY_VARIABLE] = key  # an isolated stage process books against this entry
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(ENTRY_VARIABLE, None)
            else:
                os.environ[ENTRY_VARIABLE] = saved
            with self._locked() as state:
                state["stages"].pop(key, None)

    @contextlib.contextmanager
    def extra_cores(self, wanted: int):
        """Up to `wanted` - 1 cores no other stage holds, added to this stage's own."""
        key = os.environ.get(ENTRY_VARIABLE)
        extra = 0
        with self._locked() as state:
            entry = state["stages"].get(key)
            if entry is not None:
                free = state["cores"] - sum(e["cores"] for e in state["stages"].values())
                extra = max(0, min(wanted - 1, free))
                entry["cores"] += extra
        try:
            yield 1 + extra if key is not None else wanted
        finally:
            if extra:
                with self._locked() as state:
                    entry = state["stages"].get(key)
                    if entry is not None:
                        entry["cores"] -= extra


@contextlib.contextmanager
def cores(wanted: int):
    """How many of `wanted` cores this stage may use now: all of them when its stages run one at a
    time, else its own core plus those the other running stages leave free."""
    ledger = Ledger.current()
    if ledger is None or wanted <= 1:
        yield max(1, wanted)
        return
    with ledger.extra_cores(wanted) as granted:
        yield granted


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
