"""Nothing in a .tflite candidate is stored twice: flatbuffer.pack writes each distinct vector,
string and table once (issue #17). Readers see the same model; only offsets move."""
import copy

import flatbuffers
import numpy as np
import pytest


def _read(data: bytes):
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(data))


def _per_channel_candidate(built_example):
    """A candidate of the example whose weights carry per-channel scales (and zero points)."""
    for bundle in sorted((built_example / ".edgebuild" / "tflite" / "candidates").glob("*.tflite")):
        model = _read(bundle.read_bytes())
        if any(t.quantization is not None and t.quantization.scale is not None and len(t.quantization.scale) > 1
               for t in model.subgraphs[0].tensors):
            return bundle
    pytest.fail("the example built no per-channel quantized candidate")


def _zero_point_positions(data: bytes) -> dict[int, set[int]]:
    """Channel count -> where the per-channel zero-point vectors of that length start in the file."""
    from ai_edge_litert import schema_py_generated as schema

    model, found = schema.Model.GetRootAs(data, 0), {}
    subgraph = model.Subgraphs(0)
    for index in range(subgraph.TensorsLength()):
        quantization = subgraph.Tensors(index).Quantization()
        if quantization is None or quantization.ZeroPointLength() < 2:
            continue
        position = quantization._tab.Vector(quantization._tab.Offset(10))  # zero_point: field 3
        found.setdefault(quantization.ZeroPointLength(), set()).add(position)
    return found


def test_pack_writes_each_zero_point_vector_once_and_the_model_reads_and_runs_the_same(built_example, tmp_path):
    from ai_edge_litert.tools import flatbuffer_utils
    from edgebuild_tflite.backend import TFLiteBackend
    from edgebuild_tflite.flatbuffer import buffer_data_positions, pack
    from test_tensor_names import _tensors

    model = _read(_per_channel_candidate(built_example).read_bytes())
    # The example's layers differ in width; a second tensor quantized like one of them (as a
    # MobileNet's blocks repeat widths) gives two zero-point vectors of one length.
    tensors = model.subgraphs[0].tensors
    quantized = next(t for t in tensors if t.quantization is not None and t.quantization.scale is not None
                     and len(t.quantization.scale) > 1)
    twin = copy.deepcopy(quantized)
    twin.quantization.scale = twin.quantization.scale * 2
    tensors.append(twin)
    plain = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    shared = pack(model)
    # The object API writes one zero-point vector per quantized tensor; pack one per channel count.
    assert any(len(positions) > 1 for positions in _zero_point_positions(plain).values())
    assert all(len(positions) == 1 for positions in _zero_point_positions(shared).values())
    assert len(shared) < len(plain)
    # Every tensor, op and buffer reads back the same, and repacks to the object API's bytes.
    again = _read(shared)
    assert _tensors(again) == _tensors(model)
    assert [(op.opcodeIndex, list(op.inputs), list(op.outputs)) for op in again.subgraphs[0].operators] == \
           [(op.opcodeIndex, list(op.inputs), list(op.outputs)) for op in model.subgraphs[0].operators]
    assert bytes(flatbuffer_utils.convert_object_to_bytearray(again)) == plain
    # Weights start 16-byte aligned, as the schema forces and the converter writes them.
    assert all(position % 16 == 0 for position in buffer_data_positions(shared) if position is not None)
    # The same answers to the last bit.
    (tmp_path / "plain.tflite").write_bytes(plain)
    (tmp_path / "shared.tflite").write_bytes(shared)
    with np.load(built_example / "examples" / "digits" / "eval.npz") as data:
        samples = (data["x"][:64],)
    backend = TFLiteBackend()
    expected = backend.predict(tmp_path / "plain.tflite", samples).outputs
    got = backend.predict(tmp_path / "shared.tflite", samples).outputs
    assert expected.keys() == got.keys()
    assert all(np.array_equal(expected[name], got[name]) for name in expected)
    # Same model, same bytes.
    assert pack(_read(shared)) == shared


def test_equal_weights_are_stored_once_and_counted_once(built_example, tmp_path):
    """Two buffers holding the same bytes share them: the byte breakdown and the copy finder see one."""
    from edgebuild_tflite.backend import stored_values, weight_tensors
    from edgebuild_tflite.flatbuffer import buffer_data_positions, pack

    model = _read((built_example / ".edgebuild" / "tflite" / "candidates" / "fp32.tflite").read_bytes())
    subgraph = model.subgraphs[0]
    weight = max((t for t in subgraph.tensors if model.buffers[t.buffer].data is not None),
                 key=lambda t: len(model.buffers[t.buffer].data))
    before = pack(model)
    (tmp_path / "before.tflite").write_bytes(before)
    # A second tensor with a buffer of its own holding the same bytes (as a converter writes a copy).
    from ai_edge_litert.tools import flatbuffer_utils

    copy = flatbuffer_utils.schema_fb.BufferT()
    copy.data = np.array(model.buffers[weight.buffer].data, dtype=np.uint8)
    model.buffers.append(copy)
    twin = flatbuffer_utils.schema_fb.TensorT()
    twin.shape, twin.type, twin.buffer, twin.name = np.array(weight.shape), weight.type, len(model.buffers) - 1, b"twin"
    subgraph.tensors.append(twin)
    after = pack(model)
    (tmp_path / "after.tflite").write_bytes(after)

    positions = buffer_data_positions(after)
    assert positions[weight.buffer] == positions[-1] is not None
    assert len(after) - len(before) < 128  # a tensor and a buffer table, not the weight's bytes again
    assert sum(row["bytes"] for row in weight_tensors(tmp_path / "after.tflite")) == \
           sum(row["bytes"] for row in weight_tensors(tmp_path / "before.tflite"))
    assert len(list(stored_values(tmp_path / "after.tflite"))) == len(list(stored_values(tmp_path / "before.tflite")))


def _table(builder, prepend):
    builder.StartObject(1)
    prepend(builder)
    return builder.EndObject()


def test_tables_are_shared_only_when_their_bytes_would_be_equal():
    from edgebuild_tflite.flatbuffer import SharingBuilder

    builder = SharingBuilder()
    one_int = _table(builder, lambda b: b.PrependInt32Slot(0, 1, 0))
    assert _table(builder, lambda b: b.PrependInt32Slot(0, 1, 0)) == one_int
    # 1 == 1.0 and 0.5 == 0.5 in Python; as written they are other bytes or other widths.
    one_float = _table(builder, lambda b: b.PrependFloat32Slot(0, 1.0, 0.0))
    assert one_float != one_int
    assert _table(builder, lambda b: b.PrependFloat64Slot(0, 0.5, 0.0)) != \
           _table(builder, lambda b: b.PrependFloat32Slot(0, 0.5, 0.0))
    # A scalar vector is shared; a vector of offsets is written where it is used.
    def ints():
        builder.StartVector(4, 3, 4)
        for value in (3, 2, 1):
            builder.PrependInt32(value)
        return builder.EndVector()

    assert ints() == ints()

    def offsets():
        builder.StartVector(4, 1, 4)
        builder.PrependUOffsetTRelative(one_int)
        return builder.EndVector()

    first, second = offsets(), offsets()
    assert first != second
    # What was written reads back: a table pointing at both vectors of offsets.
    builder.StartObject(2)
    builder.PrependUOffsetTRelativeSlot(0, first, 0)
    builder.PrependUOffsetTRelativeSlot(1, second, 0)
    builder.Finish(builder.EndObject())
    data = builder.Output()
    root = flatbuffers.table.Table(data, flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0))
    for field in (4, 6):
        vector = root.Vector(root.Offset(field))
        table = root.Indirect(vector)
        assert flatbuffers.encode.Get(flatbuffers.packer.int32, data, table + flatbuffers.table.Table(data, table).Offset(4)) == 1
