"""An unrolled GRU or LSTM ships in fewer ops (issue #17): slices of one tensor become one SPLIT,
single steps reshaped become one UNPACK. The answers do not change by a bit, at fp32 and at every
quantization a candidate gets, activations quantized included."""
import collections
from pathlib import Path

import numpy as np
import pytest

RECURRENT = '''
import torch
from torch import nn


class Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = (nn.GRU if kind == "gru" else nn.LSTM)(32, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def build(kind):
    torch.manual_seed(0)
    return Recurrent(kind).eval(), (torch.randn(1, 6, 32),)
'''
STEPS = 6
FEATURES = 32  # blockwise int4 needs rows of 32


def _ops(bundle: Path) -> collections.Counter:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(bundle.read_bytes()))
    codes = model.operatorCodes
    return collections.Counter(names[max(codes[op.opcodeIndex].builtinCode, codes[op.opcodeIndex].deprecatedBuiltinCode)]
                               for op in model.subgraphs[0].operators)


def _unused_tensors(bundle: Path) -> list[int]:
    from ai_edge_litert.tools import flatbuffer_utils

    subgraph = flatbuffer_utils.read_model_from_bytearray(bytearray(bundle.read_bytes())).subgraphs[0]
    used = {int(i) for op in subgraph.operators for i in [*op.inputs, *op.outputs]} | set(subgraph.outputs)
    return [index for index in range(len(subgraph.tensors)) if index not in used]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """kind -> (work folder, fp32 bundle as litert-torch wrote it, the exported program)."""
    import torch

    from edgebuild_tflite.backend import TFLiteBackend

    namespace = {}
    exec(compile(RECURRENT, "recurrent.py", "exec"), namespace)
    found = {}
    for kind in ("gru", "lstm"):
        folder = tmp_path_factory.mktemp(kind)
        module, example = namespace["build"](kind)
        torch.export.save(torch.export.export(module, example), str(folder / "model.pt2"))
        TFLiteBackend().convert(folder / "model.pt2", folder / "fp32.tflite", {})
        found[kind] = (folder, folder / "fp32.tflite", folder / "model.pt2")
    return found


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_an_unrolled_recurrent_net_ships_its_slices_as_one_split_per_cut_with_the_same_answers(converted, kind):
    from edgebuild_tflite.backend import TFLiteBackend
    from edgebuild_tflite.compaction import compact_file

    folder, fp32, _ = converted[kind]
    compacted = folder / "compacted.tflite"
    compacted.write_bytes(fp32.read_bytes())
    compact_file(compacted, roll_loops=False)  # the loop over the steps: tests/test_loops.py
    before, after = _ops(fp32), _ops(compacted)
    gates = 3 if kind == "gru" else 4
    # What stays a SLICE is y[:, -1], the last step of the output sequence.
    assert before["SLICE"] >= STEPS * gates and after["SLICE"] == 1, (before, after)
    # One SPLIT per projection a step cuts into gates; the input projection unpacked in one op.
    assert after["SPLIT"] >= STEPS - 1
    assert sum(after.values()) <= sum(before.values()) - STEPS * (gates - 1), (before, after)
    if kind == "gru":  # each step's slice of the input projection was reshaped: one UNPACK does both
        assert after["UNPACK"] == 1 and after["RESHAPE"] < before["RESHAPE"] - STEPS + 1
    assert not _unused_tensors(compacted)
    assert compacted.stat().st_size < fp32.stat().st_size
    # The same answers to the last bit, on inputs of several scales.
    rng = np.random.default_rng(0)
    samples = (np.concatenate([rng.normal(scale=s, size=(8, STEPS, FEATURES)) for s in (0.1, 1, 10)]).astype(np.float32),)
    backend = TFLiteBackend()
    expected, got = backend.predict(fp32, samples).outputs, backend.predict(compacted, samples).outputs
    assert all(np.array_equal(expected[name], got[name]) for name in expected)


@pytest.mark.slow
@pytest.mark.parametrize("technique", ["int8-weight-only", "int8-dynamic", "int8-static", "int4-weight-only", "int4-blockwise32"])
def test_quantized_candidates_are_fused_too_and_answer_as_the_unfused_quantized_model(converted, technique, tmp_path):
    """Compaction runs on every candidate after quantization: with int8 activations the SPLIT is the
    int8 kernel (the pieces keep the source's scale), and the answers equal the unfused model's."""
    from edgebuild.api import CompressInput
    from edgebuild.plugins import default_registry
    from edgebuild_tflite import backend as tflite
    from edgebuild_tflite.backend import TFLiteBackend

    folder, fp32, program = converted["gru"]
    backend = TFLiteBackend()
    [chosen] = [t for t in default_registry().techniques_for("tflite") if t.name == technique]
    rng = np.random.default_rng(1)
    calibration = [(rng.normal(size=(1, STEPS, FEATURES)).astype(np.float32),) for _ in range(16)]
    # Steps kept unrolled: the loop over them is tests/test_loops.py's.
    source = CompressInput(fp32_bundle=fp32, exported_program=program, calibration=calibration,
                           work_dir=tmp_path, options={"loops": "unrolled"})
    fused, unfused = tmp_path / "fused.tflite", tmp_path / "unfused.tflite"
    backend.compress(chosen, source, fused)
    original = tflite.compact_file
    tflite.compact_file = lambda bundle, roll_loops=True: None  # the candidate as the quantizer wrote it
    try:
        backend.compress(chosen, source, unfused)
    finally:
        tflite.compact_file = original
    assert _ops(fused)["SLICE"] == 1 < _ops(unfused)["SLICE"]
    assert fused.stat().st_size < unfused.stat().st_size
    samples = (rng.normal(size=(24, STEPS, FEATURES)).astype(np.float32),)
    expected, got = backend.predict(unfused, samples).outputs, backend.predict(fused, samples).outputs
    assert all(np.array_equal(expected[name], got[name]) for name in expected)


def test_slices_that_do_not_tile_the_tensor_stay_slices():
    """Overlapping, partial or unequal pieces are not a SPLIT: nothing changes."""
    from ai_edge_litert import schema_py_generated as schema

    from edgebuild_tflite.fusion import fuse

    def model_with(pieces):
        model = schema.ModelT()
        model.buffers = [schema.BufferT()]
        code = schema.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.SLICE
        code.version = 1
        model.operatorCodes = [code]
        subgraph = schema.SubGraphT()
        source = schema.TensorT()
        source.shape, source.type, source.buffer = np.array([1, 12], np.int32), schema.TensorType.FLOAT32, 0
        subgraph.tensors, subgraph.operators, subgraph.inputs, subgraph.outputs = [source], [], [0], []

        def constant(values):
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(np.array(values, np.int32).tobytes(), np.uint8)
            model.buffers.append(buffer)
            tensor = schema.TensorT()
            tensor.shape, tensor.type, tensor.buffer = np.array([2], np.int32), schema.TensorType.INT32, len(model.buffers) - 1
            subgraph.tensors.append(tensor)
            return len(subgraph.tensors) - 1

        for begin, size in pieces:
            out = schema.TensorT()
            out.shape, out.type, out.buffer = np.array([1, size], np.int32), schema.TensorType.FLOAT32, 0
            subgraph.tensors.append(out)
            output = len(subgraph.tensors) - 1
            op = schema.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = 0, [0, constant([0, begin]), constant([1, size])], [output]
            subgraph.operators.append(op)
            subgraph.outputs.append(output)
        model.subgraphs = [subgraph]
        return model

    for pieces in ([(0, 4), (2, 4), (8, 4)], [(0, 4), (4, 8)], [(0, 6), (0, 6)], [(0, 5), (5, 5)], [(4, 4)]):
        model = model_with(pieces)
        assert fuse(model) == 0 and len(model.subgraphs[0].operators) == len(pieces), pieces
    model = model_with([(8, 4), (0, 4), (4, 4)])
    assert fuse(model) == 2
    [split] = model.subgraphs[0].operators
    assert split.builtinOptions.numSplits == 3
    # The pieces in order along the axis, whatever order the slices came in.
    outputs = [int(o) for o in model.subgraphs[0].outputs]
    assert [int(o) for o in split.outputs] == outputs[1:] + outputs[:1]
    # A piece nobody sliced gets a tensor of its own, shaped like the others.
    model = model_with([(0, 4), (8, 4)])
    assert fuse(model) == 1
    [split] = model.subgraphs[0].operators
    subgraph = model.subgraphs[0]
    assert [int(o) for o in split.outputs][::2] == [int(o) for o in subgraph.outputs]
    assert list(subgraph.tensors[int(split.outputs[1])].shape) == [1, 4]
