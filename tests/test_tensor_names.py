"""Tensor names are not shipped: a .tflite candidate keeps them as one compressed table (issue #17).

litert-torch names each tensor after its module stack, hundreds of bytes each; the candidates
edgebuild builds drop every name but the signature's inputs' and outputs' and keep the rest in a
zlib-compressed metadata entry, which reports read them back from.
"""
import shutil

import numpy as np

from conftest import read_report


def _model(bundle):
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(bundle.read_bytes()))


def _tensors(model):
    """Every tensor's name, shape, type, buffer and quantization (an empty table reads as none)."""
    def quantization(q):
        if q is None:
            return [], [], 0, None
        return ([float(v) for v in (q.scale if q.scale is not None else [])],
                [int(v) for v in (q.zeroPoint if q.zeroPoint is not None else [])], q.quantizedDimension,
                None if q.details is None else vars(q.details))

    return [(t.name, [int(d) for d in t.shape], t.type, int(t.buffer), quantization(t.quantization))
            for subgraph in model.subgraphs for t in subgraph.tensors]

def test_the_shipped_bundle_has_no_tensor_names_but_its_interface_and_reports_name_every_layer(built_example):
    from edgebuild_tflite.compaction import table

    bundle = built_example / "dist" / "android" / "digits.tflite"
    model = _model(bundle)
    subgraph = model.subgraphs[0]
    named = {index for index, tensor in enumerate(subgraph.tensors) if tensor.name}
    assert named == set(subgraph.inputs) | set(subgraph.outputs)
    names = table(model)[0]
    assert len(names) == len(subgraph.tensors) and all(names)
    # The report's byte breakdown names the chosen bundle's weights as the fp32 conversion does.
    from edgebuild_tflite.backend import weight_tensors

    fp32_names = {row["name"] for row in weight_tensors(built_example / ".edgebuild" / "tflite" / "fp32.tflite")}
    report = read_report(built_example)
    chosen = next(c for c in report["targets"][0]["candidates"] if c["technique"] == report["targets"][0]["chosen"]["technique"])
    rows = {row["name"]: row for row in chosen["layers"]}
    assert 0 < rows.pop("metadata: tensor names (compressed)")["bytes"] < 2048
    weights = [name for name, row in rows.items() if not name.startswith("metadata: ")]
    assert weights and all(name.split("_scales")[0] in fp32_names for name in weights), weights

def test_compacting_names_changes_nothing_but_names_and_saves_their_bytes(built_example, tmp_path):
    from edgebuild_tflite.backend import TFLiteBackend, stored_values, weight_tensors
    from edgebuild_tflite.compaction import compact_file, restore_names

    original = tmp_path / "named.tflite"
    shutil.copy(built_example / ".edgebuild" / "tflite" / "fp32.tflite", original)
    compacted = tmp_path / "compacted.tflite"
    shutil.copy(original, compacted)
    compact_file(compacted)

    before, after = _model(original), _model(compacted)
    raw_names = sum(len(t.name) for t in before.subgraphs[0].tensors)
    saved = original.stat().st_size - compacted.stat().st_size
    assert saved > raw_names // 2, (saved, raw_names)
    # Same tensors, shapes, types, buffers and quantization; same names once restored.
    assert _tensors(restore_names(after)) == _tensors(before)
    assert [op.opcodeIndex for op in after.subgraphs[0].operators] == [op.opcodeIndex for op in before.subgraphs[0].operators]
    # The same answers to the last bit, and the same stored weights under the same names.
    with np.load(built_example / "examples" / "digits" / "eval.npz") as data:
        samples = (data["x"][:64],)
    backend = TFLiteBackend()
    for name, values in backend.predict(original, samples).outputs.items():
        assert np.array_equal(values, backend.predict(compacted, samples).outputs[name])
    assert [(n, c) for n, c, _ in stored_values(compacted)] == [(n, c) for n, c, _ in stored_values(original)]
    rows = weight_tensors(compacted)
    [table_row] = [row for row in rows if row["name"] == "metadata: tensor names (compressed)"]
    assert [row for row in rows if row is not table_row] == weight_tensors(original)
    assert 0 < table_row["bytes"] < raw_names / 5
    # The labels packed after the flatbuffer are still there.
    from edgebuild_tflite.metadata import associated_files

    assert associated_files(compacted) == associated_files(original) != {}
    # Compacting twice changes nothing.
    once = compacted.read_bytes()
    compact_file(compacted)
    assert compacted.read_bytes() == once
