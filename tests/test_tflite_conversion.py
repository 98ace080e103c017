"""Large models convert to .tflite in two child processes with lightweight constants; the bundle
must keep the layer names and the numbers of an ordinary in-process conversion."""
import numpy as np
import pytest
import torch

from tests.test_hf import tiny_model

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
    assert not list(tmp_path.glob("*.mlirbc"))

    names = [layer["name"] for layer in weighted_layers(children)]
    assert names == [layer["name"] for layer in weighted_layers(here)]
    assert names[0].endswith("Embedding_embed_tokens") and names[-1].endswith("Linear_lm_head")
    assert any(name.endswith("Linear_k_proj") for name in names)
    tokens = (np.arange(16, dtype=np.int32)[None] * 7) % 250
    with torch.no_grad():
        expected = module(torch.from_numpy(tokens.astype(np.int64))).numpy()
    np.testing.assert_allclose(run(children, tokens), expected, atol=1e-4)
    np.testing.assert_allclose(run(children, tokens), run(here, tokens), atol=1e-5)


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
