"""A cache of stage outputs shared by clones and machines (issue #18, `--cache DIR|URL`).

Keys are the stage's settings, code and the content of the files it reads by project-relative
path: a clone at another path with the cache runs no export, conversion, compression, evaluation
or search, and ships the same bytes. Blobs are checked against their hash when fetched.
"""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_project, run_edgebuild

HEAVY = ("export", "reference", "baseline", "convert", "compress", "evaluate", "search", "qat")


def _build(project: Path, cache: Path, *extra: str, env: dict | None = None) -> dict:
    done = run_edgebuild("build", "--json", "--cache", str(cache), *extra, cwd=project, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _shipped(project: Path) -> dict[str, bytes]:
    """Every file the build delivered, by path under dist/ (the reports' timestamps left out)."""
    found = {}
    for path in sorted((project / "dist").rglob("*")):
        if path.is_file() and path.name not in ("report.json", "report.md", "report.html", "junit.xml"):
            found[path.relative_to(project).as_posix()] = path.read_bytes()
    return found


def _blobs_match_their_names(cache: Path) -> bool:
    blobs = [p for p in (cache / "blobs").rglob("*") if p.is_file()]
    return bool(blobs) and all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in blobs)


@pytest.mark.slow
def test_a_clone_at_another_path_reruns_nothing_the_cache_holds_and_ships_the_same_bytes(tmp_path):
    cache = tmp_path / "cache"
    first, second = tmp_path / "runner-a" / "app", tmp_path / "elsewhere" / "checkout"
    for project in (first, second):
        make_project(project)
    built = _build(first, cache)
    assert any(stage.startswith("convert:") for stage in built["executed"]) and not built["cached"]

    again = _build(second, cache)
    assert [s for s in again["executed"] if s.startswith(HEAVY)] == [], again["executed"]
    for stage in ("export", "convert:tflite", "convert:coreml-ios16", "search:android", "search:ios"):
        assert stage in again["cached"], stage
    assert sum(s.startswith("evaluate:") for s in again["cached"]) == sum(
        s.startswith("evaluate:") for s in built["executed"])
    assert _shipped(second) == _shipped(first) != {}
    # The reports agree but for when each target was built.
    reports = [json.loads((p / "dist" / "report.json").read_text()) for p in (first, second)]
    for report in reports:
        for target in report["targets"]:
            target.pop("built_at", None)
    assert reports[0] == reports[1]
    assert _blobs_match_their_names(cache)
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
def test_a_corrupt_blob_is_a_miss_the_stage_reruns_and_the_entry_is_stored_again(tmp_path):
    cache = tmp_path / "cache"
    first, second = tmp_path / "a", tmp_path / "b"
    manifest = None
    for project in (first, second):
        make_project(project, manifest)
    _build(first, cache, "--platform", "android")
    fp32 = (first / ".edgebuild" / "tflite" / "fp32.tflite").read_bytes()
    blob = cache / "blobs" / hashlib.sha256(fp32).hexdigest()[:2] / hashlib.sha256(fp32).hexdigest()
    blob.write_bytes(fp32[:-100] + bytes(100))  # same length, wrong content

    again = _build(second, cache, "--platform", "android")
    assert "convert:tflite" in again["executed"] and "convert:tflite" not in again["cached"]
    assert "export" in again["cached"]
    assert _shipped(second) == _shipped(first)
    assert blob.read_bytes() == fp32  # stored again, intact
    assert _blobs_match_their_names(cache)


@pytest.mark.slow
def test_two_builds_writing_one_cache_at_once_both_succeed_and_leave_it_intact(tmp_path):
    cache = tmp_path / "cache"
    projects = [tmp_path / "one", tmp_path / "two"]
    for project in projects:
        make_project(project)
    running = [subprocess.Popen([sys.executable, "-m", "edgebuild", "build", "--cache", str(cache), "--platform",
                                 "android", "--jobs", "1"], cwd=project, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for project in projects]
    for process in running:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    assert _shipped(projects[0]) == _shipped(projects[1])
    assert _blobs_match_their_names(cache)
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]
    third = tmp_path / "three"
    make_project(third)
    again = _build(third, cache, "--platform", "android")
    assert [s for s in again["executed"] if s.startswith(HEAVY)] == []


def test_fetch_puts_nothing_in_place_unless_every_file_is_intact(tmp_path):
    from edgebuild.pipeline.cache import SharedCache

    cache = SharedCache(str(tmp_path / "cache"))
    cache.check()
    bundle = tmp_path / "a" / "model.mlpackage"
    (bundle / "Data").mkdir(parents=True)
    (bundle / "Data" / "weights.bin").write_bytes(b"w" * 1000)
    (bundle / "Manifest.json").write_text("{}")
    record = tmp_path / "a" / "model.json"
    record.write_text('{"sha256": "x"}')
    cache.store("k", [("model.json", record), ("model.mlpackage", bundle), ("absent.bin", tmp_path / "a" / "absent.bin")])

    # A fresh place: a folder output arrives whole, a declared output the entry lacks is removed.
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    (elsewhere / "absent.bin").write_bytes(b"stale")
    outputs = [("model.json", elsewhere / "model.json"), ("model.mlpackage", elsewhere / "model.mlpackage"),
               ("absent.bin", elsewhere / "absent.bin")]
    assert cache.fetch("k", outputs)
    assert (elsewhere / "model.mlpackage" / "Data" / "weights.bin").read_bytes() == b"w" * 1000
    assert (elsewhere / "model.json").read_text() == '{"sha256": "x"}'
    assert not (elsewhere / "absent.bin").exists()
    assert not cache.fetch("other key", outputs)

    # A truncated blob: a miss, the outputs in place untouched, the entry forgotten.
    blob = next(p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file() and p.stat().st_size == 1000)
    blob.write_bytes(b"w" * 10)
    (elsewhere / "model.json").write_text("mine")
    assert not cache.fetch("k", outputs)
    assert (elsewhere / "model.json").read_text() == "mine"
    assert not (tmp_path / "cache" / "entries" / "k.json").exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["model.json", "model.mlpackage"]


def test_the_exported_program_does_not_depend_on_the_projects_path(tmp_path):
    from edgebuild.manifest import load_project
    from edgebuild.pipeline.layout import Build
    from edgebuild.pipeline.stages.model import export_model

    exported = []
    for folder in (tmp_path / "a", tmp_path / "deeper" / "b"):
        build = Build(*load_project(make_project(folder)))
        export_model(build)
        exported.append(build.exported_program.read_bytes())
        assert str(folder).encode() not in exported[-1]
    assert exported[0] == exported[1]


@pytest.mark.parametrize("value, message", [
    ("cache: 3\n", "edgebuild.yaml:{line}:8: cache: expected a folder or a URL (s3://..., gs://...), got an integer"),
    ("cache: ''\n", "edgebuild.yaml:{line}:8: cache: expected a folder or a URL (s3://..., gs://...), got an empty string"),
])
def test_the_manifests_cache_is_validated_with_its_location(tmp_path, value, message):
    manifest = make_project(tmp_path)
    text = manifest.read_text()
    manifest.write_text(text + value)
    done = run_edgebuild("validate", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == message.format(line=len(text.splitlines()) + 1)


def test_an_unknown_cache_protocol_is_one_line_and_exit_2(tmp_path):
    make_project(tmp_path)
    done = run_edgebuild("build", "--cache", "nosuchprotocol://bucket/x", cwd=tmp_path)
    assert done.returncode == 2
    assert "nosuchprotocol://bucket/x" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "dist").exists()
