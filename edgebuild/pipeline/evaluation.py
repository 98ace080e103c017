"""What several stages share: reading data as the model takes it, running a bundle in its runtime,
measuring the manifest's metrics, and a target's limits. Stages import this; it imports no stage."""
import dataclasses
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..api import Prediction, ShardedPredictBackend, Technique, WeightValuesBackend
from ..data import Dataset, data_sha256, load_dataset
from ..errors import InputError, ToolchainError
from ..fsutil import bundle_bytes, bundle_download_bytes, read_json
from ..manifest import Target
from ..policy import Limits, target_limits
from ..weights import find_copies
from .layout import Build
from .machine import available_memory, cores
from .remote import cluster_cpus, predict_on_cluster

LATENCY_THREADS = 1
LATENCY_RUNS = 20        # timed single-thread invokes of one batch (after the backend's warm-up)...
LATENCY_MIN_RUNS = 3     # ...or as many as fit in LATENCY_SECONDS, at least these: a 20M-parameter
LATENCY_SECONDS = 2.0    # detector's int4 invoke takes 2 s, and 20 of them cost more than its accuracy run
LATENCY_WARMUP = 3       # invokes a backend leaves out of its median (allocation, weight packing)
# Batches run again to check the runtime's outputs repeat: 16, at most an eighth of the set (an
# LLM's few long windows, a detector's few large images), at least 1.
DETERMINISM_SAMPLES = 16
# The reruns of the determinism check, each on a heap left full of a different byte. For a digits
# int8 recipe whose kernel reads uninitialised memory, three runs in one process gave identical
# outputs in 5 of 20 trials; two patterns (0x55, 0xAA) then caught it in 30 of 30 trials. Once
# candidates were written with shared tables (edgebuild_tflite/flatbuffer.py), two patterns missed
# it in 2 of 25 whole builds (tests/test_reliability.py's), four in 1 of 55, six in 0 of 40.
HEAP_PATTERNS = (0x55, 0xAA, 0x33, 0xCC, 0x0F, 0xF0)
HEAP_BLOCK_BYTES = 16 << 20
JOBS_VARIABLE = "EDGEBUILD_JOBS"


def jobs() -> int:
    """How many shards of the samples an accuracy run evaluates at once: EDGEBUILD_JOBS (`--jobs`,
    checked by the CLI), else every core this process may use."""
    value = os.environ.get(JOBS_VARIABLE, "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else len(os.sched_getaffinity(0))


def predict_samples(backend, bundle: Path, inputs, *, batch: int, exported_program: Path | None,
                    workers: int) -> Prediction:
    """Every sample through the bundle. A `ShardedPredictBackend` runs up to `workers` contiguous
    shards at once (whole batches each); its latency is then timed apart (`time_latency`)."""
    total = len(inputs[0])
    batches = -(-total // batch)
    sharded = isinstance(backend, ShardedPredictBackend)
    cluster = cluster_cpus() if sharded else None  # a stage run as a Ray task: shards go to the cluster
    if cluster is not None:
        shards = min(cluster, batches)
    else:
        shards = min(workers, batches, _shards_memory_allows(bundle)) if sharded else 1
    if shards <= 1:
        return backend.predict(bundle, inputs, threads=LATENCY_THREADS, batch=batch, exported_program=exported_program)
    bounds = [round(batches * i / shards) * batch for i in range(shards + 1)]
    parts = [[array[start:end] for array in inputs] for start, end in zip(bounds, bounds[1:])]
    if cluster is not None:
        results = predict_on_cluster(backend, bundle, parts, batch=batch, exported_program=exported_program)
    else:
        with ThreadPoolExecutor(shards) as pool:  # the runtime releases the GIL while it runs
            results = list(pool.map(lambda part: backend.predict(bundle, part, threads=LATENCY_THREADS, batch=batch,
                                                                 exported_program=exported_program), parts))
    first = results[0].outputs
    if isinstance(first, dict):
        outputs = {name: np.concatenate([r.outputs[name] for r in results]) for name in first}
    elif isinstance(first, np.ndarray):
        outputs = np.concatenate([r.outputs for r in results])
    else:
        outputs = [np.concatenate(parts) for parts in zip(*(r.outputs for r in results))]
    return dataclasses.replace(results[0], outputs=outputs, latency_ms=None,
                               details={**results[0].details, "shards": shards})


# Each shard's runtime holds its own copy of the weights (XNNPACK packs them per interpreter), and
# packing may widen them: budget this many times the bundle's bytes per shard.
SHARD_BYTES_PER_BUNDLE_BYTE = 4


def _shards_memory_allows(bundle: Path) -> int:
    """How many runtimes of this bundle fit in half the memory available now (Linux; else no cap)."""
    available = available_memory()
    return 2**31 if available is None else shards_within(available, bundle_bytes(bundle))


def shards_within(available: int, bundle_size: int) -> int:
    return max(1, available // 2 // max(1, SHARD_BYTES_PER_BUNDLE_BYTE * bundle_size))


def latency_runs(batch_ms: float | None) -> int:
    """Timed invokes for a model whose batch takes about `batch_ms` (from its accuracy run)."""
    if not batch_ms:
        return LATENCY_RUNS
    return max(LATENCY_MIN_RUNS, min(LATENCY_RUNS, int(LATENCY_SECONDS * 1000 // batch_ms)))


def time_latency(backend, bundle: Path, inputs, *, batch: int, exported_program: Path | None,
                 runs: int = LATENCY_RUNS) -> Prediction:
    """Latency as it means something: one batch, invoked LATENCY_WARMUP + `runs` times on one
    thread, nothing else running in this process."""
    repeated = [np.concatenate([array[:batch]] * (LATENCY_WARMUP + runs)) for array in inputs]
    return backend.predict(bundle, repeated, threads=LATENCY_THREADS, batch=batch, exported_program=exported_program)


def read_data(build: Build, role: str, *, need_labels: bool) -> Dataset:
    """A data role's samples, checked against the exported model's inputs; errors name the manifest's file."""
    meta = read_json(build.model_meta)
    return load_dataset(build.data(role), build.manifest.relative(build.data_source(role)), meta["inputs"],
                        need_labels=need_labels)


def metrics(build: Build) -> dict:
    """The metrics every candidate is measured on, by key, the gating one first."""
    return {key: build.registry.metrics[build.manifest.specs[key].name] for key in build.manifest.metrics}


def evaluation_data(build: Build) -> Dataset:
    return read_data(build, "evaluation", need_labels=any(m.needs_labels for m in metrics(build).values()))


def output_specs(build: Build) -> list[dict]:
    """The model's outputs as export recorded them: name, shape, dtype, in the model's order."""
    return read_json(build.model_meta)["outputs"]


def read_outputs(path, specs: list[dict]) -> dict[str, np.ndarray]:
    """Outputs stored one array per output name (the fp32 reference), in the model's order."""
    with np.load(path) as stored:
        return {spec["name"]: stored[spec["name"]] for spec in specs}


def named_outputs(outputs, specs: list[dict], runtime: str) -> dict[str, np.ndarray]:
    """A runtime's outputs as {name: array} in the model's order: by name when the runtime names
    them as the model does (TFLite signatures, Core ML outputs), else by position."""
    names = [spec["name"] for spec in specs]
    if isinstance(outputs, np.ndarray):
        outputs = [outputs]
    if isinstance(outputs, dict):
        if set(outputs) == set(names):
            return {name: np.asarray(outputs[name]) for name in names}
        outputs = list(outputs.values())
    if len(outputs) != len(names):
        raise ToolchainError(f"{runtime} gave {len(outputs)} outputs; the model has {len(names)} "
                             f"({', '.join(names)})", stage="evaluate")
    return {name: np.asarray(array) for name, array in zip(names, outputs)}


def example_batch(build: Build) -> int:
    """The batch size the model was exported with (0 in the record means a dynamic batch: run one)."""
    return int(read_json(build.model_meta)["inputs"][0]["shape"][0]) or 1


def _shapes(reference: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {list(array.shape)}" for name, array in reference.items())


def _labels(build: Build, metric, key: str, output: str, reference: np.ndarray, data: Dataset):
    """One output's labels for a metric that needs them, checked when it takes integer classes."""
    labels = data.labels_for(output)
    source = build.manifest.relative(build.data_source("evaluation"))
    if labels is None:
        raise InputError(f"missing array 'y_{output}' or 'y' (labels) needed by metric {key}", file=source)
    if metric.integer_labels and (labels.dtype.kind not in "iu" or labels.shape[1:] != reference.shape[1:-1]):
        name = f"y_{output}" if data.labels and f"y_{output}" in data.labels else "y"
        raise InputError(f"array {name!r} has shape {labels.shape} dtype {labels.dtype}; metric {key} takes one "
                         f"integer class per sample{' and position' if reference.ndim > 2 else ''} for output "
                         f"{output} {list(reference.shape)}", file=source)
    return labels


def _judged_outputs(build: Build, key: str, metric, reference: dict[str, np.ndarray]) -> list[str]:
    """The outputs a metric reads: the one it names, the only one, or every output it applies to."""
    spec = build.manifest.specs[key]
    if spec.output is not None:
        if spec.output not in reference:
            raise build.manifest.error(spec.where + ("output",), f"unknown output {spec.output!r} (the model's "
                                                                f"outputs: {_shapes(reference)})")
        return [spec.output]
    if len(reference) == 1:
        return list(reference)
    if metric.needs_labels:
        raise build.manifest.error(spec.where, f"metric {spec.name!r} compares one output with labels; the model "
                                               f"has {len(reference)} outputs: {_shapes(reference)}; name one with "
                                               f"{{name: {spec.name}, output: NAME}}")
    names = [n for n, array in reference.items() if metric.applies is None or metric.applies(array.shape)]
    if not names:
        raise build.manifest.error(spec.where, f"metric {spec.name!r} applies to none of the model's outputs: "
                                               f"{_shapes(reference)}")
    return names


def measure(build: Build, outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray],
            data: Dataset) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Each metric of the manifest on one set of outputs: {key: value}, and, for a metric judged on
    several outputs (gating on the worst), {key: {output: value}}."""
    values, per_output = {}, {}
    for key, metric in metrics(build).items():
        if metric.all_outputs:
            values[key] = metric.compute(outputs, reference, data.labels if metric.needs_labels else None)
            continue
        results = {}
        for name in _judged_outputs(build, key, metric, reference):
            labels = _labels(build, metric, key, name, reference[name], data) if metric.needs_labels else None
            results[name] = metric.compute(outputs[name], reference[name], labels)
        values[key] = metric.worst(list(results.values()))
        if len(results) > 1:
            per_output[key] = results
    return values, per_output


def chance_warnings(build: Build, values: dict[str, float], reference: dict[str, np.ndarray]) -> list[str]:
    """A label metric whose fp32 value is at or near chance almost always reads the wrong output or
    the wrong labels: say so."""
    warnings = []
    for key, metric in metrics(build).items():
        if not (metric.needs_labels and metric.integer_labels and metric.higher_is_better) or values[key] is None:
            continue
        for name in _judged_outputs(build, key, metric, reference):
            classes = reference[name].shape[-1]
            if classes >= 2 and values[key] <= 1 / classes + 0.05:
                warnings.append(f"fp32 {key} is {values[key]:.4f}, at or near chance (1/{classes} = "
                                f"{1 / classes:.4f}) for output {name} {list(reference[name].shape)}: is it the "
                                f"right output, and are these its labels?")
    return warnings


class NotDeterministic(Exception):
    """The runtime gave different outputs for the same input and bundle: no metric of it means anything."""


def _check_deterministic(build: Build, backend, bundle: Path, inputs, outputs: dict[str, np.ndarray],
                         specs: list[dict]) -> None:
    """Run the first samples again in a fresh interpreter: the outputs must be bit-identical. (A
    recipe the converter accepts can still give a bundle whose kernels read uninitialised memory:
    logits of 1e35 that change from run to run.)"""
    batch = example_batch(build)
    batches = max(1, -(-len(inputs[0]) // batch))
    count = min(len(inputs[0]), min(DETERMINISM_SAMPLES, max(1, batches // 8)) * batch)
    for pattern in HEAP_PATTERNS:
        _dirty_heap(pattern)
        again = backend.predict(bundle, [array[:count] for array in inputs], threads=LATENCY_THREADS, batch=batch,
                                exported_program=build.exported_program)
        for name, array in named_outputs(again.outputs, specs, again.runtime).items():
            if not np.array_equal(array, outputs[name][:count], equal_nan=True):
                raise NotDeterministic(f"{again.runtime} gave different outputs for the same input on a second run "
                                       f"(output {name}, first {count} samples): the bundle is not deterministic")


def _dirty_heap(pattern: int) -> None:
    """Leave freed heap memory filled with `pattern`, for the next interpreter to allocate. A kernel
    that reads memory it never wrote then gives different numbers for each pattern; on fresh, zeroed
    pages it often repeats the same numbers, and a single rerun missed it about one time in four.
    (glibc serves a block this size with mmap and then raises its mmap threshold when it is freed:
    the second block comes from the heap and stays there.)"""
    for _ in range(2):
        block = np.full(HEAP_BLOCK_BYTES, pattern, np.uint8)
        del block


def digest(*parts) -> str:
    """A cache key: the sha256 of the parts as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def variant_evaluation_inputs(build: Build, variant_key: str) -> tuple:
    """What a full evaluation of one of a variant's bundles depends on besides the bundle's bytes:
    the fp32 bundle (the model), the evaluation data, the metrics, the toolchain and the code of
    edgebuild, the backend and the metrics."""
    backend = build.registry.backends[build.variants[variant_key].backend]
    return (read_json(build.fp32_record(variant_key))["sha256"], data_sha256(build.data("evaluation")),
            build.manifest.metrics, backend.version(),
            build.code(("backend", backend.name), *(("metric", spec.name) for spec in build.manifest.specs.values())))


def evaluated_before(build: Build, variant_key: str, sha256: str) -> Path:
    """Where the evaluation of these bytes is kept: two techniques that give the same bundle (int4
    blockwise recipes on a model whose every weight is a convolution's) are evaluated once."""
    key = digest(*variant_evaluation_inputs(build, variant_key), sha256)[:32]
    return build.state / variant_key / "evaluated" / f"{key}.json"


def evaluate_bundle(build: Build, backend, bundle: Path) -> dict:
    """Run a bundle in its runtime on the evaluation set: every output's metrics, bytes, download
    bytes, latency; a runtime that is not deterministic by construction runs the first samples
    twice, and outputs that differ are an error."""
    # First, while nothing else is held: decompressing an LLM's weights one at a time still needs room.
    copies = find_copies(backend.weight_values(bundle)) if isinstance(backend, WeightValuesBackend) else None
    data = evaluation_data(build)
    batch = example_batch(build)
    begin = time.perf_counter()
    with cores(jobs()) as workers:  # every core no other running stage holds
        prediction = predict_samples(backend, bundle, data.inputs, batch=batch,
                                     exported_program=build.exported_program, workers=workers)
    if isinstance(backend, ShardedPredictBackend):
        # Each shard ran its batches one after another: a batch took about its shard's time.
        shards = (prediction.details or {}).get("shards", 1)
        batch_ms = (time.perf_counter() - begin) * 1000 * shards / max(1, -(-len(data.inputs[0]) // batch))
        timed = time_latency(backend, bundle, data.inputs, batch=batch, exported_program=build.exported_program,
                             runs=latency_runs(batch_ms))
        prediction = dataclasses.replace(prediction, latency_ms=timed.latency_ms, latency_note=timed.latency_note,
                                         details=timed.details)
    specs = output_specs(build)
    outputs = named_outputs(prediction.outputs, specs, prediction.runtime)
    if not prediction.deterministic:  # a simulation would pay a second full weight decompression
        _check_deterministic(build, backend, bundle, data.inputs, outputs, specs)
    reference = read_outputs(build.reference, specs)  # after the run: an LLM's reference logits are large
    values, per_output = measure(build, outputs, reference, data)
    record = {
        "bytes": bundle_bytes(bundle),
        "download_bytes": bundle_download_bytes(bundle),
        "metric": values[build.manifest.metric],
        "metrics": values,
        "latency_ms": None if prediction.latency_ms is None else round(prediction.latency_ms, 4),
        "evaluated_by": prediction.runtime,
        "latency": prediction.details,
        "layers": backend.weights(bundle),
    }
    if copies is not None:
        record["copies"] = copies
    if per_output:
        record["per_output"] = per_output
    if prediction.latency_ms is None and prediction.latency_note:
        record["latency_note"] = prediction.latency_note
    return record


def limits(build: Build, target: Target) -> Limits:
    """The target's limits, its accuracy threshold measured from the fp32 baseline, and its guards."""
    return target_limits(target, build.registry.metrics, build.manifest.gate.name, read_json(build.baseline)["value"],
                         build.backend(target).platform)


def post_training_entries(build: Build, variant_key: str) -> list[tuple[Technique, dict]]:
    """Each technique of the variant with its evaluation record, or a `skipped` entry with the reason."""
    entries = []
    for technique, skip in build.runnable_techniques(variant_key):
        entries.append((technique, {"technique": technique.name, "description": technique.description,
                                    "status": "skipped", "reason": skip} if skip
                        else read_json(build.evaluation(variant_key, technique.name))))
    return entries
