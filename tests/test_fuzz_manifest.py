"""Property-based manifests: every malformed one exits 2 with one `FILE:LINE:COL: field: message` line."""
import contextlib
import copy
import io
import re
import shutil

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgebuild.cli import main
from tests.conftest import EXAMPLE, record_figure

BASE = {
    "version": 1,
    "model": {"name": "digits", "source": "python", "entry": "examples/digits/model.py:build"},
    "data": {"calibration": "examples/digits/calib.npz", "evaluation": "examples/digits/eval.npz"},
    "metric": "top1",
    "targets": [
        {"name": "android", "format": "tflite", "devices": ["pixel-7"],
         "budget": {"size": "60KB", "download": "55KB"}, "accuracy": {"max_drop": 0.01}},
        {"name": "ios", "format": "coreml", "devices": ["iphone-15"], "budget": {"size": "40KB"},
         "accuracy": {"floor": 0.9}},
    ],
    "output": "dist",
}
REQUIRED = [("version",), ("model",), ("data",), ("targets",), ("model", "name"), ("model", "source"),
            ("data", "evaluation"), ("targets", 0, "name"), ("targets", 0, "format"), ("targets", 0, "devices"),
            ("targets", 1, "accuracy")]
TYPED_FIELDS = [("version",), ("model",), ("model", "name"), ("model", "entry"), ("data",), ("data", "evaluation"),
                ("metric",), ("targets",), ("targets", 0), ("targets", 0, "devices"), ("targets", 0, "devices", 0),
                ("targets", 0, "budget"), ("targets", 0, "budget", "size"), ("targets", 0, "accuracy"),
                ("targets", 0, "accuracy", "max_drop"), ("targets", 1, "accuracy", "floor"), ("output",)]
MAPPINGS = [(), ("model",), ("data",), ("targets", 0), ("targets", 0, "budget"), ("targets", 0, "accuracy"),
            ("targets", 1)]
LINE = re.compile(r"^edgebuild\.yaml:\d+:\d+: \S[^:]*: .+$")
COUNTS = {"cases": 0, "exit_2": 0, "tracebacks": 0, "garbled": 0, "garbled_exit_2": 0, "garbled_valid": 0}


def at(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def wrong_type_for(value, draw):
    options = [[], {}, 7, -3, True, None, 2.5, "text", ["a", 1]]
    if isinstance(value, str):
        options = [o for o in options if not isinstance(o, str)]
    elif isinstance(value, dict):
        options = [o for o in options if not isinstance(o, dict)]
    elif isinstance(value, list):
        options = [o for o in options if not isinstance(o, list)]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        options = [o for o in options if not isinstance(o, (int, float)) or isinstance(o, bool)]
    return draw(st.sampled_from(options))


@st.composite
def broken_manifests(draw):
    manifest = copy.deepcopy(BASE)
    kind = draw(st.sampled_from(["remove", "retype", "unknown", "budget", "bounds", "missing_file", "duplicate",
                                 "device", "escape", "huge", "version"]))
    if kind == "remove":
        path = draw(st.sampled_from(REQUIRED))
        del at(manifest, path[:-1])[path[-1]]
    elif kind == "retype":
        path = draw(st.sampled_from(TYPED_FIELDS))
        at(manifest, path[:-1])[path[-1]] = wrong_type_for(at(manifest, path), draw)
    elif kind == "unknown":
        path = draw(st.sampled_from(MAPPINGS))
        key = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
        if key in at(manifest, path):
            key += "_x"
        at(manifest, path)[key] = draw(st.one_of(st.integers(), st.text(max_size=5), st.booleans()))
    elif kind == "budget":
        bad = draw(st.one_of(st.integers(-10**6, 10**9), st.sampled_from(["-5KB", "5", "5 kb", "KB", "5XB", "", "0B",
                                                                           "1e3KB", "five KB", "5KB5"])))
        manifest["targets"][0]["budget"][draw(st.sampled_from(["size", "download"]))] = bad
    elif kind == "bounds":
        value = draw(st.one_of(st.floats(min_value=1.0001, max_value=1e9), st.floats(max_value=-0.0001, min_value=-1e9),
                               st.just(float("nan")), st.just(float("inf"))))
        if draw(st.booleans()):
            manifest["targets"][0]["accuracy"] = {"max_drop": value}
        else:
            manifest["targets"][1]["accuracy"] = {"floor": value}
    elif kind == "missing_file":
        name = draw(st.text(alphabet="abcdefghij", min_size=1, max_size=8)) + ".npz"
        manifest["data"][draw(st.sampled_from(["calibration", "evaluation"]))] = f"examples/{name}"
    elif kind == "duplicate":
        manifest["targets"][1]["name"] = "android"
    elif kind == "device":
        manifest["targets"][0]["devices"] = [draw(st.text(alphabet="pixel-0123456789", min_size=1, max_size=10)
                                                  .filter(lambda n: n not in ("pixel-4a", "pixel-5", "pixel-6", "pixel-6a",
                                                                              "pixel-7", "pixel-7a", "pixel-8", "pixel-8a",
                                                                              "pixel-9")))]
    elif kind == "escape":
        where = draw(st.sampled_from(["output", "evaluation", "entry"]))
        if where == "output":
            manifest["output"] = draw(st.sampled_from(["../dist", "/tmp/dist", "..", "dist/../../x", "."]))
        elif where == "evaluation":
            manifest["data"]["evaluation"] = draw(st.sampled_from(["../eval.npz", "/etc/passwd", "../../x.npz"]))
        else:
            manifest["model"]["entry"] = draw(st.sampled_from(["../model.py:build", "/tmp/model.py:build",
                                                               "model.py", "examples/digits/model.py:"]))
    elif kind == "huge":
        # Sizes past 1 TB, numbers too large for a float (YAML integers are unbounded), NaN and infinity.
        huge = draw(st.sampled_from(["99999999999999GB", "1" + "0" * 40 + "KB", "5000GB", "2000000MiB",
                                     "9" * 400 + "KB", "9" * 400 + ".5B", "1" * 310 + "GiB"]))
        field = draw(st.sampled_from(["size", "download", "latency_ms"]))
        if field == "latency_ms":
            huge = draw(st.sampled_from([10 ** 400, -(10 ** 400), 10 ** 309, float("nan"), float("inf"),
                                         float("-inf"), 10 ** 12]))
        manifest["targets"][0]["budget"][field] = huge
    elif kind == "version":
        manifest["version"] = draw(st.sampled_from([0, 2, "1", 1.5, None, [1]]))
    return kind, yaml.safe_dump(manifest, sort_keys=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(EXAMPLE, root / "examples" / "digits", ignore=shutil.ignore_patterns("__pycache__"))
    yield root
    record_figure(f"fuzzed manifests: {COUNTS['cases']} malformed cases, {COUNTS['exit_2']} exited 2 with one "
                  f"FILE:LINE:COL line; {COUNTS['garbled']} garbled YAML texts, {COUNTS['garbled_exit_2']} exited 2, "
                  f"{COUNTS['garbled_valid']} still valid; {COUNTS['tracebacks']} tracebacks")


def validate(project, text):
    path = project / "edgebuild.yaml"
    path.write_text(text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["validate", "-f", "edgebuild.yaml"])
    return code, err.getvalue()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=broken_manifests())
def test_malformed_manifests_exit_2_with_one_located_line(project, case, monkeypatch):
    kind, text = case
    monkeypatch.chdir(project)
    code, err = validate(project, text)
    COUNTS["cases"] += 1
    COUNTS["tracebacks"] += "Traceback" in err
    assert "Traceback" not in err
    assert code == 2, f"{kind}: exit {code}\n{text}"
    assert len(err.strip().splitlines()) == 1 and LINE.match(err.strip()), f"{kind}: {err!r}"
    COUNTS["exit_2"] += 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=10_000), junk=st.sampled_from(["", ":", "[", "{", "\t", "- ", "&a", "*b",
                                                                           "!!python/object:os.system", "'", '"']))
def test_corrupted_yaml_text_never_crashes(project, cut, junk, monkeypatch):
    """Truncated or garbled YAML: exit 2 with a located line, or valid if the damage left valid YAML."""
    monkeypatch.chdir(project)
    text = yaml.safe_dump(BASE, sort_keys=False)
    cut = cut % len(text)
    code, err = validate(project, text[:cut] + junk + text[cut:] if junk else text[:cut])
    COUNTS["garbled"] += 1
    COUNTS["tracebacks"] += "Traceback" in err
    assert "Traceback" not in err
    assert code in (0, 2)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and re.match(r"^edgebuild\.yaml(:\d+:\d+)?: ", err.strip()), err
        COUNTS["garbled_exit_2"] += 1
    else:
        COUNTS["garbled_valid"] += 1
