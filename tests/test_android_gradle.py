"""The Android integration in a real Gradle build (Debian's Gradle 4.4.1, offline)."""
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, read_report, run_edgebuild

pytestmark = pytest.mark.slow
EDGEBUILD = Path(sys.executable).with_name("edgebuild")


@pytest.fixture(scope="module")
def gradle_home(tmp_path_factory):
    if shutil.which("gradle") is None:
        pytest.fail("gradle is not installed; `make test` installs Debian's gradle package")
    home = tmp_path_factory.mktemp("gradle-home")
    yield home
    subprocess.run(["gradle", "--stop"], env={"GRADLE_USER_HOME": str(home), "PATH": "/usr/bin:/bin"},
                   capture_output=True)


def gradle(app: Path, home: Path, *tasks, executable: str = "edgebuildExecutable") -> subprocess.CompletedProcess:
    return subprocess.run(["gradle", "--offline", "--console=plain", f"-P{executable}={EDGEBUILD}", *tasks],
                          cwd=app, capture_output=True, text=True, timeout=600,
                          env={"GRADLE_USER_HOME": str(home), "PATH": "/usr/bin:/bin", "HOME": str(home)})


@pytest.fixture
def app(built_copy) -> Path:
    """The example project with the fixture app module in `app/`, set up by `edgebuild init android`."""
    app = built_copy / "app"
    shutil.copytree(REPO / "tests" / "fixtures" / "android-app", app)
    result = run_edgebuild("init", "android", "--app-dir", "app", cwd=built_copy)
    assert result.returncode == 0, result.stderr
    assert "apply from: 'edgebuild.gradle'" in result.stdout and "manifest = '../edgebuild.yaml'" in result.stdout
    return app


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_gradle_prebuild_flow(app, gradle_home):
    project = app.parent
    # (a) preBuild runs edgebuild and the model lands in assets, with its metadata and Kotlin constants.
    first = gradle(app, gradle_home, "preBuild")
    assert first.returncode == 0, first.stdout + first.stderr
    assert ":edgebuild\n" in first.stdout and "preBuild ran" in first.stdout
    asset = app / "src" / "main" / "assets" / "models" / "digits.tflite"
    assert sha256(asset) == sha256(project / "dist" / "android" / "digits.tflite")
    assert (app / "src" / "main" / "assets" / "models" / "digits.json").is_file()
    kotlin = (app / "build" / "generated" / "source" / "edgebuild" / "DigitsModel.kt").read_text()
    assert 'const val ASSET_PATH: String = "models/digits.tflite"' in kotlin
    # The hook builds only android; the release gate still sees both targets (ios kept from the full build).
    gate = run_edgebuild("check", cwd=project)
    assert gate.returncode == 0, gate.stderr
    report = read_report(project)
    assert [(t["name"], t["in_this_build"]) for t in report["targets"]] == [("android", True), ("ios", False)]

    # (b) nothing changed: Gradle reports the task UP-TO-DATE and edgebuild does not run.
    second = gradle(app, gradle_home, "preBuild")
    assert second.returncode == 0, second.stdout + second.stderr
    assert ":edgebuild UP-TO-DATE" in second.stdout
    assert "edgebuild: android:" not in second.stdout

    # (c) editing the manifest reruns it.
    manifest = yaml.safe_load((project / "edgebuild.yaml").read_text())
    manifest["targets"][0]["budget"]["size"] = "45KB"
    (project / "edgebuild.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    third = gradle(app, gradle_home, "preBuild")
    assert third.returncode == 0, third.stdout + third.stderr
    assert ":edgebuild\n" in third.stdout and "edgebuild: android: " in third.stdout
    # ios was built from the manifest before the edit: the gate says so instead of passing it.
    stale = run_edgebuild("check", cwd=project)
    assert stale.returncode == 1
    android, ios = stale.stderr.strip().splitlines()
    assert android.startswith("✔ target android: dist/android/digits.tflite") and "matches edgebuild.lock" in android
    assert ios == "target ios: edgebuild.yaml changed since its bundle was built (sha256 differs from edgebuild.lock)"

    # (d) an impossible budget fails the Gradle build with edgebuild's one-line reason.
    manifest["targets"][0]["budget"]["size"] = "1KB"
    (project / "edgebuild.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    fourth = gradle(app, gradle_home, "preBuild")
    assert fourth.returncode != 0
    target = read_report(project)["targets"][0]
    nearest = next(c for c in target["candidates"] if c["technique"] == target["nearest"]["technique"])
    # Only the size blocks it: the smallest candidate that meets the floor.
    assert nearest["bytes"] == min(c["bytes"] for c in target["candidates"] if c.get("metric") is not None
                                   and c["metric"] >= target["accuracy"]["threshold"])
    assert ("edgebuild failed (exit 1): edgebuild.yaml: target android: no candidate meets every budget and the "
            f"floor; nearest: {nearest['technique']} (size {nearest['bytes']} B > limit 1000 B); report: dist/report.md"
            ) in fourth.stderr


def test_android_plugin_branch_and_gradle_properties(built_copy, gradle_home):
    """With an Android plugin id applied (a stand-in: see tests/fixtures/android-plugin-app/buildSrc),
    models stay uncompressed and the generated constants join the main source set; the settings come
    from Gradle properties alone (gradle.properties and -P), which is how a Kotlin DSL build passes them."""
    app = built_copy / "app"
    shutil.copytree(REPO / "tests" / "fixtures" / "android-plugin-app", app)
    assert run_edgebuild("init", "android", "--app-dir", "app", cwd=built_copy).returncode == 0
    # A second android target: `edgebuild.targets=lowend` must build it alone (the default would build both).
    manifest = yaml.safe_load((built_copy / "edgebuild.yaml").read_text())
    manifest["targets"].append({"name": "lowend", "format": "tflite", "devices": ["galaxy-a14"],
                                "budget": {"size": "50KB"}, "accuracy": {"floor": 0.95},
                                "android": {"assets_dir": "lowend"}})
    (built_copy / "edgebuild.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    properties = app / "gradle.properties"
    properties.write_text(properties.read_text().replace("edgebuild.targets=android", "edgebuild.targets=lowend"))

    result = gradle(app, gradle_home, "preBuild", "showAndroidConfiguration", executable="edgebuild.executable")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "edgebuild: lowend: " in result.stdout and "edgebuild: android: " not in result.stdout
    assert "noCompress=[tflite]" in result.stdout
    assert "build/generated/source/edgebuild" in result.stdout.split("javaSrcDirs=")[1].splitlines()[0]
    # edgebuild.assetsDir from gradle.properties: the bundle lands under src/main/models/<assets_dir>/.
    asset = app / "src" / "main" / "models" / "lowend" / "digits.tflite"
    assert sha256(asset) == sha256(built_copy / "dist" / "lowend" / "digits.tflite")
    assert not (app / "src" / "main" / "assets").exists()
    assert [(t["name"], t["in_this_build"]) for t in read_report(built_copy)["targets"]] == [
        ("android", False), ("ios", False), ("lowend", True)]


def test_gradle_fails_with_the_manifest_error(app, gradle_home):
    path = app.parent / "edgebuild.yaml"
    path.write_text(path.read_text().replace("pixel-7", "pixel-77"))
    result = gradle(app, gradle_home, "preBuild")
    assert result.returncode != 0
    assert "edgebuild: ../edgebuild.yaml:" in result.stderr and "unknown device 'pixel-77'" in result.stderr


def test_init_android_is_idempotent_and_guards_local_edits(tmp_path):
    (tmp_path / "app").mkdir()
    first = run_edgebuild("init", "android", "--app-dir", "app", cwd=tmp_path)
    assert first.returncode == 0 and "wrote app/edgebuild.gradle" in first.stderr
    script = (tmp_path / "app" / "edgebuild.gradle").read_text()
    again = run_edgebuild("init", "android", "--app-dir", "app", cwd=tmp_path)
    assert again.returncode == 0 and "already up to date" in again.stderr
    assert (tmp_path / "app" / "edgebuild.gradle").read_text() == script

    (tmp_path / "app" / "edgebuild.gradle").write_text(script + "// local edit\n")
    refused = run_edgebuild("init", "android", "--app-dir", "app", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().endswith("differs from this edgebuild's version; rerun with --force to replace it")
    forced = run_edgebuild("init", "android", "--app-dir", "app", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and (tmp_path / "app" / "edgebuild.gradle").read_text() == script


def test_store_limit_fails_a_bundle_its_declared_budget_allows(built_copy, monkeypatch, capsys):
    """A declared budget larger than the store's limit still fails at the store's limit."""
    from edgebuild import devices
    from edgebuild.cli import main

    name, limits = devices.store_for("android")
    assert name == "google-play" and limits == {"base": 200_000_000, "feature": 200_000_000,
                                                "asset-pack": 1_500_000_000}
    assert read_report(built_copy)["targets"][0]["store"] == {"store": "google-play", "delivery": "base",
                                                                "limit": 200_000_000}
    # No bundle here reaches Play's 200 MB: a store whose feature modules take 10 KB stands in (the
    # test's edge); the 60 KB size budget would let every 8- and 4-bit candidate through.
    monkeypatch.setattr(devices, "store_for", lambda platform: (name, {**limits, "feature": 10_000})
                        if platform == "android" else None)
    path = built_copy / "edgebuild.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest["targets"][0]["delivery"] = "feature"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    monkeypatch.chdir(built_copy)
    assert main(["build"]) == 1
    target = read_report(built_copy)["targets"][0]
    assert target["status"] == "fail" and target["budget"]["size"] == 60_000
    store = next(c for c in target["constraints"] if c["constraint"] == "store")
    assert store["status"] == "fail" and store["limit"] == 10_000 and store["actual"] > 10_000
    judged = [c for c in target["candidates"] if c["status"] in ("pass", "fail")]
    assert judged
    for candidate in judged:
        failed = next(f for f in candidate["failed"] if f["constraint"] == "store")
        assert (failed["limit"], failed["actual"]) == (10_000, candidate["download_bytes"])
    assert not (built_copy / "dist" / "android").exists()
    assert "store " in capsys.readouterr().err
