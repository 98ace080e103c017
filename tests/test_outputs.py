"""Models with several outputs: every output named, evaluated and mapped right; floors on each
output (guards); task metrics from the project's own plugin file."""
import json
import shutil

import numpy as np
import pytest
import yaml

from tests.conftest import REPO, read_report, run_edgebuild

THREE_HEADS = '''
import torch
from torch import nn


class Detector(nn.Module):
    """A face-detector stage: box regression, landmarks, face probability."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU())
        self.box = nn.Linear(48, 4)
        self.landmarks = nn.Linear(48, 10)
        self.face = nn.Linear(48, 2)

    def forward(self, x):
        shared = self.trunk(x)
        return self.box(shared), self.landmarks(shared), self.face(shared)


def build():
    return Detector().eval(), (torch.zeros(1, 1, 8, 8),)
'''

TWINS = '''
import torch
from torch import nn


class Twins(nn.Module):
    """Two outputs of the same shape and different values: a mapping by position could swap them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.left = nn.Linear(64, 4)
        self.right = nn.Linear(64, 4)

    def forward(self, x):
        flat = x.flatten(1)
        return {"left": self.left(flat), "right": self.right(flat) * 3.0 + 5.0}


def build():
    return Twins().eval(), (torch.zeros(1, 1, 8, 8),)
'''

# A technique that damages only the box head: 4-bit weights on that one layer (about 22 dB there).
DAMAGE_BOX = '''
from edgebuild.api import Technique
from edgebuild.hookspecs import hookimpl


@hookimpl
def register_techniques(register):
    register(Technique(
        name="wreck-box", backend="tflite", description="4-bit weights on the box head only",
        recipe=[{"layers": "box", "operation": "*", "algorithm_key": "min_max_uniform_quantize",
                 "op_config": {"weight_tensor_config": {"num_bits": 4, "symmetric": True,
                               "granularity": "CHANNELWISE", "dtype": "INT"},
                               "compute_precision": "FLOAT", "explicit_dequantize": True}}]))
'''


def digits_data(root, count=200, classes=2):
    """Digits images; labels: parity (face / not face stands in), or the digit itself (classes=10)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:count] / 16.0).astype(np.float32)[:, None]
    labels = digits.target[:count] % classes
    np.savez(root / "net" / "eval.npz", x=x, y=labels)
    return x, labels


def project(root, model_source: str, manifest: dict) -> None:
    (root / "net").mkdir(parents=True)
    (root / "net" / "model.py").write_text(model_source)
    (root / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1, "model": {"name": "detector", "source": "python", "entry": "net/model.py:build"},
        "data": {"evaluation": "net/eval.npz"}, **manifest}, sort_keys=False))


def torch_outputs(root, x):
    import sys

    import torch

    sys.path.insert(0, str(root / "net"))
    try:
        import model as module
        network, _ = module.build()
    finally:
        sys.path.remove(str(root / "net"))
        sys.modules.pop("model", None)
    with torch.no_grad():
        return [t.numpy() for t in (lambda r: r.values() if isinstance(r, dict) else r)(network(torch.from_numpy(x)))]


def run_tflite(bundle, x) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(bundle))
    runner = interpreter.get_signature_runner("serving_default")
    results = [runner(args_0=x[i:i + 1]) for i in range(len(x))]
    return {name: np.concatenate([r[name] for r in results]) for name in results[0]}


TARGET = {"name": "android", "format": "tflite", "devices": ["pixel-8"], "budget": {"size": "40KB"}}


@pytest.mark.slow
def test_three_outputs_a_label_metric_on_one_and_a_guard_on_another(tmp_path):
    project(tmp_path, THREE_HEADS, {
        "model": {"name": "detector", "source": "python", "entry": "net/model.py:build",
                  "outputs": ["box", "landmarks", "face"]},
        "metric": {"name": "top1", "output": "face"},
        "targets": [{**TARGET, "accuracy": {"max_drop": 0.05,
                                            "guards": [{"output": "box", "metric": "sqnr", "floor": 30}]}}],
        "search": {"strategy": "uniform", "techniques": ["fp16", "int8-weight-only", "wreck-box"]},
        "plugins": ["tools/damage.py"]})
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "damage.py").write_text(DAMAGE_BOX)
    x, labels = digits_data(tmp_path)
    result = run_edgebuild("build", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = read_report(tmp_path)
    assert [(o["name"], o["shape"]) for o in report["model"]["outputs"]] == [
        ("box", [1, 4]), ("landmarks", [1, 10]), ("face", [1, 2])]
    box, landmarks, face = torch_outputs(tmp_path, x)
    target = report["targets"][0]
    # The baseline is top1 of the third output, computed here in torch outside edgebuild.
    assert target["baseline"]["metric"] == pytest.approx(float(np.mean(face.argmax(1) == labels)))
    assert report["metric"]["key"] == "top1[face]" and report["metric"]["output"] == "face"

    # The technique that wrecks the box head fails on its guard, naming output, metric, limit, actual.
    wrecked = next(c for c in target["candidates"] if c["technique"] == "wreck-box")
    guard = next(f for f in wrecked["failed"] if f["constraint"] == "guard")
    assert wrecked["status"] == "fail" and (guard["metric"], guard["output"], guard["limit"]) == ("sqnr", "box", 30)
    assert guard["actual"] < 30 and wrecked["metrics"]["sqnr[box]"] == guard["actual"]
    assert all(f["constraint"] == "guard" for f in wrecked["failed"])  # the face head is untouched
    assert wrecked["metric"] == target["baseline"]["metric"]
    for report_file in ("report.md", "report.html"):
        assert f"guard sqnr[box] {guard['actual']:.4f} &lt; 30.0000" in (tmp_path / "dist" / report_file).read_text() \
            or f"guard sqnr[box] {guard['actual']:.4f} < 30.0000" in (tmp_path / "dist" / report_file).read_text()
    assert 'name="guard sqnr[box]"' in (tmp_path / "dist" / "junit.xml").read_text()

    # The chosen bundle, run in plain ai-edge-litert, read by output name, gives report.json's metric.
    chosen = target["chosen"]
    outputs = run_tflite(tmp_path / chosen["path"], x)
    assert set(outputs) == {"box", "landmarks", "face"}
    assert chosen["metric"] == pytest.approx(float(np.mean(outputs["face"].argmax(1) == labels)))
    # Each output maps to its own torch output (different shapes), not just the count.
    fp32 = run_tflite(tmp_path / ".edgebuild" / "tflite" / "fp32.tflite", x)
    for name, expected in zip(("box", "landmarks", "face"), (box, landmarks, face)):
        assert np.abs(fp32[name] - expected).max() < 1e-4, name
    metadata = json.loads((tmp_path / "dist" / "android" / "detector.json").read_text())
    assert [o["name"] for o in metadata["outputs"]] == ["box", "face", "landmarks"] or \
        sorted(o["name"] for o in metadata["outputs"]) == ["box", "face", "landmarks"]
    kotlin = (tmp_path / "dist" / "android" / "DetectorModel.kt").read_text()
    for name in ("box", "landmarks", "face"):
        assert f'NAME: String = "{name}"' in kotlin

    # With only the wrecking technique left, the build fails and its one-line reason names the guard.
    edit = yaml.safe_load((tmp_path / "edgebuild.yaml").read_text())
    edit["search"]["techniques"] = ["wreck-box"]
    (tmp_path / "edgebuild.yaml").write_text(yaml.safe_dump(edit, sort_keys=False))
    failed = run_edgebuild("build", cwd=tmp_path)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == (
        "edgebuild.yaml: target android: no candidate meets every budget and the floor; nearest: wreck-box "
        f"(guard sqnr[box] {guard['actual']:.4f} < floor 30.0000); report: dist/report.md")
    junit = (tmp_path / "dist" / "junit.xml").read_text()
    assert 'type="guard-budget" message="guard sqnr[box]: limit 30.0, best actual' in junit


@pytest.mark.slow
def test_two_outputs_of_one_shape_map_by_name_in_both_runtimes(tmp_path):
    project(tmp_path, TWINS, {
        "metric": "sqnr",
        "targets": [{**TARGET, "accuracy": {"floor": 20}},
                    {"name": "ios", "format": "coreml", "devices": ["iphone-15"], "accuracy": {"floor": 20}}],
        "search": {"strategy": "uniform", "techniques": ["fp32"]}})
    x, _ = digits_data(tmp_path, 40)
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    left, right = torch_outputs(tmp_path, x)
    outputs = run_tflite(tmp_path / "dist" / "android" / "detector.tflite", x)
    assert np.abs(outputs["left"] - left).max() < 1e-4 and np.abs(outputs["right"] - right).max() < 1e-4

    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((tmp_path / "dist" / "ios" / "Sources" / "DetectorModel" / "Resources" / "detector.mlpackage"
                          / "Data" / "com.apple.CoreML" / "model.mlmodel").read_bytes())
    assert [o.name for o in spec.description.output] == ["left", "right"]
    swift = (tmp_path / "dist" / "ios" / "Sources" / "DetectorModel" / "DetectorModel.swift").read_text()
    assert 'public static let left = "left"' in swift and 'public static let right = "right"' in swift
    # sqnr without `output:` judges every output and gates on the worst; the report keeps each.
    target = next(t for t in read_report(tmp_path)["targets"] if t["name"] == "ios")
    chosen = next(c for c in target["candidates"] if c["technique"] == target["chosen"]["technique"])
    assert set(chosen["per_output"]["sqnr"]) == {"left", "right"}
    assert chosen["metric"] == min(chosen["per_output"]["sqnr"].values())


def test_a_label_metric_on_several_outputs_without_output_is_exit_2_naming_them(tmp_path):
    project(tmp_path, THREE_HEADS, {"metric": "top1", "targets": [{**TARGET, "accuracy": {"max_drop": 0.05}}]})
    digits_data(tmp_path, 20)
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "edgebuild.yaml:8:9: metric: metric 'top1' compares one output with labels; the model has 3 outputs: "
        "output_0 [20, 4], output_1 [20, 10], output_2 [20, 2]; name one with {name: top1, output: NAME}")
    assert not (tmp_path / "dist").exists()


def test_a_label_metric_at_chance_is_warned_about(tmp_path):
    project(tmp_path, THREE_HEADS, {
        "metric": {"name": "top1", "output": "output_1"},  # an untrained ten-class head: at chance
        "targets": [{**TARGET, "accuracy": {"max_drop": 0.05}}], "search": {"strategy": "uniform",
                                                                            "techniques": ["fp32"]}})
    digits_data(tmp_path, 200, classes=10)
    result = run_edgebuild("build", cwd=tmp_path)
    warning = next(line for line in result.stderr.splitlines() if line.startswith("warning: "))
    assert "fp32 top1[output_1] is" in warning and "near chance (1/10 = 0.1000) for output output_1 [200, 10]" \
        in warning
    assert read_report(tmp_path)["warnings"] == [warning.removeprefix("warning: ")]


def example(tmp_path):
    root = tmp_path / "multihead"
    shutil.copytree(REPO / "examples" / "multihead", root, ignore=shutil.ignore_patterns("__pycache__", "dist",
                                                                                        ".edgebuild"))
    return root


@pytest.mark.slow
def test_the_multi_output_example_builds_to_both_targets_and_a_metric_edit_reruns_no_conversion(tmp_path):
    root = example(tmp_path)
    result = run_edgebuild("build", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    report = read_report(root)
    assert [o["name"] for o in report["model"]["outputs"]] == ["digit", "ink"]
    for target in report["targets"]:
        assert target["status"] == "pass"
        guard = next(c for c in target["constraints"] if c["constraint"] == "guard")
        assert (guard["metric"], guard["output"], guard["status"]) == ("ink_error", "ink", "pass")
        assert target["chosen"]["metrics"]["ink_error[ink]"] <= 0.035
    assert json.loads((root / "dist" / "android" / "inkdigits.json").read_text())["outputs"][0]["name"] in (
        "digit", "ink")
    swift = (root / "dist" / "ios" / "Sources" / "InkdigitsModel" / "InkdigitsModel.swift").read_text()
    assert 'public static let digit = "digit"' in swift and 'public static let ink = "ink"' in swift

    listing = run_edgebuild("plugins", "-f", "edgebuild.yaml", "--json", cwd=root)
    local = next(p for p in json.loads(listing.stdout) if p["name"] == "edgebuild_plugins.py")
    assert local["provides"] == ["metric ink_error"]

    plugin = root / "edgebuild_plugins.py"
    plugin.write_text(plugin.read_text().replace("np.mean(np.abs(", "1.0 * np.mean(np.abs("))
    again = run_edgebuild("build", "--json", cwd=root)
    assert again.returncode == 0, again.stderr
    executed = json.loads(again.stdout)["executed"]
    assert any(s.startswith("evaluate:") for s in executed) and "select:android" in executed
    assert not any(s.startswith(("export", "reference", "convert", "compress")) for s in executed), executed


@pytest.mark.parametrize("source, line, message", [
    ("import numpy\nraise RuntimeError('no model zoo here')\n", 2,
     "importing the plugin failed: RuntimeError: no model zoo here"),
    ("from edgebuild.hookspecs import hookimpl\n\n@hookimpl\ndef register_metrics(register):\n"
     "    register('not a metric')\n", 5,
     "register_metrics: a metric must be an edgebuild.api.Metric, got str"),
    ("def broken(:\n", 1, "cannot import the plugin: invalid syntax"),
])
def test_a_broken_local_plugin_is_exit_2_naming_file_and_line(tmp_path, source, line, message):
    root = example(tmp_path)
    (root / "edgebuild_plugins.py").write_text(source)
    result = run_edgebuild("validate", cwd=root)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"edgebuild_plugins.py:{line}:"), result.stderr
    assert result.stderr.strip().endswith(message) and "Traceback" not in result.stderr


def test_the_readme_metric_example_is_the_one_the_suite_builds():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**The Metric API.**"):]
    block = section[section.index("```python\n") + len("```python\n"):section.index("\n```", 10)]
    assert block.strip() in (REPO / "examples" / "multihead" / "edgebuild_plugins.py").read_text()


def test_output_names_that_do_not_fit_the_model_are_exit_2_located(tmp_path):
    project(tmp_path, THREE_HEADS, {
        "model": {"name": "detector", "source": "python", "entry": "net/model.py:build", "outputs": ["box", "face"]},
        "metric": {"name": "top1", "output": "face"}, "targets": [{**TARGET, "accuracy": {"max_drop": 0.05}}]})
    digits_data(tmp_path, 20)
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "edgebuild.yaml:7:3: model.outputs: names 2 output(s); the model returns 3 ([1, 4], [1, 10], [1, 2])")

    project(tmp_path / "typo", THREE_HEADS, {
        "model": {"name": "detector", "source": "python", "entry": "net/model.py:build",
                  "outputs": ["box", "landmarks", "face"]},
        "metric": {"name": "top1", "output": "faces"}, "targets": [{**TARGET, "accuracy": {"max_drop": 0.05}}]})
    digits_data(tmp_path / "typo", 20)
    validate = run_edgebuild("validate", cwd=tmp_path / "typo")
    assert validate.returncode == 2
    assert validate.stderr.strip() == (
        "edgebuild.yaml:14:11: metric.output: unknown output 'faces' (model.outputs: box, landmarks, face)")
