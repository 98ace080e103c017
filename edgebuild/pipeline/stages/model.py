"""Load: export the model, tokenize text data, the fp32 reference outputs and baseline metrics."""
import os

import numpy as np

from ... import hf
from ...data import load_dataset, run_torch_module
from ...errors import EdgebuildError, InputError, ToolchainError, first_line
from ...fsutil import atomic_output, atomic_write_json, sha256_file
from ...outputs import leaves, name_outputs, natural_names, needs_names
from ..evaluation import (chance_warnings, evaluation_data, example_batch, measure, metrics, output_specs,
                          read_data, read_outputs)
from ..layout import Build


def _torch_dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


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

    temporary = atomic_output(build.exported_program)
    torch.export.save(program, str(temporary))
    os.replace(temporary, build.exported_program)
    atomic_write_json(build.model_meta, {"name": manifest.model_name, "inputs": inputs, "outputs": outputs,
                                         "parameters": parameters, "torch": torch.__version__,
                                         "sha256": sha256_file(build.exported_program)})


REFERENCE_SAMPLES = 64


def _check_against(build: Build, program, reference, example: tuple, inputs: list[dict]) -> None:
    """The exported program must give the outputs of the module it was converted from (a TorchScript
    file's), on the example inputs and on the evaluation data: a conversion that changes answers
    never reaches a bundle."""
    import torch

    data = load_dataset(build.data("evaluation"), build.manifest.relative(build.data_source("evaluation")),
                        inputs, need_labels=False)
    samples = tuple(array[:REFERENCE_SAMPLES] for array in data.inputs)
    batch = int(inputs[0]["shape"][0]) or 1
    converted = run_torch_module(program.module(), samples, batch)
    expected = run_torch_module(reference, samples, batch)
    with torch.no_grad():
        converted += [t.float().numpy() for t in leaves(program.module()(*example))]
        expected += [t.float().numpy() for t in leaves(reference(*example))]
    if len(converted) != len(expected):
        raise ToolchainError(f"the converted program returns {len(converted)} outputs, the TorchScript module "
                             f"{len(expected)}", stage="export")
    for got, want in zip(converted, expected):
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max()))):
            difference = float(np.abs(got - want).max()) if got.shape == want.shape else "shape"
            raise ToolchainError(f"the converted program's outputs differ from the TorchScript module's on the "
                                 f"evaluation data (max |diff| {difference})", stage="export")


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
