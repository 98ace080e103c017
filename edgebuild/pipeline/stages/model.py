"""Load: export the model, tokenize text data, the fp32 reference outputs and baseline metrics."""
import os
from pathlib import Path

import numpy as np

from ... import hf
from ...data import load_dataset, run_torch_module
from ...errors import EdgebuildError, InputError, ToolchainError, first_line
from ...fsutil import atomic_output, atomic_write_json, remove_path, sha256_file
from ...outputs import leaves, name_outputs, natural_names, needs_names
from ..evaluation import (chance_warnings, evaluation_data, example_batch, measure, metrics, output_specs,
                          read_data, read_outputs)
from ..layout import Build


def _torch_dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _save_program(program, out: Path) -> None:
    """torch.export.save, with bytes that depend on neither the project's path nor the process.

    The archive's folder is named after the file written (so it is saved under its final name, in
    a folder of its own), and each node's stack trace names the model's source file by its
    absolute path: debug text no backend needs, dropped so that a clone elsewhere (another CI
    runner, a shared cache) exports the same bytes."""
    import torch

    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    staging = out.parent / f".{out.stem}.tmp-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        torch.export.save(program, str(staging / out.name))
        os.replace(staging / out.name, out)
    finally:
        remove_path(staging)


def export_model(build: Build) -> None:
    """Load the model through its loader and save it as a torch.export program with its signature."""
    import torch

    manifest = build.manifest
    loader = build.registry.loaders[manifest.model["source"]]
    try:
        # (module, example inputs), or with a reference the module was converted from (TorchScript)
        module, example, *reference = loader(manifest.model, manifest.root)
    except EdgebuildError:
        raise
    except Exception as exc:
        raise InputError(f"loading the model failed: {first_line(exc)}", file=manifest.path.name,
                         field="model") from exc
    with torch.no_grad():
        result = module(*example)
    results = leaves(result)
    names = _output_names(build, result, results)
    if needs_names(names):  # the exported program returns {name: tensor}: every backend sees the names
        name_outputs(module, names)
    try:
        program = torch.export.export(module, example)
    except Exception as exc:
        raise ToolchainError(f"torch.export failed: {first_line(exc)}", stage="export") from exc

    inputs = [{"name": name, "shape": list(tensor.shape), "dtype": _torch_dtype_name(tensor.dtype)}
              for name, tensor in zip(program.graph_signature.user_inputs, example)]
    outputs = [{"name": name, "shape": list(r.shape), "dtype": _torch_dtype_name(r.dtype)}
               for name, r in zip(names, results)]
    parameters = int(sum(p.numel() for p in module.parameters()))
    if reference:
        _check_against(build, program, reference[0], example, inputs)
    rewrites = _rewrite(build, program, example, inputs)

    _save_program(program, build.exported_program)
    atomic_write_json(build.model_meta, {"name": manifest.model_name, "inputs": inputs, "outputs": outputs,
                                         "parameters": parameters, "torch": torch.__version__, "rewrites": rewrites,
                                         "sha256": sha256_file(build.exported_program)})


REFERENCE_SAMPLES = 64


def _samples(build: Build, inputs: list[dict]) -> tuple:
    """The first evaluation samples: what a program is checked against the module it came from on."""
    data = load_dataset(build.data("evaluation"), build.manifest.relative(build.data_source("evaluation")),
                        inputs, need_labels=False)
    return data.head(REFERENCE_SAMPLES)


def _outputs(module, samples: tuple, example: tuple, inputs: list[dict]) -> list:
    """Every output of `module` on the samples, then on the example inputs."""
    import torch

    outputs = run_torch_module(module, samples, int(inputs[0]["shape"][0]) or 1)
    with torch.no_grad():
        return outputs + [t.float().numpy() for t in leaves(module(*example))]


def _check_against(build: Build, program, reference, example: tuple, inputs: list[dict]) -> None:
    """The exported program must give the outputs of the module it was converted from (a TorchScript
    file's), on the example inputs and on the evaluation data: a conversion that changes answers
    never reaches a bundle."""
    samples = _samples(build, inputs)
    converted = _outputs(program.module(), samples, example, inputs)
    expected = _outputs(reference, samples, example, inputs)
    if len(converted) != len(expected):
        raise ToolchainError(f"the converted program returns {len(converted)} outputs, the TorchScript module "
                             f"{len(expected)}", stage="export")
    for got, want in zip(converted, expected):
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max()))):
            difference = float(np.abs(got - want).max()) if got.shape == want.shape else "shape"
            raise ToolchainError(f"the converted program's outputs differ from the TorchScript module's on the "
                                 f"evaluation data (max |diff| {difference})", stage="export")


def _rewrite(build: Build, program, example: tuple, inputs: list[dict]) -> list[dict]:
    """Apply the graph rewrites the manifest leaves on, in registration order, each checked on the
    evaluation data: a rewrite that moves any output by more than 1 ulp fails the export."""
    switched = build.manifest.model.get("rewrites", {})
    applied, samples, before = [], None, None
    for name, rewrite in build.registry.rewrites.items():
        if not switched.get(name, True):
            continue
        original = program.module()  # a graph of its own over the same weights
        try:
            changed = int(rewrite.rewrite(program))
        except Exception as exc:
            raise ToolchainError(f"graph rewrite {name!r} failed: {first_line(exc)} (switch it off with "
                                 f"model.rewrites: {{{name}: false}})", stage="export") from exc
        record = {"name": name, "description": rewrite.description, "changed": changed}
        if changed:
            samples = _samples(build, inputs) if samples is None else samples
            before = _outputs(original, samples, example, inputs) if before is None else before
            after = _outputs(program.module(), samples, example, inputs)
            record["max_ulp"] = _max_ulp(before, after)
            if record["max_ulp"] > 1:
                raise ToolchainError(f"graph rewrite {name!r} changed the model's outputs by {record['max_ulp']} ulp "
                                     f"on the evaluation data (at most 1 is allowed); switch it off with "
                                     f"model.rewrites: {{{name}: false}}", stage="export")
            record["samples"] = len(samples[0])
            before = after
        applied.append(record)
    return applied


def _max_ulp(before: list, after: list) -> int:
    """The largest distance in float32 units in the last place between matching outputs."""
    worst = 0
    for old, new in zip(before, after, strict=True):
        old, new = old.astype(np.float32), new.astype(np.float32)
        if old.shape != new.shape or not np.array_equal(np.isnan(old), np.isnan(new)):
            return 2**31 - 1
        finite = ~np.isnan(old)
        # float32 bit patterns, ordered so that adjacent floats differ by 1 (negatives mirrored)
        ordered = [np.where(bits < 0, np.int64(-2**31) - bits, bits) for bits in
                   (a[finite].view(np.int32).astype(np.int64) for a in (old, new))]
        if ordered[0].size:
            worst = max(worst, int(np.abs(ordered[0] - ordered[1]).max()))
    return worst


def _output_names(build: Build, result, results: list) -> list[str]:
    """`model.outputs`, else the names the model's own output structure gives."""
    declared = build.manifest.model.get("outputs")
    if declared is None:
        return natural_names(result)
    if len(declared) != len(results):
        shapes = ", ".join(str(list(r.shape)) for r in results)
        raise build.manifest.error(("model", "outputs"), f"names {len(declared)} output(s); the model returns "
                                                         f"{len(results)} ({shapes})")
    return list(declared)


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


def reference_outputs(build: Build) -> None:
    """fp32 outputs of the exported program on the evaluation set: what every candidate is compared to."""
    import torch

    data = read_data(build, "evaluation", need_labels=False)
    program = torch.export.load(str(build.exported_program))
    outputs = run_torch_module(program.module(), data.inputs, example_batch(build))
    temporary = atomic_output(build.reference)
    np.savez(temporary, **{spec["name"]: array for spec, array in zip(output_specs(build), outputs)})
    os.replace(temporary, build.reference)


def baseline_metric(build: Build) -> None:
    """The fp32 model's metrics; `max_drop` floors are measured from the gating one. Every metric's
    outputs and labels are checked here, before any candidate is built."""
    reference = read_outputs(build.reference, output_specs(build))
    values, per_output = measure(build, reference, reference, evaluation_data(build))
    # Metrics measured against fp32 itself (sqnr) have no fp32 value of their own.
    kinds = metrics(build)
    values = {key: value if kinds[key].has_baseline else None for key, value in values.items()}
    per_output = {key: by_output for key, by_output in per_output.items() if kinds[key].has_baseline}
    atomic_write_json(build.baseline, {"metric": build.manifest.metric, "value": values[build.manifest.metric],
                                       "metrics": values, "per_output": per_output,
                                       "warnings": chance_warnings(build, values, reference),
                                       "evaluated_by": "torch fp32 (exported program)"})
