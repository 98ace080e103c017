"""PyTorch -> .tflite with litert-torch; large models convert in two child processes.

Small models convert in the calling process, in one call. For a large one, `lower` turns the
exported program into a LiteRT MLIR module with *lightweight* constants (large weights stay in
the torch tensors instead of being copied into MLIR; the converter folds constants at the end,
in the LiteRT runtime) and writes it as MLIR bytecode; `emit` parses the bytecode and writes the
flatbuffer. In a process each, the torch weights and the flatbuffer writer never share an address
space: a 100M-parameter Llama converts at ~3x its fp32 weight bytes instead of 6x
(bench/llm_scale.py), and the calling process keeps none of it.

Lightweight constants lose their names (litert-torch calls them `arith.constantN`); `lower` gives
each the name a non-lightweight conversion would, from the module stack of the op that reads the
parameter, so layer names in reports and recipes do not depend on the model's size.

Run as `python -m edgebuild_tflite.conversion lower|emit SOURCE DESTINATION`.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

# Exported programs at least this large convert in child processes.
CHILD_PROCESS_BYTES = 128 * 2**20
# litert-torch 0.10's name for a lightweight constant's resource blob (pinned in pyproject.toml).
_RESOURCE = re.compile(r'dense_resource<"TENSOR__ConstantFingerprint\(.*?data_ptr=(\d+), storage_offset=(\d+)\)">')


class ConversionFailed(Exception):
    """A conversion step failed; the message is the converter's own."""


def _layer_names(program) -> dict[str, str]:
    """Parameter/buffer name -> the module stack of the first op that reads it (litert-torch's
    location format, which .tflite tensor names are made from)."""
    from litert_torch.backend.debuginfo import build_mlir_debuginfo

    nodes = {node.name: node for node in program.graph.nodes}
    names = {}
    for spec in program.graph_signature.input_specs:
        node = nodes.get(spec.arg.name) if spec.target else None
        if node is None:
            continue
        info = next((build_mlir_debuginfo(user) for user in node.users if build_mlir_debuginfo(user)), None)
        if info:
            names[spec.target] = info
    return names


def _name_constants(module_op, tensors: dict[tuple[int, int], str], layer_names: dict[str, str]) -> None:
    """Give each lightweight constant the location (and so the tensor name) of its layer."""
    from litert_converter.mlir import ir

    def walk(operation):
        for region in operation.regions:
            for block in region.blocks:
                for inner in block.operations:
                    inner = inner.operation
                    if inner.name == "arith.constant" and "value" in inner.attributes:
                        match = _RESOURCE.search(str(inner.attributes["value"]))
                        name = tensors.get((int(match.group(1)), int(match.group(2)))) if match else None
                        if name in layer_names:
                            with inner.context:
                                inner.location = ir.Location.name(layer_names[name])
                    walk(inner)

    walk(module_op)


def lower(exported_program: Path, bytecode: Path) -> None:
    import torch
    import litert_torch

    program = torch.export.load(str(exported_program))
    args, _ = program.example_inputs
    layer_names = _layer_names(program)
    module = program.module()
    del program  # the module holds the weights; nothing else needs the archive's objects
    # Lightweight constants are named after the storage address and offset of their tensor.
    tensors = {(tensor.untyped_storage().data_ptr(), tensor.storage_offset()): name
               for name, tensor in [*module.named_parameters(), *module.named_buffers()]}
    try:
        converted = litert_torch.convert(module, tuple(args), lightweight_conversion=True)
    except Exception as exc:
        raise ConversionFailed(str(exc)) from exc
    module_op = converted._exporter._module_op  # litert-torch 0.10: the lowered module, not yet written
    _name_constants(module_op, tensors, layer_names)
    with open(bytecode, "wb") as stream:
        module_op.write_bytecode(stream)


def emit(bytecode: Path, out: Path) -> None:
    from litert_converter.mlir import ir
    from litert_converter.mlir._mlir_libs import converter_api_ext

    context = ir.Context()
    converter_api_ext.prepare_mlir_context(context)
    with context:
        module = ir.Module.parseFile(str(bytecode))  # not via a Python bytes copy of the whole model
        converter_api_ext.export_flatbuffer_to_file(module.operation, str(out))


def convert_here(exported_program: Path, out: Path) -> None:
    import torch
    import litert_torch

    program = torch.export.load(str(exported_program))
    args, _ = program.example_inputs
    try:
        litert_torch.convert(program.module(), tuple(args)).export(str(out))
    except Exception as exc:
        raise ConversionFailed(str(exc)) from exc


def convert(exported_program: Path, out: Path, *, in_children: bool | None = None) -> None:
    """Write the .tflite for an exported program; raises ConversionFailed with the converter's message."""
    if in_children is None:
        in_children = exported_program.stat().st_size >= CHILD_PROCESS_BYTES
    if not in_children:
        convert_here(exported_program, out)
        return
    bytecode = out.with_name(out.name + ".mlirbc")
    try:
        for step, source, destination in (("lower", exported_program, bytecode), ("emit", bytecode, out)):
            done = subprocess.run([sys.executable, "-m", __name__, step, str(source), str(destination)],
                                  capture_output=True, text=True, env={**os.environ, "LITERT_TORCH_SHOW_PROGRESS": "n"})
            if done.returncode != 0:
                lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
                failure = next((line for line in reversed(lines) if line.startswith(ConversionFailed.__name__)), None)
                raise ConversionFailed(failure.split(": ", 1)[1] if failure and ": " in failure
                                       else "\n".join(lines[-20:]) or f"{step} exited {done.returncode}")
    finally:
        bytecode.unlink(missing_ok=True)


if __name__ == "__main__":
    step, source, destination = sys.argv[1:4]
    try:
        (lower if step == "lower" else emit)(Path(source), Path(destination))
    except ConversionFailed as exc:
        # One line the parent can read back; the traceback is of no use to anyone here.
        print(f"{ConversionFailed.__name__}: {str(exc).strip()}".replace("\n", " | ")[:4000], file=sys.stderr)
        sys.exit(1)
