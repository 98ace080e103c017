"""Large models convert to .tflite in two child processes with lightweight constants; the bundle
must keep the layer names and the numbers of an ordinary in-process conversion."""
import json

import numpy as np
import pytest
import torch

from tests.test_hf import REPOSITORY, tiny_model

pytestmark = pytest.mark.slow


def exported(tmp_path, module: torch.nn.Module, example: tuple):
    path = tmp_path / "program.pt2"
    torch.export.save(torch.export.export(module, example), str(path))
    return path


def run(bundle, feed: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(bundle)).get_signature_runner("serving_default")
    return next(iter(runner(**{next(iter(runner.get_input_details())): feed}).values()))


def test_child_process_conversion_keeps_layer_names_and_outputs(tmp_path, monkeypatch):
    from edgebuild_loaders import load_hf
    from edgebuild_tflite import conversion
    from edgebuild_tflite.backend import weighted_layers

    tiny_model(tmp_path / "llama", "llama", tokenizer=False)
    module, example = load_hf({"path": "llama", "sequence_length": 16}, tmp_path)
    program = exported(tmp_path, module, example)
    here, children = tmp_path / "here.tflite", tmp_path / "children.tflite"
    conversion.convert(program, here, in_children=False)
    # Every weight above 1024 elements becomes a lightweight (unnamed) constant, as the large
    # weights of a real LLM do; the children inherit the setting.
    monkeypatch.setenv("RESOURCE_CONSTANT_NUMEL_THRESHOLD", "1024")
    conversion.convert(program, children, in_children=True)
    assert not list(tmp_path.glob("*.mlirbc*"))  # nor the weights set aside

    names = [layer["name"] for layer in weighted_layers(children)]
    assert names == [layer["name"] for layer in weighted_layers(here)]
    assert names[0].endswith("Embedding_embed_tokens") and names[-1].endswith("Linear_lm_head")
    assert any(name.endswith("Linear_k_proj") for name in names)
    tokens = (np.arange(16, dtype=np.int32)[None] * 7) % 250
    with torch.no_grad():
        expected = module(torch.from_numpy(tokens.astype(np.int64))).numpy()
    np.testing.assert_allclose(run(children, tokens), expected, atol=1e-4)
    np.testing.assert_allclose(run(children, tokens), run(here, tokens), atol=1e-5)

    # The children set the weights aside and write them back into the flatbuffer: the bytes are
    # those of writing the lowered module with its weights inside.
    with_weights, set_aside = tmp_path / "with-weights.mlirbc", tmp_path / "set-aside.mlirbc"
    conversion.lower(program, with_weights, set_aside=False)
    conversion.lower(program, set_aside)
    index = json.loads((tmp_path / "set-aside.mlirbc.weights.json").read_text())
    assert len(index) == len(names)  # every weight is over the 1024-element threshold
    assert set_aside.stat().st_size < with_weights.stat().st_size - sum(entry["bytes"] for entry in index)
    conversion.emit(with_weights, tmp_path / "a.tflite")
    conversion.emit(set_aside, tmp_path / "b.tflite")
    assert (tmp_path / "a.tflite").read_bytes() == (tmp_path / "b.tflite").read_bytes() == children.read_bytes()

    # A placeholder the flatbuffer lacks is a conversion failure, not a bundle with a hole in it.
    index.append({"number": len(index) + 1, "offset": 0, "bytes": 4096})
    (tmp_path / "set-aside.mlirbc.weights.json").write_text(json.dumps(index))
    with pytest.raises(conversion.ConversionFailed, match="1 weight placeholders are missing"):
        conversion.emit(set_aside, tmp_path / "c.tflite")


class Gaussianize(torch.nn.Module):
    def forward(self, x):
        return torch.special.erfinv(x * 0.5)


def test_child_process_conversion_failure_names_the_op(tmp_path, monkeypatch):
    from edgebuild.errors import ToolchainError
    from edgebuild_tflite import conversion
    from edgebuild_tflite.backend import TFLiteBackend

    program = exported(tmp_path, Gaussianize(), (torch.zeros(1, 4),))
    with pytest.raises(conversion.ConversionFailed) as failed:
        conversion.convert(program, tmp_path / "out.tflite", in_children=True)
    assert "aten.erfinv" in str(failed.value) and "\n" not in str(failed.value)
    monkeypatch.setattr(conversion, "CHILD_PROCESS_BYTES", 0)  # the backend takes the child path for any size
    with pytest.raises(ToolchainError) as error:
        TFLiteBackend().convert(program, tmp_path / "out.tflite", {})
    assert error.value.reason == "litert-torch cannot convert op aten.erfinv.default"
    assert not (tmp_path / "out.tflite").exists() and not list(tmp_path.glob("*.mlirbc"))


def test_large_model_stages_run_in_their_own_processes_with_the_same_results(tmp_path):
    """EDGEBUILD_ISOLATE_STAGES=1 runs what a large model would in child processes: same bundle bytes,
    same exit 3 naming the op for a model the converter rejects."""
    import shutil

    import yaml

    from tests.conftest import python_project, read_report, run_edgebuild
    from tests.test_build import REJECTED_MODEL

    tiny_model(tmp_path / "a" / "models" / "llama", "llama")
    (tmp_path / "a" / "eval.txt").write_text((REPOSITORY / "README.md").read_text(encoding="utf-8")[:2000], encoding="utf-8")
    (tmp_path / "a" / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1, "model": {"name": "m", "source": "hf", "path": "models/llama", "sequence_length": 16},
        "data": {"evaluation": "eval.txt"}, "metric": "token_agreement", "report_metrics": ["perplexity"],
        "reports": ["json"], "search": {"strategy": "uniform", "techniques": ["fp32", "int4-blockwise32"]},
        "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "accuracy": {"floor": 0.5}}],
    }, sort_keys=False))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    here = run_edgebuild("build", cwd=tmp_path / "a", env={"EDGEBUILD_ISOLATE_STAGES": "0"})
    apart = run_edgebuild("build", cwd=tmp_path / "b", env={"EDGEBUILD_ISOLATE_STAGES": "1"})
    assert here.returncode == apart.returncode == 0, apart.stderr
    first, second = read_report(tmp_path / "a")["targets"][0], read_report(tmp_path / "b")["targets"][0]
    assert first["chosen"]["sha256"] == second["chosen"]["sha256"]
    assert first["chosen"]["metrics"] == second["chosen"]["metrics"]

    rejected = python_project(tmp_path / "c", "gauss", REJECTED_MODEL)
    failed = run_edgebuild("build", cwd=rejected, env={"EDGEBUILD_ISOLATE_STAGES": "1"})
    assert failed.returncode == 3
    assert failed.stderr.strip().splitlines()[-1].startswith(
        "stage convert, target android: litert-torch cannot convert op aten.erfinv.default")
    assert "Traceback" not in failed.stderr


def test_a_stage_process_that_dies_is_an_error_naming_the_stage(tmp_path):
    """An isolated stage whose process ends without a result (killed, out of memory) fails the
    build with exit 3, naming the stage and its exit code."""
    from tests.conftest import python_project, run_edgebuild

    project = python_project(tmp_path, "dies", "import os\n\ndef build():\n    os._exit(7)\n")
    result = run_edgebuild("build", cwd=project, env={"EDGEBUILD_ISOLATE_STAGES": "1"})
    assert result.returncode == 3, result.stderr
    assert ("stage export: unexpected error: the stage's process ended with exit code 7 and no result "
            "[log: .edgebuild/logs/export.log]") in result.stderr.splitlines()
    assert "Traceback" not in result.stderr


def test_weights_go_back_into_inline_and_offset_buffers(tmp_path):
    """Past 2 GB a .tflite keeps its buffers after the flatbuffer (offset/size) instead of inside
    it; placeholders are found and filled in both layouts, and no other buffer is touched."""
    import flatbuffers
    from litert_converter import schema_py_generated as schema

    from edgebuild_tflite import conversion

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(64).astype("<f4") for _ in range(2)]
    other = rng.standard_normal(64).astype("<f4")
    placeholders = [np.full(64, conversion._placeholder_value(number), "<f4") for number in (1, 2)]

    def pack(tail_at: int) -> bytes:
        model = schema.ModelT()
        model.version = 3
        inline, outside, untouched = schema.BufferT(), schema.BufferT(), schema.BufferT()
        inline.data = placeholders[0].view(np.uint8)
        outside.offset, outside.size = tail_at, placeholders[1].nbytes
        untouched.offset, untouched.size = tail_at + placeholders[1].nbytes, other.nbytes
        model.buffers = [schema.BufferT(), inline, outside, untouched]
        builder = flatbuffers.Builder(0)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    head = pack(2**40)
    tail_at = -(-len(head) // 16) * 16
    head = pack(tail_at)
    assert len(head) <= tail_at
    bundle = tmp_path / "model.tflite"
    bundle.write_bytes(head.ljust(tail_at, b"\0") + placeholders[1].tobytes() + other.tobytes())
    bytecode = tmp_path / "model.mlirbc"
    side, index = conversion._side_files(bytecode)
    side.write_bytes(b"".join(weight.tobytes() for weight in weights))
    index.write_text(json.dumps([{"number": number, "offset": 256 * (number - 1), "bytes": 256} for number in (1, 2)]))

    conversion._put_back(bundle, bytecode)
    data = bundle.read_bytes()
    model = schema.Model.GetRootAs(data, 0)
    assert model.Buffers(1).DataAsNumpy().view("<f4").tolist() == weights[0].tolist()
    assert data[tail_at:tail_at + 256] == weights[1].tobytes()
    assert data[tail_at + 256:] == other.tobytes()
    assert len(data) == tail_at + 512
