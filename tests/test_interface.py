"""Bundles the platforms' own tools understand: TFLite Model Metadata (read back with MediaPipe's
displayer) and Core ML image inputs and classifiers (read back with coremltools)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, make_project, example_manifest, read_report, run_edgebuild

pytestmark = pytest.mark.slow

LABELS = (REPO / "examples" / "digits" / "labels.txt").read_text().splitlines()


def tflite_metadata(bundle: Path) -> dict:
    """The bundle's metadata as MediaPipe's displayer shows it, with its packed files."""
    from edgebuild_tflite.metadata import writers

    metadata, *_ = writers()
    displayer = metadata.MetadataDisplayer.with_model_file(str(bundle))
    return {"json": json.loads(displayer.get_metadata_json()),
            "files": {name: displayer.get_associated_file_buffer(name).decode()
                      for name in displayer.get_packed_associated_file_list()}}


def without_metadata(bundle: Path, out: Path) -> Path:
    """The same model with no TFLite Model Metadata and no packed files (ai-edge-litert's schema)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(bundle.read_bytes()))
    model.metadata = [m for m in model.metadata if m.name != b"TFLITE_METADATA"]
    out.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return out


def coreml_spec(package: Path):
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    program = load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    return spec, list(program.functions["main"].operations)


def test_android_bundle_carries_metadata_the_displayer_reads(built_example):
    bundle = built_example / "dist" / "android" / "digits.tflite"
    found = tflite_metadata(bundle)
    meta = found["json"]
    manifest = example_manifest()["model"]
    assert (meta["name"], meta["description"], meta["version"], meta["author"], meta["license"]) == (
        "digits", manifest["description"], "1.0", "edgebuild examples", "Apache-2.0")
    assert found["files"] == {"labels.txt": "\n".join(LABELS) + "\n"}
    (image,) = meta["subgraph_metadata"][0]["input_tensor_metadata"]
    assert image["name"] == "x" and image["content"]["content_properties_type"] == "ImageProperties"
    assert image["content"]["content_properties"]["color_space"] == "GRAYSCALE"
    (normalization,) = image["process_units"]
    assert normalization["options"] == {"mean": [0.0], "std": [255.0]}
    assert image["stats"] == {"max": [1.0], "min": [0.0]}   # the range [0, 255], normalized
    (scores,) = meta["subgraph_metadata"][0]["output_tensor_metadata"]
    assert scores["description"] == "scores of 10 classes, labels in labels.txt"
    assert scores["associated_files"] == [{"name": "labels.txt", "type": "TENSOR_AXIS_LABELS",
                                           "description": "Labels for categories that the model can recognize."}]


def test_the_report_says_what_the_bundles_carry(built_example):
    interface = read_report(built_example)["model"]["interface"]
    assert interface["labels"] == [{"output": "output_0", "classes": 10, "file": "examples/digits/labels.txt"}]
    assert interface["images"] == [{"input": "x", "layout": "NCHW", "mean": [0.0], "std": [255.0], "range": [0.0, 255.0],
                                    "description": ""}]
    assert ("every bundle carries class labels for `output_0` (10, examples/digits/labels.txt); image input `x` "
            "(NCHW, the model sees (pixel - [0.0]) / [255.0])") in (built_example / "dist" / "report.md").read_text()


def test_input_names_come_from_the_archive_in_argument_order(tmp_path):
    import torch

    from edgebuild_tflite.backend import _input_names

    class TwoInputs(torch.nn.Module):
        def forward(self, tokens, image):
            return tokens.float().sum() + image.sum()

    path = tmp_path / "two.pt2"
    program = torch.export.export(TwoInputs(), (torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 1, 2, 2)))
    torch.export.save(program, str(path))
    assert _input_names(path) == list(program.graph_signature.user_inputs) == ["tokens", "image"]


def test_metadata_bytes_are_measured_and_change_no_output(built_example, tmp_path):
    from edgebuild.plugins import default_registry

    report = read_report(built_example)
    android = report["targets"][0]
    bundle = built_example / android["chosen"]["path"]
    chosen = next(c for c in android["candidates"] if c["technique"] == android["chosen"]["technique"])
    # The size budget is judged on the file that ships, metadata and labels included.
    assert android["chosen"]["bytes"] == bundle.stat().st_size
    rows = {row["name"]: row for row in chosen["layers"] if row["name"].startswith("metadata: ")}
    assert set(rows) == {"metadata: TFLite Model Metadata", "metadata: labels.txt", "metadata: tensor names (compressed)"}
    assert rows["metadata: labels.txt"]["bytes"] == len(("\n".join(LABELS) + "\n").encode())
    assert 200 < rows["metadata: TFLite Model Metadata"]["bytes"] < 2000
    assert "metadata: TFLite Model Metadata" in (built_example / "dist" / "report.html").read_text()

    bare = without_metadata(bundle, tmp_path / "bare.tflite")
    assert bare.stat().st_size < bundle.stat().st_size
    backend = default_registry().backends["tflite"]
    inputs = [np.load(built_example / "examples" / "digits" / "eval.npz")["x"]]
    shipped = backend.predict(bundle, inputs).outputs
    plain = backend.predict(bare, inputs).outputs
    assert set(shipped) == set(plain) == {"output_0"} and len(shipped["output_0"]) == len(inputs[0])
    assert np.array_equal(shipped["output_0"], plain["output_0"])


def test_every_android_candidate_keeps_running_with_metadata(built_example):
    """Blockwise int4 bundles re-packed with MediaPipe's older schema lose their block scales and no
    longer load; every candidate of the example must evaluate."""
    android = read_report(built_example)["targets"][0]
    statuses = {c["technique"]: c["status"] for c in android["candidates"] if "not_evaluated" not in c}
    assert statuses["int4-blockwise64"] in ("pass", "fail") and "error" not in statuses.values(), statuses


def test_ios_bundle_is_a_classifier_with_an_image_input(built_example):
    report = read_report(built_example)
    ios = report["targets"][1]
    spec, ops = coreml_spec(built_example / ios["chosen"]["path"])
    (image,) = spec.description.input
    assert image.name == "x" and image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.width, image.type.imageType.height) == (8, 8)
    scale = next(op for op in ops if op.name == "x__scaled__")
    assert float(np.asarray(scale.inputs["y"].val).reshape(-1)[0]) == pytest.approx(1 / 255)
    assert not any(op.name == "x__biased__" for op in ops)   # mean 0: no bias to add
    assert spec.description.predictedFeatureName == "classLabel"
    classify = next(op for op in ops if op.op_type == "classify")
    assert [str(label) for label in classify.inputs["classes"].val] == LABELS
    assert [o.name for o in spec.description.output] == ["classLabel", spec.description.predictedProbabilitiesName]
    metadata = spec.description.metadata
    assert (metadata.author, metadata.license, metadata.versionString) == ("edgebuild examples", "Apache-2.0", "1.0")
    assert "grayscale image, 8x8; the model sees (pixel - [0.0]) / [255.0]" == image.shortDescription
    # Evaluation on Linux still runs (the torch simulation is fed the normalized values).
    assert ios["chosen"]["metric"] >= ios["accuracy"]["threshold"]

    swift = (built_example / "dist" / "ios" / "Sources" / "DigitsModel" / "DigitsModel.swift").read_text()
    assert 'public static let classLabels: [String] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]' in swift
    assert re.search(r'public static let x: \(scale: Double, bias: \[Double\]\) = \(0\.0039\d*, \[0\.0\]\)', swift)
    assert 'public static let classLabel = "classLabel"' in swift


def test_kotlin_object_names_the_labels_and_normalization(built_example):
    kotlin = (built_example / "dist" / "android" / "DigitsModel.kt").read_text()
    assert 'const val OUTPUT_0_LABELS_FILE: String = "labels.txt"' in kotlin
    assert "const val OUTPUT_0_LABEL_COUNT: Int = 10" in kotlin
    assert "val INPUT_0_NORM_STD: FloatArray = floatArrayOf(255.0f)" in kotlin


def test_a_label_edit_rebuilds_the_bundles_but_not_the_export(built_copy):
    labels = built_copy / "examples" / "digits" / "labels.txt"
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    labels.write_text("\n".join(names) + "\n")
    result = run_edgebuild("build", cwd=built_copy)
    assert result.returncode == 0, result.stderr
    assert "▶ export" not in result.stderr and "▶ convert:tflite" in result.stderr
    assert tflite_metadata(built_copy / "dist" / "android" / "digits.tflite")["files"]["labels.txt"].split() == names
    spec, ops = coreml_spec(built_copy / read_report(built_copy)["targets"][1]["chosen"]["path"])
    assert [str(v) for v in next(op for op in ops if op.op_type == "classify").inputs["classes"].val] == names


def test_a_wrong_label_count_exits_2_naming_the_file_and_the_class_count(tmp_path):
    manifest = make_project(tmp_path)
    (tmp_path / "examples" / "digits" / "labels.txt").write_text("\n".join(LABELS[:9]) + "\n")
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = next(line for line in result.stderr.splitlines() if "labels" in line)
    assert re.match(r"edgebuild\.yaml:\d+:\d+: model\.labels: examples/digits/labels\.txt has 9 labels, but output "
                    r"'output_0' has 10 classes \(shape \[1, 10\]\)", line), result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "dist").exists()
    assert manifest.is_file()


@pytest.mark.parametrize("change, message", [
    ({"labels": {"face": "examples/digits/labels.txt"}, "outputs": ["digit"]},
     "model.labels.face: unknown output 'face' (model.outputs: digit)"),
    ({"labels": "examples/digits/nope.txt"}, "model.labels: file 'examples/digits/nope.txt' not found"),
    ({"inputs": {"x": {"kind": "audio", "mean": [0], "std": [1]}}}, "model.inputs.x.kind: unknown input kind 'audio'"),
    ({"inputs": {"x": {"kind": "image", "mean": [0], "std": [0]}}}, "model.inputs.x.std: every std must be above 0"),
    ({"inputs": {"x": {"kind": "image", "mean": [0, 1], "std": [1, 2, 3]}}}, "model.inputs.x.std: mean has 2 values"),
    ({"inputs": {"x": {"kind": "image", "mean": [0], "std": [1], "range": [255, 0]}}},
     "model.inputs.x.range: LOW must be below HIGH"),
    ({"inputs": {"x": {"kind": "image", "layout": "CHW", "mean": [0], "std": [1]}}},
     "model.inputs.x.layout: unknown layout 'CHW'"),
])
def test_interface_fields_are_validated_with_their_location(tmp_path, change, message):
    manifest = example_manifest()
    manifest["model"] = {**manifest["model"], **change}
    make_project(tmp_path, manifest)
    result = run_edgebuild("validate", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "edgebuild.yaml:" in result.stderr, result.stderr


@pytest.mark.parametrize("content, message", [
    ("", "labels file 'examples/digits/labels.txt' is empty"),
    ("a\n\nb\n", "labels file 'examples/digits/labels.txt': line 2 is empty"),
    ("a\nb\na\n", "labels file 'examples/digits/labels.txt': line 3 repeats label 'a'"),
])
def test_a_bad_labels_file_is_refused_at_validation(tmp_path, content, message):
    make_project(tmp_path)
    (tmp_path / "examples" / "digits" / "labels.txt").write_text(content)
    result = run_edgebuild("validate", cwd=tmp_path)
    assert result.returncode == 2 and f"model.labels: {message}" in result.stderr, result.stderr


TWO_HEADS = '''
import torch
from torch import nn


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.kind = nn.Linear(4 * 6 * 6, 3)
        self.size = nn.Linear(4 * 6 * 6, 2)

    def forward(self, image):
        h = torch.relu(self.body(image)).flatten(1)
        return {"kind": self.kind(h), "size": self.size(h)}
'''


def test_several_labelled_outputs_and_an_rgb_image_in_both_formats(tmp_path):
    """Labels per output name: TFLite packs a file per output; Core ML makes the first labelled
    output (in the model's order) its classifier and keeps the other's labels in its metadata."""
    import importlib.util

    import torch

    from edgebuild.api import ImageInput, ModelInterface
    from edgebuild.plugins import default_registry

    source = tmp_path / "two_heads.py"
    source.write_text(TWO_HEADS)
    spec = importlib.util.spec_from_file_location("two_heads", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.TwoHeads().eval()
    example = (torch.rand(1, 3, 6, 6),)
    program = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(net, example), str(program))
    interface = ModelInterface("heads", "two heads", "2", "me", "MIT",
                               {"image": ImageInput("NCHW", (127.5, 127.5, 127.5), (127.5,), (0.0, 255.0))},
                               {"size": ("small", "large"), "kind": ("cat", "dog", "bird")})
    registry = default_registry()

    tflite = tmp_path / "heads.tflite"
    registry.backends["tflite"].convert(program, tflite, {"model": interface.to_json()})
    found = tflite_metadata(tflite)
    assert found["files"] == {"labels_kind.txt": "cat\ndog\nbird\n", "labels_size.txt": "small\nlarge\n"}
    outputs = {o["name"]: o for o in found["json"]["subgraph_metadata"][0]["output_tensor_metadata"]}
    assert [f["name"] for f in outputs["kind"]["associated_files"]] == ["labels_kind.txt"]
    assert [f["name"] for f in outputs["size"]["associated_files"]] == ["labels_size.txt"]
    (image,) = found["json"]["subgraph_metadata"][0]["input_tensor_metadata"]
    assert image["process_units"][0]["options"] == {"mean": [127.5] * 3, "std": [127.5] * 3}
    assert image["content"]["content_properties"]["color_space"] == "RGB"
    assert image["stats"] == {"max": [1.0] * 3, "min": [-1.0] * 3}

    package = tmp_path / "heads.mlpackage"
    coreml = registry.backends["coreml"]
    coreml.convert(program, package, {"min_ios": 16, "model": interface.to_json()})
    spec, ops = coreml_spec(package)
    assert spec.description.input[0].type.imageType.colorSpace == spec.description.input[0].type.imageType.RGB
    assert [float(v) for v in np.asarray(next(op for op in ops if op.name == "image__biased__").inputs["y"].val)
            .reshape(-1)] == [-1.0, -1.0, -1.0]
    # The classifier's scores keep the output's own name, which the evaluation and TFLite use.
    assert spec.description.predictedProbabilitiesName == "kind"
    assert sorted(o.name for o in spec.description.output) == ["classLabel", "kind", "size"]
    assert json.loads(spec.description.metadata.userDefined["edgebuild.labels.size"]) == ["small", "large"]
    described = coreml.describe(package)
    assert described["classifier"] == {"label_output": "classLabel", "scores_output": "kind",
                                       "labels": ["cat", "dog", "bird"]}
    assert next(o for o in described["outputs"] if o["name"] == "size")["labels"] == ["small", "large"]
    assert "labels" not in next(o for o in described["outputs"] if o["name"] == "kind")
    # The weights-exact simulation still maps every parameter by name.
    simulated = coreml.predict(package, [example[0].numpy()], exported_program=program)
    assert simulated.details["unmapped_parameters"] == [] and len(simulated.outputs) == 2


def test_core_ml_refuses_an_image_range_it_cannot_express(tmp_path):
    manifest = example_manifest()
    manifest["model"]["inputs"] = {"x": {"kind": "image", "mean": [0], "std": [255], "range": [0, 1]}}
    make_project(tmp_path, manifest)
    result = run_edgebuild("build", "--platform", "ios", cwd=tmp_path)
    assert result.returncode == 3, result.stderr
    assert "model.inputs.x.range: Core ML image inputs are 8-bit pixels, [0, 255]; got [0.0, 1.0]" in result.stderr
    assert not (tmp_path / "dist" / "ios").exists()


def test_an_nhwc_image_input_in_both_formats(tmp_path):
    """A model that takes channel-last images (what MediaPipe Tasks feeds) keeps them channel-last."""
    import torch

    from edgebuild.api import ImageInput, ModelInterface
    from edgebuild.plugins import default_registry

    class ChannelLast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Linear(4 * 4 * 4, 3)

        def forward(self, image):
            return self.head(torch.relu(self.conv(image.permute(0, 3, 1, 2))).flatten(1))

    example = (torch.rand(1, 6, 6, 3),)
    program = tmp_path / "nhwc.pt2"
    torch.export.save(torch.export.export(ChannelLast().eval(), example), str(program))
    interface = ModelInterface("nhwc", images={"image": ImageInput("NHWC", (127.5,), (127.5,), (0.0, 255.0))},
                               labels={"": ("a", "b", "c")})
    registry = default_registry()
    tflite = tmp_path / "nhwc.tflite"
    registry.backends["tflite"].convert(program, tflite, {"model": interface.to_json()})
    (image,) = tflite_metadata(tflite)["json"]["subgraph_metadata"][0]["input_tensor_metadata"]
    assert image["content"]["content_properties"]["color_space"] == "RGB" and image["stats"]["min"] == [-1.0] * 3
    assert registry.backends["tflite"].describe(tflite)["inputs"][0]["shape"] == [1, 6, 6, 3]

    package = tmp_path / "nhwc.mlpackage"
    coreml = registry.backends["coreml"]
    coreml.convert(program, package, {"min_ios": 16, "model": interface.to_json()})
    (described,) = coreml.describe(package)["inputs"]
    assert (described["kind"], described["shape"], described["dtype"]) == ("image", [6, 6], "rgb")
    assert described["bias"] == [-1.0, -1.0, -1.0] and described["scale"] == pytest.approx(1 / 127.5)
    simulated = coreml.predict(package, [example[0].numpy()], exported_program=program)
    assert simulated.details["unmapped_parameters"] == []
