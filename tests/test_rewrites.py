"""Weights stored once: graph rewrites before export, and copies that remain found and reported.

The MTCNN pattern (a Linear followed by PReLU) is the case issue #17 measured: the converter lowers
PReLU as relu(x) - alpha * relu(-x) and folds the negation into a second, negated copy of the
Linear's weight. The built-in rewrite `prelu-as-select` prevents it; switched off, the copy is
found in every candidate and named in every report format.
"""
import json
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, read_report, run_edgebuild
from edgebuild.weights import find_copies, relation

MTCNN_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.prelu1 = nn.PReLU(8)
        self.dense = nn.Linear(8 * 8 * 8, 256)
        self.prelu2 = nn.PReLU(256)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.prelu2(self.dense(self.prelu1(self.conv(x)).flatten(1))))


def build():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.3, 0.3)  # negative slopes too: the select must keep their sign
    return model, (torch.zeros(1, 1, 8, 8),)
'''


def _project(root: Path, rewrites: dict | None = None, plugins: list | None = None) -> Path:
    (root / "net").mkdir(parents=True)
    (root / "net" / "model.py").write_text(MTCNN_MODEL)
    shutil.copy(REPO / "examples" / "digits" / "eval.npz", root / "net" / "eval.npz")
    model = {"name": "mtcnn", "source": "python", "entry": "net/model.py:build"}
    if rewrites is not None:
        model["rewrites"] = rewrites
    manifest = {"version": 1, "model": model, "data": {"evaluation": "net/eval.npz"}, "metric": "sqnr",
                "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"],
                             "accuracy": {"floor": 20}}],
                "search": {"techniques": ["int8-weight-only"]}, "reports": ["json", "md", "html", "junit"]}
    if plugins:
        manifest["plugins"] = plugins
    (root / "edgebuild.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return root


def _dense_buffers(bundle: Path) -> list[str]:
    """Stored tensors holding 256x512 values: the dense layer's weight, however often it is stored."""
    from edgebuild_tflite.backend import stored_values

    return [name for name, count, _ in stored_values(bundle) if count == 256 * 8 * 8 * 8]


@pytest.mark.slow
def test_a_linear_followed_by_prelu_is_stored_once_and_a_remaining_copy_is_reported(tmp_path):
    on, off = _project(tmp_path / "on"), _project(tmp_path / "off", rewrites={"prelu-as-select": False})
    for project in (on, off):
        done = run_edgebuild("build", cwd=project)
        assert done.returncode == 0, done.stderr

    # Rewritten: one stored weight, in the fp32 conversion and in the shipped bundle.
    assert len(_dense_buffers(on / ".edgebuild" / "tflite" / "fp32.tflite")) == 1
    assert len(_dense_buffers(on / "dist" / "android" / "mtcnn.tflite")) == 1
    report = read_report(on)
    assert report["model"]["rewrites"] == [{
        "name": "prelu-as-select", "description": report["model"]["rewrites"][0]["description"],
        "changed": 2, "max_ulp": 0, "samples": 64}]
    assert report["targets"][0]["stored_twice"] == []
    assert "`prelu-as-select` (2 places, outputs within 0 ulp" in (on / "dist" / "report.md").read_text()

    # The fp32 outputs every candidate is judged against are the same bits with and without the rewrite.
    with np.load(on / ".edgebuild" / "model" / "reference.npz") as a, \
            np.load(off / ".edgebuild" / "model" / "reference.npz") as b:
        assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    # ... and the rewritten conversion runs to the same answers as the original one.
    from edgebuild_tflite.backend import TFLiteBackend

    with np.load(on / "net" / "eval.npz") as data:
        samples = (data["x"][:64],)
    backend = TFLiteBackend()
    outputs = [backend.predict(project / ".edgebuild" / "tflite" / "fp32.tflite", samples).outputs["output_0"]
               for project in (on, off)]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)

    # Switched off: the negated copy is there, in every candidate, and every report names it.
    assert len(_dense_buffers(off / "dist" / "android" / "mtcnn.tflite")) == 2
    report = read_report(off)
    assert report["model"]["rewrites"] == []
    target = report["targets"][0]
    evaluated = [c for c in target["candidates"] if c["status"] != "skipped"]
    assert {c["technique"] for c in evaluated} == {"int8-weight-only", "mixed-precision"} or len(evaluated) >= 1
    for candidate in evaluated:
        assert [(c["tensor"], c["copy_of"], c["relation"]) for c in candidate["copies"]] == [
            ("Linear_dense", "PReLU_prelu2", "negated")], candidate["technique"]
    [twice] = target["stored_twice"]
    line = f"android: stored twice: PReLU_prelu2 and Linear_dense (negated), 131,072 parameters, {twice['text'].rsplit(', ', 1)[1]}"
    assert twice["params"] == 131072 and twice["dtype"] == "int4" and line in report["warnings"]
    assert line in (off / "dist" / "report.md").read_text()
    assert line.split(": ", 1)[1] in (off / "dist" / "report.html").read_text()
    junit = ElementTree.parse(off / "dist" / "junit.xml")
    assert [p.get("value") for p in junit.iter("property") if p.get("name") == "stored_twice"] == [twice["text"]]
    # The search sees the weight and its copy as one layer with both copies' parameters.
    from edgebuild_tflite.backend import weighted_layers

    layers = {layer["name"]: layer for layer in weighted_layers(off / ".edgebuild" / "tflite" / "fp32.tflite")}
    assert "PReLU_prelu2" not in layers
    assert layers["Linear_dense"]["params"] == 2 * 131072
    assert layers["Linear_dense"]["copies"] == [{"name": "PReLU_prelu2", "relation": "negated"}]
    assert ("Linear_dense is stored twice (PReLU_prelu2 holds a negated copy): searched as one layer, both "
            "copies at one precision") in target["search"]["notes"]


INEXACT_REWRITE = '''
import torch

from edgebuild.api import GraphRewrite
from edgebuild.hookspecs import hookimpl
from edgebuild.rewriting import NodeReplacement, finish


def heavier_linears(program):
    """Not exact: scales every Linear's weight by 1.001 (it runs after the built-in PReLU rewrite)."""
    aten = torch.ops.aten
    changed = 0
    for node in list(program.graph.nodes):
        if node.op == "call_function" and node.target == aten.linear.default:
            x, weight, *rest = node.args
            with NodeReplacement(program, node) as call:
                call.result(call(aten.linear.default, x, call(aten.mul.Tensor, weight, 1.001), *rest))
            changed += 1
    finish(program)
    return changed


@hookimpl
def register_graph_rewrites(register):
    register(GraphRewrite("heavier-linears", heavier_linears, "a rewrite that changes answers"))
'''


def test_a_rewrite_that_changes_outputs_fails_the_export_and_leaves_no_output(tmp_path):
    project = _project(tmp_path, plugins=["rewrite_plugin.py"])
    (project / "rewrite_plugin.py").write_text(INEXACT_REWRITE)
    listed = run_edgebuild("plugins", "-f", "edgebuild.yaml", cwd=project)
    assert "graph rewrite heavier-linears" in listed.stdout and "graph rewrite prelu-as-select" in listed.stdout
    done = run_edgebuild("build", cwd=project)
    assert done.returncode == 3, done.stderr
    assert "graph rewrite 'heavier-linears' changed the model's outputs by" in done.stderr
    assert "model.rewrites: {heavier-linears: false}" in done.stderr and "Traceback" not in done.stderr
    assert not (project / "dist").exists()
    # Switched off in the manifest, the same project builds.
    manifest = yaml.safe_load((project / "edgebuild.yaml").read_text())
    manifest["model"]["rewrites"] = {"heavier-linears": False}
    manifest["search"]["techniques"] = ["fp32"]
    (project / "edgebuild.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    done = run_edgebuild("build", cwd=project)
    assert done.returncode == 0, done.stderr
    applied = json.loads((project / "dist" / "report.json").read_text())["model"]["rewrites"]
    assert [(r["name"], r["changed"]) for r in applied] == [("prelu-as-select", 2)]


BROKEN_REWRITE = '''
from edgebuild.api import GraphRewrite
from edgebuild.hookspecs import hookimpl


def explodes(program):
    raise RuntimeError("no such pattern")


@hookimpl
def register_graph_rewrites(register):
    register(GraphRewrite("explodes", explodes, "a rewrite that raises"))
'''


def test_a_rewrite_that_raises_fails_the_export_naming_it(tmp_path):
    project = _project(tmp_path, plugins=["rewrite_plugin.py"])
    (project / "rewrite_plugin.py").write_text(BROKEN_REWRITE)
    done = run_edgebuild("build", cwd=project)
    assert done.returncode == 3, done.stderr
    assert "graph rewrite 'explodes' failed:" in done.stderr and "no such pattern" in done.stderr
    assert "(switch it off with model.rewrites: {explodes: false})" in done.stderr and "Traceback" not in done.stderr
    assert not (project / "dist").exists()


@pytest.mark.parametrize("rewrites, message", [
    ({"prelu-as-selct": False}, "model.rewrites.prelu-as-selct: unknown key; did you mean 'prelu-as-select'?"),
    ({"prelu-as-select": "no"}, "model.rewrites.prelu-as-select: expected true or false, got a string 'no'"),
    (["prelu-as-select"], "model.rewrites: expected a mapping, got a list"),
])
def test_model_rewrites_are_validated_with_their_location(tmp_path, rewrites, message):
    project = _project(tmp_path, rewrites=rewrites)
    done = run_edgebuild("validate", cwd=project)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("edgebuild.yaml:7:") and message in line, line


def test_copies_are_found_by_relation_and_unrelated_tensors_are_not():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(64, 48)).astype(np.float32)
    conv = rng.normal(size=(16, 3, 3, 8)).astype(np.float32)
    assert relation(weight, weight.copy()) == "identical"
    assert relation(weight, -weight) == "negated"
    assert relation(weight, np.ascontiguousarray(weight.T)) == "transposed"
    assert relation(weight, -weight.T) == "negated transposed"
    assert relation(weight, np.float32(0.5) * weight) == "scaled by 0.5"
    assert relation(conv, np.moveaxis(conv, 0, -1)) == "transposed"
    assert relation(weight, rng.permutation(weight.ravel()).reshape(weight.shape)) is None  # same values, not a copy
    nearly = weight.copy()
    nearly[3, 7] = np.nextafter(nearly[3, 7], np.float32(np.inf))
    assert relation(weight, nearly) is None  # one ulp off is another tensor

    tensors = [("a", weight), ("b", rng.normal(size=(64, 48)).astype(np.float32)), ("a_negated", -weight),
               ("zeros", np.zeros((64, 48), np.float32)), ("zeros_again", np.zeros((64, 48), np.float32)),
               ("small", weight[:8, :8]), ("small_again", weight[:8, :8].copy()), ("a_t", weight.T.copy())]
    found = find_copies((name, values.size, lambda values=values: values) for name, values in tensors)
    assert [(c["tensor"], c["copy_of"], c["relation"]) for c in found] == [
        ("a_negated", "a", "negated"), ("a_t", "a", "transposed")]


TIED_LM = '''
import torch
from torch import nn


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.mix = nn.Linear(32, 32)
        self.lm_head = nn.Linear(32, 64, bias=False)
        self.lm_head.weight = self.embed.weight  # tied: one table, read by a lookup and a matmul

    def forward(self, tokens):
        return self.lm_head(torch.relu(self.mix(self.embed(tokens))))


def build():
    torch.manual_seed(0)
    return TiedLM().eval(), (torch.zeros(1, 8, dtype=torch.int64),)
'''


@pytest.mark.slow
def test_a_tied_embedding_is_one_layer_to_the_search_and_every_precision_compresses(tmp_path):
    """The lookup and lm_head read one buffer; the quantizer cannot give them two precisions (it
    failed on the first sensitivity probe), so the search sees one layer, stored once."""
    import torch

    from edgebuild.api import CompressInput
    from edgebuild_tflite.backend import TFLiteBackend, weighted_layers

    (tmp_path / "tied.py").write_text(TIED_LM)
    namespace = {}
    exec(compile(TIED_LM, "tied.py", "exec"), namespace)
    module, example = namespace["build"]()
    torch.export.save(torch.export.export(module, example), str(tmp_path / "tied.pt2"))
    backend, fp32 = TFLiteBackend(), tmp_path / "fp32.tflite"
    backend.convert(tmp_path / "tied.pt2", fp32, {})
    layers = weighted_layers(fp32)
    [table] = [layer for layer in layers if layer.get("shared_with")]
    assert table["op"] == "EMBEDDING_LOOKUP" and table["params"] == 64 * 32 and len(table["shared_with"]) == 1
    assert table["shared_with"][0] not in {layer["name"] for layer in layers}
    source = CompressInput(fp32_bundle=fp32, exported_program=tmp_path / "tied.pt2", calibration=None,
                           work_dir=tmp_path, options={})
    sizes = {}
    for precision in backend.default_precisions():
        out = tmp_path / f"{precision}.tflite"
        backend.compress(backend.mixed_technique({table["name"]: precision}, layers, "probe"), source, out)
        stored = [t for t in backend.weights(out) if t["shape"] == [64, 32]]
        assert len(stored) == 1, (precision, stored)  # still one table, at the precision asked
        sizes[precision] = stored[0]["bytes"]
    assert sizes["fp16"] == 64 * 32 * 2 and sizes["int8"] == 64 * 32 and sizes["int4"] == 64 * 32 // 2


TWICE = '''
import torch
from torch import nn


class Twice(nn.Module):
    """Two layers, one weight the other's negation: both converters store it twice. (Identical
    untied weights they store once.)"""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Linear(64, 48), nn.Linear(64, 48)
        with torch.no_grad():
            self.right.weight.copy_(-self.left.weight)

    def forward(self, x):
        return self.left(x) - self.right(torch.relu(x))
'''


@pytest.mark.slow
@pytest.mark.parametrize("fmt, options", [("tflite", {}), ("coreml", {"min_ios": 16, "model": {"name": "twice"}})])
def test_every_backend_that_reads_its_weights_back_finds_a_copy(tmp_path, fmt, options):
    import torch

    from edgebuild.api import WeightValuesBackend
    from edgebuild.plugins import default_registry

    namespace = {}
    exec(compile(TWICE, "twice.py", "exec"), namespace)
    torch.manual_seed(0)
    module = namespace["Twice"]().eval()
    program = tmp_path / "twice.pt2"
    torch.export.save(torch.export.export(module, (torch.zeros(1, 64),)), str(program))
    backend = default_registry().backends[fmt]
    assert isinstance(backend, WeightValuesBackend)
    bundle = tmp_path / f"fp32{backend.extension}"
    backend.convert(program, bundle, options)
    found = find_copies(backend.weight_values(bundle))
    assert [(c["relation"], c["params"]) for c in found] == [("negated", 64 * 48)]
    assert {found[0]["tensor"], found[0]["copy_of"]} == ({"Linear_left", "Linear_right"} if fmt == "tflite"
                                                         else {"left_weight", "right_weight"})
