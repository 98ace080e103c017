"""An accuracy run's shards as Ray tasks, when its stage is itself a task on a Ray cluster.

A stage run by `--executor ray` holds one CPU. Its evaluation is split like a local one
(contiguous shards of whole batches, one single-threaded interpreter each, so each sample gets the
bits one run gives it), but each shard is a Ray task of its own, on whichever node has a free CPU:
the shard's rows and the bundle's files travel through the object store, and the outputs come
back in order, concatenated, so metrics are computed over the whole set exactly as before.
(A task blocked on its shards gives its CPU back to Ray meanwhile, so the shards can run.)
"""
import os
import tempfile
from pathlib import Path

import numpy as np

from ..fsutil import read_tree, write_tree
from .layout import EXECUTOR_VARIABLE

RETRIES = 3  # a Ray task whose worker dies is run again this many times


def cluster_cpu_count(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_cpus() -> int | None:
    """The CPUs of the Ray cluster this process works for as a stage's task; None elsewhere."""
    if os.environ.get(EXECUTOR_VARIABLE) != "ray":
        return None
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return cluster_cpu_count(ray)


def _files(path: Path) -> dict[str, bytes]:
    """A bundle's (or program's) files, by path relative to its folder."""
    return read_tree([path], path.parent)


def _predict_part(backend, bundle_name: str, files: dict, program: dict | None, inputs: list, batch: int):
    """One shard, in a scratch folder holding the bundle (and the exported program when given)."""
    with tempfile.TemporaryDirectory(prefix="edgebuild-shard-") as scratch:
        root = Path(scratch)
        write_tree(root, {**files, **(program or {})})
        exported = root / next(iter(program)) if program else None
        return backend.predict(root / bundle_name, inputs, threads=1, batch=batch, exported_program=exported)


def predict_on_cluster(backend, bundle: Path, parts: list[list], *, batch: int, exported_program: Path | None):
    """`backend.predict` of each part as a Ray task, in order."""
    import ray

    files = ray.put(_files(bundle))
    program = ray.put(_files(exported_program)) if exported_program is not None and exported_program.is_file() else None
    remote = ray.remote(num_cpus=1, max_retries=RETRIES)(_predict_part)
    pending = [remote.remote(backend, bundle.name, files, program, [np.asarray(array) for array in part], batch)
               for part in parts]
    print(f"accuracy run of {bundle.name}: {len(parts)} shards as Ray tasks", flush=True)  # into the stage's log
    return ray.get(pending)
