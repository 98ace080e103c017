"""The same computation in fewer ops: what litert-torch writes one piece at a time, in one op.

An unrolled recurrent net (an LSTM or GRU over T steps) reaches the converter as T slices of the
input projection, each reshaped, and per step one slice per gate. Every op costs ~45 bytes of
tables and a dispatch at run time: 117 of the 385 ops of a 20-step GRU are such slices.
- SLICEs that cut one tensor along one axis into equal pieces covering it become one SPLIT;
- a SPLIT into single steps whose pieces are each only reshaped to drop that axis becomes one
  UNPACK (the reshapes go).
Both are exact (they move the same elements), keep every tensor the rest of the graph reads, and
apply only where the pieces carry the source's quantization (SPLIT and UNPACK do not requantize).
Tensors and buffers nothing uses any more are removed, and indices renumbered.
"""
from ai_edge_litert import schema_py_generated as schema

from .graph import (OP, builtin, consumers, copy_tensor, drop_unused, int32_scalar, int_constant, operator,
                    same_quantization, slice_window, static_shape)

# The op version the runtime registers for each element type (tensorflow/lite/tools/versioning).
_SPLIT_VERSIONS = {schema.TensorType.FLOAT32: 1, schema.TensorType.INT8: 2, schema.TensorType.INT16: 3}
_UNPACK_VERSIONS = {schema.TensorType.FLOAT32: 1, schema.TensorType.INT8: 2, schema.TensorType.INT16: 4}


def fuse(model) -> int:
    """Rewrite `model` (a ModelT) in place; returns how many ops fewer it has."""
    before = sum(len(s.operators or []) for s in model.subgraphs)
    for subgraph in model.subgraphs:
        _slices_to_split(model, subgraph)
        _split_steps_to_unpack(model, subgraph)
    removed = before - sum(len(s.operators or []) for s in model.subgraphs)
    if removed:
        drop_unused(model)
    return removed


def _slices_to_split(model, subgraph) -> None:
    groups = {}
    for position, op in enumerate(subgraph.operators):
        window = slice_window(model, subgraph, op) if builtin(model, op) == OP.SLICE and len(op.inputs) == 3 else None
        if window is None:
            continue
        source, begin, size = window
        shape = static_shape(subgraph.tensors[source])
        cut = [axis for axis, (dim, b, s) in enumerate(zip(shape, begin, size)) if (b, s) != (0, dim)]
        if len(cut) == 1:
            axis = cut[0]
            groups.setdefault((source, axis), []).append((begin[axis], size[axis], position))
    replaced = {}
    for (source, axis), pieces in groups.items():
        pieces.sort()
        tensor = subgraph.tensors[source]
        dim, width = tensor.shape[axis], pieces[0][1]
        version = _SPLIT_VERSIONS.get(tensor.type)
        begins = [b for b, _, _ in pieces]
        outputs = {b: int(subgraph.operators[p].outputs[0]) for b, _, p in pieces}
        # Equal pieces on the grid of their width, each cut once. A piece nobody slices (an
        # LSTM's forget gate at the first step, where the cell state is zero) gets a tensor of
        # its own that nothing reads.
        if (len(pieces) < 2 or version is None or dim % width or len(set(begins)) != len(begins)
                or any(b % width or s != width for b, s, _ in pieces)
                or not all(same_quantization(tensor, subgraph.tensors[o]) for o in outputs.values())):
            continue
        pieces_out = [outputs[b] if b in outputs else copy_tensor(subgraph, subgraph, outputs[begins[0]], name=None)
                      for b in range(0, dim, width)]
        split = operator(model, OP.SPLIT, version, [int32_scalar(model, subgraph, axis), source], pieces_out,
                         schema.BuiltinOptions.SplitOptions, schema.SplitOptionsT(), numSplits=dim // width)
        first = min(p for _, _, p in pieces)
        replaced[first] = split
        replaced.update({p: None for _, _, p in pieces if p != first})
    _replace(subgraph, replaced)


def _split_steps_to_unpack(model, subgraph) -> None:
    readers, kept = consumers(subgraph), set(int(i) for i in subgraph.outputs)
    replaced = {}
    for position, op in enumerate(subgraph.operators):
        if builtin(model, op) != OP.SPLIT:
            continue
        axis = int_constant(model, subgraph, int(op.inputs[0]))
        source = subgraph.tensors[int(op.inputs[1])]
        shape = static_shape(source)
        version = _UNPACK_VERSIONS.get(source.type)
        if axis is None or len(axis) != 1 or shape is None or version is None:
            continue
        axis = axis[0] % len(shape)
        if shape[axis] != len(op.outputs):
            continue  # pieces wider than one step
        dropped = shape[:axis] + shape[axis + 1:]
        reshapes = []
        for output in (int(o) for o in op.outputs):
            users = readers.get(output, [])
            if output in kept or len(users) != 1:
                break
            user = subgraph.operators[users[0]]
            result = subgraph.tensors[int(user.outputs[0])]
            if (builtin(model, user) != OP.RESHAPE or int(user.inputs[0]) != output
                    or static_shape(result) != dropped or not same_quantization(source, result)):
                break
            reshapes.append(users[0])
        else:
            unpack = operator(model, OP.UNPACK, version, [int(op.inputs[1])],
                              [int(subgraph.operators[p].outputs[0]) for p in reshapes],
                              schema.BuiltinOptions.UnpackOptions, schema.UnpackOptionsT(), num=len(reshapes), axis=axis)
            replaced[position] = unpack
            replaced.update({p: None for p in reshapes})
    _replace(subgraph, replaced)


def _replace(subgraph, replaced: dict) -> None:
    if replaced:
        subgraph.operators = [replaced.get(p, op) for p, op in enumerate(subgraph.operators)
                              if replaced.get(p, op) is not None]


