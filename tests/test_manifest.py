"""Manifest validation: every bad manifest exits 2 with one `FILE:LINE:COL: field: reason` line."""
import pytest

from edgebuild.cli import main
from tests.conftest import make_project, run_edgebuild

GOOD = """\
version: 1
model:
  name: digits
  source: python
  entry: examples/digits/model.py:build
data:
  calibration: examples/digits/calib.npz
  evaluation: examples/digits/eval.npz
metric: top1
targets:
  - name: android
    format: tflite
    devices: [pixel-7]
    budget:
      size: 60KB
    accuracy:
      max_drop: 0.01
output: dist
"""


def validate(tmp_path, text, capsys):
    path = make_project(tmp_path, text)
    code = main(["validate", "-f", str(path)])
    err = capsys.readouterr().err.strip()
    return code, err.replace(str(path), "edgebuild.yaml")


def test_valid_manifest_passes(tmp_path, capsys):
    path = make_project(tmp_path, GOOD)
    assert main(["validate", "-f", str(path)]) == 0
    assert "valid (1 target: android)" in capsys.readouterr().err


@pytest.mark.parametrize("old, new, expected", [
    ("version: 1", "version: 2", "edgebuild.yaml:1:10: version: unsupported version 2; this edgebuild reads version 1"),
    ("  name: digits", "  nmae: digits",
     "edgebuild.yaml:3:3: model.nmae: unknown key; did you mean 'name'?"),
    ("    budget:", "    budgt:", "edgebuild.yaml:14:5: targets[0].budgt: unknown key; did you mean 'budget'?"),
    ("devices: [pixel-7]", "devices: [pixel-77]",
     "edgebuild.yaml:13:15: targets[0].devices[0]: unknown device 'pixel-77'; closest: pixel-7, pixel-7a"),
    ("devices: [pixel-7]", "devices: [iphone-15]",
     "edgebuild.yaml:13:15: targets[0].devices[0]: device 'iphone-15' is an ios device; format 'tflite' targets android"),
    ("size: 60KB", "size: 60000", "edgebuild.yaml:15:13: targets[0].budget.size: expected a size with a unit such as '40KB' or '2MiB', got 60000"),
    ("size: 60KB", "size: -5KB", "edgebuild.yaml:15:13: targets[0].budget.size: expected a size with a unit such as '40KB' or '2MiB', got '-5KB'"),
    ("max_drop: 0.01", "max_drop: 1.5", "edgebuild.yaml:17:17: targets[0].accuracy.max_drop: must be between 0.0 and 1.0, got 1.5"),
    ("max_drop: 0.01", "floor: high", "edgebuild.yaml:17:14: targets[0].accuracy.floor: expected a number, got a string 'high'"),
    ("format: tflite", "format: tflight", "edgebuild.yaml:12:13: targets[0].format: unknown format 'tflight'; did you mean 'tflite'? (available: coreml, tflite)"),
    ("metric: top1", "metric: top5", "edgebuild.yaml:9:9: metric: unknown metric 'top5'; did you mean 'top1'? (available: agreement, kl, perplexity, sqnr, token_agreement, top1)"),
    ("evaluation: examples/digits/eval.npz", "evaluation: examples/digits/missing.npz",
     "edgebuild.yaml:8:15: data.evaluation: file 'examples/digits/missing.npz' not found"),
    ("evaluation: examples/digits/eval.npz", "evaluation: ../outside.npz",
     "edgebuild.yaml:8:15: data.evaluation: path '../outside.npz' is outside the project folder"),
    ("output: dist", "output: ../dist", "edgebuild.yaml:18:9: output: path '../dist' is outside the project folder"),
    ("output: dist", "output: .", "edgebuild.yaml:18:9: output: output '.' must be a folder of its own inside the project"),
    ("entry: examples/digits/model.py:build", "entry: examples/digits/model.py",
     "edgebuild.yaml:5:10: model.entry: expected FILE.py:FUNCTION, got 'examples/digits/model.py'"),
    ("  source: python", "  source: onnx",
     "edgebuild.yaml:4:11: model.source: unknown model source 'onnx' (available: hf, python, torch-export, torchscript)"),
    ("    accuracy:\n      max_drop: 0.01\n", "    accuracy:\n      max_drop: 0.01\n      floor: 0.9\n",
     "edgebuild.yaml:17:7: targets[0].accuracy: give exactly one of 'max_drop' or 'floor'"),
    ("  name: digits\n", "  name: digits\n  name: other\n", "edgebuild.yaml:4:3: model.name: duplicate key"),
    ("  source: python", "  source: [python", "edgebuild.yaml:5:8: invalid YAML: expected ',' or ']', but got ':'"),
])
def test_bad_manifest_is_one_exact_line(tmp_path, capsys, old, new, expected):
    assert old in GOOD
    code, err = validate(tmp_path, GOOD.replace(old, new, 1), capsys)
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(expected), f"{err!r} != {expected!r}"


def test_missing_required_key_points_at_parent(tmp_path, capsys):
    code, err = validate(tmp_path, GOOD.replace("  name: digits\n", ""), capsys)
    assert (code, err) == (2, "edgebuild.yaml:3:3: model.name: required key is missing")


def test_duplicate_target_names(tmp_path, capsys):
    text = GOOD.replace("output: dist\n", "") + """\
  - name: android
    format: tflite
    devices: [pixel-8]
    accuracy: {floor: 0.9}
"""
    code, err = validate(tmp_path, text, capsys)
    assert (code, err) == (2, "edgebuild.yaml:18:11: targets[1].name: duplicate target name 'android'")


def test_empty_target_list(tmp_path, capsys):
    text = GOOD[:GOOD.index("targets:")] + "targets: []\noutput: dist\n"
    code, err = validate(tmp_path, text, capsys)
    assert (code, err) == (2, "edgebuild.yaml:10:10: targets: expected a non-empty list of targets, got a list")


def test_empty_manifest(tmp_path, capsys):
    code, err = validate(tmp_path, "", capsys)
    assert (code, err) == (2, "edgebuild.yaml:1:1: manifest is empty")


def test_sqnr_takes_a_floor_not_a_drop(tmp_path, capsys):
    code, err = validate(tmp_path, GOOD.replace("metric: top1", "metric: sqnr"), capsys)
    assert code == 2
    assert err == "edgebuild.yaml:17:7: targets[0].accuracy.max_drop: metric 'sqnr' has no fp32 baseline to drop from; use 'floor'"


def test_missing_manifest_file(tmp_path, capsys):
    assert main(["validate", "-f", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"{tmp_path / 'nope.yaml'}: manifest not found"


def test_cli_prints_no_traceback_and_exits_2(tmp_path):
    make_project(tmp_path, GOOD.replace("devices: [pixel-7]", "devices: [pixle-7]"))
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("edgebuild.yaml:13:15: targets[0].devices[0]: unknown device 'pixle-7'; "
                                     "closest: pixel-7, pixel-7a, pixel-9")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "dist").exists() and not (tmp_path / ".edgebuild").exists()


def test_unknown_target_on_command_line(tmp_path, capsys):
    path = make_project(tmp_path, GOOD)
    assert main(["build", "-f", str(path), "--target", "ios"]) == 2
    assert capsys.readouterr().err.strip() == "--target: unknown target 'ios' (targets: android)"


@pytest.mark.parametrize("extra, expected", [
    ("    delivery: cdn\n", "edgebuild.yaml:18:15: targets[0].delivery: unknown delivery 'cdn' (available: asset-pack, base, feature)"),
    ("    android: {kotlin_package: Com.Example}\n",
     "edgebuild.yaml:18:31: targets[0].android.kotlin_package: invalid value 'Com.Example' (for example 'com.example.models')"),
    ("    android: {assets_dir: ../models}\n",
     "edgebuild.yaml:18:27: targets[0].android.assets_dir: invalid value '../models' (for example 'models/vision')"),
    ("    android: {loops: unroled}\n",
     "edgebuild.yaml:18:22: targets[0].android.loops: unknown loops 'unroled'; did you mean 'unrolled'? (available: rolled, unrolled)"),
])
def test_android_delivery_and_packaging_settings(tmp_path, capsys, extra, expected):
    code, err = validate(tmp_path, GOOD.replace("output: dist\n", extra), capsys)
    assert (code, err) == (2, expected)


def test_android_settings_default(tmp_path):
    from edgebuild.manifest import load_manifest
    from edgebuild.plugins import default_registry

    manifest = load_manifest(make_project(tmp_path, GOOD), default_registry())
    assert manifest.targets[0].delivery == "base"
    assert manifest.targets[0].android == {"assets_dir": "models", "kotlin_package": "edgebuild.models"}


def test_a_fixed_loop_form_is_a_conversion_variant_of_its_own(tmp_path):
    """`android: {loops: unrolled | rolled}` fixes how a recurrent net's steps ship: candidates of
    their own, and no faster form of a technique runs (unset, a latency budget asks for them)."""
    from edgebuild.manifest import load_manifest
    from edgebuild.plugins import default_registry

    registry = default_registry()
    backend = registry.backends["tflite"]
    [faster] = [t for t in registry.techniques_for("tflite") if t.name == "int8-weight-only-unrolled"]
    for form in ("unrolled", "rolled"):
        text = GOOD.replace("output: dist\n", f"    android: {{loops: {form}}}\n")
        manifest = load_manifest(make_project(tmp_path / form, text), registry)
        key, options = backend.variant(manifest.targets[0])
        assert (key, options) == (f"tflite-{form}", {"loops": form})
        assert backend.skip_reason(faster, options) == f"android.loops is {form}: the steps ship that way only"
    manifest = load_manifest(make_project(tmp_path / "default", GOOD), registry)
    assert backend.variant(manifest.targets[0]) == ("tflite", {})
    assert backend.skip_reason(faster, {}) is None


def test_min_ios_cannot_exclude_a_listed_device(tmp_path, capsys):
    text = GOOD.replace("output: dist\n", """\
  - name: ios
    format: coreml
    devices: [iphone-15, iphone-x]
    min_ios: 17
    accuracy: {floor: 0.9}
""")
    code, err = validate(tmp_path, text, capsys)
    assert (code, err) == (2, "edgebuild.yaml:21:14: targets[1].min_ios: device 'iphone-x' runs at most iOS 16; "
                              "min_ios 17 would exclude it")


@pytest.mark.parametrize("block, expected", [
    ("search: {strategy: greedy}", "edgebuild.yaml:19:20: search.strategy: unknown search strategy 'greedy' "
                                   "(available: exhaustive, sensitivity, uniform)"),
    ("search: {max_evaluations: 0}", "edgebuild.yaml:19:27: search.max_evaluations: expected a whole number from 1 to 100000, got 0"),
    ("search: {max_time: soon}", "edgebuild.yaml:19:20: search.max_time: expected a duration such as 90s, 5m or 1h, got 'soon'"),
    ("search: {precisions: [int3]}", "edgebuild.yaml:19:23: search.precisions[0]: unknown precision 'int3'; did you "
                                     "mean 'int8'? (available: fp16, int4, int4-block32, int8, pal2, pal3, pal4, pal6, pal8)"),
    ("search: {techniques: [int9-magic]}", "edgebuild.yaml:19:23: search.techniques[0]: unknown technique 'int9-magic'"),
    ("search: {sensitivity: simulated}", "edgebuild.yaml:19:23: search.sensitivity: unknown sensitivity "
                                         "measurement 'simulated' (available: auto, runtime, torch)"),
])
def test_search_block_is_validated(tmp_path, capsys, block, expected):
    code, err = validate(tmp_path, GOOD + block + "\n", capsys)
    assert code == 2 and err.startswith(expected), err


def test_search_settings_parse(tmp_path):
    from edgebuild.manifest import load_manifest
    from edgebuild.plugins import default_registry

    text = GOOD + "search: {strategy: exhaustive, max_time: 5m, precisions: [fp16, int4], sensitivity: runtime}\n"
    manifest = load_manifest(make_project(tmp_path, text), default_registry())
    assert manifest.search == {"strategy": "exhaustive", "max_evaluations": 12, "max_time": 300.0,
                               "precisions": ["fp16", "int4"], "sensitivity": "runtime"}


@pytest.mark.parametrize("extra, expected", [
    ("    qat: sometimes\n", "edgebuild.yaml:18:10: targets[0].qat: unknown qat mode 'sometimes'"),
    ("    qat: {trainable: first:2}\n", "edgebuild.yaml:18:22: targets[0].qat.trainable: expected 'all' or 'last:N', got 'first:2'"),
    ("    qat: {epochs: 0}\n", "edgebuild.yaml:18:19: targets[0].qat.epochs: expected a whole number from 1 to 10000, got 0"),
])
def test_qat_settings_are_validated(tmp_path, capsys, extra, expected):
    code, err = validate(tmp_path, GOOD.replace("output: dist\n", extra), capsys)
    assert code == 2 and err.startswith(expected), err


def test_inputs_prints_what_a_build_reads_and_where_bundles_land(tmp_path, capsys, monkeypatch):
    """`edgebuild inputs` is what the Gradle hook's up-to-date check reads: every file a build reads,
    and each selected target's folder."""
    import json

    make_project(tmp_path)
    (tmp_path / "notes.txt").write_text("not read by the build\n")
    monkeypatch.chdir(tmp_path)
    assert main(["inputs", "--platform", "android"]) == 0
    plan = json.loads(capsys.readouterr().out)
    digits = tmp_path / "examples" / "digits"
    assert plan == {
        "manifest": str(tmp_path / "edgebuild.yaml"),
        # The python entry's whole folder (weights, sibling modules), the data and the manifest.
        "inputs": sorted(str(p) for p in [tmp_path / "edgebuild.yaml", *digits.iterdir()]),
        "output": str(tmp_path / "dist"),
        "targets": [{"name": "android", "format": "tflite", "platform": "android",
                     "directory": str(tmp_path / "dist" / "android"), "assets_dir": "models"}],
    }
    assert main(["inputs"]) == 0
    assert [t["name"] for t in json.loads(capsys.readouterr().out)["targets"]] == ["android", "ios"]
