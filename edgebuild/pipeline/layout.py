"""Where each stage keeps its state under `.edgebuild/`; one place, so tasks and stages agree."""
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..manifest import TEXT_SUFFIX, Manifest, Target
from ..plugins import Registry


@dataclass(frozen=True)
class Variant:
    """One conversion of the model: a backend with options; targets that agree on it share candidates."""

    key: str
    backend: str
    options: dict


@dataclass
class Build:
    """A manifest, the plugins that serve it, and the paths of everything a build writes."""

    manifest: Manifest
    registry: Registry

    @property
    def state(self) -> Path:
        return self.manifest.state_dir

    # variants
    def variant(self, target: Target) -> Variant:
        key, options = self.registry.backends[target.format].variant(target)
        # Backends that embed model metadata (Core ML) read it from here; it is part of the cache key.
        model = {k: self.manifest.model.get(k) for k in ("name", "description", "version")}
        return Variant(key=key, backend=target.format, options={**options, "model": model})

    @cached_property
    def variants(self) -> dict[str, Variant]:
        found = {}
        for target in self.manifest.targets:
            variant = self.variant(target)
            found.setdefault(variant.key, variant)
        return dict(sorted(found.items()))

    def backends_in_use(self) -> list[str]:
        return sorted({t.format for t in self.manifest.targets})

    # data: each role's file as stages read it
    def data_source(self, role: str) -> Path | None:
        """The manifest's file for a role ('evaluation', 'calibration', 'train'), None if not given."""
        return getattr(self.manifest, role)

    def is_text(self, role: str) -> bool:
        source = self.data_source(role)
        return source is not None and source.suffix == TEXT_SUFFIX

    def data(self, role: str) -> Path | None:
        """The .npz a stage reads for a role: the manifest's file, or the tokenization of its text."""
        if self.is_text(role):
            return self.state / "data" / f"{role}.npz"
        return self.data_source(role)

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

    # convert / compress / evaluate, per variant
    def _extension(self, variant: str) -> str:
        return self.registry.backends[self.variants[variant].backend].extension

    def fp32_bundle(self, variant: str) -> Path:
        return self.state / variant / f"fp32{self._extension(variant)}"

    def fp32_record(self, variant: str) -> Path:
        return self.state / variant / "fp32.json"

    def candidate_bundle(self, variant: str, technique: str) -> Path:
        return self.state / variant / "candidates" / f"{technique}{self._extension(variant)}"

    def candidate_record(self, variant: str, technique: str) -> Path:
        return self.state / variant / "candidates" / f"{technique}.json"

    def evaluation(self, variant: str, technique: str) -> Path:
        return self.state / variant / "evaluations" / f"{technique}.json"

    # select / package, per target
    def selection(self, target: Target) -> Path:
        return self.state / "targets" / target.name / "selection.json"

    def search_record(self, target: Target) -> Path:
        return self.state / "targets" / target.name / "search.json"

    def search_bundle(self, target: Target) -> Path:
        return self.state / "targets" / target.name / f"mixed{self._extension(self.variant(target).key)}"

    def qat_record(self, target: Target) -> Path:
        return self.state / "targets" / target.name / "qat.json"

    def qat_bundle(self, target: Target) -> Path:
        return self.state / "targets" / target.name / f"qat{self._extension(self.variant(target).key)}"

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
