"""A latency budget chooses how a recurrent net's steps ship (issue #17). By default they ship as
one WHILE loop, the smallest form; a net that outputs every step runs that loop slower than its
unrolled steps. A target with a latency budget also gets each technique's faster form (the steps
unrolled: `<technique>-unrolled`), and the one policy picks the smallest candidate meeting every
budget. Budgets are not part of an evaluation's key, so the forms are timed once and a budget edit
only reselects."""
import json

import numpy as np
import pytest
import yaml

from conftest import read_report, run_edgebuild, spotter_source

# A keyword spotter's shape: 100 frames of 40 features, a GRU of width 64, a label every frame.
SPOTTER = spotter_source(frames=100, features=40, width=64, labels=12)


def _manifest(budget: dict, android: dict | None = None) -> dict:
    target = {"name": "android", "format": "tflite", "devices": ["pixel-8"], "budget": budget,
              "accuracy": {"floor": 10}}
    if android:
        target["android"] = android
    return {"version": 1, "model": {"name": "spotter", "source": "python", "entry": "net/model.py:build"},
            "data": {"evaluation": "net/eval.npz"}, "metric": "sqnr", "targets": [target],
            "search": {"strategy": "uniform", "techniques": ["int8-weight-only"]}, "reports": ["json", "md"]}


def _build(root, budget: dict, android: dict | None = None):
    (root / "edgebuild.yaml").write_text(yaml.safe_dump(_manifest(budget, android), sort_keys=False))
    result = run_edgebuild("build", cwd=root)
    [target] = read_report(root)["targets"]
    return result, target, {c["technique"]: c for c in target["candidates"]}


@pytest.mark.slow
def test_a_latency_budget_ships_the_faster_form_only_when_the_smaller_misses_it(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "model.py").write_text(SPOTTER)
    np.savez(tmp_path / "net" / "eval.npz", x=np.random.default_rng(0).standard_normal((8, 100, 40)).astype(np.float32))

    # A budget both forms meet: both are built and timed, and the loop ships (fewer bytes).
    result, target, candidates = _build(tmp_path, {"size": "200KB", "latency_ms": 1000})
    assert result.returncode == 0, result.stderr
    rolled, unrolled = candidates["int8-weight-only"], candidates["int8-weight-only-unrolled"]
    assert target["chosen"]["technique"] == "int8-weight-only"
    assert unrolled["bytes"] > 2 * rolled["bytes"]  # 99.8 KB against 31.9 KB
    assert unrolled["latency_ms"] > 0 and rolled["latency_ms"] > 0
    assert unrolled["metric"] == pytest.approx(rolled["metric"], abs=1e-3)
    [knob] = [row for row in target["comparisons"] if row["technique"] == "int8-weight-only-unrolled"]
    assert knob["compared_with"] == "int8-weight-only" and knob["bytes_delta"] == unrolled["bytes"] - rolled["bytes"]
    assert knob["latency_delta_ms"] == pytest.approx(unrolled["latency_ms"] - rolled["latency_ms"])
    assert "| int8-weight-only-unrolled | int8-weight-only | steps unrolled" in (tmp_path / "dist" / "report.md").read_text()

    # A budget between the two measured latencies: the faster form ships, even when it is the
    # larger (the unrolled steps, 0.10 against 0.17 ms on an idle machine; bench/loops.py times
    # them, this test only reads what the build measured). Nothing is timed again.
    between = (rolled["latency_ms"] + unrolled["latency_ms"]) / 2
    result, target, candidates = _build(tmp_path, {"size": "200KB", "latency_ms": between})
    assert result.returncode == 0, result.stderr
    assert "▶ evaluate" not in result.stderr and "▶ compress" not in result.stderr
    faster, slower = ((unrolled, rolled) if unrolled["latency_ms"] < rolled["latency_ms"] else (rolled, unrolled))
    assert target["chosen"]["technique"] == faster["technique"]
    assert candidates[slower["technique"]]["status"] == "fail"
    assert [f["constraint"] for f in candidates[slower["technique"]]["failed"]] == ["latency"]
    shipped = tmp_path / "dist" / "android" / "spotter.tflite"
    assert shipped.stat().st_size == faster["bytes"]
    assert json.loads(shipped.with_suffix(".json").read_text())["technique"] == faster["technique"]

    # `android: {loops: rolled}` fixes the form: no faster one competes, and nothing else can meet
    # a budget below the loop's measured latency.
    result, target, candidates = _build(tmp_path, {"size": "200KB", "latency_ms": rolled["latency_ms"] / 10},
                                        {"loops": "rolled"})
    assert result.returncode == 1 and target["status"] == "fail"
    assert "int8-weight-only-unrolled" not in candidates
    assert "nearest: int8-weight-only (latency" in result.stderr, result.stderr

    # Without a latency budget no faster form is built or listed: the loop ships.
    result, target, candidates = _build(tmp_path, {"size": "200KB"})
    assert result.returncode == 0, result.stderr
    assert set(candidates) >= {"int8-weight-only"} and not any(name.endswith("-unrolled") for name in candidates)
    assert target["chosen"]["technique"] == "int8-weight-only"


def test_a_net_without_steps_lists_no_faster_form_under_a_latency_budget(built_copy):
    manifest = yaml.safe_load((built_copy / "edgebuild.yaml").read_text())
    [android] = [target for target in manifest["targets"] if target["format"] == "tflite"]
    android["budget"]["latency_ms"] = 1000  # Core ML cannot be timed on Linux: iOS stays unbudgeted
    (built_copy / "edgebuild.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    result = run_edgebuild("build", cwd=built_copy)
    assert result.returncode == 0, result.stderr
    # The faster forms ran (no stage skips them: the latency budget asks for them) and found
    # nothing to lay out otherwise; they are no candidates.
    assert "▶ compress:tflite:int8-weight-only-unrolled" in result.stderr
    [target] = [target for target in read_report(built_copy)["targets"] if target["format"] == "tflite"]
    assert target["status"] == "pass"
    assert not any(c["technique"].endswith("-unrolled") for c in target["candidates"])


def test_a_faster_form_takes_its_smaller_forms_recipe_and_is_compared_with_it():
    from edgebuild.plugins import default_registry

    techniques = {t.name: t for t in default_registry().techniques_for("tflite")}
    for name, technique in techniques.items():
        if technique.faster_form_of:
            base = techniques[technique.faster_form_of]
            assert name == f"{base.name}-unrolled"
            assert (technique.recipe, technique.needs_calibration) == (base.recipe, base.needs_calibration)
            assert technique.compare_with == base.name and technique.knob
    assert {t.faster_form_of for t in techniques.values()} >= {"fp32", "int8-weight-only", "int4-weight-only"}
