"""Every weight at the bits its technique gives, also those the quantizer leaves in float32.

ai-edge-quantizer's weight-only and dynamic recipes quantize the weights of FULLY_CONNECTED,
CONV_2D, DEPTHWISE_CONV_2D, EMBEDDING_LOOKUP and BATCH_MATMUL. A float constant that another op
reads stays float32. A learned positional table added to the token embeddings is such a constant:
16 KB of a 530k-parameter transformer's int4 bundle, whose int4 weights are 264 KB in all.

`quantize_constants` stores each such table at the recipe's bits, the way the quantizer stores a
weight-only FULLY_CONNECTED weight:
- symmetric, one scale per row along its first dimension longer than one;
- a DEQUANTIZE op in front of its readers.
It takes only tables: at least MIN_ELEMENTS elements over two or more dimensions longer than one,
read only by elementwise ADD, SUB or MUL. Vectors stay float32: biases, LayerNorm scales, one
value a channel. The candidate is evaluated like any other, and its accuracy floor judges the
rounding.
"""
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from .graph import OP, TYPE, builtin, constant_data, consumers, drop_unused, operator

MIN_ELEMENTS = 1024
READERS = {OP.ADD, OP.SUB, OP.MUL}


def quantize_constants(model, bits: int) -> list[str]:
    """Quantize `model`'s (a ModelT) float tables to `bits` (8 or 4) in place; returns their names."""
    done = []
    for subgraph in model.subgraphs:
        readers = consumers(subgraph)
        boundary = {int(i) for i in [*subgraph.inputs, *subgraph.outputs]}
        for index in range(len(subgraph.tensors)):
            tensor = subgraph.tensors[index]
            data = constant_data(model, tensor)
            shape = [int(d) for d in tensor.shape]
            users = readers.get(index, [])
            if (tensor.type != TYPE.FLOAT32 or data is None or index in boundary or not users
                    or int(np.prod(shape)) < MIN_ELEMENTS or sum(d > 1 for d in shape) < 2
                    or any(builtin(model, subgraph.operators[p]) not in READERS for p in users)):
                continue
            values = np.frombuffer(data, dtype=np.float32).reshape(shape)
            axis = next(a for a, d in enumerate(shape) if d > 1)
            stored = _quantized_tensor(model, values, axis, bits, tensor.name)
            subgraph.tensors.append(stored)
            # The float tensor the readers read is now what DEQUANTIZE writes: no data of its own.
            tensor.buffer = 0
            subgraph.operators.insert(min(users), operator(model, OP.DEQUANTIZE, 1, [len(subgraph.tensors) - 1], [index]))
            readers = consumers(subgraph)
            done.append(tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name or index))
    if done:
        drop_unused(model)
    return done


def _quantized_tensor(model, values: np.ndarray, axis: int, bits: int, name):
    """A new constant tensor holding `values` at `bits`, symmetric per slice along `axis`."""
    limit = 2 ** (bits - 1) - 1
    moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    scales = np.abs(moved).max(axis=1) / limit
    scales[scales == 0] = 1.0  # an all-zero row: any scale stores it exactly
    shape = [1] * values.ndim
    shape[axis] = -1
    quantized = np.clip(np.round(values / scales.reshape(shape)), -limit, limit).astype(np.int8)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(_packed(quantized.ravel(), bits), dtype=np.uint8)
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape = np.array(values.shape, np.int32)
    tensor.type = TYPE.INT8 if bits == 8 else TYPE.INT4
    tensor.buffer = len(model.buffers) - 1
    tensor.name = name
    tensor.quantization = schema.QuantizationParametersT()
    tensor.quantization.scale = scales.astype(np.float32)
    tensor.quantization.zeroPoint = np.zeros(len(scales), np.int64)
    tensor.quantization.quantizedDimension = axis
    return tensor


def _packed(values: np.ndarray, bits: int) -> bytes:
    if bits == 8:
        return values.astype(np.int8).tobytes()
    # int4: two a byte, the first in the low nibble (as TFLite and ai-edge-quantizer store them).
    nibbles = (values.astype(np.int16) & 0x0F).astype(np.uint8)
    if len(nibbles) % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def quantize_constants_file(bundle, bits: int) -> list[str]:
    """`quantize_constants` on a .tflite (no metadata or packed files yet: right after export)."""
    from ai_edge_litert.tools import flatbuffer_utils

    from .flatbuffer import pack

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(bundle.read_bytes()))
    done = quantize_constants(model, bits)
    if done:
        bundle.write_bytes(pack(model))
    return done
