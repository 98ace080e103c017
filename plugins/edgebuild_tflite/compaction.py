"""What the converter writes and no runtime reads, out of the shipped bytes.

litert-torch names every tensor after the module stack of the op that made it
('zoo.MobileNetV2ish/torch.nn.modules.container.Sequential_blocks/zoo.InvRes_3/...;17', up to
~600 bytes). Nothing on a device reads them: interpreters and the TFLite support library address
tensors by index and by signature name. In a small model they are real weight: 46 KB of a
MobileNetV2-style net's 645 KB int8 bundle, 18 KB of an unrolled LSTM's 154 KB.

`compact` drops every name but those of the signature's inputs and outputs (which
`Interpreter.get_input_details` shows) and keeps the rest as one zlib-compressed JSON table in the
model's metadata (`edgebuild.tensor_names`; ~1 KB for either model above), so reports still say
which layer a weight belongs to. `restore_names` puts the names back on a model read with the
flatbuffer object API, for everything in edgebuild that reads names.

It also drops empty quantization tables, which litert-torch writes for every float tensor: the
runtime reads an absent table as "not quantized", exactly as an empty one (2.8 KB of the LSTM's),
and writes the model through `flatbuffer.pack`, which stores each distinct vector and table once
(all-zero zero points, shapes, op options: 27 KB of the MobileNetV2-style int8 bundle, 16 KB of
the LSTM's).

Before that, two graph passes: `fusion.fuse` writes runs of slices as one SPLIT or UNPACK (117
fewer ops in a 20-step GRU; exact), and `loops.roll` writes a recurrent net's identical steps as one
WHILE loop (kept only when it answers as the unrolled model; `roll_loops=False` skips it). Names
and tables change nothing else: same tensors, shapes, buffers and quantization parameters
(tests/test_tensor_names.py runs both and compares every tensor).
"""
import functools
import json
import zlib
from pathlib import Path

from . import loops
from .flatbuffer import pack
from .fusion import fuse
from .metadata import append_metadata, packed_files, with_files

NAMES_FIELD = "edgebuild.tensor_names"
# Files this large keep their buffers outside the flatbuffer (offset/size); rebuilding such a file
# through the object API is not done here: their names are a negligible share of their bytes.
_INLINE_LIMIT = 2**31 - 2**24


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def compact(model_buffer: bytes, roll_loops: bool = True) -> bytes | None:
    """The flatbuffer part of a .tflite with its slices fused, its unrolled steps rolled into
    loops (unless `roll_loops` is false) and its tensor names moved to the table; None when there
    is nothing to gain (already compact, or buffers kept outside the flatbuffer)."""
    from ai_edge_litert.tools import flatbuffer_utils

    if len(model_buffer) >= _INLINE_LIMIT:
        return None
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_buffer))
    if any(is_names_table(entry) for entry in model.metadata or []):
        return None
    if any((buffer.offset or 0) > 1 for buffer in model.buffers):
        return None
    # Graph passes first: the table lists the tensors that remain.
    fuse(model)
    if roll_loops and loops.has_steps(model):
        unrolled = pack(model)
        try:
            kept = not loops.roll(model) or loops.same_answers(unrolled, pack(model))
        except Exception:  # a graph the pass did not foresee: the steps ship unrolled, as converted
            kept = False
        if not kept:  # never ship a wrong loop, nor fail a candidate over one
            model = flatbuffer_utils.read_model_from_bytearray(bytearray(unrolled))
    entry_points = {0} | {signature.subgraphIndex for signature in model.signatureDefs or []}
    table = []
    for position, subgraph in enumerate(model.subgraphs):
        table.append([_text(tensor.name) for tensor in subgraph.tensors])
        # Callers see an entry point's inputs and outputs by name; a loop body's, nobody.
        kept = set(subgraph.inputs or []) | set(subgraph.outputs or []) if position in entry_points else set()
        for index, tensor in enumerate(subgraph.tensors):
            if index not in kept:
                tensor.name = None
            if _empty(tensor.quantization):
                tensor.quantization = None
    append_metadata(model, NAMES_FIELD, zlib.compress(json.dumps(table, separators=(",", ":")).encode(), 9))
    return pack(model)


def _empty(quantization) -> bool:
    return quantization is not None and quantization.details is None and all(
        getattr(quantization, field) is None or not len(getattr(quantization, field))
        for field in ("scale", "zeroPoint", "min", "max"))


def table(model) -> list[list[str]] | None:
    """The names `compact` set aside, per subgraph; None for a model that keeps its own."""
    for entry in model.metadata or []:
        if is_names_table(entry):
            return json.loads(zlib.decompress(bytes(model.buffers[entry.buffer].data)))
    return None


def restore_names(model):
    """`model` (a ModelT) with the names `compact` set aside back on its tensors; returns it."""
    names = table(model)
    for subgraph, subgraph_names in zip(model.subgraphs, names or []):
        for tensor, name in zip(subgraph.tensors, subgraph_names):
            tensor.name = name.encode()  # as the object API reads names: bytes
    return model


def is_names_table(entry) -> bool:
    return _text(entry.name) == NAMES_FIELD


def compact_file(bundle, roll_loops: bool = True) -> None:
    """`compact` a .tflite in place, keeping the files packed after the flatbuffer (labels)."""
    data = bundle.read_bytes()
    compacted = compact(data, roll_loops)
    if compacted is not None:
        bundle.write_bytes(with_files(compacted, packed_files(data)))


def rolls_steps(bundle) -> bool:
    """Whether `loops.roll` writes steps of a .tflite (the fp32 conversion) as a loop: only then
    does a candidate have another form. Read once per file (each faster form asks)."""
    stat = bundle.stat()
    return _rolls_steps(str(bundle), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _rolls_steps(bundle: str, mtime_ns: int, size: int) -> bool:
    from ai_edge_litert.tools import flatbuffer_utils

    if size >= _INLINE_LIMIT:
        return False
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(Path(bundle).read_bytes()))
    fuse(model)
    try:
        return loops.has_steps(model) and loops.roll(model) > 0
    except Exception:  # as in `compact`: a graph the pass did not foresee ships unrolled anyway
        return False
