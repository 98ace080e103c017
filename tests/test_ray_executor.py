"""Heavy stages as Ray tasks on a real local cluster (issue #18, `--executor ray`).

The driver keeps the task graph, its state and the reports; each heavy stage runs in a Ray worker
on files shipped through Ray's object store, in a scratch folder. The bundles are the local
build's, byte for byte; a worker killed mid-task is retried and changes nothing.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_project

ray = pytest.importorskip("ray", reason="the Ray executor's tests need the [ray] extra, which `make test` installs")


def _delivered(project) -> dict[str, bytes]:
    return {p.relative_to(project).as_posix(): p.read_bytes() for p in sorted((project / "dist").rglob("*"))
            if p.is_file() and p.name not in ("report.json", "report.md", "report.html", "junit.xml")}


def _build(project, *extra, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "edgebuild", "build", "--json", *extra], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_the_example_built_on_ray_ships_the_local_builds_bytes_and_the_report_names_the_executor(built_example, tmp_path):
    project = tmp_path / "on-ray"
    make_project(project)
    done = _build(project, "--executor", "ray")
    out, err = done.communicate(timeout=900)
    assert done.returncode == 0, err
    assert out.startswith("{"), out[:2000]
    summary = json.loads(out)
    assert any(stage.startswith("convert:") for stage in summary["executed"])
    assert _delivered(project) == _delivered(built_example) != {}
    reports = [json.loads((p / "dist" / "report.json").read_text()) for p in (built_example, project)]
    assert (reports[0]["executor"], reports[1]["executor"]) == ("local", "ray")

    def without_timings(value):
        if isinstance(value, dict):
            return {k: without_timings(v) for k, v in value.items()
                    if k not in ("latency_ms", "latency", "latency_delta_ms", "seconds", "built_at", "executor")}
        if isinstance(value, list):
            return [without_timings(v) for v in value]
        return value

    assert without_timings(reports[0]) == without_timings(reports[1])
    # Each stage's log says which Ray worker ran it; an accuracy run's shards were Ray tasks of their own.
    assert (project / ".edgebuild" / "logs" / "convert-tflite.log").read_text().startswith("[ray task on ")
    evaluated = (project / ".edgebuild" / "logs" / "evaluate-tflite-int8-weight-only.log").read_text()
    assert "accuracy run of int8-weight-only.tflite: 2 shards as Ray tasks" in evaluated, evaluated


def _stage_workers() -> list[int]:
    """Pids of Ray workers running an edgebuild stage right now."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read()
        except OSError:
            continue
        if b"ray::_stage_in_scratch" in command:
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_a_ray_worker_killed_mid_build_is_retried_and_the_bundles_do_not_change(built_example, tmp_path):
    project = tmp_path / "killed"
    make_project(project)
    running = _build(project, "--executor", "ray", "--platform", "android")
    killed = []
    deadline = time.monotonic() + 600
    while not killed and running.poll() is None and time.monotonic() < deadline:
        busy = _stage_workers()
        if busy:
            time.sleep(0.5)  # let it get into the stage
            for pid in busy[:1]:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        time.sleep(0.1)
    out, err = running.communicate(timeout=900)
    assert killed, "no Ray worker ran a stage"
    assert running.returncode == 0, err
    android = {k: v for k, v in _delivered(built_example).items() if k.startswith("dist/android/")}
    assert {k: v for k, v in _delivered(project).items() if k.startswith("dist/android/")} == android
    logs = [p.read_text() for p in (project / ".edgebuild" / "logs").glob("*.log")]
    assert not any(f", pid {killed[0]}]" in log.splitlines()[0] for log in logs if log)


def test_the_manifests_executor_is_validated_with_its_location(tmp_path):
    from conftest import run_edgebuild

    manifest = make_project(tmp_path)
    text = manifest.read_text()
    manifest.write_text(text + "executor: rey\n")
    done = run_edgebuild("validate", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"edgebuild.yaml:{len(text.splitlines()) + 1}:11: executor: unknown executor 'rey'; did you mean 'ray'? "
        "(available: local, ray)")
