"""The architecture holds: one-way imports, no cycles, backends that conform to the declared
protocols (built-ins and a third-party one that implements nothing else)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, make_project, read_report, run_edgebuild
from tests.test_plugins import install_fake_distribution


def test_import_layers_hold():
    """pyproject.toml's import-linter contracts: pipeline layers one way, stages independent, plugins
    never reaching into the pipeline, the manifest or the registry (function-local imports included)."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def import_cycles(package: str) -> list[list[str]]:
    """Strongly connected groups of modules in the package's import graph (function-local imports too)."""
    import grimp

    graph = grimp.build_graph(package, include_external_packages=False)
    edges = {m: sorted(i for i in graph.find_modules_directly_imported_by(m) if i.split(".")[0] == package)
             for m in graph.modules}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in edges[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return groups


def test_no_import_cycle_among_edgebuild_modules():
    assert import_cycles("edgebuild") == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from . import b\n")  # function-local: still an import
    (package / "b.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles("cyclic") == [["cyclic.a", "cyclic.b"]]


@pytest.mark.slow
@pytest.mark.parametrize("name, options, techniques", [
    ("tflite", {}, ["fp16", "int8-dynamic", "int4-weight-only"]),
    ("coreml", {"min_ios": 16, "model": {"name": "tiny"}}, ["fp32", "int8-linear", "palettize-4bit"]),
])
def test_built_in_backends_conform(tmp_path, name, options, techniques):
    from edgebuild.plugins import default_registry
    from edgebuild.testing import check_backend

    registry = default_registry()
    backend = registry.backends[name]
    chosen = [registry.techniques[(name, technique)] for technique in techniques]
    assert check_backend(backend, tmp_path, chosen, options) == []


THIRD_PARTY = '''
"""A third-party backend: a torch.export program as the bundle, run in torch. It implements only
what edgebuild.api.Backend declares (no BackendBase), plus a packager."""
import os
import shutil
import time
from pathlib import Path

from edgebuild.api import Prediction, Technique
from edgebuild.data import run_torch_module
from edgebuild.hookspecs import hookimpl


def _note(stage):
    """Which process ran a stage's backend call, for the stage-isolation test."""
    if os.environ.get("TORCHFILE_PID_LOG"):
        with open(os.environ["TORCHFILE_PID_LOG"], "a") as log:
            log.write(f"{stage} {os.getpid()}\\n")


class TorchFileBackend:
    name = "torchfile"
    platform = "android"
    extension = ".pt2"

    def version(self):
        return "torchfile 1.0"

    def variant(self, target):
        return "torchfile", {}

    def skip_reason(self, technique, options):
        return None

    def convert(self, exported_program, out, options):
        _note("convert")
        shutil.copyfile(exported_program, out)

    def compress(self, technique, source, out):
        import torch

        _note(f"compress:{technique.name}")
        program = torch.export.load(str(source.fp32_bundle))
        if technique.recipe == "round-fp16":
            with torch.no_grad():
                for tensor in program.state_dict.values():
                    tensor.copy_(tensor.half().float())
        torch.export.save(program, str(out))

    def predict(self, bundle, inputs, *, threads, batch=1, exported_program=None):
        import torch

        _note(f"predict:{Path(bundle).name}")
        module = torch.export.load(str(bundle)).module()
        begin = time.perf_counter()
        outputs = run_torch_module(module, tuple(inputs), batch)
        return Prediction(outputs=outputs, latency_ms=(time.perf_counter() - begin) * 1000 / len(inputs[0]),
                          runtime="torch (third-party torchfile backend)")

    def describe(self, bundle):
        return {"inputs": [{"name": "x"}], "outputs": [{"name": "output_0"}]}

    def weights(self, bundle):
        return []


def package_torchfile(job):
    bundle = job.directory / f"{job.model_name}.pt2"
    shutil.copyfile(job.bundle, bundle)
    return [bundle]


@hookimpl
def register_backends(register):
    register(TorchFileBackend())


@hookimpl
def register_techniques(register):
    register(Technique("as-exported", "torchfile", "the exported program as it is"))
    register(Technique("rounded-fp16", "torchfile", "weights rounded to float16", recipe="round-fp16"))


@hookimpl
def register_packagers(register):
    register("torchfile", package_torchfile)
'''


@pytest.mark.slow
def test_a_third_party_backend_implementing_only_the_protocols_builds(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(site, "edgebuild_torchfile", THIRD_PARTY)
    sys.path.insert(0, str(site))
    try:
        from edgebuild.api import MixedPrecisionBackend, QATBackend, Technique
        from edgebuild.testing import check_backend
        from edgebuild_torchfile import TorchFileBackend

        backend = TorchFileBackend()
        assert not isinstance(backend, (MixedPrecisionBackend, QATBackend))
        assert check_backend(backend, tmp_path / "conformance",
                             [Technique("rounded-fp16", "torchfile", "", recipe="round-fp16")]) == []
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("edgebuild_torchfile", None)

    root = tmp_path / "project"
    root.mkdir()
    manifest = yaml.safe_load((REPO / "edgebuild.yaml.example").read_text())
    manifest["targets"] = [{"name": "phone", "format": "torchfile", "devices": ["pixel-8"],
                            "budget": {"size": "1MB"}, "accuracy": {"max_drop": 0.01}}]
    make_project(root, manifest)
    result = run_edgebuild("build", "--json", cwd=root, env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    target = read_report(root)["targets"][0]
    assert {c["technique"]: c["status"] for c in target["candidates"]} == {"as-exported": "pass",
                                                                          "rounded-fp16": "pass"}
    assert target["candidates"][0]["evaluated_by"] == "torch (third-party torchfile backend)"
    # No search ran (the backend declares no per-layer precisions), no training.
    assert not any(stage.startswith(("search", "qat")) for stage in json.loads(result.stdout)["executed"])
    assert (root / "dist" / "phone" / "digits.pt2").is_file()


@pytest.mark.slow
def test_a_large_model_runs_every_heavy_stage_in_its_own_process(tmp_path):
    """The automatic rule: model files of 128 MiB and up (here a sparse file beside the python entry,
    whose folder counts) run convert, every compress and every evaluation in a process of its own,
    never in the build's."""
    from edgebuild.pipeline import isolated

    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(site, "edgebuild_torchfile", THIRD_PARTY)
    manifest = yaml.safe_load((REPO / "edgebuild.yaml.example").read_text())
    manifest["targets"] = [{"name": "phone", "format": "torchfile", "devices": ["pixel-8"],
                            "budget": {"size": "1MB"}, "accuracy": {"max_drop": 0.01}}]
    make_project(tmp_path, manifest)
    with open(tmp_path / "examples" / "digits" / "extra-weights.bin", "wb") as sparse:
        sparse.truncate(isolated.ISOLATE_BYTES)
    log = tmp_path / "pids.txt"
    env = {key: value for key, value in os.environ.items() if key != isolated.SETTING}
    build = subprocess.Popen([sys.executable, "-m", "edgebuild", "build"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**env, "PYTHONPATH": str(site), "TORCHFILE_PID_LOG": str(log)})
    _, errors = build.communicate(timeout=600)
    assert build.returncode == 0, errors
    processes = {}  # stage -> pids its calls ran in (an evaluation predicts twice: the determinism check)
    for stage, pid in (line.split() for line in log.read_text().splitlines()):
        processes.setdefault(stage, set()).add(int(pid))
    assert set(processes) >= {"convert", "compress:rounded-fp16", "predict:rounded-fp16.pt2"}, processes
    # Each stage ran in one process of its own, none of them the build's.
    assert all(len(pids) == 1 for pids in processes.values()), processes
    assert len(set.union(*processes.values())) == len(processes), processes
    assert build.pid not in set.union(*processes.values())


def test_isolation_setting_overrides_the_size_rule(monkeypatch):
    from edgebuild.pipeline import isolated

    monkeypatch.delenv(isolated.SETTING, raising=False)
    assert not isolated.wanted(isolated.ISOLATE_BYTES - 1) and isolated.wanted(isolated.ISOLATE_BYTES)
    monkeypatch.setenv(isolated.SETTING, "0")
    assert not isolated.wanted(10 * isolated.ISOLATE_BYTES)
    monkeypatch.setenv(isolated.SETTING, "1")
    assert isolated.wanted(0)
