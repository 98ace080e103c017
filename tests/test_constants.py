"""Float tables the quantizer leaves (an ADD's learned positional table) are stored at the
technique's bits too (issue #17: every layer at the bits it was given); vectors stay float32."""
import numpy as np
import pytest

TABLE = '''
import torch
from torch import nn


class Table(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 16, 64))   # a table: 1,024 values over 16 rows
        self.gain = nn.Parameter(torch.rand(64) + 0.5)    # a vector: stays float32

    def forward(self, x):
        return (x + self.pos) * self.gain


def build():
    torch.manual_seed(0)
    return Table().eval(), (torch.randn(1, 16, 64),)
'''


def _stored(bundle):
    """name-independent view: (type, shape, scales, quantized dimension, values) of each constant."""
    from ai_edge_litert.tools import flatbuffer_utils

    from edgebuild_tflite.backend import stored_values

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(bundle.read_bytes()))
    subgraph = model.subgraphs[0]
    tables = {}
    for tensor in subgraph.tensors:
        if model.buffers[tensor.buffer].data is not None and len(tensor.shape) and int(np.prod(tensor.shape)) >= 64:
            q = tensor.quantization
            tables[tuple(int(d) for d in tensor.shape)] = (tensor.type, None if q is None or q.scale is None else
                                                           (np.array(q.scale), int(q.quantizedDimension)))
    values = {count: load() for _, count, load in stored_values(bundle)}
    return tables, values


@pytest.fixture(scope="module")
def table_model(tmp_path_factory):
    import torch

    from edgebuild_tflite.backend import TFLiteBackend

    folder = tmp_path_factory.mktemp("table")
    namespace = {}
    exec(compile(TABLE, "table.py", "exec"), namespace)
    module, example = namespace["build"]()
    torch.export.save(torch.export.export(module, example), str(folder / "model.pt2"))
    TFLiteBackend().convert(folder / "model.pt2", folder / "fp32.tflite", {})
    return folder, module


@pytest.mark.parametrize("technique, bits, type_code", [("int8-weight-only", 8, 9), ("int8-dynamic", 8, 9),
                                                        ("int4-weight-only", 4, 17)])
def test_a_positional_table_is_stored_at_the_techniques_bits_and_read_back_exactly(table_model, technique, bits,
                                                                                   type_code, tmp_path):
    from edgebuild.api import CompressInput
    from edgebuild.plugins import default_registry
    from edgebuild_tflite.backend import TFLiteBackend

    folder, module = table_model
    [chosen] = [t for t in default_registry().techniques_for("tflite") if t.name == technique]
    backend, out = TFLiteBackend(), tmp_path / "candidate.tflite"
    backend.compress(chosen, CompressInput(fp32_bundle=folder / "fp32.tflite", exported_program=folder / "model.pt2",
                                           calibration=None, work_dir=tmp_path, options={}), out)
    tables, values = _stored(out)
    kind, (scales, axis) = tables[(1, 16, 64)]
    assert kind == type_code and axis == 1 and len(scales) == 16  # one scale a row
    assert tables[(1, 1, 64)] == (0, None)  # the gain vector (as the converter shapes it): float32
    pos = module.pos.detach().numpy()
    table = values[pos.size]
    step = scales.reshape(1, 16, 1)
    assert np.all(np.abs(table - pos) <= step / 2 + 1e-7)  # rounded to the nearest step
    assert np.allclose(np.abs(table / step), np.round(np.abs(table / step)), atol=1e-4)
    assert np.max(np.abs(table / step)) <= 2 ** (bits - 1) - 1 + 1e-4
    # The runtime reads the stored table as the report does: outputs are (x + table) * gain exactly.
    x = np.random.default_rng(0).normal(size=(4, 16, 64)).astype(np.float32)
    got = backend.predict(out, (x,)).outputs
    [output] = got.values()
    expected = (x + table.astype(np.float32)) * module.gain.detach().numpy()
    assert np.allclose(output, expected, rtol=1e-6, atol=1e-6)
    assert out.stat().st_size < (folder / "fp32.tflite").stat().st_size - pos.size * 4 * (1 - bits / 32) + 512


def test_which_techniques_store_tables_at_their_bits():
    """Weight-only and dynamic per-channel integer recipes do; calibrated activations (the quantizer
    quantizes an ADD's inputs itself), blockwise and float recipes do not."""
    from edgebuild.plugins import default_registry
    from edgebuild_tflite.backend import constant_bits

    bits = {t.name: constant_bits(t) for t in default_registry().techniques_for("tflite")}
    assert bits["int8-weight-only"] == bits["int8-dynamic"] == 8
    assert bits["int4-weight-only"] == bits["int4-weight-only-mse"] == 4
    assert all(bits[name] is None for name in ("fp32", "fp16", "int8-static", "int8-static-tensorwise",
                                               "int4-blockwise32"))


@pytest.mark.parametrize("step, expected", [
    ("quantize_constants_file", "stage compress, technique int8-weight-only: quantizing the float tables the "
                                "quantizer left failed: RuntimeError: boom"),
    ("compact_file", "stage compress, technique int8-weight-only: compacting the .tflite (fusing slices, rolling "
                     "steps, names) failed: RuntimeError: boom"),
])
def test_a_failure_after_the_quantizer_names_its_step_not_the_quantizer(table_model, tmp_path, monkeypatch, step,
                                                                        expected):
    """The steps edgebuild runs on a candidate after ai-edge-quantizer fail as themselves (a build
    turns any ToolchainError into exit 3, tests/test_reliability.py)."""
    from edgebuild.api import CompressInput
    from edgebuild.errors import ToolchainError
    from edgebuild.plugins import default_registry
    from edgebuild_tflite import backend as tflite

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(tflite, step, broken)
    folder, _ = table_model
    [chosen] = [t for t in default_registry().techniques_for("tflite") if t.name == "int8-weight-only"]
    with pytest.raises(ToolchainError) as failure:
        tflite.TFLiteBackend().compress(chosen, CompressInput(
            fp32_bundle=folder / "fp32.tflite", exported_program=folder / "model.pt2", calibration=None,
            work_dir=tmp_path, options={}), tmp_path / "candidate.tflite")
    assert str(failure.value) == expected
