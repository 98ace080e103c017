"""The objects plugins register. Small, declarative, and free of heavy imports."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np


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


class NotApplicable(Exception):
    """Raised by `Backend.compress` when a technique has nothing to act on in this model (say, no
    embedding table): the candidate is reported as skipped with this reason, not as an error."""


@dataclass(frozen=True)
class Metric:
    """How good a candidate's outputs are, given fp32 reference outputs and optional labels."""

    name: str
    description: str
    compute: Callable[[np.ndarray, np.ndarray, np.ndarray | None], float]
    higher_is_better: bool = True
    needs_labels: bool = False
    # Metrics measured against fp32 itself (sqnr) have no finite fp32 baseline: only `floor` applies.
    has_baseline: bool = True
    unit: str = ""
    bounds: tuple[float | None, float | None] = (0.0, 1.0)   # the values it can take (None: unbounded)

    def meets(self, value: float, threshold: float) -> bool:
        """Whether a value is at least as good as the threshold, in this metric's direction."""
        return value >= threshold if self.higher_is_better else value <= threshold


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
    """A bundle run on a data set in the target runtime."""

    outputs: np.ndarray
    latency_ms: float | None
    runtime: str
    details: dict = field(default_factory=dict)


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

    def predict(self, bundle: Path, inputs: Sequence[np.ndarray], *, threads: int,
                exported_program: Path | None = None) -> Prediction:
        """Run the bundle on every sample; measure host latency (None where it means nothing)."""

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


class BackendBase:
    """Defaults for the optional parts of the Backend protocol."""

    def variant(self, target) -> tuple[str, dict]:
        return self.name, {}

    def skip_reason(self, technique: Technique, options: dict) -> str | None:
        return None

    def weights(self, bundle: Path) -> list[dict]:
        return []


Loader = Callable[[Mapping[str, Any], Path], tuple]
Packager = Callable[[PackageInput], list[Path]]
Reporter = Callable[..., Path]
