"""Core ML targets: iOS-gated techniques, weights-exact simulation on Linux, Swift package output."""
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import read_report, run_edgebuild

pytestmark = pytest.mark.slow


def ios_target(report: dict) -> dict:
    return next(t for t in report["targets"] if t["name"] == "ios")


def mil_ops(package: Path):
    """The weight-holding ops of an .mlpackage, read with coremltools (no edgebuild code)."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    program = load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    return spec, [op for f in program.functions.values() for op in f.operations]


def test_ios_output_is_a_swift_package_holding_the_chosen_compressed_model(built_example):
    target = ios_target(read_report(built_example))
    chosen = target["chosen"]
    assert target["status"] == "pass" and chosen["technique"] in ("mixed-precision", "palettize-4bit", "palettize-6bit")
    package = built_example / "dist" / "ios"
    bundle = built_example / chosen["path"]
    assert bundle == package / "Sources" / "DigitsModel" / "Resources" / "digits.mlpackage"
    assert chosen["bytes"] == sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) <= 40_000

    manifest = (package / "Package.swift").read_text()
    assert manifest.startswith("// swift-tools-version:5.9")
    assert 'platforms: [.iOS(.v16)]' in manifest
    assert '.process("Resources/digits.mlpackage")' in manifest
    swift = (package / "Sources" / "DigitsModel" / "DigitsModel.swift").read_text()
    assert "public enum DigitsModel" in swift and 'forResource: "digits", withExtension: "mlmodelc"' in swift

    spec, ops = mil_ops(bundle)
    # Typed names in Swift are the model's real input and output names.
    for feature in list(spec.description.input) + list(spec.description.output):
        assert f'= "{feature.name}"' in swift
    # Metadata from the manifest is written into the Core ML model itself.
    assert spec.description.metadata.shortDescription.startswith("Handwritten digit classifier")
    assert spec.description.metadata.versionString == "1.0"
    assert spec.description.input[0].shortDescription == "grayscale image, 8x8; the model sees (pixel - [0.0]) / [255.0]"
    assert spec.description.output[1].shortDescription == "score of each class label"
    # The weights are compressed as the report says: each weight is a lookup table of 2^bits entries.
    if chosen["technique"] == "mixed-precision":
        wanted = {d["layer"]: d["precision"] for d in target["search"]["chosen"]["decision_log"]}
    else:
        bits = re.match(r"palettize-(\d)bit", chosen["technique"]).group(1)
        wanted = {name: f"pal{bits}" for name in ("features_0_weight", "features_2_weight", "classifier_1_weight",
                                                  "classifier_3_weight")}
    luts = {op.name.removeprefix("p_").split("_to_fp16")[0]: op.inputs["lut"].val.size
            for op in ops if op.op_type == "constexpr_lut_to_dense"}
    assert luts == {name: 2 ** int(p.removeprefix("pal")) for name, p in wanted.items() if p != "fp16"}


def test_ios16_devices_never_get_ios17_or_ios18_techniques(built_example):
    target = ios_target(read_report(built_example))
    by_name = {c["technique"]: c for c in target["candidates"]}
    for name in ("palettize-3bit", "palettize-4bit-grouped16", "int4-block32"):
        assert by_name[name]["status"] == "skipped"
        assert by_name[name]["reason"] == "requires iOS 18, target min is iOS 16"
    assert by_name["w8a8"]["reason"] == "requires iOS 17, target min is iOS 16"
    built = {p.name for p in (built_example / ".edgebuild" / "coreml-ios16" / "candidates").iterdir()}
    assert not any(n.startswith(("palettize-3bit", "int4-block32", "palettize-4bit-grouped16", "w8a8")) for n in built)
    judged = [c for c in target["candidates"] if c["status"] in ("pass", "fail")]
    assert len(judged) == 8  # 7 uniform techniques that run on iOS 16, and the mixed-precision search's pick
    # Over the 40 KB budget, fp32, fp16, int8-linear and palettize-8bit are measured, not run.
    assert {c["technique"] for c in judged if "not_evaluated" in c} == {"fp32", "fp16", "int8-linear", "palettize-8bit"}
    evaluated = [c for c in judged if "not_evaluated" not in c]
    assert all(c["evaluated_by"].startswith("weights-exact torch simulation") for c in evaluated)
    assert all(c["latency_ms"] is None for c in evaluated)


def test_simulated_weights_equal_the_bundles_decompressed_weights(built_example):
    import coremltools as ct
    from coremltools.optimize.coreml import decompress_weights, get_weights_metadata
    from edgebuild_coreml.backend import simulated_module

    exported = built_example / ".edgebuild" / "model" / "exported.pt2"
    for technique in ("palettize-4bit", "int8-linear", "palettize-2bit", "fp16"):
        package = built_example / ".edgebuild" / "coreml-ios16" / "candidates" / f"{technique}.mlpackage"
        module, missing = simulated_module(package, exported)
        assert missing == []
        decompressed = get_weights_metadata(decompress_weights(ct.models.MLModel(str(package), skip_model_load=True)),
                                            weight_threshold=0)
        state = module.state_dict()
        for name, tensor in state.items():
            key = next(k for k in decompressed if k.startswith("p_" + name.replace(".", "_")))
            np.testing.assert_array_equal(tensor.numpy(), decompressed[key].val.astype(np.float32),
                                          err_msg=f"{technique}: {name}")


PRELU_MODEL = '''
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.act = torch.nn.PReLU(8)          # per-channel PReLU: converts only after decomposition
        self.head = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).flatten(1))

def build():
    return Net().eval(), (torch.zeros(1, 1, 8, 8),)
'''

ERFINV_MODEL = '''
import torch

class Net(torch.nn.Module):
    def forward(self, x):
        return torch.special.erfinv(x * 0.5)

def build():
    return Net().eval(), (torch.zeros(1, 1, 8, 8),)
'''


def ios_project(root: Path, source: str) -> Path:
    (root / "net").mkdir()
    (root / "net" / "model.py").write_text(source)
    x = np.random.default_rng(0).uniform(0, 1, (16, 1, 8, 8)).astype(np.float32)
    np.savez(root / "net" / "eval.npz", x=x)
    (root / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1, "model": {"name": "net", "source": "python", "entry": "net/model.py:build"},
        "data": {"evaluation": "net/eval.npz"}, "metric": "agreement",
        "targets": [{"name": "ios", "format": "coreml", "devices": ["iphone-12"], "accuracy": {"floor": 0.5}}],
    }, sort_keys=False))
    return root


def test_per_channel_prelu_model_converts(tmp_path):
    result = run_edgebuild("build", cwd=ios_project(tmp_path, PRELU_MODEL))
    assert result.returncode == 0, result.stderr
    target = read_report(tmp_path)["targets"][0]
    assert target["chosen"] is not None
    # iOS 18 device: only macOS-bound w8a8 and the LLM technique (no embeddings here) are skipped.
    skipped = {c["technique"]: c["reason"] for c in target["candidates"] if c["status"] == "skipped"}
    assert set(skipped) == {"w8a8", "int4-block32-int8-embeddings"}
    assert skipped["int4-block32-int8-embeddings"] == "no layer of this model matches '(?i)(embed|lm_head)'"


def test_op_core_ml_cannot_express_exits_3_naming_it(tmp_path):
    result = run_edgebuild("build", cwd=ios_project(tmp_path, ERFINV_MODEL))
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1].startswith(
        "stage convert, target ios: coremltools cannot convert op erfinv")
    assert "Traceback" not in result.stderr


def test_a_parameter_the_bundle_does_not_store_labels_the_evaluation_not_weights_exact(tmp_path):
    """Core ML folds an eval-mode batch norm and the convolution before it into one weight: the
    bundle stores no tensor under one of their torch names, so the simulation cannot take it from
    the bundle, and says so."""
    import torch

    from edgebuild_coreml.backend import CoreMLBackend

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10)).eval()
    with torch.no_grad():  # statistics that are not the identity, so folding them matters
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    program = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(1, 1, 8, 8),)), str(program))
    backend = CoreMLBackend()
    bundle = tmp_path / f"fp32{backend.extension}"
    backend.convert(program, bundle, {"min_ios": 16})
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 8, 8)).astype(np.float32)
    prediction = backend.predict(bundle, [x], exported_program=program)
    missing = prediction.details["unmapped_parameters"]
    assert missing and set(missing) <= set(dict(net.named_parameters())), missing
    assert prediction.runtime == (f"torch simulation, NOT weights-exact: {len(missing)} parameter(s) not found in "
                                  f"the bundle kept their float32 values ({', '.join(missing)})")


def test_a_package_another_stage_is_reading_copies_and_hashes_as_the_package(built_example, tmp_path):
    """coremltools rewrites Manifest.json through a temporary Manifest.<uuid> whenever it opens an
    .mlpackage, also to read it. A copy or hash made meanwhile must not take that file along (a
    copy that listed it and found it gone failed a CI build), and reading really does write it."""
    import shutil
    import uuid

    import coremltools as ct

    from edgebuild.fsutil import bundle_bytes, bundle_files, bundle_sha256, copy_bundle

    package = tmp_path / "model.mlpackage"
    shutil.copytree(built_example / ".edgebuild" / "coreml-ios16" / "fp32.mlpackage", package)
    before = (package / "Manifest.json").stat().st_mtime_ns
    ct.models.MLModel(str(package), skip_model_load=True)
    assert (package / "Manifest.json").stat().st_mtime_ns != before  # a read rewrites the manifest
    digest, size = bundle_sha256(package), bundle_bytes(package)
    (package / f"Manifest.{uuid.uuid4()}").write_text("{}")  # caught mid-rewrite
    assert bundle_sha256(package) == digest and bundle_bytes(package) == size
    assert not [f for f in bundle_files(package) if f.name.startswith("Manifest.") and f.name != "Manifest.json"]
    copy_bundle(package, tmp_path / "copy.mlpackage")
    assert bundle_sha256(tmp_path / "copy.mlpackage") == digest
