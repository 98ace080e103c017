"""The one constraint policy, and the defects fixed on the way to it (each test fails without its fix)."""
import io
import tracemalloc
import zipfile

import numpy as np
import pytest

from edgebuild.api import SearchContext, Status
from edgebuild.policy import Limits, choose, judge, judged, problems, target_checks, verdict
from tests.conftest import example_manifest, make_project, run_edgebuild

LIMITS = Limits(size=1000, download=None, store=5000, latency_ms=2.0, accuracy=0.9, higher_is_better=True)


def test_a_constraint_this_host_cannot_measure_is_unverified_never_passed():
    checks = judge(LIMITS, {"bytes": 900, "download_bytes": 800, "metric": 0.95, "latency_ms": None,
                            "latency_note": "Core ML runs models on macOS only"})
    assert [(c.constraint, c.status) for c in checks] == [
        ("size", Status.PASS), ("store", Status.PASS), ("latency", Status.UNVERIFIED), ("accuracy", Status.PASS)]
    assert checks[2].reason == "latency not measured: Core ML runs models on macOS only"
    assert verdict(checks) == Status.UNVERIFIED
    assert problems(checks) == [{"constraint": "latency", "status": "unverified", "limit": 2.0, "actual": None,
                                 "reason": "latency not measured: Core ML runs models on macOS only"}]
    # An unverified candidate is never chosen, however small.
    entry = judged({"technique": "small", "bytes": 10, "download_bytes": 10, "metric": 1.0, "latency_ms": None}, LIMITS)
    assert entry["status"] == "unverified" and choose([entry], True) is None


def test_a_failure_outranks_an_unverified_constraint():
    checks = judge(LIMITS, {"bytes": 2000, "download_bytes": 800, "metric": 0.95, "latency_ms": None})
    assert verdict(checks) == Status.FAIL
    assert [c.constraint for c in checks if c.status != Status.PASS] == ["size", "latency"]


def test_lower_is_better_metrics_and_every_limit_are_judged_in_their_direction():
    kl = Limits(size=None, download=100, store=None, latency_ms=None, accuracy=0.05, higher_is_better=False)
    assert verdict(judge(kl, {"bytes": 5, "download_bytes": 100, "metric": 0.05})) == Status.PASS
    failing = judge(kl, {"bytes": 5, "download_bytes": 101, "metric": 0.06})
    assert [(c.constraint, c.status) for c in failing] == [("download", Status.FAIL), ("accuracy", Status.FAIL)]


def test_a_target_without_a_bundle_reports_the_best_any_candidate_did_per_constraint():
    candidates = [judged({"technique": t, "bytes": b, "download_bytes": b, "metric": m, "latency_ms": 1.0}, LIMITS)
                  for t, b, m in (("big", 4000, 0.99), ("small", 800, 0.5))]
    rows = {row["constraint"]: row for row in target_checks(LIMITS, candidates, None)}
    assert rows["size"] == {"constraint": "size", "status": "pass", "limit": 1000, "actual": 800, "candidate": "small"}
    assert rows["accuracy"]["candidate"] == "big" and rows["accuracy"]["status"] == "pass"


def search_context(higher_is_better: bool) -> SearchContext:
    layer = {"name": "dense", "op": "FULLY_CONNECTED", "params": 10}
    metrics = {"int8": 0.2, "int4": 0.1}  # the same bytes (below), different metric

    def evaluate(assignment):
        return {"bytes": 100, "download_bytes": 100, "metric": metrics[assignment["dense"]], "latency_ms": 1.0,
                "status": "pass", "failed": []}

    return SearchContext(layers=[layer], precisions={"int8": 8, "int4": 4},
                         sensitivity={"dense": {"int8": 40.0, "int4": 20.0}},
                         layer_bytes={"dense": {"int8": 10, "int4": 5}}, base_bytes=90, max_evaluations=10,
                         max_time=60, higher_is_better=higher_is_better, evaluate_fn=evaluate)


@pytest.mark.parametrize("higher_is_better, expected", [(True, "int8"), (False, "int4")])
def test_the_exhaustive_strategy_breaks_ties_in_the_metrics_own_direction(higher_is_better, expected):
    from edgebuild_search import exhaustive_search

    assert exhaustive_search(search_context(higher_is_better)) == {"dense": expected}


def test_download_bytes_stream_the_zip_and_match_an_in_memory_one(tmp_path):
    from edgebuild.fsutil import _ZIP_EPOCH, download_bytes

    rng = np.random.default_rng(0)
    (tmp_path / "bundle").mkdir()
    files = [tmp_path / "bundle" / "weights.bin", tmp_path / "bundle" / "spec.txt"]
    files[0].write_bytes(rng.integers(-8, 8, size=16_000_000, dtype=np.int8).tobytes())  # an int4-ish 16 MB bundle
    files[1].write_text(" ".join(map(str, range(50_000))))
    buffer = io.BytesIO()  # what a store's zip of the same files weighs
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in sorted(files):
            info = zipfile.ZipInfo(path.relative_to(tmp_path).as_posix(), date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes(), compresslevel=9)
    tracemalloc.start()
    measured = download_bytes(files, tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert measured == len(buffer.getvalue())
    assert peak < 4 * 2**20, f"measuring a 16 MB bundle held {peak} bytes at once"


def test_a_size_of_400_digits_is_a_schema_error(tmp_path):
    manifest = make_project(tmp_path).read_text().replace("size: 60KB", "size: " + "9" * 400 + "KB")
    (tmp_path / "edgebuild.yaml").write_text(manifest)
    result = run_edgebuild("validate", cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith("edgebuild.yaml:") and ": targets[0].budget.size: size '999" in line, line
    assert line.endswith("is larger than 1TB") and "Traceback" not in result.stderr


def test_qat_without_training_data_is_refused_at_validation(tmp_path):
    manifest = example_manifest()
    del manifest["data"]["calibration"]
    manifest["targets"][0]["qat"] = "auto"
    text = make_project(tmp_path, manifest).read_text()
    result = run_edgebuild("validate", cwd=tmp_path)
    assert result.returncode == 2
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.strip().startswith("qat:"))
    assert result.stderr.strip() == (
        f"edgebuild.yaml:{line}:3: targets[0].qat: quantization-aware training needs data.train or "
        "data.calibration to train on; data.evaluation only judges the result")


def test_qat_cross_entropy_reads_a_language_models_logits_on_the_last_axis_and_ignores_unlabelled():
    import torch

    from edgebuild.pipeline.stages.qat import cross_entropy_loss

    logits = torch.randn(2, 3, 5)          # [batch, positions, vocabulary]
    labels = torch.tensor([[1, 4, -1], [0, -1, 2]])
    expected = -torch.stack([torch.log_softmax(logits[b, t], -1)[labels[b, t]]
                             for b in range(2) for t in range(3) if labels[b, t] >= 0]).mean()
    assert torch.allclose(cross_entropy_loss(logits, labels), expected)
    classifier = torch.randn(4, 3)         # [batch, classes]: unchanged
    targets = torch.tensor([0, 2, 1, 1])
    assert torch.allclose(cross_entropy_loss(classifier, targets),
                          torch.nn.functional.cross_entropy(classifier, targets))


def test_the_qat_teacher_runs_a_batch_at_a_time():
    import torch

    from edgebuild.pipeline.stages.qat import BATCH, teacher_outputs

    seen = []

    def teacher(x):
        seen.append(len(x))
        return x * 2

    inputs = [torch.arange(100.0).reshape(100, 1)]
    assert len(teacher_outputs(teacher, inputs)) == 1  # one output
    assert torch.equal(teacher_outputs(teacher, inputs)[0], inputs[0] * 2)
    assert max(seen) == BATCH and sum(seen) == 200  # two calls above, 100 samples each


def test_cache_keys_of_the_search_include_the_code_that_produced_them(tmp_path, monkeypatch):
    from edgebuild.fsutil import atomic_write_json
    from edgebuild.manifest import load_manifest
    from edgebuild.pipeline.layout import Build
    from edgebuild.pipeline.stages import search
    from edgebuild.plugins import default_registry

    registry = default_registry()
    build = Build(load_manifest(make_project(tmp_path), registry), registry)
    target = build.manifest.targets[0]
    atomic_write_json(build.fp32_record(build.variant(target).key), {"sha256": "0" * 64})
    atomic_write_json(build.model_meta, {"inputs": [], "outputs": [{"name": "output_0", "shape": [1, 10],
                                                                    "dtype": "float32"}]})
    def keys():
        return (search.sensitivity_key(build, target, [], {}, "evaluation"),
                search.evaluation_key(search.evaluation_inputs(build, target), []))

    before = keys()
    monkeypatch.setattr(Build, "code", lambda self, *items: "an edited plugin")
    after = keys()
    assert before[0] != after[0] and before[1] != after[1]


def test_the_sensitivity_strategy_leaves_out_a_layer_with_no_precision_to_offer():
    """A layer every probe kept in float (the backend offers it nothing) stays as converted; the
    strategy searches the others (it raised IndexError on an LSTM's input projection)."""
    from edgebuild_search import sensitivity_search

    kept = {"name": "rnn_input", "op": "FULLY_CONNECTED", "params": 10}
    context = search_context(True)
    context.layers.append(kept)
    context.sensitivity["rnn_input"] = {"int8": None, "int4": None}
    context.layer_bytes["rnn_input"] = {"int8": None, "int4": None}
    assert sensitivity_search(context) == {"dense": "int4"}


def test_a_probe_reads_the_stored_type_of_the_layers_weight_not_of_its_bias():
    from edgebuild.pipeline.stages.search import _stored_dtype

    tensors = [{"name": "LSTM_rnn", "dtype": "float32", "shape": [512]},       # its bias, same name
               {"name": "LSTM_rnn", "dtype": "int8", "shape": [512, 32]}]
    assert _stored_dtype(tensors, {"name": "LSTM_rnn", "params": 512 * 32}) == "int8"
    # merged with a negated copy of its weight: the layer counts both copies' parameters
    merged = {"name": "LSTM_rnn", "params": 2 * 512 * 32, "copies": [{"name": "twin", "relation": "negated"}]}
    assert _stored_dtype(tensors, merged) == "int8"
    assert _stored_dtype(tensors, {"name": "other", "params": 10}) is None
