"""Where each stage keeps its state under `.edgebuild/`; one place, so tasks and stages agree."""
from dataclasses import dataclass
from pathlib import Path

from ..manifest import Manifest, Target
from ..plugins import Registry


@dataclass
class Build:
    """A manifest, the plugins that serve it, and the paths of everything a build writes."""

    manifest: Manifest
    registry: Registry

    @property
    def state(self) -> Path:
        return self.manifest.state_dir

    # load / export
    @property
    def exported_program(self) -> Path:
        return self.state / "model" / "exported.pt2"

    @property
    def model_meta(self) -> Path:
        return self.state / "model" / "model.json"

    @property
    def reference(self) -> Path:
        return self.state / "model" / "reference.npz"

    @property
    def baseline(self) -> Path:
        return self.state / "model" / "baseline.json"

    # convert / compress / evaluate, per backend
    def fp32_bundle(self, backend: str) -> Path:
        return self.state / backend / f"fp32{self.registry.backends[backend].extension}"

    def candidate_bundle(self, backend: str, technique: str) -> Path:
        return self.state / backend / "candidates" / f"{technique}{self.registry.backends[backend].extension}"

    def candidate_record(self, backend: str, technique: str) -> Path:
        return self.state / backend / "candidates" / f"{technique}.json"

    def evaluation(self, backend: str, technique: str) -> Path:
        return self.state / backend / "evaluations" / f"{technique}.json"

    # select / package, per target
    def selection(self, target: Target) -> Path:
        return self.state / "targets" / target.name / "selection.json"

    def packaged(self, target: Target) -> Path:
        return self.state / "targets" / target.name / "packaged.json"

    def target_output(self, target: Target) -> Path:
        return self.manifest.output / target.name

    @property
    def report_record(self) -> Path:
        """Which report files the last report stage wrote, with their hashes."""
        return self.state / "reports.json"

    @property
    def staging(self) -> Path:
        return self.state / "staging"

    @property
    def trash(self) -> Path:
        return self.state / "trash"

    def log(self, task_name: str) -> Path:
        return self.state / "logs" / (task_name.replace(":", "-") + ".log")

    def backends_in_use(self) -> list[str]:
        return sorted({t.format for t in self.manifest.targets})
