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
import copy

import numpy as np
from ai_edge_litert import schema_py_generated as schema

OP = schema.BuiltinOperator
_INT_TYPES = {schema.TensorType.INT32: np.int32, schema.TensorType.INT64: np.int64}
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
        _drop_unused(model)
    return removed


def _code(model, op) -> int:
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _opcode(model, builtin: int, version: int) -> int:
    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and code.version == version:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _constant(model, subgraph, index):
    tensor = subgraph.tensors[index]
    data = model.buffers[tensor.buffer].data
    if tensor.type not in _INT_TYPES or data is None or not len(data):
        return None
    return np.frombuffer(bytes(data), dtype=_INT_TYPES[tensor.type]).tolist()


def _static_shape(tensor):
    shape = [int(d) for d in tensor.shape]
    signature = tensor.shapeSignature
    if signature is not None and len(signature) and any(int(d) < 0 for d in signature):
        return None
    return shape


def _same_quantization(a, b) -> bool:
    def key(q):
        if q is None or q.scale is None or not len(q.scale):
            return None
        return ([float(v) for v in q.scale], [int(v) for v in q.zeroPoint], q.quantizedDimension)
    return key(a.quantization) == key(b.quantization)


def _consumers(subgraph) -> dict[int, list[int]]:
    found = {}
    for position, op in enumerate(subgraph.operators):
        for index in op.inputs:
            if index >= 0:
                found.setdefault(int(index), []).append(position)
    return found


def _slices_to_split(model, subgraph) -> None:
    groups = {}
    for position, op in enumerate(subgraph.operators):
        if _code(model, op) != OP.SLICE or len(op.inputs) != 3:
            continue
        source, begin, size = (int(i) for i in op.inputs)
        shape = _static_shape(subgraph.tensors[source])
        begin, size = _constant(model, subgraph, begin), _constant(model, subgraph, size)
        if shape is None or begin is None or size is None or len(begin) != len(shape) or len(size) != len(shape):
            continue
        size = [dim - b if s == -1 else s for dim, b, s in zip(shape, begin, size)]
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
                or not all(_same_quantization(tensor, subgraph.tensors[o]) for o in outputs.values())):
            continue
        split = schema.OperatorT()
        split.opcodeIndex = _opcode(model, OP.SPLIT, version)
        split.inputs = [_scalar(model, subgraph, axis), source]
        split.outputs = [outputs[b] if b in outputs else _like(subgraph, outputs[begins[0]])
                         for b in range(0, dim, width)]
        split.builtinOptionsType = schema.BuiltinOptions.SplitOptions
        split.builtinOptions = schema.SplitOptionsT()
        split.builtinOptions.numSplits = dim // width
        first = min(p for _, _, p in pieces)
        replaced[first] = split
        replaced.update({p: None for _, _, p in pieces if p != first})
    _replace(subgraph, replaced)


def _split_steps_to_unpack(model, subgraph) -> None:
    consumers, kept = _consumers(subgraph), set(int(i) for i in subgraph.outputs)
    replaced = {}
    for position, op in enumerate(subgraph.operators):
        if _code(model, op) != OP.SPLIT:
            continue
        axis = _constant(model, subgraph, int(op.inputs[0]))
        source = subgraph.tensors[int(op.inputs[1])]
        shape = _static_shape(source)
        version = _UNPACK_VERSIONS.get(source.type)
        if axis is None or len(axis) != 1 or shape is None or version is None:
            continue
        axis = axis[0] % len(shape)
        if shape[axis] != len(op.outputs):
            continue  # pieces wider than one step
        dropped = shape[:axis] + shape[axis + 1:]
        reshapes = []
        for output in (int(o) for o in op.outputs):
            users = consumers.get(output, [])
            if output in kept or len(users) != 1:
                break
            user = subgraph.operators[users[0]]
            result = subgraph.tensors[int(user.outputs[0])]
            if (_code(model, user) != OP.RESHAPE or int(user.inputs[0]) != output
                    or _static_shape(result) != dropped or not _same_quantization(source, result)):
                break
            reshapes.append(users[0])
        else:
            unpack = schema.OperatorT()
            unpack.opcodeIndex = _opcode(model, OP.UNPACK, version)
            unpack.inputs = [int(op.inputs[1])]
            unpack.outputs = [int(subgraph.operators[p].outputs[0]) for p in reshapes]
            unpack.builtinOptionsType = schema.BuiltinOptions.UnpackOptions
            unpack.builtinOptions = schema.UnpackOptionsT()
            unpack.builtinOptions.num, unpack.builtinOptions.axis = len(reshapes), axis
            replaced[position] = unpack
            replaced.update({p: None for p in reshapes})
    _replace(subgraph, replaced)


def _replace(subgraph, replaced: dict) -> None:
    if replaced:
        subgraph.operators = [replaced.get(p, op) for p, op in enumerate(subgraph.operators)
                              if replaced.get(p, op) is not None]


def _like(subgraph, index: int) -> int:
    """A new tensor of the shape, type and quantization of tensor `index`."""
    tensor = copy.deepcopy(subgraph.tensors[index])
    tensor.name = None
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def _scalar(model, subgraph, value: int) -> int:
    """An int32 scalar constant holding `value`: one already in `subgraph`, else a new one."""
    for index, tensor in enumerate(subgraph.tensors):
        if (tensor.type == schema.TensorType.INT32 and tensor.shape is not None and not len(tensor.shape)
                and _constant(model, subgraph, index) == [value]):
            return index
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(np.int32(value).tobytes(), dtype=np.uint8)
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape, tensor.type, tensor.buffer = np.array([], dtype=np.int32), schema.TensorType.INT32, len(model.buffers) - 1
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def _drop_unused(model) -> None:
    """Remove tensors no op, input, output or signature uses, then buffers no tensor or metadata uses."""
    for index, subgraph in enumerate(model.subgraphs):
        used = {int(i) for op in subgraph.operators for i in [*op.inputs, *op.outputs, *(op.intermediates if op.intermediates is not None else [])] if i >= 0}
        used |= {int(i) for i in [*subgraph.inputs, *subgraph.outputs]}
        for tensor in subgraph.tensors:
            details = getattr(tensor.quantization, "details", None)
            for field in ("scales", "zeroPoints"):
                if isinstance(getattr(details, field, None), int) and getattr(details, field) >= 0:
                    used.add(getattr(details, field))
        used |= {i for i, t in enumerate(subgraph.tensors) if t.isVariable}
        for signature in model.signatureDefs or []:
            if signature.subgraphIndex == index:
                used |= {int(t.tensorIndex) for t in [*signature.inputs, *signature.outputs]}
        order = sorted(used)
        new = {old: position for position, old in enumerate(order)}
        subgraph.tensors = [subgraph.tensors[i] for i in order]
        for op in subgraph.operators:
            op.inputs = [new[int(i)] if i >= 0 else -1 for i in op.inputs]
            op.outputs = [new[int(i)] for i in op.outputs]
            if op.intermediates is not None:
                op.intermediates = [new[int(i)] for i in op.intermediates]
        subgraph.inputs = [new[int(i)] for i in subgraph.inputs]
        subgraph.outputs = [new[int(i)] for i in subgraph.outputs]
        for tensor in subgraph.tensors:
            details = getattr(tensor.quantization, "details", None)
            for field in ("scales", "zeroPoints"):
                if isinstance(getattr(details, field, None), int) and getattr(details, field) >= 0:
                    setattr(details, field, new[getattr(details, field)])
        for signature in model.signatureDefs or []:
            if signature.subgraphIndex == index:
                for t in [*signature.inputs, *signature.outputs]:
                    t.tensorIndex = new[int(t.tensorIndex)]
    used = {0} | {int(t.buffer) for s in model.subgraphs for t in s.tensors}
    used |= {int(m.buffer) for m in model.metadata or []}
    used |= {int(b) for b in (model.metadataBuffer if model.metadataBuffer is not None else [])}
    order = sorted(used)
    new = {old: position for position, old in enumerate(order)}
    model.buffers = [model.buffers[i] for i in order]
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            tensor.buffer = new[int(tensor.buffer)]
    for entry in model.metadata or []:
        entry.buffer = new[int(entry.buffer)]
    if model.metadataBuffer is not None:
        model.metadataBuffer = [new[int(b)] for b in model.metadataBuffer]
