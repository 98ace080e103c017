"""End-to-end builds with the real converter, quantizer and interpreter (no mocks)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import make_project, python_project, read_report, record_figure, run_edgebuild

pytestmark = pytest.mark.slow


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_manifest(root: Path, change) -> None:
    path = root / "edgebuild.yaml"
    manifest = yaml.safe_load(path.read_text())
    change(manifest)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))


def run_tflite_outside_edgebuild(bundle: Path, x: np.ndarray) -> np.ndarray:
    """Plain ai-edge-litert, written here independently of edgebuild's backend."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(bundle))
    interpreter.allocate_tensors()
    (input_detail,), (output_detail,) = interpreter.get_input_details(), interpreter.get_output_details()
    predictions = []
    for sample in x:
        value = sample[None]
        scale, zero_point = input_detail["quantization"]
        if input_detail["dtype"] != np.float32:
            value = np.clip(np.round(value / scale + zero_point), -128, 127).astype(input_detail["dtype"])
        interpreter.set_tensor(input_detail["index"], value)
        interpreter.invoke()
        out = interpreter.get_tensor(output_detail["index"])
        if output_detail["dtype"] != np.float32:
            scale, zero_point = output_detail["quantization"]
            out = (out.astype(np.float32) - zero_point) * scale
        predictions.append(out[0].argmax())
    return np.array(predictions)


def test_example_bundle_meets_budget_and_its_metric_reproduces(built_example):
    report = read_report(built_example)
    target = report["targets"][0]
    assert target["name"] == "android" and target["status"] == "pass"
    chosen = target["chosen"]
    bundle = built_example / chosen["path"]
    assert bundle == built_example / "dist" / "android" / "digits.tflite"
    assert bundle.stat().st_size == chosen["bytes"] <= target["budget"]["size"]
    assert chosen["download_bytes"] <= target["budget"]["download"]
    assert sha256(bundle) == chosen["sha256"]

    data = np.load(built_example / "examples" / "digits" / "eval.npz")
    accuracy = float(np.mean(run_tflite_outside_edgebuild(bundle, data["x"]) == data["y"]))
    assert abs(accuracy - chosen["metric"]) <= 0.001
    assert accuracy >= target["accuracy"]["threshold"]
    assert target["baseline"]["metric"] > 0.95

    by_name = {c["technique"]: c for c in target["candidates"]}
    # The example's budget is one fp32 and fp16 cannot meet but 8-bit can.
    assert [f["constraint"] for f in by_name["fp32"]["failed"]][:1] == ["size"]
    assert by_name["fp16"]["status"] == "fail"
    assert by_name["int8-dynamic"]["status"] == "pass"
    assert all(c["latency_ms"] > 0 for c in target["candidates"] if c["status"] != "skipped" and "not_evaluated" not in c)
    # Techniques for language models have nothing to act on in a CNN: skipped, with the reason.
    assert by_name["int4-blockwise32-int8-embeddings"]["status"] == "skipped"
    assert by_name["int4-blockwise32-int8-embeddings"]["reason"] == "no layer of this model matches '(?i)(embed|lm_head)'"
    assert {k["knob"] for k in target["comparisons"]} >= {"per-channel instead of per-tensor weight scales"}
    assert "| android (tflite) | ✅ pass |" in (built_example / "dist" / "report.md").read_text()


def test_noop_rebuild_reruns_nothing(built_copy):
    bundle = built_copy / "dist" / "android" / "digits.tflite"
    before = sha256(bundle)
    result = run_edgebuild("build", "--json", cwd=built_copy)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["executed"] == []
    assert "nothing changed" in result.stderr and "no conversion or evaluation rerun" in result.stderr
    assert sha256(bundle) == before


def test_changing_one_budget_reruns_only_that_target(built_copy):
    def add_second_target(manifest):
        manifest["targets"].append({"name": "lowend", "format": "tflite", "devices": ["galaxy-a14"],
                                    "budget": {"size": "50KB"}, "accuracy": {"floor": 0.95}})
    edit_manifest(built_copy, add_second_target)
    first = run_edgebuild("build", "--json", cwd=built_copy)
    assert first.returncode == 0, first.stderr
    assert set(json.loads(first.stdout)["executed"]) == {"search:lowend", "select:lowend", "package:lowend", "report", "lock"}

    edit_manifest(built_copy, lambda m: m["targets"][2]["budget"].update(size="40KB"))
    second = run_edgebuild("build", "--json", cwd=built_copy)
    assert second.returncode == 0, second.stderr
    assert set(json.loads(second.stdout)["executed"]) == {"search:lowend", "select:lowend", "package:lowend", "report", "lock"}
    assert read_report(built_copy)["targets"][2]["budget"]["size"] == 40_000


def test_impossible_budget_exits_1_with_reasons_per_candidate(built_copy):
    edit_manifest(built_copy, lambda m: m["targets"][0]["budget"].update(size="1KB"))
    result = run_edgebuild("build", cwd=built_copy)
    assert result.returncode == 1, result.stderr
    target, ios = read_report(built_copy)["targets"]
    assert ios["status"] == "pass"
    assert target["status"] == "fail" and target["chosen"] is None
    judged = [c for c in target["candidates"] if c["status"] != "skipped"]
    assert {c["technique"] for c in target["candidates"]} - {c["technique"] for c in judged} == {
        "int4-blockwise128", "int4-blockwise32-int8-embeddings"}  # blocks wider than a layer; no embeddings
    for candidate in judged:
        size = next(f for f in candidate["failed"] if f["constraint"] == "size")
        assert size["limit"] == 1000 and size["actual"] == candidate["bytes"] > 1000
        assert f"{candidate['technique']}: size {candidate['bytes']} B > limit 1000 B" in result.stderr
    assert not (built_copy / "dist" / "android").exists()  # no stale bundle that no longer fits


def test_floor_failures_name_limit_and_actual(built_copy):
    # Within 30 KB only 4-bit candidates fit, and none reaches 0.999 top1 (the best reach 358/360):
    # the target fails on its floor alone.
    edit_manifest(built_copy, lambda m: m["targets"][0].update(accuracy={"floor": 0.999}) or
                  m["targets"][0]["budget"].update(size="30KB"))
    result = run_edgebuild("build", cwd=built_copy)
    assert result.returncode == 1, result.stderr
    target = read_report(built_copy)["targets"][0]
    assert target["status"] == "fail" and target["chosen"] is None
    fitting = [c for c in target["candidates"] if c["status"] == "fail" and c["bytes"] <= 30_000]
    assert {c["technique"] for c in fitting} >= {"int4-weight-only", "int4-weight-only-mse"}
    for candidate in fitting:
        assert candidate["failed"] == [{"constraint": "accuracy", "status": "fail", "limit": 0.999,
                                        "actual": candidate["metric"]}]
        assert f"{candidate['technique']}: accuracy {candidate['metric']:.4f} < floor 0.9990" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("edgebuild.yaml: target android: no candidate meets every budget and the floor; nearest: ")
    assert "accuracy 0.99" in last and "< floor 0.9990" in last


REJECTED_MODEL = '''
import torch

class Gaussianize(torch.nn.Module):
    def forward(self, x):
        return torch.special.erfinv(x * 0.5)

def build():
    return Gaussianize().eval(), (torch.zeros(1, 4),)
'''


def test_model_the_converter_rejects_exits_3_naming_the_op(tmp_path):
    python_project(tmp_path, "gauss", REJECTED_MODEL, metric="sqnr", floor=30,
                   samples=np.random.default_rng(0).uniform(-1, 1, (8, 4)).astype(np.float32))
    result = run_edgebuild("build", cwd=tmp_path)
    assert result.returncode == 3
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stage convert, target android: litert-torch cannot convert op aten.erfinv.default")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "dist" / "android").exists()


def test_labels_that_do_not_fit_the_outputs_exit_2(built_copy):
    data = dict(np.load(built_copy / "examples" / "digits" / "eval.npz"))
    count = len(data["y"])
    np.savez(built_copy / "examples" / "digits" / "eval.npz", x=data["x"], y=np.stack([data["y"], data["y"]], 1))
    result = run_edgebuild("build", cwd=built_copy)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"examples/digits/eval.npz: array 'y' has shape ({count}, 2) dtype int64; metric top1 takes one integer "
        f"class per sample for output output_0 [{count}, 10]")
    assert "Traceback" not in result.stderr


def test_eval_data_that_does_not_fit_the_model_exits_2(built_copy):
    np.savez(built_copy / "examples" / "digits" / "eval.npz", x=np.zeros((10, 64), np.float32), y=np.zeros(10, int))
    result = run_edgebuild("build", cwd=built_copy)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "examples/digits/eval.npz: array 'x' has shape (10, 64); model input 'x' takes (N, 1, 8, 8)")


def test_nan_calibration_data_exits_2(built_copy):
    x = np.load(built_copy / "examples" / "digits" / "calib.npz")["x"].copy()
    x[3, 0, 2, 2] = np.nan
    np.savez(built_copy / "examples" / "digits" / "calib.npz", x=x)
    result = run_edgebuild("build", cwd=built_copy)
    assert result.returncode == 2
    assert "examples/digits/calib.npz: array 'x' holds 1 NaN or infinite values" in result.stderr


def most_stages_at_once(stderr: str) -> int:
    """The most stages running at one time, from the progress lines a build printed."""
    running, most = set(), 0
    for line in stderr.splitlines():
        if line.startswith("▶ "):
            running.add(line[2:].strip())
            most = max(most, len(running))
        elif line.strip().startswith(("done ", "failed ")):
            running.discard(line.split()[1])
    return most


def test_two_clean_builds_are_byte_identical(built_example, tmp_path):
    """The session's example build ran its stages in parallel where it could (by default, as many
    as cores and memory allow); this one runs one stage at a time, on one core."""
    make_project(tmp_path)
    result = run_edgebuild("build", "--jobs", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert most_stages_at_once(result.stderr) == 1
    # Every file of every target folder; the reports at the top of dist/ are compared below.
    files = sorted(p.relative_to(built_example) for p in (built_example / "dist").rglob("*")
                   if p.is_file() and p.parent != built_example / "dist")
    assert len(files) > 5 and any(".mlpackage" in str(p) for p in files)
    for name in files:  # every bundle file, Core ML packages included
        assert sha256(tmp_path / name) == sha256(built_example / name), name
    record_figure(f"reproducibility: two clean builds (parallel stages, --jobs 1), {len(files)} bundle files (all targets), "
                  f"{sum(sha256(tmp_path / n) == sha256(built_example / n) for n in files)} identical sha256")

    def without_timings(report):
        """Drop the fields the schema documents as timings."""
        for target in report["targets"]:
            target.pop("built_at")
            for entry in [target["chosen"], *target["candidates"], *target.get("search", {}).get("evaluated", [])]:
                entry.pop("latency_ms", None)
                entry.pop("latency", None)
            target.get("search", {}).pop("seconds", None)
            for row in target.get("comparisons", []):
                row.pop("latency_delta_ms")
        return report
    assert without_timings(read_report(tmp_path)) == without_timings(read_report(built_example))


def test_independent_stages_run_at_once_within_the_memory(built_copy):
    """After every candidate record is deleted, the rebuild reruns compress and evaluate stages:
    two at a time with two cores, one at a time when the memory given holds one stage; the same
    bundles either way."""
    before = {p: sha256(p) for p in sorted((built_copy / "dist").rglob("*")) if p.is_file()
              and p.parent != built_copy / "dist"}
    runs = {}
    for name, env in (("two cores", {}), ("memory for one stage", {"EDGEBUILD_MEMORY": str(2 << 30)})):
        for record in (built_copy / ".edgebuild").glob("*/candidates/*.json"):
            record.unlink()
        result = run_edgebuild("build", "--jobs", "2", cwd=built_copy, env=env)
        assert result.returncode == 0, result.stderr
        assert sum(line.startswith("▶ compress:") for line in result.stderr.splitlines()) >= 10, result.stderr
        runs[name] = most_stages_at_once(result.stderr)
        assert {p: sha256(p) for p in before} == before, name
    assert runs == {"two cores": 2, "memory for one stage": 1}
