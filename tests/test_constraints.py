"""Constraints end to end: what this host cannot measure fails as unverified, and `edgebuild check`
judges every constraint selection judges (one policy)."""
import json
import re
from xml.etree import ElementTree

import pytest
import yaml

from edgebuild.cli import main
from tests.conftest import read_report, run_edgebuild
from tests.test_plugins import install_fake_distribution


def edit_manifest(root, change) -> None:
    path = root / "edgebuild.yaml"
    manifest = yaml.safe_load(path.read_text())
    change(manifest)
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))


@pytest.mark.slow
def test_a_core_ml_latency_budget_on_linux_fails_as_unverified(built_copy):
    edit_manifest(built_copy, lambda m: m["targets"][1]["budget"].update(latency_ms=0.001))
    result = run_edgebuild("build", "--target", "ios", cwd=built_copy)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("edgebuild.yaml: target ios: no candidate meets every budget and the floor; nearest: ")
    assert "latency unverified (limit 0.001 ms): latency not measured: Core ML runs models on macOS only" in last

    target = next(t for t in read_report(built_copy)["targets"] if t["name"] == "ios")
    assert target["status"] == "fail" and target["chosen"] is None
    latency = next(c for c in target["constraints"] if c["constraint"] == "latency")
    assert latency["status"] == "unverified" and latency["actual"] is None
    judged = [c for c in target["candidates"] if c["status"] not in ("skipped", "error")]
    assert judged and all(c["status"] in ("unverified", "fail") for c in judged)
    assert any(c["status"] == "unverified" for c in judged)  # met every measured budget, still not chosen
    markdown = (built_copy / "dist" / "report.md").read_text()
    assert "**ios** constraints:" in markdown and "⚠️ unverified latency unverified: latency not measured" in markdown
    case = ElementTree.parse(built_copy / "dist" / "junit.xml").getroot().find(
        "./testsuite[@name='edgebuild.ios']/testcase[@name='latency']")
    assert case.find("failure").get("type") == "latency-unverified"
    assert (built_copy / "dist" / "report.html").read_text().count('class="unverified"') >= 2
    assert not (built_copy / "dist" / "ios").exists()  # no bundle left behind for a failing target


@pytest.mark.slow
def test_check_fails_when_the_latency_budget_drops_below_the_measured_latency(built_copy):
    android = next(t for t in read_report(built_copy)["targets"] if t["name"] == "android")
    measured = android["chosen"]["latency_ms"]
    assert measured > 0.001
    edit_manifest(built_copy, lambda m: m["targets"][0]["budget"].update(latency_ms=0.001))
    result = run_edgebuild("check", cwd=built_copy)
    assert result.returncode == 1
    assert (f"target android: no longer meets its constraints: latency {measured:.3f} ms > limit 0.001 ms"
            in result.stderr), result.stderr


@pytest.mark.slow
def test_check_fails_when_the_delivery_store_limit_is_exceeded(built_copy, monkeypatch, capsys):
    from edgebuild import devices

    # The catalog's Play limits are 200 MB and up; a store whose feature modules take 1 KB stands in.
    store = ("Google Play", {"base": 200_000_000, "feature": 1000, "asset-pack": 1_500_000_000})
    monkeypatch.setattr(devices, "store_for", lambda platform: store if platform == "android" else None)
    monkeypatch.chdir(built_copy)
    assert main(["check"]) == 0
    edit_manifest(built_copy, lambda m: m["targets"][0].update(delivery="feature"))
    assert main(["check"]) == 1
    # The packaged bundle's download bytes, measured by check itself (its zip names the packaged file).
    assert re.search(r"^target android: no longer meets its constraints: store \d{5} B > limit 1000 B$",
                     capsys.readouterr().err, re.MULTILINE)


SNEAKY = '''
from edgebuild.api import Technique
from edgebuild.hookspecs import hookimpl

@hookimpl
def register_techniques(register):
    register(Technique(
        name="qat-int8", backend="tflite", description="third-party: a name that looks like a trained candidate",
        recipe=[{"regex": ".*", "operation": "*", "algorithm_key": "min_max_uniform_quantize",
                 "op_config": {"weight_tensor_config": {"num_bits": 8, "symmetric": True,
                               "granularity": "CHANNELWISE", "dtype": "INT"},
                               "compute_precision": "FLOAT", "explicit_dequantize": True}}]))
'''


@pytest.mark.slow
def test_package_takes_the_chosen_bundle_from_selection_never_from_a_technique_name(built_copy, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(site, "edgebuild_sneaky", SNEAKY)
    edit_manifest(built_copy, lambda m: m.update(search={"strategy": "uniform", "techniques": ["qat-int8"]}))
    result = run_edgebuild("build", "--target", "android", "--json", cwd=built_copy, env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    chosen = json.loads(result.stdout)["targets"][0]["chosen"]
    assert chosen["technique"] == "qat-int8"
    from edgebuild.fsutil import sha256_file

    assert sha256_file(built_copy / "dist" / "android" / "digits.tflite") == chosen["sha256"]
