"""What each pipeline stage does. Every stage reads files and writes files, nothing else.

The doit tasks in `tasks.py` decide *when* a stage runs; this module says *what* it does.
"""
import os
import shutil
from pathlib import Path

import numpy as np

from .. import __version__
from .. import devices as device_catalog
from ..api import CompressInput, NotApplicable, PackageInput, Technique
from .. import hf
from ..data import Dataset, load_dataset, run_torch_module
from ..errors import EdgebuildError, InputError, ToolchainError
from ..fsutil import (atomic_output, atomic_write_json, bundle_bytes, bundle_files, bundle_download_bytes, bundle_sha256, read_json,
                      remove_dir, remove_path, replace_dir, replace_path, sha256_file)
from ..manifest import Target
from .layout import Build

CALIBRATION_SAMPLES = 256  # enough for min/max ranges; more only slows the quantizer
LATENCY_THREADS = 1


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _torch_dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- load / export ---------------------------------------------------------------------------

def export_model(build: Build) -> None:
    """Load the model through its loader and save it as a torch.export program with its signature."""
    import torch

    manifest = build.manifest
    loader = build.registry.loaders[manifest.model["source"]]
    try:
        module, example = loader(manifest.model, manifest.root)
    except EdgebuildError:
        raise
    except Exception as exc:
        raise InputError(f"loading the model failed: {_first_line(exc)}", file=manifest.path.name,
                         field="model") from exc
    try:
        program = torch.export.export(module, example)
    except Exception as exc:
        raise ToolchainError(f"torch.export failed: {_first_line(exc)}", stage="export") from exc

    names = list(program.graph_signature.user_inputs)
    inputs = [{"name": name, "shape": list(tensor.shape), "dtype": _torch_dtype_name(tensor.dtype)}
              for name, tensor in zip(names, example)]
    with torch.no_grad():
        result = module(*example)
    results = result if isinstance(result, (tuple, list)) else (result,)
    outputs = [{"shape": list(r.shape), "dtype": _torch_dtype_name(r.dtype)} for r in results]
    parameters = int(sum(p.numel() for p in module.parameters()))

    temporary = atomic_output(build.exported_program)
    torch.export.save(program, str(temporary))
    os.replace(temporary, build.exported_program)
    atomic_write_json(build.model_meta, {"name": manifest.model_name, "inputs": inputs, "outputs": outputs,
                                         "parameters": parameters, "torch": torch.__version__,
                                         "sha256": sha256_file(build.exported_program)})


def tokenize(build: Build, role: str) -> None:
    """A text data file cut into next-token windows by the model's own tokenizer (a causal LM's data)."""
    manifest = build.manifest
    source = build.data_source(role)
    length = int(manifest.model.get("sequence_length", hf.DEFAULT_SEQUENCE_LENGTH))
    arrays = hf.tokenize_text(source, manifest.root / manifest.model["path"], length, manifest.relative(source))
    out = build.data(role)
    temporary = atomic_output(out)
    np.savez(temporary, **arrays)
    os.replace(temporary, out)


def read_data(build: Build, role: str, *, need_labels: bool) -> Dataset:
    """A data role's samples, checked against the exported model's inputs; errors name the manifest's file."""
    meta = read_json(build.model_meta)
    return load_dataset(build.data(role), build.manifest.relative(build.data_source(role)), meta["inputs"],
                        need_labels=need_labels)


def _metrics(build: Build) -> dict:
    """The metrics every candidate is measured on, the gating one first."""
    return {name: build.registry.metrics[name] for name in build.manifest.metrics}


def measure(build: Build, outputs: np.ndarray, reference: np.ndarray, data: Dataset) -> dict[str, float]:
    """Each metric of the manifest on one set of outputs."""
    if data.labels is not None and data.labels.shape[1:] != reference.shape[1:-1]:
        raise InputError(f"array 'y' has shape {data.labels.shape}; the model's outputs {reference.shape} take one "
                         f"label per sample{' and position' if reference.ndim > 2 else ''}",
                         file=build.manifest.relative(build.data_source("evaluation")))
    return {name: metric.compute(outputs, reference, data.labels) for name, metric in _metrics(build).items()}


def reference_outputs(build: Build) -> None:
    """fp32 outputs of the exported program on the evaluation set: what every candidate is compared to."""
    import torch

    data = read_data(build, "evaluation", need_labels=False)
    program = torch.export.load(str(build.exported_program))
    batch = int(read_json(build.model_meta)["inputs"][0]["shape"][0]) or 1
    outputs = run_torch_module(program.module(), data.inputs, batch)
    temporary = atomic_output(build.reference)
    np.savez(temporary, outputs=outputs)
    os.replace(temporary, build.reference)


def _evaluation_data(build: Build) -> Dataset:
    return read_data(build, "evaluation", need_labels=any(m.needs_labels for m in _metrics(build).values()))


def baseline_metric(build: Build) -> None:
    """The fp32 model's metrics; `max_drop` floors are measured from the gating one."""
    with np.load(build.reference) as stored:
        reference = stored["outputs"]
    values = measure(build, reference, reference, _evaluation_data(build))
    # Metrics measured against fp32 itself (sqnr) have no fp32 value of their own.
    values = {name: value if build.registry.metrics[name].has_baseline else None for name, value in values.items()}
    atomic_write_json(build.baseline, {"metric": build.manifest.metric, "value": values[build.manifest.metric],
                                       "metrics": values, "evaluated_by": "torch fp32 (exported program)"})


# ---- convert / compress / evaluate ------------------------------------------------------------

def convert(build: Build, variant_key: str) -> None:
    variant = build.variants[variant_key]
    backend = build.registry.backends[variant.backend]
    out = build.fp32_bundle(variant_key)
    temporary = atomic_output(out)
    targets = ", ".join(t.name for t in build.manifest.targets if build.variant(t).key == variant_key)
    try:
        backend.convert(build.exported_program, temporary, variant.options)
        replace_path(temporary, out)
    except ToolchainError as exc:
        raise ToolchainError(exc.reason, stage=exc.stage, target=targets, op=exc.op) from exc
    except Exception as exc:
        raise ToolchainError(f"{variant.backend} conversion failed: {_first_line(exc)}", stage="convert",
                             target=targets) from exc
    finally:
        remove_path(temporary)
    # Bundles may be folders (.mlpackage); doit tracks this record of their hash instead.
    atomic_write_json(build.fp32_record(variant_key), {"sha256": bundle_sha256(out)})


def runnable_techniques(build: Build, variant_key: str) -> list[tuple[Technique, str | None]]:
    """Every technique of the variant's backend, with the reason it is skipped (None: it runs)."""
    variant = build.variants[variant_key]
    backend = build.registry.backends[variant.backend]
    result = []
    allowed = build.manifest.search.get("techniques")
    for technique in build.registry.techniques_for(variant.backend):
        reason = backend.skip_reason(technique, variant.options)
        if reason is None and allowed is not None and technique.name not in allowed:
            reason = "not in search.techniques"
        if reason is None and technique.needs_calibration and build.manifest.calibration is None:
            reason = "needs data.calibration, which the manifest does not give"
        result.append((technique, reason))
    return result


def post_training_entries(build: Build, variant_key: str) -> list[tuple[Technique, dict]]:
    """Each technique of the variant with its evaluation record, or a `skipped` entry with the reason."""
    entries = []
    for technique, skip in runnable_techniques(build, variant_key):
        entries.append((technique, {"technique": technique.name, "description": technique.description,
                                    "status": "skipped", "reason": skip} if skip
                        else read_json(build.evaluation(variant_key, technique.name))))
    return entries


def compress(build: Build, variant_key: str, technique_name: str) -> None:
    """Build one candidate; a toolchain failure is recorded (and retried next build), not fatal."""
    variant = build.variants[variant_key]
    backend = build.registry.backends[variant.backend]
    technique = build.registry.techniques[(variant.backend, technique_name)]
    out = build.candidate_bundle(variant_key, technique_name)
    record_path = build.candidate_record(variant_key, technique_name)
    calibration = None
    if technique.needs_calibration:
        calibration = read_data(build, "calibration", need_labels=False).samples(CALIBRATION_SAMPLES)
    temporary = atomic_output(out)
    try:
        backend.compress(technique, CompressInput(fp32_bundle=build.fp32_bundle(variant_key),
                                                  exported_program=build.exported_program,
                                                  calibration=calibration, work_dir=out.parent,
                                                  options=variant.options), temporary)
        replace_path(temporary, out)
        record = {"technique": technique_name, "status": "ok", "sha256": bundle_sha256(out)}
    except NotApplicable as exc:
        record = {"technique": technique_name, "status": "skipped", "reason": str(exc)}
        remove_path(out)
    except Exception as exc:
        error = exc if isinstance(exc, ToolchainError) else ToolchainError(
            f"{_first_line(exc)}", stage="compress", technique=technique_name)
        record = {"technique": technique_name, "status": "error", "error": error.to_record()}
        remove_path(out)
    finally:
        remove_path(temporary)
    atomic_write_json(record_path, record)


def output_is_intact(record_path: Path, output: Path) -> bool:
    """A cached output counts only if its stage succeeded and its bytes still hash to the record.

    Used as a doit `uptodate` check: a failed, deleted or corrupted output is rebuilt, not trusted.
    """
    try:
        record = read_json(record_path)
    except (OSError, ValueError):
        return False
    return record.get("status", "ok") == "ok" and output.exists() and bundle_sha256(output) == record.get("sha256")


def candidate_is_valid(build: Build, variant_key: str, technique_name: str) -> bool:
    try:
        if read_json(build.candidate_record(variant_key, technique_name)).get("status") == "skipped":
            return True  # nothing to build for this model; settled until its inputs change
    except (OSError, ValueError):
        return False
    return output_is_intact(build.candidate_record(variant_key, technique_name),
                            build.candidate_bundle(variant_key, technique_name))


def evaluate_bundle(build: Build, backend, bundle: Path) -> dict:
    """Run a bundle in its runtime on the evaluation set: metrics, bytes, download bytes, latency."""
    data = _evaluation_data(build)
    prediction = backend.predict(bundle, data.inputs, threads=LATENCY_THREADS, exported_program=build.exported_program)
    with np.load(build.reference) as stored:  # after the run: an LLM's reference logits are large
        reference = stored["outputs"]
    values = measure(build, prediction.outputs, reference, data)
    return {
        "bytes": bundle_bytes(bundle),
        "download_bytes": bundle_download_bytes(bundle),
        "metric": values[build.manifest.metric],
        "metrics": values,
        "latency_ms": None if prediction.latency_ms is None else round(prediction.latency_ms, 4),
        "evaluated_by": prediction.runtime,
        "latency": prediction.details,
        "layers": backend.weights(bundle),
    }


def evaluate(build: Build, variant_key: str, technique_name: str) -> None:
    """Run the candidate in its runtime on the evaluation set; record metric, size and latency."""
    variant = build.variants[variant_key]
    backend = build.registry.backends[variant.backend]
    technique = build.registry.techniques[(variant.backend, technique_name)]
    record = read_json(build.candidate_record(variant_key, technique_name))
    result = {"technique": technique_name, "description": technique.description}
    destination = build.evaluation(variant_key, technique_name)
    if record["status"] == "skipped":
        atomic_write_json(destination, {**result, "status": "skipped", "reason": record["reason"]})
        return
    if record["status"] != "ok":
        atomic_write_json(destination, {**result, "status": "error", "error": record["error"]})
        return
    try:
        measured = evaluate_bundle(build, backend, build.candidate_bundle(variant_key, technique_name))
    except EdgebuildError:
        raise
    except Exception as exc:
        error = ToolchainError(_first_line(exc), stage="evaluate", technique=technique_name)
        atomic_write_json(destination, {**result, "status": "error", "error": error.to_record()})
        return
    atomic_write_json(destination, {**result, "status": "ok", "sha256": record["sha256"], **measured})


# ---- search / select / package / report -------------------------------------------------------

def target_threshold(build: Build, target: Target) -> float:
    metric = build.registry.metrics[build.manifest.metric]
    return target.threshold(read_json(build.baseline)["value"], metric.higher_is_better)


def store_limit(build: Build, target: Target) -> dict | None:
    """A store's hard download limit; it applies even when the manifest's own budget is larger."""
    store = device_catalog.store_for(build.registry.backends[target.format].platform)
    if store and target.delivery:
        return {"store": store[0], "delivery": target.delivery, "limit": store[1][target.delivery]}
    return None


def candidate_verdict(build: Build, target: Target, evaluation: dict, threshold: float) -> list[dict]:
    """Every constraint an evaluated candidate breaks, with its limit and actual value."""
    failed = []
    if target.size is not None and evaluation["bytes"] > target.size:
        failed.append({"constraint": "size", "limit": target.size, "actual": evaluation["bytes"]})
    if target.download is not None and evaluation["download_bytes"] > target.download:
        failed.append({"constraint": "download", "limit": target.download, "actual": evaluation["download_bytes"]})
    store = store_limit(build, target)
    if store and evaluation["download_bytes"] > store["limit"]:
        failed.append({"constraint": "store", "limit": store["limit"], "actual": evaluation["download_bytes"]})
    if target.latency_ms is not None and evaluation["latency_ms"] is not None and evaluation["latency_ms"] > target.latency_ms:
        failed.append({"constraint": "latency", "limit": target.latency_ms, "actual": evaluation["latency_ms"]})
    if not build.registry.metrics[build.manifest.metric].meets(evaluation["metric"], threshold):
        failed.append({"constraint": "accuracy", "limit": threshold, "actual": evaluation["metric"]})
    return failed


def select(build: Build, target: Target) -> None:
    """The smallest candidate meeting every budget and the floor; ties go to the better metric."""
    from .search import pareto_front, search_runs

    manifest = build.manifest
    metric = build.registry.metrics[manifest.metric]
    threshold = target_threshold(build, target)
    backend = build.registry.backends[target.format]
    variant_key = build.variant(target).key
    baseline = read_json(build.baseline)
    # In technique order; the search's pick and the trained candidate last.
    entries = [entry for _, entry in post_training_entries(build, variant_key)]
    search = read_json(build.search_record(target)) if search_runs(build, target) else None
    if search and search.get("candidate"):
        entries.append(search["candidate"])
    trained = read_json(build.qat_record(target)) if target.qat is not None else None
    if trained and trained.get("candidate"):
        entries.append(trained["candidate"])
    candidates = []
    for entry in entries:
        if entry["status"] in ("skipped", "error"):
            candidates.append(entry)
            continue
        failed = candidate_verdict(build, target, entry, threshold)
        candidates.append({**entry, "status": "fail" if failed else "pass", "failed": failed})

    passing = [c for c in candidates if c["status"] == "pass"]
    sign = -1 if metric.higher_is_better else 1
    chosen = min(passing, key=lambda c: (c["bytes"], sign * c["metric"], c["technique"]), default=None)
    bundle_path = build.target_output(target) / f"{manifest.model_name}{backend.extension}"
    by_name = {c["technique"]: c for c in candidates}
    comparisons = []
    for technique in build.registry.techniques_for(target.format):
        this, other = by_name.get(technique.name), by_name.get(technique.compare_with)
        if technique.compare_with and this and other and "metric" in this and "metric" in other:
            comparisons.append({"technique": technique.name, "compared_with": technique.compare_with,
                                "knob": technique.knob, "metric_delta": this["metric"] - other["metric"],
                                "bytes_delta": this["bytes"] - other["bytes"]})
    judged = [c for c in candidates if c["status"] in ("pass", "fail")]
    selection = {
        "name": target.name,
        "format": target.format,
        "devices": target.devices,
        "status": "pass" if chosen else "fail",
        "budget": {"size": target.size, "download": target.download, "latency_ms": target.latency_ms},
        "store": store_limit(build, target),
        "accuracy": {"max_drop": target.max_drop, "floor": target.floor, "threshold": threshold},
        "baseline": {"metric": baseline["value"], "metrics": baseline["metrics"]},
        "chosen": None if chosen is None else {
            "technique": chosen["technique"], "path": manifest.relative(bundle_path), "bytes": chosen["bytes"],
            "download_bytes": chosen["download_bytes"], "metric": chosen["metric"], "metrics": chosen["metrics"],
            "latency_ms": chosen["latency_ms"], "sha256": chosen["sha256"]},
        "candidates": candidates,
        "comparisons": comparisons,
        "pareto_front": [{"technique": c["technique"], "bytes": c["bytes"], "metric": c["metric"]}
                         for c in pareto_front(judged, metric.higher_is_better)],
    }
    if chosen is None and judged:
        # Nothing fits: the candidate closest to passing (smallest relative violation, summed
        # over the constraints it breaks), and by how much each constraint blocks it.
        nearest = min(judged, key=lambda c: (sum(abs(f["actual"] - f["limit"]) / max(abs(f["limit"]), 1e-12)
                                                 for f in c["failed"]), c["bytes"], c["technique"]))
        selection["nearest"] = {"technique": nearest["technique"], "blocked_by": [
            {**f, "by": abs(f["actual"] - f["limit"])} for f in nearest["failed"]]}
    if trained is not None:
        selection["qat"] = {k: v for k, v in trained.items() if k != "candidate"}
    if search is not None:
        selection["search"] = {k: search[k] for k in ("strategy", "precisions", "layers", "evaluations",
                                                      "max_evaluations", "seconds", "notes", "chosen")}
        selection["search"]["evaluated"] = search["evaluated"]
    atomic_write_json(build.selection(target), selection)


def package(build: Build, target: Target) -> None:
    """Swap the chosen bundle into `output/<target>/`; a failing target leaves no bundle behind."""
    from .qat import QAT_PREFIX
    from .search import MIXED

    selection = read_json(build.selection(target))
    destination = build.target_output(target)
    if selection["chosen"] is None:
        remove_dir(destination, build.trash)
        atomic_write_json(build.packaged(target), {"files": []})
        return
    staged = build.staging / target.name
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    technique = selection["chosen"]["technique"]
    if technique == MIXED:
        bundle = build.search_bundle(target)
    elif technique.startswith(QAT_PREFIX):
        bundle = build.qat_bundle(target)
    else:
        bundle = build.candidate_bundle(build.variant(target).key, technique)
    packager = build.registry.packagers[target.format]
    written = packager(PackageInput(bundle=bundle, directory=staged, model_name=build.manifest.model_name,
                                    model_description=build.manifest.model.get("description", ""),
                                    manifest_file=build.manifest.path.name, target=target,
                                    chosen=selection["chosen"], backend=build.registry.backends[target.format]))
    files = [{"path": build.manifest.relative(destination / f.relative_to(staged)), "sha256": sha256_file(f),
              "bytes": f.stat().st_size} for p in sorted(written) for f in bundle_files(p)]
    extension = build.registry.backends[target.format].extension
    bundle_path = next((p for p in sorted(written) if p.name.endswith(extension)), None)
    replace_dir(staged, destination, build.trash)
    atomic_write_json(build.packaged(target), {
        "bundle": build.manifest.relative(destination / bundle_path.relative_to(staged)) if bundle_path else None,
        "files": files})


def packaged_is_intact(build: Build, target: Target) -> bool:
    try:
        files = read_json(build.packaged(target))["files"]
    except (OSError, ValueError, KeyError):
        return False
    for entry in files:
        path = build.manifest.root / entry["path"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            return False
    return True


def report_data(build: Build) -> dict:
    manifest = build.manifest
    metric = build.registry.metrics[manifest.metric]
    meta = read_json(build.model_meta)
    return {
        "schema_version": 1,
        "edgebuild_version": __version__,
        "manifest": manifest.path.name,
        "model": {"name": manifest.model_name, "source": manifest.model["source"], "parameters": meta["parameters"],
                  "inputs": meta["inputs"]},
        "metric": {"name": metric.name, "description": metric.description, "unit": metric.unit,
                   "higher_is_better": metric.higher_is_better},
        # The gating metric first, then those the manifest only reports.
        "metrics": [{"name": m.name, "description": m.description, "unit": m.unit,
                     "higher_is_better": m.higher_is_better} for m in _metrics(build).values()],
        "toolchain": {name: build.registry.backends[name].version() for name in build.backends_in_use()},
        "targets": [target_summary(build, t) for t in manifest.targets],
    }


def target_summary(build: Build, target: Target) -> dict | None:
    """A target's selection, with the chosen bundle's path as its packager laid it out."""
    if not build.selection(target).is_file():
        return None
    summary = read_json(build.selection(target))
    if summary["chosen"] is not None and build.packaged(target).is_file():
        bundle = read_json(build.packaged(target)).get("bundle")
        if bundle:
            summary["chosen"]["path"] = bundle
    return summary


def write_reports(build: Build, reporters: list[str], data: dict | None = None) -> None:
    """Write each selected report format and record what was written, for the up-to-date check."""
    data = report_data(build) if data is None else data
    output = build.manifest.output
    output.mkdir(parents=True, exist_ok=True)
    # Reporters write into staging; each finished file is then renamed into `output`, so a crash
    # never leaves a half-written or temporary file there.
    staged = build.staging / "reports"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    written = []
    for name in reporters:
        path = build.registry.reporters[name](data, staged)
        os.replace(path, output / path.name)
        written.append(output / path.name)
    files = {build.manifest.relative(p): sha256_file(p) for p in written}
    try:
        previous = read_json(build.report_record)["files"]
    except (OSError, ValueError, KeyError):
        previous = {}
    for stale in set(previous) - set(files):  # a format dropped from `reports:` leaves no stale file
        (build.manifest.root / stale).unlink(missing_ok=True)
    atomic_write_json(build.report_record, {"files": files})


def reports_are_intact(build: Build) -> bool:
    try:
        files = read_json(build.report_record)["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((build.manifest.root / path).is_file() and sha256_file(build.manifest.root / path) == digest
               for path, digest in files.items())


def write_lock(build: Build) -> None:
    """edgebuild.lock: sha256 of every input and every emitted bundle file, for `edgebuild check`."""
    from .tasks import input_files

    manifest = build.manifest
    try:
        previous = read_json(build.manifest.lock_file).get("targets", {})
    except (OSError, ValueError):
        previous = {}
    targets = dict(previous)  # a --target build keeps the other targets' entries
    for target in manifest.targets:
        selection = read_json(build.selection(target))
        packaged = read_json(build.packaged(target))
        targets[target.name] = {
            "status": selection["status"],
            "technique": selection["chosen"]["technique"] if selection["chosen"] else None,
            "bundle": packaged.get("bundle"),
            "files": {entry["path"]: entry["sha256"] for entry in packaged["files"]},
        }
    atomic_write_json(build.manifest.lock_file, temp_dir=build.staging, value={
        "lock_version": 1,
        "edgebuild_version": __version__,
        "manifest": manifest.path.name,
        "inputs": {manifest.relative(path): sha256_file(path) for path in input_files(build)},
        "targets": {name: targets[name] for name in sorted(targets)},
    })
