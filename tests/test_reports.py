"""Reports for release managers and CI: schema, Markdown, JUnit, HTML, baselines, lock and check."""
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

from tests.conftest import REPO, read_report, report_schema, run_edgebuild, validate_report

pytestmark = pytest.mark.slow
ARTIFACTS = REPO / "test-artifacts"


def set_budget(root: Path, size: str) -> None:
    path = root / "edgebuild.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest["targets"][0]["budget"]["size"] = size
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))


def test_schema_is_a_valid_json_schema_and_rejects_wrong_reports(built_example):
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(report_schema())
    report = read_report(built_example)
    report["targets"][0]["status"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, report_schema(), cls=jsonschema.Draft202012Validator)


def test_all_four_formats_are_written_by_default(built_example):
    names = sorted(p.name for p in (built_example / "dist").iterdir() if p.is_file())
    assert names == ["junit.xml", "report.html", "report.json", "report.md"]


def test_junit_has_a_case_per_constraint_with_limit_and_actual(built_copy):
    passing = ElementTree.parse(built_copy / "dist" / "junit.xml").getroot()
    cases = passing.find("./testsuite[@name='edgebuild.android']").findall("testcase")
    assert [c.get("name") for c in cases] == ["size", "download", "store", "accuracy"]
    assert not passing.findall(".//failure")
    size = {p.get("name"): p.get("value") for p in cases[0].findall("./properties/property")}
    assert size == {"limit": "60000", "actual": str(read_report(built_copy)["targets"][0]["chosen"]["bytes"]),
                    "status": "pass"}

    set_budget(built_copy, "1KB")
    assert run_edgebuild("build", cwd=built_copy).returncode == 1
    failing = ElementTree.parse(built_copy / "dist" / "junit.xml").getroot()
    suite = failing.find("./testsuite[@name='edgebuild.android']")
    assert suite.get("failures") == "2"
    failures = {c.get("name"): c.find("failure") for c in suite.findall("testcase") if c.find("failure") is not None}
    assert set(failures) == {"size", "all constraints"}
    smallest = min(c["bytes"] for c in read_report(built_copy)["targets"][0]["candidates"] if "bytes" in c)
    assert failures["size"].get("message").startswith(f"size: limit 1000, best actual {smallest} (")


def chromium_console_errors(page: Path, screenshot: Path) -> list[str]:
    """Load a page in headless Chromium; return console errors it logged."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed; `make test` installs Debian's chromium package")
    result = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             f"--user-data-dir={screenshot.parent / 'chromium-profile'}", "--enable-logging=stderr",
                             "--v=0", "--window-size=1100,1800", f"--screenshot={screenshot}", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000, result.stderr[-2000:]
    return [line for line in result.stderr.splitlines() if ":CONSOLE" in line]


def test_html_report_renders_in_chromium_without_console_errors(built_example, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    # The check itself must be able to fail: a page that logs an error is caught.
    control = tmp_path / "control.html"
    control.write_text("<html><body><p>x</p><script>console.error('control error')</script></body></html>")
    assert any("control error" in line for line in chromium_console_errors(control, tmp_path / "control.png"))

    page = built_example / "dist" / "report.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text.replace("https://edgebuild.dev", "")  # self-contained
    assert "<svg" in text and "Pareto front" in text and "Decision log" in text
    assert "Sequential_classifier/Linear_1" in text  # per-tensor byte breakdown
    assert chromium_console_errors(page, ARTIFACTS / "report.png") == []


def test_baseline_deltas_and_fail_on_growth(built_copy, tmp_path):
    old = read_report(built_copy)
    old["targets"][0]["chosen"]["bytes"] = int(old["targets"][0]["chosen"]["bytes"] * 0.8)
    baseline = tmp_path / "main-report.json"
    baseline.write_text(json.dumps(old))

    grown = run_edgebuild("report", "--baseline", baseline, "--fail-on-growth", "5%", cwd=built_copy)
    assert grown.returncode == 1, grown.stderr
    assert "target android: bytes grew 25.0%" in grown.stderr and "limit 5%" in grown.stderr
    report = read_report(built_copy)
    delta = report["baseline_report"]["targets"][0]["bytes"]
    assert delta["percent"] == pytest.approx(25.0, abs=0.01)
    assert "Compared with" in (built_copy / "dist" / "report.md").read_text()

    tolerated = run_edgebuild("report", "--baseline", baseline, "--fail-on-growth", "30", cwd=built_copy)
    assert tolerated.returncode == 0, tolerated.stderr
    assert tolerated.stdout.splitlines()[1].startswith("android\t+")

    missing = run_edgebuild("report", "--baseline", tmp_path / "nope.json", cwd=built_copy)
    assert missing.returncode == 2 and "nope.json: report not found" in missing.stderr


def tree_state(root: Path) -> dict:
    """Every file under `root` with its bytes' hash and modification time."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_check_verifies_lock_and_detects_a_modified_bundle(built_copy):
    lock = json.loads((built_copy / "edgebuild.lock").read_text())
    for target in ("android", "ios"):
        assert set(lock["targets"][target]["inputs"]) >= {"edgebuild.yaml", "examples/digits/model.py",
                                                          "examples/digits/eval.npz"}
    assert "dist/android/digits.tflite" in lock["targets"]["android"]["files"]

    ok = run_edgebuild("check", cwd=built_copy)
    assert ok.returncode == 0, ok.stderr
    assert "target android: dist/android/digits.tflite" in ok.stderr

    bundle = built_copy / "dist" / "android" / "digits.tflite"
    data = bytearray(bundle.read_bytes())
    data[-1] ^= 0xFF
    bundle.write_bytes(bytes(data))
    before = tree_state(built_copy)
    tampered = run_edgebuild("check", cwd=built_copy)
    assert tampered.returncode == 1
    assert "dist/android/digits.tflite: sha256 mismatch" in tampered.stderr
    # Check builds nothing: a build would have repackaged the tampered bundle (and touched the state).
    assert bundle.read_bytes() == bytes(data)
    assert tree_state(built_copy) == before


def test_check_flags_inputs_changed_since_the_build_and_budgets_no_longer_met(built_copy):
    set_budget(built_copy, "20KB")
    result = run_edgebuild("check", cwd=built_copy)
    assert result.returncode == 1
    bundle_bytes = read_report(built_copy)["targets"][0]["chosen"]["bytes"]
    assert result.stderr.strip().splitlines() == [
        "target android: edgebuild.yaml changed since its bundle was built (sha256 differs from edgebuild.lock)",
        f"target android: no longer meets its constraints: size {bundle_bytes} B > limit 20000 B",
        "target ios: edgebuild.yaml changed since its bundle was built (sha256 differs from edgebuild.lock)"]


def test_check_without_a_lock_exits_2(built_copy):
    (built_copy / "edgebuild.lock").unlink()
    result = run_edgebuild("check", cwd=built_copy)
    assert result.returncode == 2
    assert result.stderr.strip() == "edgebuild.lock: edgebuild.lock not found; run `edgebuild build` first"


def test_partial_build_keeps_the_other_targets_in_reports_and_lock(built_copy):
    before = read_report(built_copy)
    lock_before = json.loads((built_copy / "edgebuild.lock").read_text())
    result = run_edgebuild("build", "--target", "ios", cwd=built_copy)
    assert result.returncode == 0, result.stderr
    report = read_report(built_copy)
    assert [(t["name"], t["in_this_build"]) for t in report["targets"]] == [("android", False), ("ios", True)]
    kept = report["targets"][0]
    assert kept["built_at"] == before["targets"][0]["built_at"]
    assert kept["chosen"] == before["targets"][0]["chosen"]
    assert (f"> android: not built by this build (--target/--platform); kept from the build of {kept['built_at']}"
            in (built_copy / "dist" / "report.md").read_text())
    assert "kept from the build of" in (built_copy / "dist" / "report.html").read_text()
    suites = ElementTree.parse(built_copy / "dist" / "junit.xml").getroot()
    assert [s.get("name") for s in suites] == ["edgebuild.android", "edgebuild.ios"]
    assert suites[0].find("properties/property[@name='in_this_build']").get("value") == "false"
    assert json.loads((built_copy / "edgebuild.lock").read_text()) == lock_before
    gate = run_edgebuild("check", cwd=built_copy)
    assert gate.returncode == 0, gate.stderr
    assert len(gate.stderr.strip().splitlines()) == 2


def test_report_formats_are_selectable(built_copy, tmp_path):
    summary = tmp_path / "summary.md"
    result = run_edgebuild("build", "--report", "junit", cwd=built_copy, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (built_copy / "dist").iterdir() if p.is_file())
    assert files == ["junit.xml", "report.json"]  # json is always written; md and html were removed
    assert not summary.exists()
    result = run_edgebuild("build", "--report", "md", cwd=built_copy, env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert result.returncode == 0
    assert "| android (tflite) | ✅ pass |" in summary.read_text()
    validate_report(built_copy / "dist" / "report.json")
