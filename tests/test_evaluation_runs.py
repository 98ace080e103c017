"""How candidates are run: accuracy on every core (`--jobs`, EDGEBUILD_JOBS) with results that do not
depend on it; latency timed apart, single-threaded, a fixed number of invokes; a candidate over every
size budget reported with its bytes and not run (`--evaluate-all` runs it)."""
import json
import shutil

import numpy as np
import yaml
import pytest

from conftest import read_report, run_edgebuild


def test_sharded_accuracy_runs_give_every_sample_the_bits_of_one_run(built_example):
    """int4 weight-only is the candidate whose outputs change with XNNPACK's own thread count, which
    is why shards run single-threaded interpreters side by side instead."""
    from edgebuild.pipeline.evaluation import predict_samples
    from edgebuild_tflite.backend import TFLiteBackend

    backend = TFLiteBackend()
    bundle = built_example / ".edgebuild" / "tflite" / "candidates" / "int4-weight-only.tflite"
    with np.load(built_example / "examples" / "digits" / "eval.npz") as data:
        inputs = (data["x"].astype(np.float32),)
    runs = {workers: predict_samples(backend, bundle, inputs, batch=1, exported_program=None, workers=workers)
            for workers in (1, 2, 7)}
    single = runs[1].outputs
    assert runs[1].latency_ms is not None and runs[7].latency_ms is None  # shards never time latency
    assert runs[7].details["shards"] == 7
    for workers in (2, 7):
        assert runs[workers].outputs.keys() == single.keys()
        for name in single:
            assert runs[workers].outputs[name].shape == single[name].shape == (len(inputs[0]), 10)
            assert np.array_equal(runs[workers].outputs[name], single[name]), workers


def test_the_report_is_the_same_with_any_jobs_and_latency_is_timed_apart(built_example, tmp_path):
    from edgebuild.pipeline.evaluation import LATENCY_RUNS

    root = tmp_path / "project"
    shutil.copytree(built_example, root, symlinks=True)
    shutil.rmtree(root / ".edgebuild")
    shutil.rmtree(root / "dist")
    done = run_edgebuild("build", "--platform", "android", "--jobs", "3", cwd=root)
    assert done.returncode == 0, done.stderr
    one, three = read_report(built_example)["targets"][0], read_report(root)["targets"][0]

    def results(target):  # everything but timings
        return [(c["technique"], c["status"], c.get("sha256"), c.get("metric"), c.get("metrics"))
                for c in target["candidates"]]

    assert results(one) == results(three) and one["chosen"]["sha256"] == three["chosen"]["sha256"]
    for candidate in three["candidates"]:
        if candidate["status"] in ("pass", "fail") and "not_evaluated" not in candidate:
            assert candidate["latency"] == {"batch": 1, "threads": 1, "runs": LATENCY_RUNS}


@pytest.mark.parametrize("args, env, message", [
    (["--jobs", "0"], {}, "--jobs: expected a whole number of at least 1, got '0'"),
    ([], {"EDGEBUILD_JOBS": "many"}, "EDGEBUILD_JOBS: expected a whole number of at least 1, got 'many'"),
    ([], {"EDGEBUILD_MEMORY": "4G"}, "EDGEBUILD_MEMORY: expected a whole number of at least 1, got '4G'"),
])
def test_a_bad_jobs_value_is_one_line_and_exit_2(tmp_path, args, env, message):
    from conftest import make_project

    make_project(tmp_path)
    done = run_edgebuild("build", *args, cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == message
    assert not (tmp_path / ".edgebuild").exists() and not (tmp_path / "dist").exists()


def _copy(built_example, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(built_example, root, symlinks=True)
    return root


def test_a_candidate_over_every_size_budget_is_reported_not_run(built_example, tmp_path):
    report = read_report(built_example)
    android, ios = report["targets"]
    over = {t["name"]: {c["technique"]: c for c in t["candidates"] if "not_evaluated" in c} for t in (android, ios)}
    # The example's budgets: android 60 KB (fp32, fp16 over it), ios 40 KB (fp32, fp16, 8-bit over it).
    assert set(over["android"]) == {"fp32", "fp16"}
    assert set(over["ios"]) == {"fp32", "fp16", "int8-linear", "palettize-8bit"}
    fp32 = over["android"]["fp32"]
    assert fp32["status"] == "fail" and "metric" not in fp32 and fp32["bytes"] > 60_000
    assert fp32["not_evaluated"] == (f"not evaluated: over budget ({fp32['bytes']:,} B > 60,000 B, the largest size "
                                     "budget of its targets; --evaluate-all evaluates it)")
    assert [(f["constraint"], f["status"]) for f in fp32["failed"]] == [
        ("size", "fail"), ("download", "fail"), ("accuracy", "unverified")]
    assert fp32["failed"][2]["reason"] == fp32["not_evaluated"]
    assert all(c["technique"] not in over["android"] for c in android["pareto_front"])
    assert f"not evaluated: over budget ({fp32['bytes']:,}" in (built_example / "dist" / "report.md").read_text()
    record = json.loads((built_example / ".edgebuild" / "tflite" / "evaluations" / "fp32.json").read_text())
    assert "evaluated_by" not in record and "latency" not in record  # no runtime ran it

    root = _copy(built_example, tmp_path)
    done = run_edgebuild("build", "--json", "--evaluate-all", cwd=root)
    assert done.returncode == 0, done.stderr
    executed = set(json.loads(done.stdout)["executed"])
    assert {s for s in executed if s.startswith("evaluate:")} == {
        "evaluate:tflite:fp32", "evaluate:tflite:fp16", "evaluate:coreml-ios16:fp32", "evaluate:coreml-ios16:fp16",
        "evaluate:coreml-ios16:int8-linear", "evaluate:coreml-ios16:palettize-8bit"}
    after = read_report(root)
    for target, before in zip(after["targets"], (android, ios)):
        assert target["chosen"]["sha256"] == before["chosen"]["sha256"]  # what ships does not change
        for candidate in target["candidates"]:
            assert "not_evaluated" not in candidate
            if candidate["technique"] in over[target["name"]]:
                assert candidate["status"] == "fail" and "metric" in candidate
    # Full evaluations stay valid without the flag: nothing reruns.
    again = run_edgebuild("build", "--json", cwd=root)
    assert json.loads(again.stdout)["executed"] == []


def test_a_budget_that_grows_past_a_left_out_candidate_evaluates_it(built_example, tmp_path):
    root = _copy(built_example, tmp_path)
    manifest = yaml.safe_load((root / "edgebuild.yaml").read_text())
    manifest["targets"][0]["budget"] = {"size": "90KB"}  # fp16 (82 KB) fits now; fp32 (158 KB) does not
    (root / "edgebuild.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    done = run_edgebuild("build", "--json", cwd=root)
    assert done.returncode == 0, done.stderr
    assert {s for s in json.loads(done.stdout)["executed"] if s.startswith("evaluate:")} == {"evaluate:tflite:fp16"}
    by_name = {c["technique"]: c for c in read_report(root)["targets"][0]["candidates"]}
    assert "metric" in by_name["fp16"] and "not_evaluated" in by_name["fp32"]


def test_shards_are_bounded_by_the_memory_their_runtimes_need():
    """Each shard's interpreter holds its own packed weights (budgeted at 4x the bundle): a large
    bundle gets fewer shards, whatever --jobs asks for."""
    from edgebuild.pipeline.evaluation import available_memory, shards_within

    assert shards_within(16 * 2**30, 512 * 2**20) == 4      # 8 GiB usable / 2 GiB per runtime
    assert shards_within(3 * 2**30, 512 * 2**20) == 1       # never fewer than one
    assert shards_within(16 * 2**30, 60_000) > 10_000       # small models: --jobs decides
    assert available_memory() > 2**30                      # read from /proc/meminfo here


def test_latency_takes_as_many_invokes_as_fit_in_its_time():
    from edgebuild.pipeline.evaluation import LATENCY_MIN_RUNS, LATENCY_RUNS, latency_runs

    assert latency_runs(None) == latency_runs(0.05) == LATENCY_RUNS  # the digits CNN: 20
    assert latency_runs(150.0) == 13
    assert latency_runs(2500.0) == LATENCY_MIN_RUNS  # a 20M-parameter detector's int4 invoke


def test_a_candidate_with_another_candidates_bytes_is_evaluated_once(built_copy, tmp_path):
    """A third-party technique whose recipe is int8-weight-only's gives the same bytes: its record
    is that evaluation's, latency timings included (a second run would time differently)."""
    from tests.test_plugins import install_fake_distribution

    from edgebuild.plugins import default_registry

    recipe = default_registry().techniques[("tflite", "int8-weight-only")].recipe
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(site, "edgebuild_again", (
        "from edgebuild.api import Technique\nfrom edgebuild.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef register_techniques(register):\n"
        f"    register(Technique('int8-weight-only-again', 'tflite', 'third-party', recipe={recipe!r}))\n"))
    done = run_edgebuild("build", "--json", cwd=built_copy, env={"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    assert "evaluate:tflite:int8-weight-only-again" in json.loads(done.stdout)["executed"]
    candidates = {c["technique"]: c for c in read_report(built_copy)["targets"][0]["candidates"]}
    first, again = candidates["int8-weight-only"], candidates["int8-weight-only-again"]
    assert again["sha256"] == first["sha256"]
    for key in ("metric", "metrics", "bytes", "latency_ms", "latency", "evaluated_by"):
        assert again[key] == first[key], key
