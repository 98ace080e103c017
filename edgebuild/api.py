"""The contract plugins see: what they register, what a backend may declare it can do, and the
records stages exchange. Small, declarative, and free of heavy imports.

Core code asks a backend what it can do through these protocols
(`isinstance(backend, MixedPrecisionBackend)`), never by probing attributes one by one;
`edgebuild.testing.check_backend` tells a plugin author whether a backend conforms.
"""
import importlib.metadata
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import yaml


@dataclass(frozen=True)
class Technique:
    """One way to compress a model for one backend; `recipe` is backend data, not code."""

    name: str
    backend: str
    description: str
    recipe: Any = None
    needs_calibration: bool = False
    # The report shows what one knob (granularity, calibrated ranges) bought: this technique's
    # metric and bytes against `compare_with`, which differs from it in `knob` alone.
    compare_with: str = ""
    knob: str = ""
    # The same compression as the technique named, laid out to run faster for more bytes (TFLite: a
    # recurrent net's steps unrolled, not one WHILE loop). Built only for a target with a latency
    # budget, where it competes with the smaller form under the same policy.
    faster_form_of: str = ""


class NotApplicable(Exception):
    """Raised by `Backend.compress` when a technique has nothing to act on in this model (say, no
    embedding table): the candidate is reported as skipped with this reason, not as an error."""


@dataclass(frozen=True)
class Metric:
    """How good a candidate's outputs are, given the fp32 reference outputs and, if it needs them, labels.

    `compute(outputs, reference, labels)` gets one output's array (samples first), the fp32 model's
    array for the same output, and that output's labels (the data file's `y_<output>`, else `y`).
    A metric with `all_outputs=True` gets every output instead, as {name: array} dicts (labels too:
    {array name: array}). Labels are whatever numeric arrays the metric understands; the built-in
    label metrics take integer classes (`integer_labels`).
    """

    name: str
    description: str
    compute: Callable[[Any, Any, Any], float]
    higher_is_better: bool = True
    needs_labels: bool = False
    # Metrics measured against fp32 itself (sqnr) have no finite fp32 baseline: only `floor` applies.
    has_baseline: bool = True
    unit: str = ""
    bounds: tuple[float | None, float | None] = (0.0, 1.0)   # the values it can take (None: unbounded)
    all_outputs: bool = False
    integer_labels: bool = True          # with needs_labels: one integer class per sample (or position)
    # Without `output:`, a label-free metric judges every output it applies to (by the output's shape)
    # and gates on the worst; None: every output.
    applies: Callable[[tuple], bool] | None = None

    def meets(self, value: float, threshold: float) -> bool:
        """Whether a value is at least as good as the threshold, in this metric's direction."""
        return value >= threshold if self.higher_is_better else value <= threshold

    def worst(self, values: list[float]) -> float:
        return min(values) if self.higher_is_better else max(values)


@dataclass
class CompressInput:
    """What a backend gets to build one candidate."""

    fp32_bundle: Path
    exported_program: Path
    calibration: Sequence[tuple[np.ndarray, ...]] | None   # batch-of-one samples, inputs in argument order
    work_dir: Path
    options: dict = field(default_factory=dict)            # the variant's options (e.g. {"min_ios": 16})


@dataclass
class Prediction:
    """A bundle run on a data set in the target runtime.

    `outputs`: every output of the model, samples first: a list in the model's output order, or a
    dict by name (a TFLite signature's output names, Core ML's output names). A single array is
    taken as the only output.
    """

    outputs: list[np.ndarray] | dict[str, np.ndarray] | np.ndarray
    latency_ms: float | None
    runtime: str
    details: dict = field(default_factory=dict)
    # Why latency_ms is None, in words a release manager reads ("Core ML runs models on macOS only"):
    # a latency budget that cannot be measured is reported unverified with this reason, never passed.
    latency_note: str | None = None
    # True where identical inputs give identical outputs by construction (a torch simulation on the
    # CPU): evaluation then skips running its first samples a second time to check.
    deterministic: bool = False


@dataclass(frozen=True)
class ImageInput:
    """An input the app feeds as an image: pixels in `range`, normalized as (pixel - mean) / std per
    channel before the model sees them (the evaluation data hold the normalized values)."""

    layout: str                          # "NCHW" or "NHWC": where the channels are in the input's shape
    mean: tuple[float, ...]              # one value, or one per channel
    std: tuple[float, ...]
    range: tuple[float, float] = (0.0, 255.0)
    description: str = ""

    def channels(self, shape: Sequence[int]) -> int:
        return int(shape[1] if self.layout == "NCHW" else shape[-1])

    def per_channel(self, channels: int) -> tuple[list[float], list[float]]:
        """(mean, std), one value per channel (a single value applies to every channel)."""
        return ([*self.mean] * channels if len(self.mean) == 1 else list(self.mean),
                [*self.std] * channels if len(self.std) == 1 else list(self.std))

    def to_json(self) -> dict:
        return {"layout": self.layout, "mean": list(self.mean), "std": list(self.std), "range": list(self.range),
                "description": self.description}

    @classmethod
    def from_json(cls, record: dict) -> "ImageInput":
        return cls(record["layout"], tuple(record["mean"]), tuple(record["std"]), tuple(record["range"]),
                   record.get("description", ""))


# `labels` key for the model's only output, when the manifest gives one file without an output name.
ONLY_OUTPUT = ""


@dataclass(frozen=True)
class ModelInterface:
    """What the platforms' own tools read from a bundle (TFLite Model Metadata, a Core ML model's
    description): general info, image inputs with their normalization, class labels per output.
    Backends get it as the variant option `model` and write it in their format's own form."""

    name: str
    description: str = ""
    version: str = ""
    author: str = ""
    license: str = ""
    images: Mapping[str, ImageInput] = field(default_factory=dict)      # input name -> image
    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # output name (or ONLY_OUTPUT) -> labels

    def labels_by_output(self, outputs: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """Labels keyed by real output names, in the model's output order."""
        if ONLY_OUTPUT in self.labels and len(outputs) == 1:
            return {outputs[0]: self.labels[ONLY_OUTPUT]}
        return {name: self.labels[name] for name in outputs if name in self.labels}

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "version": self.version, "author": self.author,
                "license": self.license, "images": {k: v.to_json() for k, v in sorted(self.images.items())},
                "labels": {k: list(v) for k, v in sorted(self.labels.items())}}

    @classmethod
    def from_json(cls, record: Mapping | None) -> "ModelInterface":
        record = record or {}
        return cls(record.get("name", ""), record.get("description") or "", record.get("version") or "",
                   record.get("author") or "", record.get("license") or "",
                   {k: ImageInput.from_json(v) for k, v in (record.get("images") or {}).items()},
                   {k: tuple(v) for k, v in (record.get("labels") or {}).items()})


@runtime_checkable
class Backend(Protocol):
    """Converts an exported PyTorch program into one bundle format and runs bundles of that format.

    A bundle is a file (.tflite) or a folder (.mlpackage). Targets whose `variant` is the same
    share one conversion and one set of candidates.
    """

    name: str            # the manifest's `format:`
    platform: str        # devices of this platform may be targeted ("android", "ios")
    extension: str       # bundle suffix, with the dot

    def version(self) -> str:
        """Versions of the toolchain that affect output bytes (part of every cache key)."""

    def variant(self, target) -> tuple[str, dict]:
        """(key, options) of the conversion a target needs, e.g. ("coreml-ios16", {"min_ios": 16})."""

    def skip_reason(self, technique: Technique, options: dict) -> str | None:
        """Why a technique cannot run on this variant (e.g. "requires iOS 18, target min is iOS 16")."""

    def convert(self, exported_program: Path, out: Path, options: dict) -> None:
        """Write the fp32 bundle for the exported program."""

    def compress(self, technique: Technique, source: CompressInput, out: Path) -> None:
        """Write the candidate bundle for `technique`."""

    def predict(self, bundle: Path, inputs: Sequence[np.ndarray], *, threads: int, batch: int = 1,
                exported_program: Path | None = None) -> Prediction:
        """Run the bundle on every sample (`batch`: the exported batch size); measure host latency
        (None, with `latency_note` saying why, where it means nothing)."""

    def describe(self, bundle: Path) -> dict:
        """Input/output names, shapes, dtypes and quantization parameters of a bundle."""

    def weights(self, bundle: Path) -> list[dict]:
        """Stored constant tensors: name, dtype, shape, bytes (largest first), for the byte breakdown."""


@dataclass
class PackageInput:
    """What a packager gets to lay out one target's chosen bundle in a staging folder."""

    bundle: Path                 # the chosen candidate
    directory: Path              # write here; edgebuild swaps it into `output/<target>/` whole
    model_name: str
    model_description: str
    manifest_file: str
    target: Any                  # edgebuild.manifest.Target
    chosen: dict                 # the chosen candidate's report entry (technique, bytes, sha256, metric ...)
    backend: Backend

    def metadata(self, bundle: Path) -> dict:
        """The fields every packager's `<model>.json` starts with."""
        return {"model": self.model_name, "description": self.model_description, "target": self.target.name,
                "manifest": self.manifest_file, "file": bundle.name}


@runtime_checkable
class MixedPrecisionBackend(Backend, Protocol):
    """A backend that can store each layer at its own precision: the mixed-precision search runs for it."""

    # Bytes per weight in the conversion every candidate starts from (Core ML's is float16: 2).
    reference_bytes_per_weight: int

    def layers(self, fp32_bundle: Path, options: dict) -> list[dict]:
        """Layers with a weight: name, op, scope (what a rule matches), params, in_features."""

    def precisions(self, options: dict | None = None) -> dict[str, float]:
        """Per-layer precision name -> bits per weight, highest first (options: the variant's)."""

    def default_precisions(self, options: dict | None = None) -> list[str]:
        """The precisions the search tries unless `search.precisions` names others."""

    def mixed_technique(self, assignment: dict[str, str], layers: list[dict], name: str) -> Technique:
        """One technique (recipe data) that stores each assigned layer at its precision."""


@runtime_checkable
class QATBackend(Backend, Protocol):
    """A backend that can simulate some of its compressions in training (quantization-aware training)."""

    def qat_plan(self, technique: Technique) -> dict | None:
        """What training must simulate for this technique; None when it cannot be simulated."""

    def train_quantized(self, technique: Technique, plan: dict, module, example: tuple, train: Callable,
                        out: Path, work: Path, options: dict) -> None:
        """Prepare `module`, call `train(module, layers[, after_step])`, write the trained bundle to `out`."""


@runtime_checkable
class ShardedPredictBackend(Backend, Protocol):
    """A backend whose `predict` may run on disjoint shards of the samples at once, each call with a
    runtime of its own, and give every sample the same bits a single call gives it: accuracy runs
    then use every core (`--jobs`), and latency is timed apart, single-threaded."""

    shards_predict: bool


@runtime_checkable
class WeightValuesBackend(Backend, Protocol):
    """A backend that can read back the values its bundles store: edgebuild finds weights stored
    twice (identical, negated, transposed or scaled copies) and reports them."""

    def weight_values(self, bundle: Path) -> Iterable[tuple[str, int, Callable[[], np.ndarray]]]:
        """Each stored weight buffer once: (name as `weights()` gives it, element count, a function
        returning its values as float32, dequantized)."""


@runtime_checkable
class SimulatedSensitivityBackend(MixedPrecisionBackend, WeightValuesBackend, Protocol):
    """A backend some of whose precisions compute in float on the dequantized weights it stores
    (weight-only): per-layer sensitivity at those is measured in torch, on the exported program
    with the stored values written back, not by a conversion and a runtime run per probe."""

    def simulated_precisions(self, options: dict | None = None) -> set[str]:
        """The precisions whose outputs equal the exported program's run on the stored weights."""


class BackendBase:
    """Defaults for the optional parts of the Backend protocol."""

    def variant(self, target) -> tuple[str, dict]:
        return self.name, {}

    def skip_reason(self, technique: Technique, options: dict) -> str | None:
        return None

    def weights(self, bundle: Path) -> list[dict]:
        return []


class Status(str, Enum):
    """How a candidate, a constraint or a target stands. A string, so records stay plain JSON."""

    OK = "ok"                   # built and evaluated, not yet judged against a target
    PASS = "pass"
    FAIL = "fail"
    UNVERIFIED = "unverified"   # this host cannot measure a constraint: never counted as a pass
    SKIPPED = "skipped"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


@dataclass
class SearchContext:
    """What a search strategy works with. Strategies call `evaluate`; everything else is read-only."""

    layers: list[dict]
    precisions: dict[str, float]           # name -> bits, highest first
    sensitivity: dict[str, dict[str, float | None]]  # layer -> precision -> SQNR (dB) with only it lowered
    layer_bytes: dict[str, dict[str, int | None]]    # layer -> precision -> bytes it takes; None: not offered
    base_bytes: int                        # bytes that no assignment changes
    max_evaluations: int
    max_time: float
    higher_is_better: bool = True          # the gating metric's direction, for tie-breaks
    evaluate_fn: Callable[[dict], dict] | None = None
    started: float = field(default_factory=time.monotonic)
    evaluated: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def options(self, layer: dict) -> list[str]:
        """Precisions this layer can really be stored at, highest first, each smaller than the last
        (for a tiny layer, int8 with per-channel scales can outweigh float16: then int8 is no option)."""
        choices, smallest = [], None
        for precision in self.precisions:
            cost = self.layer_bytes[layer["name"]][precision]
            if cost is not None and (smallest is None or cost < smallest):
                choices.append(precision)
                smallest = cost
        return choices

    def estimate_bytes(self, assignment: dict[str, str]) -> int:
        return self.base_bytes + sum(self.layer_bytes[name][precision] for name, precision in assignment.items())

    def proxy_db(self, assignment: dict[str, str]) -> float:
        """Combined output SQNR, treating each layer's quantization noise as independent and additive."""
        noise = sum(10 ** (-self.sensitivity[name][precision] / 10) for name, precision in assignment.items())
        return 200.0 if noise == 0 else min(200.0, -10 * math.log10(noise))

    def budget_left(self) -> bool:
        return len(self.evaluated) < self.max_evaluations and time.monotonic() - self.started < self.max_time

    def better(self, point: dict) -> tuple:
        """A sort key: fewer bytes first, then the better metric in its own direction."""
        return point["bytes"], -point["metric"] if self.higher_is_better else point["metric"]

    def evaluate(self, assignment: dict[str, str]) -> dict:
        """Build and run one assignment for real; returns its judged evaluation (cached by content)."""
        for previous in self.evaluated:
            if previous["assignment"] == assignment:
                return previous
        result = self.evaluate_fn(assignment)
        entry = {"assignment": dict(assignment), "estimated_bytes": self.estimate_bytes(assignment),
                 "proxy_db": round(self.proxy_db(assignment), 3), **result}
        self.evaluated.append(entry)
        return entry


@dataclass(frozen=True)
class CandidateRecord:
    """What the compress stage records for one candidate: built (ok, with the bundle's sha256),
    skipped (the technique has nothing to act on here, with the reason) or error (the toolchain's)."""

    technique: str
    status: Status
    sha256: str | None = None
    reason: str | None = None
    error: dict | None = None

    def to_json(self) -> dict:
        fields = (("sha256", self.sha256), ("reason", self.reason), ("error", self.error))
        return {"technique": self.technique, "status": self.status.value,
                **{key: value for key, value in fields if value is not None}}

    @classmethod
    def from_json(cls, record: dict) -> "CandidateRecord":
        return cls(record["technique"], Status(record["status"]), record.get("sha256"), record.get("reason"),
                   record.get("error"))


@dataclass(frozen=True)
class SearchStrategy:
    """A mixed-precision search strategy for `search.strategy: name`.

    `search(context)` returns the per-layer assignment to ship, or None. A strategy whose `search`
    is None declares that it never searches: no sensitivity table, no search stage.
    """

    name: str
    search: Callable[[SearchContext], dict[str, str] | None] | None
    description: str = ""

    @property
    def searches(self) -> bool:
        return self.search is not None


@dataclass(frozen=True)
class GraphRewrite:
    """An fp32-exact rewrite of the exported program, applied before any backend converts it.

    `rewrite(program)` edits the `torch.export.ExportedProgram` in place and returns how many
    places it changed. Rewrites exist to stop a converter from storing or computing something
    twice (a PReLU's negated weight copy); edgebuild checks on the evaluation data that the
    rewritten program's outputs are within 1 ulp of the original's, and refuses the build if not.
    """

    name: str
    rewrite: Callable[[Any], int]
    description: str = ""


def protocol_members(protocol: type) -> set[str]:
    """The attributes and methods a protocol declares, its base protocols' included."""
    names = set()
    for cls in protocol.__mro__:
        if cls in (object, Protocol) or cls.__module__ == "typing":
            continue
        names.update(getattr(cls, "__annotations__", {}))
        names.update(name for name, value in vars(cls).items() if callable(value) and not name.startswith("_"))
    return names


def missing_members(value, protocol: type) -> list[str]:
    """What `value` lacks to satisfy `protocol` (empty: it conforms, as isinstance checks it)."""
    return sorted(name for name in protocol_members(protocol) if not hasattr(value, name))


def package_version(distribution: str) -> str:
    """An installed distribution's version ("missing" if it is not installed): part of cache keys."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


TECHNIQUE_FIELDS = ("description", "needs_calibration", "compare_with", "knob", "faster_form_of")


def techniques_from_yaml(path: Path, backend: str) -> list[Technique]:
    """A backend's techniques kept as data: name -> {description, recipe or other recipe fields, ...}.

    A `recipe:` entry is the recipe; without one, every field that is not a Technique field is.
    A `faster_form_of:` entry takes that technique's recipe and calibration, and is compared with it.
    """
    entries = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    techniques = []
    for name, spec in entries.items():
        base = entries[spec["faster_form_of"]] if "faster_form_of" in spec else {}
        spec = {**{key: base[key] for key in ("recipe", "needs_calibration") if key in base},
                "compare_with": spec.get("faster_form_of", ""), **spec}
        recipe = spec.get("recipe") if "recipe" in spec else {
            key: value for key, value in spec.items() if key not in TECHNIQUE_FIELDS}
        techniques.append(Technique(name=name, backend=backend, description=spec["description"], recipe=recipe,
                                    needs_calibration=bool(spec.get("needs_calibration")),
                                    compare_with=spec.get("compare_with", ""), knob=spec.get("knob", ""),
                                    faster_form_of=spec.get("faster_form_of", "")))
    return techniques


# A loader returns (module, example inputs), or (module, example inputs, reference): a callable the
# module was converted from (a TorchScript module), whose outputs the export stage checks it matches.
Loader = Callable[[Mapping[str, Any], Path], tuple]
Packager = Callable[[PackageInput], list[Path]]
Reporter = Callable[..., Path]
