"""Shared fixtures: throwaway projects built from the shipped digits example."""
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests import figures
from tests.figures import record_figure

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Set in the controller before xdist starts its workers, which inherit it.
    if not os.environ.get(figures.FOLDER_VARIABLE):
        os.environ[figures.FOLDER_VARIABLE] = tempfile.mkdtemp(prefix="edgebuild-figures-")


def pytest_terminal_summary(terminalreporter):
    lines = figures.recorded()
    if lines:
        terminalreporter.section("edgebuild figures")
        for line in lines:
            terminalreporter.write_line(line)
EXAMPLE = REPO / "examples" / "digits"


def example_manifest(**overrides) -> dict:
    manifest = yaml.safe_load((REPO / "edgebuild.yaml.example").read_text())
    manifest.update(overrides)
    return manifest


def make_project(root: Path, manifest: dict | str | None = None) -> Path:
    """A project folder holding a copy of the digits example and a manifest; returns the manifest path."""
    shutil.copytree(EXAMPLE, root / "examples" / "digits", ignore=shutil.ignore_patterns("__pycache__"))
    path = root / "edgebuild.yaml"
    if manifest is None:
        manifest = example_manifest()
    path.write_text(manifest if isinstance(manifest, str) else yaml.safe_dump(manifest, sort_keys=False))
    return path


def example_project(root: Path, example: str, manifest: dict) -> Path:
    """A project holding a copy of examples/<example> and the given manifest; returns the folder."""
    shutil.copytree(REPO / "examples" / example, root / "examples" / example,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "edgebuild.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return root


def python_project(root: Path, name: str, model_source: str, *, samples=None, metric: str = "agreement",
                   floor: float = 0.5) -> Path:
    """A project whose model is `net/model.py:build` (inputs of 4 floats) and one Android target;
    evaluated on `samples` (two zero rows unless given). Returns the folder."""
    import numpy as np

    (root / "net").mkdir(parents=True, exist_ok=True)
    (root / "net" / "model.py").write_text(model_source)
    np.savez(root / "net" / "eval.npz", x=np.zeros((2, 4), np.float32) if samples is None else samples)
    (root / "edgebuild.yaml").write_text(yaml.safe_dump({
        "version": 1, "model": {"name": name, "source": "python", "entry": "net/model.py:build"},
        "data": {"evaluation": "net/eval.npz"}, "metric": metric,
        "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "accuracy": {"floor": floor}}],
    }, sort_keys=False))
    return root


def spotter_source(frames: int, features: int, width: int, labels: int) -> str:
    """A keyword spotter's model.py (`build()`): `frames` frames of `features` features, a GRU of
    `width`, a label every frame. Its steps roll into a loop that writes every step's output."""
    return f'''
import torch
from torch import nn


class Spotter(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU({features}, {width}, batch_first=True)
        self.fc = nn.Linear({width}, {labels})

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y)


def build():
    torch.manual_seed(0)
    return Spotter().eval(), (torch.randn(1, {frames}, {features}),)
'''


def run_edgebuild(*args, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would, in its own process."""
    return subprocess.run([sys.executable, "-m", "edgebuild", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@functools.cache
def report_schema() -> dict:
    from importlib import resources

    return json.loads(resources.files("edgebuild.schemas").joinpath("report.schema.json").read_text())


def validate_report(path: Path) -> dict:
    """Every report the suite reads is checked against the published schema."""
    import jsonschema

    report = json.loads(path.read_text())
    jsonschema.validate(report, report_schema(), cls=jsonschema.Draft202012Validator)
    return report


def read_report(root: Path) -> dict:
    return validate_report(root / "dist" / "report.json")


@pytest.fixture(scope="session", autouse=True)
def every_report_validates(tmp_path_factory):
    """After the session, validate every report.json any test wrote, and say how many."""
    yield
    import jsonschema

    reports = sorted(tmp_path_factory.getbasetemp().rglob("report.json"))
    failures = []
    for path in reports:
        try:
            validate_report(path)
        except (jsonschema.ValidationError, ValueError) as exc:
            failures.append(f"{path}: {str(exc).splitlines()[0]}")
    record_figure(f"report.json files validated against the published schema: {len(reports)}, invalid: {len(failures)}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="session")
def built_example(tmp_path_factory) -> Path:
    """The example built once per session; tests copy it so cached stages make them fast."""
    root = tmp_path_factory.mktemp("built")
    make_project(root)
    result = run_edgebuild("build", cwd=root)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def built_copy(built_example, tmp_path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(built_example, root, symlinks=True)
    return root
