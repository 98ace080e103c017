"""Conformance checks a backend author can run: `check_backend(backend, work_dir)` returns what is
wrong (an empty list when the backend conforms), `assert_conforms` fails a test with that list.

It checks the declared protocols (`edgebuild.api.Backend`, and `MixedPrecisionBackend` or
`QATBackend` where the backend claims them), then runs the backend for real on a tiny model it
exports here: convert, predict against torch, describe, weights, one compression per technique
given, and, for a mixed-precision backend, one per-layer assignment. Every built-in backend passes
it (tests/test_architecture.py).
"""
from pathlib import Path

import numpy as np

from .api import (Backend, CompressInput, MixedPrecisionBackend, NotApplicable, QATBackend, Technique,
                  missing_members)

TOLERANCE = 5e-2  # an fp32 conversion of the tiny model matches torch closely; float16 ones nearly so


def tiny_program(directory: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A small two-layer classifier exported with torch.export: (program file, inputs, torch outputs)."""
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    example = (torch.randn(1, 16),)
    path = Path(directory) / "tiny.pt2"
    torch.export.save(torch.export.export(module, example), str(path))
    inputs = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    with torch.no_grad():
        outputs = module(torch.from_numpy(inputs)).numpy()
    return path, inputs, outputs


def _structure(backend) -> list[str]:
    problems = []
    for protocol in (Backend, MixedPrecisionBackend, QATBackend):
        missing = missing_members(backend, protocol)
        if protocol is Backend and missing:
            problems.append(f"not an edgebuild.api.Backend: missing {', '.join(missing)}")
    for attribute, kind in (("name", str), ("platform", str), ("extension", str)):
        if not isinstance(getattr(backend, attribute, None), kind):
            problems.append(f"{attribute} must be a {kind.__name__}")
    if isinstance(getattr(backend, "extension", None), str) and not backend.extension.startswith("."):
        problems.append(f"extension {backend.extension!r} must start with a dot")
    if not problems and not (isinstance(backend.version(), str) and backend.version()):
        problems.append("version() must return a non-empty string (it is part of every cache key)")
    return problems


def _run(backend, bundle: Path, inputs: np.ndarray, expected: np.ndarray, program: Path, what: str,
         close: bool = False) -> list[str]:
    prediction = backend.predict(bundle, (inputs,), threads=1, batch=1, exported_program=program)
    found = prediction.outputs
    found = list(found.values()) if isinstance(found, dict) else [found] if isinstance(found, np.ndarray) else found
    if len(found) != 1:
        return [f"{what}: predict() gave {len(found)} outputs; the model has one"]
    outputs = np.asarray(found[0])
    if outputs.shape != expected.shape:
        return [f"{what}: predict() gave outputs of shape {outputs.shape}, torch gives {expected.shape}"]
    if close and np.abs(outputs - expected).max() > TOLERANCE * np.abs(expected).max():
        return [f"{what}: outputs differ from torch's by {np.abs(outputs - expected).max():.4g}"]
    if prediction.latency_ms is None and not prediction.latency_note:
        return [f"{what}: predict() gave no latency and no latency_note saying why"]
    return []


def _mixed(backend: MixedPrecisionBackend, fp32: Path, source: CompressInput, work: Path) -> list[str]:
    layers = backend.layers(fp32, source.options)
    keys = {"name", "op", "scope", "params", "in_features"}
    if not layers or any(not keys <= set(layer) for layer in layers):
        return [f"layers() must list the weighted layers with {', '.join(sorted(keys))}"]
    precisions = backend.precisions(source.options)
    bits = list(precisions.values())
    if bits != sorted(bits, reverse=True) or not set(backend.default_precisions(source.options)) <= set(precisions):
        return ["precisions() must go from highest to lowest bits, and default_precisions() be among them"]
    lowest = list(precisions)[-1]
    technique = backend.mixed_technique({layer["name"]: lowest for layer in layers}, layers, "conformance-mixed")
    if not isinstance(technique, Technique) or technique.backend != backend.name:
        return ["mixed_technique() must return a Technique of this backend"]
    backend.compress(technique, source, work / f"mixed{backend.extension}")
    return []


def check_backend(backend, work_dir: Path, techniques: list[Technique] = (), options: dict | None = None) -> list[str]:
    """What keeps `backend` from working in edgebuild (empty: it conforms); `options` are the
    variant's, as `backend.variant(target)` would give them (e.g. {"min_ios": 16})."""
    problems = _structure(backend)
    if problems:
        return problems
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    program, inputs, expected = tiny_program(work)
    options = dict(options or {})
    fp32 = work / f"fp32{backend.extension}"
    backend.convert(program, fp32, options)
    if not fp32.exists():
        return [f"convert() wrote nothing at {fp32.name}"]
    problems += _run(backend, fp32, inputs, expected, program, "fp32", close=True)
    description = backend.describe(fp32)
    if not (isinstance(description, dict) and description.get("inputs") and description.get("outputs")):
        problems.append("describe() must give the bundle's inputs and outputs")
    if any(not {"name", "dtype", "shape", "bytes"} <= set(row) for row in backend.weights(fp32)):
        problems.append("weights() rows need name, dtype, shape and bytes")
    source = CompressInput(fp32_bundle=fp32, exported_program=program, calibration=[(inputs[:1],)],
                           work_dir=work, options=options)
    for technique in techniques:
        if backend.skip_reason(technique, options):
            continue
        out = work / f"{technique.name}{backend.extension}"
        try:
            backend.compress(technique, source, out)
        except NotApplicable:
            continue
        problems += _run(backend, out, inputs, expected, program, technique.name)
        if isinstance(backend, QATBackend) and not isinstance(backend.qat_plan(technique), (dict, type(None))):
            problems.append(f"{technique.name}: qat_plan() must return a dict or None")
    if isinstance(backend, MixedPrecisionBackend):
        problems += _mixed(backend, fp32, source, work)
    return problems


def assert_conforms(backend, work_dir: Path, techniques: list[Technique] = (), options: dict | None = None) -> None:
    problems = check_backend(backend, work_dir, techniques, options)
    assert not problems, f"backend {getattr(backend, 'name', backend)!r}: " + "; ".join(problems)
