"""TorchScript files (what PyTorch Mobile apps keep) build end to end, with no Python source."""
import shutil
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import EXAMPLE, read_report, run_edgebuild

SCRIPTED = '''
import torch
from torch import nn


class Gated(nn.Module):
    """Scripted control flow: a fixed loop and a branch on a shape."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.mix = nn.Linear(8 * 8 * 8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        h = self.mix(h)
        for _ in range(2):
            h = torch.relu(h) + 0.5 * h
        if h.shape[1] == 32:
            h = h * 1.5
        return self.head(h)
'''

DATA_DEPENDENT = '''
import torch
from torch import nn


class Doubling(nn.Module):
    def forward(self, x):
        while x.abs().sum() < 100.0:
            x = x * 2.0
        return x.flatten(1)
'''


def digits_net():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import model

        net, example = model.build()
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("model", None)
    return net, example


def scripted(tmp_path, source: str, class_name: str):
    """A scripted module from source written to a file (TorchScript needs the source to script)."""
    import importlib.util

    import torch

    file = tmp_path / f"{class_name.lower()}_source.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return torch.jit.script(getattr(module, class_name)().eval())


def project(root, saved, *, inputs: bool = True, formats=("tflite", "coreml"), suffix=".pt") -> None:
    """A project holding only a TorchScript file (and its example inputs) and the digits data."""
    import torch

    (root / "models").mkdir(parents=True)
    path = root / "models" / f"net{suffix}"
    if suffix == ".ptl":
        saved._save_for_lite_interpreter(str(path))
    else:
        torch.jit.save(saved, str(path))
    if inputs:
        np.savez(path.with_name(path.name + ".inputs.npz"), x=np.zeros((1, 1, 8, 8), np.float32))
    shutil.copy(EXAMPLE / "eval.npz", root / "models" / "eval.npz")
    targets = {"tflite": {"name": "android", "format": "tflite", "devices": ["pixel-8"], "budget": {"size": "60KB"},
                          "accuracy": {"max_drop": 0.02}},
               "coreml": {"name": "ios", "format": "coreml", "devices": ["iphone-15"], "budget": {"size": "60KB"},
                          "accuracy": {"max_drop": 0.02}}}
    (root / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1, "model": {"name": "digits", "source": "torchscript", "path": f"models/net{suffix}"},
        "data": {"evaluation": "models/eval.npz"}, "metric": "top1",
        "targets": [targets[f] for f in formats],
        "search": {"strategy": "uniform", "techniques": ["fp16", "int8-dynamic", "palettize-6bit"]}}, sort_keys=False))


def evaluation():
    with np.load(EXAMPLE / "eval.npz") as stored:
        return stored["x"], stored["y"]


def tflite_top1(bundle, x, y) -> float:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(bundle)).get_signature_runner("serving_default")
    logits = np.concatenate([runner(args_0=x[i:i + 1])["output_0"] for i in range(len(x))])
    return float(np.mean(logits.argmax(1) == y))


@pytest.mark.slow
def test_a_traced_cnn_builds_to_both_targets_and_its_metrics_rerun_outside_match(tmp_path):
    import torch

    net, example = digits_net()
    project(tmp_path, torch.jit.trace(net, example))
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = read_report(tmp_path)
    assert report["model"]["inputs"][0]["name"] == "x"  # the TorchScript argument's name, not the converter's
    x, y = evaluation()
    android = next(t for t in report["targets"] if t["name"] == "android")
    assert tflite_top1(tmp_path / android["chosen"]["path"], x, y) == pytest.approx(android["chosen"]["metric"])
    # The fp32 baseline is the TorchScript module's own accuracy.
    traced = torch.jit.load(str(tmp_path / "models" / "net.pt"))
    with torch.no_grad():
        assert android["baseline"]["metric"] == pytest.approx(float(np.mean(traced(torch.from_numpy(x)).numpy()
                                                                             .argmax(1) == y)))
    ios = next(t for t in report["targets"] if t["name"] == "ios")
    from edgebuild_coreml.backend import simulated_module

    bundle = tmp_path / ios["chosen"]["path"]
    module, missing = simulated_module(bundle, tmp_path / ".edgebuild" / "model" / "exported.pt2")
    assert missing == []  # every weight is a parameter the bundle stores: the evaluation is weights-exact
    with torch.no_grad():
        logits = np.concatenate([module(torch.from_numpy(x[i:i + 1])).numpy() for i in range(len(x))])
    assert float(np.mean(logits.argmax(1) == y)) == pytest.approx(ios["chosen"]["metric"])
    assert "palettized" in {layer["dtype"].split(" ")[0] for layer in ios["candidates"][-1].get("layers", [])} or \
        any(c["technique"] == "palettize-6bit" and c["bytes"] < 40_000 for c in ios["candidates"])


@pytest.mark.slow
def test_a_scripted_module_with_control_flow_builds_and_matches_torchscript(tmp_path):
    import torch

    module = scripted(tmp_path, SCRIPTED, "Gated")
    project(tmp_path, module)
    result = run_edgebuild("build", cwd=tmp_path)
    # An untrained net: the floor (fp32 less 0.02) may or may not be met; the build itself must work.
    assert result.returncode in (0, 1), result.stderr
    x, _ = evaluation()
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(tmp_path / ".edgebuild" / "tflite" / "fp32.tflite")).get_signature_runner(
        "serving_default")
    converted = np.concatenate([runner(args_0=x[i:i + 1])["output_0"] for i in range(32)])
    with torch.no_grad():
        expected = module(torch.from_numpy(x[:32])).numpy()
    assert np.abs(converted - expected).max() < 1e-4
    layers = {c["technique"]: c for c in read_report(tmp_path)["targets"][1]["candidates"]}
    # The scripted module's weights are parameters again: Core ML palettizes them.
    assert any(layer["dtype"].startswith("palettized") for layer in layers["palettize-6bit"]["layers"])


def test_a_torchscript_file_the_converter_rejects_is_exit_3_naming_the_construct(tmp_path):
    project(tmp_path, scripted(tmp_path, DATA_DEPENDENT, "Doubling"), formats=("tflite",))
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("stage export"))
    assert line.startswith("stage export: TorchScript cannot be converted to torch.export: prim::Loop is not "
                           "supported"), line
    assert not (tmp_path / "dist").exists()


def test_missing_example_inputs_are_exit_2_naming_the_file(tmp_path):
    import torch

    net, example = digits_net()
    project(tmp_path, torch.jit.trace(net, example), inputs=False, formats=("tflite",))
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "models/net.pt: TorchScript needs example inputs in net.pt.inputs.npz beside it (arrays in argument order, "
        "batch first), not found")


def test_an_unreadable_lite_interpreter_file_is_exit_2_saying_what_to_give(tmp_path):
    import torch

    net, example = digits_net()
    project(tmp_path, torch.jit.trace(net, example), formats=("tflite",), suffix=".ptl")
    (tmp_path / "models" / "net.ptl").write_bytes(b"PK\x03\x04 not the archive it claims to be")
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "models/net.ptl: a PyTorch Mobile lite-interpreter file (.ptl) cannot be loaded for conversion; give the "
        "TorchScript file it was made from (torch.jit.save, .pt) or a torch.export archive (source: torch-export)")


@pytest.mark.slow
def test_a_torch_export_archive_builds_end_to_end(tmp_path):
    import torch

    net, example = digits_net()
    (tmp_path / "models").mkdir()
    torch.export.save(torch.export.export(net, example), str(tmp_path / "models" / "net.pt2"))
    shutil.copy(EXAMPLE / "eval.npz", tmp_path / "models" / "eval.npz")
    (tmp_path / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1, "model": {"name": "digits", "source": "torch-export", "path": "models/net.pt2"},
        "data": {"evaluation": "models/eval.npz"}, "metric": "top1",
        "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "budget": {"size": "60KB"},
                     "accuracy": {"max_drop": 0.02}}],
        "search": {"strategy": "uniform", "techniques": ["int8-dynamic"]}}, sort_keys=False))
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    chosen = read_report(tmp_path)["targets"][0]["chosen"]
    x, y = evaluation()
    assert chosen["technique"] == "int8-dynamic"
    assert tflite_top1(tmp_path / chosen["path"], x, y) == pytest.approx(chosen["metric"])


@pytest.mark.slow
def test_a_lite_interpreter_file_torch_can_read_converts_like_any_torchscript(tmp_path):
    import torch

    net, example = digits_net()
    project(tmp_path, torch.jit.trace(net, example), formats=("tflite",), suffix=".ptl")
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    chosen = read_report(tmp_path)["targets"][0]["chosen"]
    x, y = evaluation()
    assert tflite_top1(tmp_path / chosen["path"], x, y) == pytest.approx(chosen["metric"])
