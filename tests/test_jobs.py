"""Accuracy runs on every core (`--jobs`, EDGEBUILD_JOBS) with results that do not depend on it;
latency timed apart, single-threaded, a fixed number of invokes."""
import numpy as np
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
    import shutil

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
        if candidate["status"] in ("pass", "fail"):
            assert candidate["latency"] == {"batch": 1, "threads": 1, "runs": LATENCY_RUNS}


@pytest.mark.parametrize("args, env, message", [
    (["--jobs", "0"], {}, "--jobs: expected a whole number of at least 1, got '0'"),
    ([], {"EDGEBUILD_JOBS": "many"}, "EDGEBUILD_JOBS: expected a whole number of at least 1, got 'many'"),
])
def test_a_bad_jobs_value_is_one_line_and_exit_2(tmp_path, args, env, message):
    from conftest import make_project

    make_project(tmp_path)
    done = run_edgebuild("build", *args, cwd=tmp_path, env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == message
    assert not (tmp_path / ".edgebuild").exists() and not (tmp_path / "dist").exists()
