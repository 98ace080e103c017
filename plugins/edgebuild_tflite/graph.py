"""Reading and editing a TFLite graph (the flatbuffer object API's ModelT): what the passes that
rewrite a converted model (fusion, loops) share."""
import copy

import numpy as np
from ai_edge_litert import schema_py_generated as schema

OP = schema.BuiltinOperator
TYPE = schema.TensorType
_INT_TYPES = {TYPE.INT32: np.int32, TYPE.INT64: np.int64}


def builtin(model, op) -> int:
    """The op's BuiltinOperator code (codes over 127 live in the newer field)."""
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def opcode(model, operator: int, version: int | None) -> int:
    """The index of the model's operator code for (operator, version), added when missing; version
    None takes any version the model has (else adds version 1)."""
    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == operator and version in (None, code.version):
            return index
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = operator, min(operator, 127), version or 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def constant_data(model, tensor) -> bytes | None:
    """The bytes a constant tensor holds; None for a tensor without data (an activation)."""
    data = model.buffers[tensor.buffer].data
    return bytes(data) if data is not None and len(data) else None


def int_constant(model, subgraph, index) -> list[int] | None:
    """The values of an int32/int64 constant tensor; None when it is not one."""
    tensor = subgraph.tensors[index]
    data = constant_data(model, tensor)
    if tensor.type not in _INT_TYPES or data is None:
        return None
    return np.frombuffer(data, dtype=_INT_TYPES[tensor.type]).tolist()


def slice_window(model, subgraph, op) -> tuple[int, list[int], list[int]] | None:
    """(source tensor, begin, size) of a SLICE with constant begin and size (a size of -1 made
    explicit); None when they are not constants of the source's rank."""
    source = int(op.inputs[0])
    shape = static_shape(subgraph.tensors[source])
    begin, size = int_constant(model, subgraph, int(op.inputs[1])), int_constant(model, subgraph, int(op.inputs[2]))
    if shape is None or begin is None or size is None or len(begin) != len(shape) or len(size) != len(shape):
        return None
    return source, begin, [dim - b if s == -1 else s for dim, b, s in zip(shape, begin, size)]


def static_shape(tensor) -> list[int] | None:
    """The tensor's shape; None when a dimension is dynamic."""
    shape = [int(d) for d in tensor.shape]
    signature = tensor.shapeSignature
    if signature is not None and len(signature) and any(int(d) < 0 for d in signature):
        return None
    return shape


def quantization_key(tensor) -> tuple | None:
    """A tensor's quantization parameters, comparable; None when it has none."""
    q = tensor.quantization
    if q is None or q.scale is None or not len(q.scale):
        return None
    return tuple(float(v) for v in q.scale), tuple(int(v) for v in q.zeroPoint), q.quantizedDimension


def same_quantization(a, b) -> bool:
    """Whether two tensors carry the same quantization parameters (or both none)."""
    return quantization_key(a) == quantization_key(b)


def detail_tensors(tensor) -> dict[str, int]:
    """The tensors a tensor's quantization details point at, by field (blockwise scales)."""
    details = getattr(tensor.quantization, "details", None)
    return {field: getattr(details, field) for field in ("scales", "zeroPoints")
            if isinstance(getattr(details, field, None), int) and getattr(details, field) >= 0}


def consumers(subgraph) -> dict[int, list[int]]:
    """Tensor index -> positions of the ops that read it."""
    found = {}
    for position, op in enumerate(subgraph.operators):
        for index in op.inputs:
            if index >= 0:
                found.setdefault(int(index), []).append(position)
    return found


def copy_tensor(source, graph, index: int, **fields) -> int:
    """A copy of `source`'s tensor `index` (shape, type, quantization, buffer) appended to `graph`,
    with `fields` (name, buffer) set on it; returns its index there."""
    tensor = copy.deepcopy(source.tensors[index])
    for name, value in fields.items():
        setattr(tensor, name, value)
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def operator(model, code: int, version: int | None, inputs, outputs, options_type=0, options=None, **fields):
    """A new op (not yet in any subgraph) with its builtin options, `fields` set on them."""
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = opcode(model, code, version), list(inputs), list(outputs)
    for name, value in fields.items():
        setattr(options, name, value)
    op.builtinOptionsType, op.builtinOptions = options_type, options
    return op


def int32_scalar(model, subgraph, value: int) -> int:
    """An int32 scalar constant holding `value`: one already in `subgraph`, else a new one."""
    for index, tensor in enumerate(subgraph.tensors):
        if (tensor.type == TYPE.INT32 and tensor.shape is not None and not len(tensor.shape)
                and int_constant(model, subgraph, index) == [value]):
            return index
    return int32_constant(model, subgraph, np.int32(value))


def int32_constant(model, subgraph, values) -> int:
    """A new int32 constant tensor holding `values` (any shape), with a buffer of its own."""
    return _constant(model, subgraph, np.asarray(values, np.int32), TYPE.INT32)


def float32_constant(model, subgraph, values) -> int:
    """A new float32 constant tensor holding `values` (any shape), with a buffer of its own."""
    return _constant(model, subgraph, np.asarray(values, np.float32), TYPE.FLOAT32)


def _constant(model, subgraph, values: np.ndarray, tensor_type: int) -> int:
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(values.tobytes(), dtype=np.uint8)
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape, tensor.type, tensor.buffer = np.array(values.shape, np.int32), tensor_type, len(model.buffers) - 1
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def drop_unused(model) -> None:
    """Remove tensors no op, input, output or signature uses, then buffers no tensor or metadata uses."""
    for index, subgraph in enumerate(model.subgraphs):
        used = {int(i) for op in subgraph.operators
                for i in [*op.inputs, *op.outputs, *(op.intermediates if op.intermediates is not None else [])] if i >= 0}
        used |= {int(i) for i in [*subgraph.inputs, *subgraph.outputs]}
        used |= {i for tensor in subgraph.tensors for i in detail_tensors(tensor).values()}
        used |= {i for i, t in enumerate(subgraph.tensors) if t.isVariable}
        signatures = [signature for signature in model.signatureDefs or [] if signature.subgraphIndex == index]
        used |= {int(t.tensorIndex) for signature in signatures for t in [*signature.inputs, *signature.outputs]}
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
            for field, old in detail_tensors(tensor).items():
                setattr(tensor.quantization.details, field, new[old])
        for t in (t for signature in signatures for t in [*signature.inputs, *signature.outputs]):
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
