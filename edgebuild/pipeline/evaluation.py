"""What several stages share: reading data as the model takes it, running a bundle in its runtime,
measuring the manifest's metrics, and a target's limits. Stages import this; it imports no stage."""
from pathlib import Path

import numpy as np

from ..api import Technique
from ..data import Dataset, load_dataset
from ..errors import InputError
from ..fsutil import bundle_bytes, bundle_download_bytes, read_json
from ..manifest import Target
from ..policy import Limits, target_limits
from .layout import Build

LATENCY_THREADS = 1


def read_data(build: Build, role: str, *, need_labels: bool) -> Dataset:
    """A data role's samples, checked against the exported model's inputs; errors name the manifest's file."""
    meta = read_json(build.model_meta)
    return load_dataset(build.data(role), build.manifest.relative(build.data_source(role)), meta["inputs"],
                        need_labels=need_labels)


def metrics(build: Build) -> dict:
    """The metrics every candidate is measured on, the gating one first."""
    return {name: build.registry.metrics[name] for name in build.manifest.metrics}


def evaluation_data(build: Build) -> Dataset:
    return read_data(build, "evaluation", need_labels=any(m.needs_labels for m in metrics(build).values()))


def example_batch(build: Build) -> int:
    """The batch size the model was exported with (0 in the record means a dynamic batch: run one)."""
    return int(read_json(build.model_meta)["inputs"][0]["shape"][0]) or 1


def measure(build: Build, outputs: np.ndarray, reference: np.ndarray, data: Dataset) -> dict[str, float]:
    """Each metric of the manifest on one set of outputs."""
    if data.labels is not None and data.labels.shape[1:] != reference.shape[1:-1]:
        raise InputError(f"array 'y' has shape {data.labels.shape}; the model's outputs {reference.shape} take one "
                         f"label per sample{' and position' if reference.ndim > 2 else ''}",
                         file=build.manifest.relative(build.data_source("evaluation")))
    return {name: metric.compute(outputs, reference, data.labels) for name, metric in metrics(build).items()}


def evaluate_bundle(build: Build, backend, bundle: Path) -> dict:
    """Run a bundle in its runtime on the evaluation set: metrics, bytes, download bytes, latency."""
    data = evaluation_data(build)
    prediction = backend.predict(bundle, data.inputs, threads=LATENCY_THREADS, batch=example_batch(build),
                                 exported_program=build.exported_program)
    with np.load(build.reference) as stored:  # after the run: an LLM's reference logits are large
        reference = stored["outputs"]
    values = measure(build, prediction.outputs, reference, data)
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
    if prediction.latency_ms is None and prediction.latency_note:
        record["latency_note"] = prediction.latency_note
    return record


def limits(build: Build, target: Target) -> Limits:
    """The target's limits, its accuracy threshold measured from the fp32 baseline."""
    metric = build.registry.metrics[build.manifest.metric]
    return target_limits(target, metric, read_json(build.baseline)["value"], build.backend(target).platform)


def post_training_entries(build: Build, variant_key: str) -> list[tuple[Technique, dict]]:
    """Each technique of the variant with its evaluation record, or a `skipped` entry with the reason."""
    entries = []
    for technique, skip in build.runnable_techniques(variant_key):
        entries.append((technique, {"technique": technique.name, "description": technique.description,
                                    "status": "skipped", "reason": skip} if skip
                        else read_json(build.evaluation(variant_key, technique.name))))
    return entries
