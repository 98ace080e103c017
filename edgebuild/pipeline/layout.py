"""Where each stage keeps its state under `.edgebuild/`, and what a build is made of (variants,
techniques, searches, input files): one place, so the task graph and the stages agree."""
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..api import MixedPrecisionBackend, ModelInterface, QATBackend, Technique
from ..data import shard_files
from ..errors import InputError
from ..manifest import ENTRY_PATTERN, TEXT_SUFFIX, Manifest, Target
from ..plugins import Registry, code_fingerprint
from .cache import CACHE_VARIABLE, SharedCache, open_cache


@dataclass(frozen=True)
class Variant:
    """One conversion of the model: a backend with options; targets that agree on it share candidates."""

    key: str
    backend: str
    options: dict


def _in_state(*parts: str) -> property:
    """A fixed file under the build's state folder."""
    return property(lambda self: self.state.joinpath(*parts))


EVALUATE_ALL_VARIABLE = "EDGEBUILD_EVALUATE_ALL"  # set by `build --evaluate-all`
EXECUTOR_VARIABLE = "EDGEBUILD_EXECUTOR"          # set by `build --executor`
RAY_ADDRESS_VARIABLE = "EDGEBUILD_RAY_ADDRESS"    # set by `build --ray-address`
EXECUTORS = ("local", "ray")


def executor_name(manifest: Manifest | None = None) -> str:
    """Where heavy stages run (pipeline/executor.py): --executor (through the environment), else
    the manifest's `executor:`, else local."""
    name = os.environ.get(EXECUTOR_VARIABLE) or (manifest.executor if manifest else None) or "local"
    if name not in EXECUTORS:
        raise InputError(f"unknown executor {name!r} (executors: {', '.join(EXECUTORS)})", file=EXECUTOR_VARIABLE)
    return name


@dataclass
class Build:
    """A manifest, the plugins that serve it, and the paths of everything a build writes."""

    manifest: Manifest
    registry: Registry

    @property
    def state(self) -> Path:
        return self.manifest.state_dir

    @cached_property
    def shared_cache(self) -> SharedCache | None:
        """The cache shared with other clones and machines: --cache / EDGEBUILD_CACHE, else the
        manifest's `cache:`; None without one."""
        return open_cache(os.environ.get(CACHE_VARIABLE) or self.manifest.cache, self.manifest.root)

    # variants
    def variant(self, target: Target) -> Variant:
        key, options = self.registry.backends[target.format].variant(target)
        # What each backend writes into its bundles for the platforms' tools (ModelInterface.from_json
        # reads it back); part of the cache key, so a label edit rebuilds the bundles that carry it.
        interface = self.manifest.interface or ModelInterface(self.manifest.model_name)
        return Variant(key=key, backend=target.format, options={**options, "model": interface.to_json()})

    @cached_property
    def variants(self) -> dict[str, Variant]:
        found = {}
        for target in self.manifest.targets:
            variant = self.variant(target)
            found.setdefault(variant.key, variant)
        return dict(sorted(found.items()))

    def evaluation_size_limit(self, variant_key: str) -> int | None:
        """Bytes above which a candidate of this variant fails every target's size budget, so its
        accuracy cannot change what ships: it is not evaluated (`--evaluate-all` evaluates it).
        None when a target of the variant has no size budget, or every candidate is to be evaluated."""
        if os.environ.get(EVALUATE_ALL_VARIABLE) == "1":
            return None
        sizes = [t.size for t in self.manifest.declared_targets if self.variant(t).key == variant_key]
        return None if not sizes or None in sizes else max(sizes)

    def kept_targets(self) -> list[Target]:
        """Declared targets outside a --target/--platform selection that an earlier build delivered:
        their bundles, report entries and lock entries stay as that build left them."""
        current = {t.name for t in self.manifest.targets}
        return [t for t in self.manifest.declared_targets if t.name not in current
                and self.selection(t).is_file() and self.packaged(t).is_file()]

    def reported_targets(self) -> list[Target]:
        """The targets the reports list: this build's and the kept ones, in the manifest's order."""
        shown = {t.name for t in self.manifest.targets} | {t.name for t in self.kept_targets()}
        return [t for t in self.manifest.declared_targets if t.name in shown]

    def backends_in_use(self, targets: list[Target] | None = None) -> list[str]:
        """The backends of `targets` (default: this build's)."""
        return sorted({t.format for t in (self.manifest.targets if targets is None else targets)})

    def backend(self, target: Target):
        return self.registry.backends[target.format]

    @property
    def gate_metric(self):
        """The registered metric that gates selection."""
        return self.registry.metrics[self.manifest.gate.name]

    def code(self, *items: tuple[str, str]) -> str:
        """Fingerprint of edgebuild's code and of the plugins that registered `items`: part of
        every cache key, so a new release or a local plugin edit reruns what that code produces."""
        return code_fingerprint(self.registry, *items)

    def runnable_techniques(self, variant_key: str) -> list[tuple[Technique, str | None]]:
        """Every technique of the variant's backend, with the reason it is skipped (None: it runs).
        A faster form of another technique is left out, not skipped, unless a target of the variant
        has a latency budget: without one the smaller form always wins."""
        variant = self.variants[variant_key]
        backend = self.registry.backends[variant.backend]
        allowed = self.manifest.search.get("techniques")
        timed = any(t.latency_ms is not None for t in self.manifest.targets if self.variant(t).key == variant_key)
        techniques = self.registry.techniques_for(variant.backend)
        by_name = {technique.name: technique for technique in techniques}
        result = []
        for technique in techniques:
            if technique.faster_form_of and not timed:
                continue
            # A faster form runs where its smaller form can.
            smaller = by_name.get(technique.faster_form_of)
            reason = ((smaller and backend.skip_reason(smaller, variant.options))
                      or backend.skip_reason(technique, variant.options))
            # search.techniques naming a technique takes its faster form along.
            if reason is None and allowed is not None and not {technique.name, technique.faster_form_of} & set(allowed):
                reason = "not in search.techniques"
            if reason is None and technique.needs_calibration and self.manifest.calibration is None:
                reason = "needs data.calibration, which the manifest does not give"
            result.append((technique, reason))
        return result

    def searches(self, target: Target) -> bool:
        """Whether this build searches mixed precision for the target: the strategy declares that
        it searches and the backend declares per-layer precisions."""
        strategy = self.registry.strategies[self.manifest.search["strategy"]]
        return strategy.searches and isinstance(self.backend(target), MixedPrecisionBackend)

    def trains(self, target: Target) -> bool:
        """Whether the target asks for quantization-aware training (validation checked the backend can)."""
        return target.qat is not None and isinstance(self.backend(target), QATBackend)

    # files a build reads
    def model_sources(self) -> list[Path]:
        """Files whose change must re-export the model.

        A python entry may read anything beside it (weights, configs, sibling modules), so its whole
        folder counts, but for what the manifest names as something else (the manifest, data, the
        project's plugins: a metric edit never re-exports); unchanged re-exports produce identical
        bytes and stop the rebuild there.
        """
        manifest = self.manifest
        if manifest.model["source"] != "python":
            path = (manifest.root / manifest.model["path"]).resolve()
            # A Hugging Face model is a folder: every file in it (weights, config, tokenizer) counts.
            return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        entry = (manifest.root / ENTRY_PATTERN.match(manifest.model["entry"])["file"]).resolve()
        skip = {manifest.state_dir, manifest.output, manifest.lock_file, manifest.path, *manifest.plugins,
                *manifest.label_files.values(),
                *(shard for p in (manifest.evaluation, manifest.calibration, manifest.train) if p
                  for shard in [p, *shard_files(p)])}
        files = []
        for path in sorted(entry.parent.rglob("*")):
            if not path.is_file() or any(s == path or s in path.parents for s in skip):
                continue
            relative = path.relative_to(entry.parent).parts
            if any(part.startswith(".") or part == "__pycache__" for part in relative):
                continue
            files.append(path)
        return files

    def input_files(self) -> list[Path]:
        """Every file a build reads: the manifest, the model's files, the data."""
        manifest = self.manifest
        files = {manifest.path, *shard_files(manifest.evaluation), *self.model_sources(), *manifest.plugins,
                 *manifest.label_files.values()}
        files.update(shard for p in (manifest.calibration, manifest.train) if p for shard in shard_files(p))
        return sorted(files)

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
    exported_program = _in_state("model", "exported.pt2")
    model_meta = _in_state("model", "model.json")
    reference = _in_state("model", "reference.npz")      # fp32 outputs on the evaluation set
    baseline = _in_state("model", "baseline.json")       # fp32 metrics

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

    def sensitivity_cache(self, variant: str) -> Path:
        return self.state / variant / "sensitivity.json"

    def search_cache(self, variant: str) -> Path:
        """Full evaluations of mixed assignments, shared by every target of the variant."""
        return self.state / variant / "search"

    def qat_bundle(self, target: Target) -> Path:
        return self.state / "targets" / target.name / f"qat{self._extension(self.variant(target).key)}"

    def packaged(self, target: Target) -> Path:
        return self.state / "targets" / target.name / "packaged.json"

    def target_output(self, target: Target) -> Path:
        return self.manifest.output / target.name

    report_record = _in_state("reports.json")  # which report files the last report stage wrote, with hashes
    staging = _in_state("staging")
    trash = _in_state("trash")

    def log(self, task_name: str) -> Path:
        return self.state / "logs" / (task_name.replace(":", "-") + ".log")
