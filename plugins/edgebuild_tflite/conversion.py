"""PyTorch -> .tflite with litert-torch; large models convert in two child processes.

Small models convert in the calling process, in one call. For a large one, `lower` turns the
exported program into a LiteRT MLIR module with *lightweight* constants (large weights stay in
the torch tensors instead of being copied into MLIR; the converter folds constants at the end,
in the LiteRT runtime) and writes it as MLIR bytecode; `emit` parses the bytecode and writes the
flatbuffer. In a process each, the torch weights and the flatbuffer writer never share an address
space, and the calling process keeps none of it.

Lightweight constants lose their names (litert-torch calls them `arith.constantN`); `lower` gives
each the name a non-lightweight conversion would, from the module stack of the op that reads the
parameter, so layer names in reports and recipes do not depend on the model's size.

The weights do not travel inside the bytecode either. `lower` replaces each lightweight constant
by a splat placeholder of its shape (placeholder k is filled with -(k + 0.25)) and writes the
weights to a side file straight from the torch tensors; `emit` writes the flatbuffer with the
placeholders, finds each placeholder's buffer by its value, and overwrites it with the weight, a
chunk at a time. The file is byte-identical to one written with the weights inside
(tests/test_tflite_conversion.py), but neither child holds the weights twice: MLIR's bytecode
writer hands Python each blob as one `bytes` (~100 MB for an LLM's embedding table), and the
flatbuffer writer keeps every blob mapped while its buffer doubles. A 100M-parameter Llama
converts at 2.82x its fp32 weight bytes (3.08x with the weights in the bytecode, 6.0x in one
process; bench/llm_scale.py).

Run as `python -m edgebuild_tflite.conversion lower|emit SOURCE DESTINATION`.
"""
import json
import math
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

# Exported programs at least this large convert in child processes.
CHILD_PROCESS_BYTES = 128 * 2**20
# litert-torch 0.10's name for a lightweight constant's resource blob (pinned in pyproject.toml).
_RESOURCE = re.compile(r'dense_resource<"TENSOR__ConstantFingerprint\(.*?data_ptr=(\d+), storage_offset=(\d+)\)">')
# Placeholder k is filled with -(k + 0.25): a value no real weight tensor consists of, exact in
# float32 for k < 2**21.
_MAX_PLACEHOLDERS = 2**21
_CHUNK = 16 * 2**20


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


def _lightweight_constants(module_op, tensors: dict[tuple[int, int], str]):
    """(op, parameter name) for each lightweight constant whose blob is a parameter's memory."""
    def walk(operation):
        for region in operation.regions:
            for block in region.blocks:
                for inner in block.operations:
                    inner = inner.operation
                    if inner.name == "arith.constant" and "value" in inner.attributes:
                        match = _RESOURCE.search(str(inner.attributes["value"]))
                        name = tensors.get((int(match.group(1)), int(match.group(2)))) if match else None
                        if name is not None:
                            yield inner, name
                    yield from walk(inner)

    yield from walk(module_op)


def _name_constants(constants, layer_names: dict[str, str]) -> None:
    """Give each lightweight constant the location (and so the tensor name) of its layer."""
    from litert_converter.mlir import ir

    for op, name in constants:
        if name in layer_names:
            with op.context:
                op.location = ir.Location.name(layer_names[name])


def _side_files(bytecode: Path) -> tuple[Path, Path]:
    """Where `lower` sets the weights aside, and the index `emit` puts them back by."""
    return bytecode.with_name(bytecode.name + ".weights"), bytecode.with_name(bytecode.name + ".weights.json")


def _set_aside(constants, parameters: dict, bytecode: Path) -> None:
    """Replace each lightweight float32 constant by a numbered placeholder (a splat) and write its
    bytes to the side files."""
    import torch
    from litert_converter.mlir import ir

    weights, index_file = _side_files(bytecode)
    index, numbers = [], {}  # one placeholder per parameter, however many constants read it
    with open(weights, "wb") as stream:
        for op, name in constants:
            tensor = parameters[name]
            attribute = op.attributes["value"]
            shaped = ir.ShapedType(attribute.type)
            if (tensor.dtype != torch.float32 or not tensor.is_contiguous() or not shaped.has_static_shape
                    or tensor.numel() != math.prod(shaped.shape) or str(shaped.element_type) != "f32"
                    or len(index) + 1 >= _MAX_PLACEHOLDERS):
                continue
            if name not in numbers:
                numbers[name] = len(index) + 1
                index.append({"number": numbers[name], "offset": stream.tell(), "bytes": tensor.numel() * 4})
                stream.write(memoryview(tensor.detach().numpy()).cast("B"))  # the tensor's own memory, not a copy
            with op.context, op.location:
                op.attributes["value"] = ir.DenseElementsAttr.get_splat(
                    attribute.type, ir.FloatAttr.get(ir.F32Type.get(), _placeholder_value(numbers[name])))
    index_file.write_text(json.dumps(index), encoding="utf-8")


def _placeholder_value(number: int) -> float:
    return -(number + 0.25)


def _placeholder_number(values) -> int | None:
    """The number of the placeholder a buffer holds; None for any other buffer."""
    number = -float(values[0]) - 0.25
    if not (number.is_integer() and 1 <= number < _MAX_PLACEHOLDERS):
        return None
    return int(number) if (values == values[0]).all() else None


def _put_back(flatbuffer: Path, bytecode: Path) -> None:
    """Overwrite each placeholder's buffer in `flatbuffer` with the weight `_set_aside` wrote."""
    import numpy as np
    from litert_converter import schema_py_generated as schema

    weights, index_file = _side_files(bytecode)
    index = {entry["number"]: entry for entry in json.loads(index_file.read_text(encoding="utf-8"))}
    if not index:
        return
    smallest = min(entry["bytes"] for entry in index.values())
    found = {}
    with open(flatbuffer, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as view:
        model = schema.Model.GetRootAs(view, 0)
        for position in range(model.BuffersLength()):
            buffer = model.Buffers(position)
            if buffer.Offset() > 1:  # past 2 GB the data follow the flatbuffer, at offset/size
                start, size = buffer.Offset(), buffer.Size()
            else:
                start, size = buffer._tab.Vector(buffer._tab.Offset(4)), buffer.DataLength()
            if size < smallest or size % 4:
                continue
            number = _placeholder_number(np.frombuffer(view, dtype="<f4", count=size // 4, offset=start))
            entry = index.get(number)
            if entry is not None and entry["bytes"] == size:
                found.setdefault(number, []).append(start)
    missing = sorted(set(index) - set(found))
    if missing:
        raise ConversionFailed(f"{len(missing)} weight placeholders are missing from the flatbuffer (first: {missing[0]})")
    with open(weights, "rb") as source, open(flatbuffer, "r+b") as target:
        for number, starts in sorted(found.items()):
            entry = index[number]
            for start in starts:
                source.seek(entry["offset"])
                target.seek(start)
                for done in range(0, entry["bytes"], _CHUNK):
                    target.write(source.read(min(_CHUNK, entry["bytes"] - done)))


def lower(exported_program: Path, bytecode: Path, *, set_aside: bool = True) -> None:
    import torch
    import litert_torch

    program = torch.export.load(str(exported_program))
    args, _ = program.example_inputs
    layer_names = _layer_names(program)
    module = program.module()
    del program  # the module holds the weights; nothing else needs the archive's objects
    # Lightweight constants are named after the storage address and offset of their tensor.
    parameters = dict([*module.named_parameters(), *module.named_buffers()])
    tensors = {(tensor.untyped_storage().data_ptr(), tensor.storage_offset()): name
               for name, tensor in parameters.items()}
    try:
        converted = litert_torch.convert(module, tuple(args), lightweight_conversion=True)
    except Exception as exc:
        raise ConversionFailed(str(exc)) from exc
    module_op = converted._exporter._module_op  # litert-torch 0.10: the lowered module, not yet written
    constants = list(_lightweight_constants(module_op, tensors))
    _name_constants(constants, layer_names)
    _set_aside(constants if set_aside else [], parameters, bytecode)
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
    del module
    _put_back(out, bytecode)


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
        for leftover in (bytecode, *_side_files(bytecode)):
            leftover.unlink(missing_ok=True)


if __name__ == "__main__":
    step, source, destination = sys.argv[1:4]
    try:
        (lower if step == "lower" else emit)(Path(source), Path(destination))
    except ConversionFailed as exc:
        # One line the parent can read back; the traceback is of no use to anyone here.
        print(f"{ConversionFailed.__name__}: {str(exc).strip()}".replace("\n", " | ")[:4000], file=sys.stderr)
        sys.exit(1)
