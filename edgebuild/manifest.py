"""Reads and validates edgebuild.yaml. Every error names the file, line, column and field."""
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import devices as device_catalog
from . import hf
from .api import ONLY_OUTPUT, ImageInput, MixedPrecisionBackend, ModelInterface, QATBackend
from .data import is_pattern, shard_files
from .errors import InputError
from .outputs import OUTPUT_NAME
from .plugins import Registry, default_registry, registry_with
from .units import parse_size

SUPPORTED_VERSION = 1
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
ENTRY_PATTERN = re.compile(r"^(?P<file>[^:]+\.py):(?P<function>[A-Za-z_][A-Za-z0-9_]*)$")
STATE_DIR = ".edgebuild"
LOCK_FILE = "edgebuild.lock"

TOP_KEYS = {"version": True, "model": True, "data": True, "metric": False, "targets": True, "output": False,
            "reports": False, "search": False, "report_metrics": False, "plugins": False, "cache": False,
            "executor": False}
DEFAULT_REPORTS = ["json", "md", "junit", "html"]
MODEL_KEYS = {"name": True, "source": True, "entry": False, "path": False, "description": False, "version": False,
              "task": False, "sequence_length": False, "outputs": False, "rewrites": False, "author": False,
              "license": False, "labels": False, "inputs": False}
# What the bundles tell the platforms' tools about the model (ModelInterface); none of it changes the
# exported program, so editing it re-exports nothing.
INTERFACE_KEYS = ("description", "version", "author", "license", "labels", "inputs")
INPUT_KEYS = {"kind": True, "layout": False, "mean": True, "std": True, "range": False, "description": False}
INPUT_KINDS = ("image",)
IMAGE_LAYOUTS = ("NCHW", "NHWC")
DATA_KEYS = {"calibration": False, "evaluation": True, "train": False}
DATA_ROLES = ("evaluation", "calibration", "train")
# Plain text data is tokenized with the model's own tokenizer into windows of sequence_length
# tokens, each with its next tokens as labels (for perplexity): causal-LM Hugging Face models only.
TEXT_SUFFIX = ".txt"
TARGET_KEYS = {"name": True, "format": True, "devices": True, "budget": False, "accuracy": True,
               "delivery": False, "android": False, "min_ios": False, "qat": False}
QAT_KEYS = {"mode": False, "trainable": False, "epochs": False, "max_steps": False, "learning_rate": False,
            "max_time": False, "loss": False}
QAT_DEFAULTS = {"mode": "auto", "trainable": "all", "epochs": 60, "max_steps": 20_000, "learning_rate": 3e-3,
                "max_time": 1800.0, "loss": "distill"}
MIN_IOS_RANGE = (15, 18)  # ML Programs need iOS 15; coremltools 9 knows deployment targets up to iOS 18
ANDROID_KEYS = {"assets_dir": False, "kotlin_package": False, "loops": False}
ANDROID_LOOPS = ("rolled", "unrolled")
ANDROID_DEFAULTS = {"assets_dir": "models", "kotlin_package": "edgebuild.models"}
ASSETS_DIR_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*(/[A-Za-z0-9_][A-Za-z0-9_-]*)*$")
KOTLIN_PACKAGE_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
BUDGET_KEYS = {"size": False, "download": False, "latency_ms": False}
SEARCH_KEYS = {"strategy": False, "max_evaluations": False, "max_time": False, "precisions": False, "techniques": False,
               "sensitivity": False}
# How per-layer sensitivity is measured: in torch where the backend declares it exact, precisions
# far closer to fp32 than a probed one estimated from it, else in the runtime (auto); every exact
# precision probed in torch (torch); or every probe converted and run in the runtime (runtime).
SENSITIVITY_MODES = ("auto", "torch", "runtime")
SEARCH_DEFAULTS = {"strategy": "sensitivity", "max_evaluations": 12, "max_time": 600.0}
ACCURACY_KEYS = {"max_drop": False, "floor": False, "guards": False}
METRIC_KEYS = {"name": True, "output": False}
GUARD_KEYS = {"output": True, "metric": True, "floor": True}


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric, on one named output (or, without `output`, on the model's only output,
    or on every output for a label-free metric, gating on the worst)."""

    name: str
    output: str | None = None
    where: tuple = field(default=(), compare=False)   # its place in the manifest, for error messages

    @property
    def key(self) -> str:
        """How reports name it: 'top1', or 'top1[face]' on one output."""
        return self.name if self.output is None else f"{self.name}[{self.output}]"


@dataclass(frozen=True)
class Guard:
    """A floor on another output or metric (`accuracy.guards`): judged like the main floor."""

    spec: MetricSpec
    floor: float


@dataclass
class Target:
    name: str
    format: str
    devices: list[str]
    size: int | None
    download: int | None
    max_drop: float | None
    floor: float | None
    raw: dict = field(repr=False)
    delivery: str | None = None          # how the store delivers it (android: base | feature | asset-pack)
    android: dict = field(default_factory=dict)  # assets_dir, kotlin_package
    min_ios: int | None = None           # ios: deployment target; default: the lowest iOS among devices
    latency_ms: float | None = None      # host-measured median latency budget (single thread)
    qat: dict | None = None              # quantization-aware training settings; None: off
    guards: list[Guard] = field(default_factory=list)

    def threshold(self, baseline: float | None, higher_is_better: bool) -> float:
        """The metric a candidate must reach: the floor, or the fp32 baseline less max_drop."""
        if self.floor is not None:
            return self.floor
        return baseline - self.max_drop if higher_is_better else baseline + self.max_drop


@dataclass
class Manifest:
    path: Path
    root: Path
    model: dict
    calibration: Path | None
    evaluation: Path
    metric: str                          # the gating metric's key ('top1', or 'top1[face]' on one output)
    targets: list[Target]
    output: Path
    raw: dict = field(repr=False)
    report_metrics: list[str] = field(default_factory=list)  # keys measured and reported, never gating
    reports: list[str] = field(default_factory=lambda: list(DEFAULT_REPORTS))
    train: Path | None = None
    search: dict = field(default_factory=lambda: dict(SEARCH_DEFAULTS))
    specs: dict[str, MetricSpec] = field(default_factory=dict)  # key -> spec, for every key in `metrics`
    plugins: list[Path] = field(default_factory=list)            # project-local plugin files
    document: "_Document | None" = field(default=None, repr=False)
    interface: ModelInterface | None = None
    label_files: dict[str, Path] = field(default_factory=dict)   # output name (or ONLY_OUTPUT) -> labels file
    cache: str | None = None  # the shared cache: a folder (relative to the manifest) or an fsspec URL
    executor: str | None = None  # where heavy stages run: local | ray (--executor overrides it)
    # Every target the manifest declares; `targets` may be narrowed to a --target/--platform selection,
    # whose build keeps the others' bundles, report entries and lock entries from their last build.
    declared_targets: list[Target] = field(default_factory=list)

    def __post_init__(self):
        self.declared_targets = self.declared_targets or list(self.targets)

    @property
    def metrics(self) -> list[str]:
        """Every metric a candidate is measured on: the gating one first, then the reported ones, then
        the guards' (every target's)."""
        guards = [guard.spec.key for target in self.targets for guard in target.guards]
        return list(dict.fromkeys([self.metric, *self.report_metrics, *guards]))

    @property
    def gate(self) -> MetricSpec:
        return self.specs[self.metric]

    def error(self, path: tuple, message: str) -> InputError:
        """An error found after validation (e.g. once the model's outputs are known), located like one."""
        if self.document is None:
            return InputError(message, file=self.path.name, field=field_path(path) or None)
        return self.document.error(path, message)

    def label_file(self, output: str) -> Path:
        """The labels file of an output: its own, or the one file given for the only output."""
        return self.label_files[ONLY_OUTPUT if ONLY_OUTPUT in self.label_files else output]

    @property
    def model_name(self) -> str:
        return self.model["name"]

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    def relative(self, path: Path) -> str:
        """A path as report.json writes it: relative to the manifest's folder, with slashes."""
        return Path(path).resolve().relative_to(self.root).as_posix()


class _Document:
    """Parsed YAML plus the position of every value and key, for error messages."""

    def __init__(self, label: str):
        self.label = label
        self.value_marks: dict[tuple, yaml.Mark] = {}
        self.key_marks: dict[tuple, yaml.Mark] = {}

    def error(self, path: tuple, message: str, *, at_key: bool = False) -> InputError:
        marks = self.key_marks if at_key else self.value_marks
        probe = path
        while probe not in marks and probe:
            probe = probe[:-1]
        mark = marks.get(probe) or self.value_marks.get(())
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return InputError(message, file=self.label, line=line, column=column, field=field_path(path) or None)


def field_path(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _typename(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def read_yaml(path: Path, label: str) -> tuple[Any, _Document]:
    doc = _Document(label)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("manifest not found", file=label) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read manifest: {exc}", file=label) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise InputError("manifest is empty", file=label, line=1, column=1)
        return _construct(loader, node, (), doc), doc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = (exc.problem or exc.context or "invalid YAML").strip()
        raise InputError(f"invalid YAML: {problem}", file=label,
                         line=mark.line + 1 if mark else 1, column=mark.column + 1 if mark else 1) from None
    except yaml.YAMLError as exc:
        raise InputError(f"invalid YAML: {exc}", file=label, line=1, column=1) from None
    finally:
        loader.dispose()


_PLAIN_TAGS = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}


def _construct(loader: yaml.SafeLoader, node: yaml.Node, path: tuple, doc: _Document) -> Any:
    doc.value_marks[path] = node.start_mark
    if type(node) in _PLAIN_TAGS and node.tag != _PLAIN_TAGS[type(node)]:
        # Like yaml.safe_load: no tag may construct objects (e.g. !!python/object/apply).
        raise yaml.constructor.ConstructorError(None, None, f"could not determine a constructor for the tag {node.tag!r}",
                                                node.start_mark)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolve YAML merge keys (<<) the way safe_load would
        result = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                doc.value_marks[path + ("?",)] = key_node.start_mark
                raise doc.error(path + ("?",), f"keys must be strings, got {_typename(key)} {key!r}")
            if key in result:
                doc.key_marks[path + (key,)] = key_node.start_mark
                raise doc.error(path + (key,), "duplicate key", at_key=True)
            doc.key_marks[path + (key,)] = key_node.start_mark
            result[key] = _construct(loader, value_node, path + (key,), doc)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_construct(loader, item, path + (i,), doc) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


class _Validator:
    def __init__(self, doc: _Document, root: Path, registry: Registry):
        self.doc, self.root, self.registry = doc, root, registry

    def mapping(self, value: Any, path: tuple, keys: dict[str, bool]) -> dict:
        if not isinstance(value, dict):
            raise self.doc.error(path, f"expected a mapping, got {_typename(value)}")
        for key in value:
            if key not in keys:
                near = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
                hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(keys)}"
                raise self.doc.error(path + (key,), f"unknown key{hint}", at_key=True)
        for key, required in keys.items():
            if required and key not in value:
                raise self.doc.error(path + (key,), "required key is missing")
        return value

    def string(self, value: Any, path: tuple) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.doc.error(path, f"expected a non-empty string, got {_typename(value)}")
        return value

    def name(self, value: Any, path: tuple) -> str:
        self.string(value, path)
        if not NAME_PATTERN.match(value):
            raise self.doc.error(path, f"invalid name {value!r}: use a letter, then letters, digits, '-' or '_' (64 at most)")
        return value

    def choice(self, value: Any, path: tuple, choices: list[str], what: str) -> str:
        self.string(value, path)
        if value not in choices:
            near = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise self.doc.error(path, f"unknown {what} {value!r}{hint} (available: {', '.join(sorted(choices))})")
        return value

    def choice_list(self, value: Any, path: tuple, choices: list[str], what: str, items: str) -> list[str]:
        """A non-empty list whose every item is one of `choices` (`items` names them in the error)."""
        if not isinstance(value, list) or not value:
            raise self.doc.error(path, f"expected a non-empty list of {items}, got {_typename(value)}")
        for i, item in enumerate(value):
            self.choice(item, path + (i,), choices, what)
        return list(value)

    def number(self, value: Any, path: tuple, low: float | None = None, high: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.doc.error(path, f"expected a number, got {_typename(value)} {value!r}")
        if isinstance(value, int) and abs(value) > 1e300:  # YAML ints are unbounded; float() would overflow
            raise self.doc.error(path, f"expected a number, got an integer of {len(str(abs(value)))} digits")
        if not math.isfinite(value):
            raise self.doc.error(path, f"expected a number, got {_typename(value)} {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            if high is None:
                raise self.doc.error(path, f"must be at least {low}, got {value}")
            if low is None:
                raise self.doc.error(path, f"must be at most {high}, got {value}")
            raise self.doc.error(path, f"must be between {low} and {high}, got {value}")
        return float(value)

    def duration(self, value: Any, path: tuple) -> float:
        """Seconds: a number, or a string like '90s', '5m', '1h'."""
        if isinstance(value, str):
            match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([smh])\s*$", value)
            if not match:
                raise self.doc.error(path, f"expected a duration such as 90s, 5m or 1h, got {value!r}")
            value = float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]
        return self.number(value, path, 1.0, 7 * 24 * 3600.0)

    def size(self, value: Any, path: tuple) -> int:
        try:
            return parse_size(value)
        except ValueError as exc:
            raise self.doc.error(path, str(exc)) from None

    def project_path(self, value: Any, path: tuple, *, must_exist: bool) -> Path:
        """A path inside the manifest's folder; anything escaping it is refused."""
        self.string(value, path)
        resolved = (self.root / value).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise self.doc.error(path, f"path {value!r} is outside the project folder {self.root}")
        if must_exist and not resolved.is_file():
            state = "is not a file" if resolved.exists() else "not found"
            raise self.doc.error(path, f"file {value!r} {state}")
        return resolved


def load_manifest(path: Path | str, registry: Registry) -> Manifest:
    """Parse and validate a manifest; raise InputError with file:line:col on the first problem."""
    path = Path(path)
    raw, doc = read_yaml(path, str(path))
    root = path.resolve().parent
    check = _Validator(doc, root, registry)
    check.mapping(raw, (), TOP_KEYS)
    version = raw["version"]
    if isinstance(version, bool) or version != SUPPORTED_VERSION:
        raise doc.error(("version",), f"unsupported version {version!r}; this edgebuild reads version {SUPPORTED_VERSION}")
    plugins = local_plugin_files(check, raw)
    model = _model(check, doc, raw["model"])
    outputs = model.get("outputs")
    interface, label_files = _interface(check, model, outputs)
    data = _data(check, doc, raw["data"], model)
    gate = _metric_spec(check, raw.get("metric", "top1"), ("metric",), outputs)
    reported = []
    if "report_metrics" in raw:
        value = raw["report_metrics"]
        if not isinstance(value, list) or not value:
            raise doc.error(("report_metrics",), f"expected a non-empty list of metrics, got {_typename(value)}")
        reported = [_metric_spec(check, item, ("report_metrics", i), outputs) for i, item in enumerate(value)]
    targets_raw = raw["targets"]
    if not isinstance(targets_raw, list) or not targets_raw:
        raise doc.error(("targets",), f"expected a non-empty list of targets, got {_typename(targets_raw)}")
    seen: set[str] = set()
    targets = [_target(check, doc, entry, ("targets", i), registry.metrics[gate.name], seen, data, outputs)
               for i, entry in enumerate(targets_raw)]
    specs = {spec.key: spec for spec in [gate, *reported, *(g.spec for t in targets for g in t.guards)]}
    specs = {key: specs[key] for key in dict.fromkeys([gate.key, *specs])}
    cache = raw.get("cache")
    if cache is not None and (not isinstance(cache, str) or not cache.strip()):
        got = "an empty string" if isinstance(cache, str) else _typename(cache)
        raise doc.error(("cache",), f"expected a folder or a URL (s3://..., gs://...), got {got}")
    executor = check.choice(raw["executor"], ("executor",), ["local", "ray"], "executor") if "executor" in raw else None
    return Manifest(path=path.resolve(), root=root, model=dict(model), calibration=data.get("calibration"),
                    evaluation=data["evaluation"], metric=gate.key, targets=targets,
                    output=_output(check, doc, raw, model, data), raw=raw, reports=_reports(check, raw),
                    search=_search(check, doc, raw), train=data.get("train"),
                    report_metrics=[spec.key for spec in dict.fromkeys(reported) if spec.key != gate.key],
                    specs=specs, plugins=plugins, document=doc, interface=interface, label_files=label_files,
                    cache=cache, executor=executor)


def load_project(path: Path | str) -> tuple[Manifest, Registry]:
    """The manifest and the plugins that serve it: the installed ones, then the project's own
    (`plugins:`), against which every other field is validated."""
    path = Path(path)
    raw, doc = read_yaml(path, str(path))
    files = local_plugin_files(_Validator(doc, path.resolve().parent, None), raw) if isinstance(raw, dict) else []
    root = path.resolve().parent
    registry = registry_with({file.relative_to(root).as_posix(): file for file in files}) if files \
        else default_registry()
    return load_manifest(path, registry), registry


def local_plugin_files(check: "_Validator", raw: dict) -> list[Path]:
    """`plugins:` Python files inside the project, loaded after the installed plugins."""
    if "plugins" not in raw:
        return []
    value = raw["plugins"]
    if not isinstance(value, list) or not value:
        raise check.doc.error(("plugins",), f"expected a non-empty list of .py files, got {_typename(value)}")
    files = []
    for i, item in enumerate(value):
        path = check.project_path(item, ("plugins", i), must_exist=True)
        if path.suffix != ".py":
            raise check.doc.error(("plugins", i), f"a plugin is a Python file (.py), got {item!r}")
        files.append(path)
    return files


def _metric_spec(check: "_Validator", value: Any, path: tuple, outputs: list[str] | None) -> MetricSpec:
    """`top1`, or `{name: top1, output: face}`."""
    if isinstance(value, dict):
        block = check.mapping(value, path, METRIC_KEYS)
        name = check.choice(block["name"], path + ("name",), list(check.registry.metrics), "metric")
        output = _output_name(check, block["output"], path + ("output",), outputs) if "output" in block else None
        return MetricSpec(name, output, path)
    if not isinstance(value, str):
        raise check.doc.error(path, f"expected a metric name or {{name: METRIC, output: OUTPUT}}, got "
                                    f"{_typename(value)}")
    return MetricSpec(check.choice(value, path, list(check.registry.metrics), "metric"), None, path)


def _output_name(check: "_Validator", value: Any, path: tuple, outputs: list[str] | None) -> str:
    """An output name; one of `model.outputs` when the manifest names them (else checked after export)."""
    name = check.string(value, path)
    if outputs is not None and name not in outputs:
        raise check.doc.error(path, f"unknown output {name!r} (model.outputs: {', '.join(outputs)})")
    return name


def _model(check: "_Validator", doc: "_Document", value: Any) -> dict:
    model = check.mapping(value, ("model",), MODEL_KEYS)
    check.name(model["name"], ("model", "name"))
    source = check.choice(model["source"], ("model", "source"), list(check.registry.loaders), "model source")
    for key in ("description", "version", "author", "license"):
        if key in model:
            check.string(model[key], ("model", key))
    if source == "python":
        if "entry" not in model:
            raise doc.error(("model", "entry"), "required key is missing: source 'python' takes entry: FILE.py:FUNCTION")
        entry = check.string(model["entry"], ("model", "entry"))
        match = ENTRY_PATTERN.match(entry)
        if not match:
            raise doc.error(("model", "entry"), f"expected FILE.py:FUNCTION, got {entry!r}")
        check.project_path(match["file"], ("model", "entry"), must_exist=True)
    elif "entry" in model:
        raise doc.error(("model", "entry"), f"'entry' is for source 'python'; source {source!r} takes 'path'", at_key=True)
    if "outputs" in model:
        names = model["outputs"]
        if not isinstance(names, list) or not names:
            raise doc.error(("model", "outputs"), f"expected a non-empty list of output names, got {_typename(names)}")
        for i, name in enumerate(names):
            check.string(name, ("model", "outputs", i))
            if not OUTPUT_NAME.match(name):
                raise doc.error(("model", "outputs", i), f"invalid output name {name!r}: use a letter or '_', then "
                                                         "letters, digits or '_' (64 at most)")
            if name in names[:i]:
                raise doc.error(("model", "outputs", i), f"duplicate output name {name!r}")
    if "rewrites" in model:
        _rewrites(check, model["rewrites"])
    if source == "hf":
        _hf_model(check, doc, model)
    elif source != "python":
        if "path" not in model:
            raise doc.error(("model", "path"), f"required key is missing: source {source!r} takes path: FILE")
        check.project_path(model["path"], ("model", "path"), must_exist=True)
    return model


def _interface(check: "_Validator", model: dict, outputs: list[str] | None) -> tuple[ModelInterface, dict[str, Path]]:
    """General info, image inputs and label files: what the bundles carry for the platforms' tools.
    Names and class counts are checked against the exported model (`check_interface`)."""
    label_files: dict[str, Path] = {}
    labels: dict[str, tuple[str, ...]] = {}
    if "labels" in model:
        value, path = model["labels"], ("model", "labels")
        entries = {ONLY_OUTPUT: (value, path)} if isinstance(value, str) else None
        if entries is None:
            if not isinstance(value, dict) or not value:
                raise check.doc.error(path, f"expected a labels file, or {{OUTPUT: FILE}} per output, got "
                                            f"{_typename(value)}")
            entries = {_output_name(check, name, path + (name,), outputs): (item, path + (name,))
                       for name, item in value.items()}
        for output, (item, where) in entries.items():
            label_files[output] = check.project_path(item, where, must_exist=True)
            labels[output] = _read_labels(check, label_files[output], item, where)
    images = {}
    if "inputs" in model:
        value = model["inputs"]
        if not isinstance(value, dict) or not value:
            raise check.doc.error(("model", "inputs"), f"expected {{INPUT: {{kind: image, ...}}}} per input, got "
                                                       f"{_typename(value)}")
        images = {name: _image_input(check, spec, ("model", "inputs", name)) for name, spec in value.items()}
    interface = ModelInterface(name=model["name"], description=model.get("description", ""),
                               version=str(model.get("version", "")), author=model.get("author", ""),
                               license=model.get("license", ""), images=images, labels=labels)
    return interface, label_files


def _read_labels(check: "_Validator", file: Path, shown: str, path: tuple) -> tuple[str, ...]:
    """One label per line; a final newline is allowed, an empty or duplicate label is not."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise check.doc.error(path, f"cannot read labels file {shown!r}: {exc}") from None
    if not lines:
        raise check.doc.error(path, f"labels file {shown!r} is empty")
    for number, label in enumerate(lines, 1):
        if not label.strip():
            raise check.doc.error(path, f"labels file {shown!r}: line {number} is empty")
        if label in lines[:number - 1]:
            raise check.doc.error(path, f"labels file {shown!r}: line {number} repeats label {label!r}")
    return tuple(lines)


def _image_input(check: "_Validator", value: Any, path: tuple) -> ImageInput:
    spec = check.mapping(value, path, INPUT_KEYS)
    check.choice(spec["kind"], path + ("kind",), list(INPUT_KINDS), "input kind")
    layout = check.choice(spec.get("layout", "NCHW"), path + ("layout",), list(IMAGE_LAYOUTS), "layout")

    def numbers(key: str, low: float | None = None) -> tuple[float, ...]:
        items = spec[key] if isinstance(spec[key], list) else [spec[key]]
        if not items or len(items) > 4:
            raise check.doc.error(path + (key,), f"expected one number or one per channel, got {spec[key]!r}")
        return tuple(check.number(item, path + (key, i) if isinstance(spec[key], list) else path + (key,), low)
                     for i, item in enumerate(items))

    mean, std = numbers("mean"), numbers("std")
    if any(s <= 0 for s in std):
        raise check.doc.error(path + ("std",), f"every std must be above 0, got {spec['std']!r}")
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise check.doc.error(path + ("std",), f"mean has {len(mean)} values and std {len(std)}: give one, or one "
                                               "per channel, for each")
    low, high = (0.0, 255.0)
    if "range" in spec:
        bounds = spec["range"]
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise check.doc.error(path + ("range",), f"expected [LOW, HIGH], got {bounds!r}")
        low, high = (check.number(item, path + ("range", i)) for i, item in enumerate(bounds))
        if low >= high:
            raise check.doc.error(path + ("range",), f"LOW must be below HIGH, got {bounds!r}")
    description = check.string(spec["description"], path + ("description",)) if "description" in spec else ""
    return ImageInput(layout, mean, std, (low, high), description)


def check_interface(manifest: "Manifest", inputs: list[dict], outputs: list[dict]) -> None:
    """The manifest's labels and image inputs against the exported model's inputs and outputs."""
    interface = manifest.interface
    if interface is None:
        return
    names = [o["name"] for o in outputs]
    shapes = {o["name"]: o["shape"] for o in outputs}
    if ONLY_OUTPUT in interface.labels and len(names) > 1:
        raise manifest.error(("model", "labels"), f"the model has {len(names)} outputs ({', '.join(names)}): give "
                                                  "labels per output, {OUTPUT: FILE}")
    for output, labels in interface.labels_by_output(names).items():
        where = ("model", "labels") if ONLY_OUTPUT in interface.labels else ("model", "labels", output)
        shown = manifest.relative(manifest.label_file(output))
        classes = shapes[output][-1] if shapes[output] else 1
        if len(labels) != classes:
            raise manifest.error(where, f"{shown} has {len(labels)} labels, but output {output!r} has {classes} "
                                        f"classes (shape {shapes[output]})")
    for name in interface.labels:
        if name != ONLY_OUTPUT and name not in names:
            raise manifest.error(("model", "labels", name), f"unknown output {name!r} (the model's outputs: "
                                                            f"{', '.join(names)})")
    by_name = {i["name"]: i for i in inputs}
    for name, image in interface.images.items():
        where = ("model", "inputs", name)
        if name not in by_name:
            raise manifest.error(where, f"unknown input {name!r} (the model's inputs: {', '.join(by_name)})")
        shape = by_name[name]["shape"]
        if len(shape) != 4 or by_name[name]["dtype"] != "float32":
            raise manifest.error(where, f"an image input is a float32 tensor of 4 dimensions ({image.layout}); "
                                        f"{name!r} is {by_name[name]['dtype']} {shape}")
        channels = image.channels(shape)
        if channels not in (1, 3):
            raise manifest.error(where + ("layout",), f"an image has 1 (grayscale) or 3 (RGB) channels; {name!r} "
                                                      f"{shape} has {channels} in {image.layout}")
        for key in ("mean", "std"):
            if len(getattr(image, key)) not in (1, channels):
                raise manifest.error(where + (key,), f"{len(getattr(image, key))} values for {channels} channel(s)")


def _rewrites(check: "_Validator", value: Any) -> None:
    """`rewrites: {NAME: false}`: every registered graph rewrite runs unless switched off here."""
    path = ("model", "rewrites")
    known = list(check.registry.rewrites)
    check.mapping(value, path, {name: False for name in known})
    for name, on in value.items():
        if not isinstance(on, bool):
            raise check.doc.error(path + (name,), f"expected true or false, got {_typename(on)} {on!r}")


def _hf_model(check: "_Validator", doc: "_Document", model: dict) -> None:
    if "path" not in model:
        raise doc.error(("model", "path"), "required key is missing: source 'hf' takes path: FOLDER")
    folder = check.project_path(model["path"], ("model", "path"), must_exist=False)
    if not (folder / "config.json").is_file():
        raise doc.error(("model", "path"), f"config.json not found in {model['path']!r} (a local Hugging Face "
                                           "folder is needed; nothing is downloaded)")
    if "sequence_length" in model:
        value = model["sequence_length"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 131072:
            raise doc.error(("model", "sequence_length"), f"expected a whole number from 1 to 131072, got {value!r}")
    if "task" in model:
        check.choice(model["task"], ("model", "task"), list(hf.TASKS), "task")
        return
    try:  # the loader needs a task: say so at validation, located, not at export
        hf.task_of(model, folder)
    except InputError as exc:
        raise doc.error(("model", "path"), f"{exc.reason} (config.json in {model['path']!r})") from None


def _data(check: "_Validator", doc: "_Document", value: Any, model: dict) -> dict[str, Path]:
    """Each data role the manifest gives -> its resolved file."""
    data = check.mapping(value, ("data",), DATA_KEYS)
    files = {}
    for role in DATA_ROLES:
        if role not in data:
            continue
        where = ("data", role)
        path = check.project_path(data[role], where, must_exist=False)
        if is_pattern(path):  # shards matching a pattern, streamed a shard at a time
            matched = shard_files(path)
            stray = next((p for p in matched if p.suffix != ".npz"), None)
            if not matched:
                raise doc.error(where, f"pattern {data[role]!r} matches no .npz shards")
            if stray is not None:
                raise doc.error(where, f"pattern {data[role]!r} matches {stray.name}, which is not a .npz file")
        elif path.is_dir():  # a folder of .npz shards, streamed a shard at a time
            if not any(p.is_file() for p in path.glob("*.npz")):
                raise doc.error(where, f"folder {data[role]!r} holds no .npz shards")
        else:
            path = check.project_path(data[role], where, must_exist=True)
        files[role] = path
    for role in DATA_ROLES:
        if role in data and Path(data[role]).suffix == TEXT_SUFFIX:
            _check_text_data(doc, model, check.root, ("data", role), data[role])
    return files


def _output(check: "_Validator", doc: "_Document", raw: dict, model: dict, data: dict[str, Path]) -> Path:
    root = check.root
    output_value = raw.get("output", "dist")
    output = check.project_path(output_value, ("output",), must_exist=False)
    if output == root or output == root / STATE_DIR or (root / STATE_DIR) in output.parents:
        raise doc.error(("output",), f"output {output_value!r} must be a folder of its own inside the project")
    protected = {root / p for p in ([model.get("path")] if "path" in model else [])}
    protected.update(data[role] for role in ("evaluation", "calibration") if role in data)
    if any(output == p or output in p.parents for p in protected):
        raise doc.error(("output",), f"output {output_value!r} would hold the manifest's own inputs")
    return output


def _reports(check: "_Validator", raw: dict) -> list[str]:
    if "reports" not in raw:
        return list(DEFAULT_REPORTS)
    value = check.choice_list(raw["reports"], ("reports",), list(check.registry.reporters), "report format",
                              "report formats")
    # report.json is the contract `check` and `report` read: always written.
    return ["json"] + [name for name in dict.fromkeys(value) if name != "json"]


def _search(check: "_Validator", doc: "_Document", raw: dict) -> dict:
    search = dict(SEARCH_DEFAULTS)
    if "search" not in raw:
        return search
    registry = check.registry
    block = check.mapping(raw["search"], ("search",), SEARCH_KEYS)
    if "strategy" in block:
        search["strategy"] = check.choice(block["strategy"], ("search", "strategy"), list(registry.strategies),
                                          "search strategy")
    if "max_evaluations" in block:
        value = block["max_evaluations"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
            raise doc.error(("search", "max_evaluations"), f"expected a whole number from 1 to 100000, got {value!r}")
        search["max_evaluations"] = value
    if "max_time" in block:
        search["max_time"] = check.duration(block["max_time"], ("search", "max_time"))
    if "sensitivity" in block:
        search["sensitivity"] = check.choice(block["sensitivity"], ("search", "sensitivity"), list(SENSITIVITY_MODES),
                                             "sensitivity measurement")
    known = {"precisions": {p for b in registry.backends.values() if isinstance(b, MixedPrecisionBackend)
                            for p in b.precisions()},
             "techniques": {name for (_, name) in registry.techniques}}
    for key in ("precisions", "techniques"):
        if key in block:
            search[key] = check.choice_list(block[key], ("search", key), sorted(known[key]), key.rstrip("s"), "names")
    return search


def _check_text_data(doc: _Document, model: dict, root: Path, path: tuple, value: str) -> None:
    """Text data needs a causal LM that brings its own tokenizer."""
    if model["source"] != "hf":
        raise doc.error(path, f"text data is tokenized with a Hugging Face model's tokenizer; model.source is "
                              f"{model['source']!r} (give an .npz file instead)")
    folder = root / model["path"]
    try:
        task = hf.task_of(model, folder)
    except InputError:
        task = None
    if task != hf.CAUSAL_LM:
        raise doc.error(path, f"text data gives next-token windows for causal LMs; the model's task is "
                              f"{task or 'unknown'!r} (set model.task: {hf.CAUSAL_LM}, or give an .npz file)")
    if not any((folder / name).is_file() for name in hf.TOKENIZER_FILES):
        raise doc.error(path, f"no tokenizer in {model['path']!r} (looked for {', '.join(hf.TOKENIZER_FILES)}) "
                              f"to tokenize {value!r}")


def _target(check: _Validator, doc: _Document, entry: Any, path: tuple, metric, seen: set[str],
            data: dict[str, Path], outputs: list[str] | None) -> Target:
    check.mapping(entry, path, TARGET_KEYS)
    name = check.name(entry["name"], path + ("name",))
    if name in seen:
        raise doc.error(path + ("name",), f"duplicate target name {name!r}")
    seen.add(name)
    fmt = check.choice(entry["format"], path + ("format",), list(check.registry.backends), "format")
    platform = check.registry.backends[fmt].platform
    devices = _devices(check, doc, entry["devices"], path + ("devices",), fmt, platform)
    size, download, latency_ms = _budget(check, entry, path + ("budget",))
    max_drop, floor = _accuracy(check, doc, entry["accuracy"], path + ("accuracy",), metric)
    guards = _guards(check, entry["accuracy"], path + ("accuracy", "guards"), outputs)
    delivery = _delivery(check, doc, entry, path, fmt, platform)
    android = _android(check, doc, entry, path, fmt, platform)
    min_ios = _min_ios(doc, entry, path, fmt, platform, devices)
    qat = _qat_settings(check, doc, entry["qat"], path + ("qat",), fmt, data) if "qat" in entry else None
    return Target(name=name, format=fmt, devices=devices, size=size, download=download, max_drop=max_drop,
                  floor=floor, raw=entry, delivery=delivery, android=android, min_ios=min_ios, latency_ms=latency_ms,
                  qat=qat, guards=guards)


def _devices(check: _Validator, doc: _Document, devices: Any, path: tuple, fmt: str, platform: str) -> list[str]:
    if not isinstance(devices, list) or not devices:
        raise doc.error(path, f"expected a non-empty list of device names, got {_typename(devices)}")
    catalog = device_catalog.catalog()
    for j, device in enumerate(devices):
        check.string(device, path + (j,))
        if device not in catalog:
            near = device_catalog.closest(device, platform)
            hint = f"; closest: {', '.join(near)}" if near else ""
            raise doc.error(path + (j,), f"unknown device {device!r}{hint}")
        if catalog[device]["platform"] != platform:
            raise doc.error(path + (j,),
                            f"device {device!r} is an {catalog[device]['platform']} device; format {fmt!r} targets {platform}")
    return list(devices)


def _budget(check: _Validator, entry: dict, path: tuple) -> tuple[int | None, int | None, float | None]:
    """(size, download, latency_ms), each None when not given."""
    if "budget" not in entry:
        return None, None, None
    budget = check.mapping(entry["budget"], path, BUDGET_KEYS)
    size = check.size(budget["size"], path + ("size",)) if "size" in budget else None
    download = check.size(budget["download"], path + ("download",)) if "download" in budget else None
    latency_ms = None
    if "latency_ms" in budget:
        latency_ms = check.number(budget["latency_ms"], path + ("latency_ms",), 0.001, 3_600_000.0)
    return size, download, latency_ms


def _accuracy(check: _Validator, doc: _Document, value: Any, path: tuple, metric) -> tuple[float | None, float | None]:
    """(max_drop, floor): exactly one is given."""
    accuracy = check.mapping(value, path, ACCURACY_KEYS)
    if ("max_drop" in accuracy) == ("floor" in accuracy):
        raise doc.error(path, "give exactly one of 'max_drop' or 'floor'")
    if "floor" in accuracy:
        return None, check.number(accuracy["floor"], path + ("floor",), *metric.bounds)
    if not metric.has_baseline:
        raise doc.error(path + ("max_drop",), f"metric {metric.name!r} has no fp32 baseline to drop from; use 'floor'",
                        at_key=True)
    low, high = metric.bounds
    # How far from fp32 a candidate may fall (a rise, for metrics where lower is better).
    widest = high - low if low is not None and high is not None else None
    return check.number(accuracy["max_drop"], path + ("max_drop",), 0.0, widest), None


def _guards(check: _Validator, accuracy: dict, path: tuple, outputs: list[str] | None) -> list[Guard]:
    """`guards: [{output: box, metric: sqnr, floor: 20}]`: floors on other outputs or metrics."""
    if "guards" not in accuracy:
        return []
    value = accuracy["guards"]
    if not isinstance(value, list) or not value:
        raise check.doc.error(path, f"expected a non-empty list of guards, got {_typename(value)}")
    guards = []
    for i, item in enumerate(value):
        block = check.mapping(item, path + (i,), GUARD_KEYS)
        name = check.choice(block["metric"], path + (i, "metric"), list(check.registry.metrics), "metric")
        output = _output_name(check, block["output"], path + (i, "output"), outputs)
        metric = check.registry.metrics[name]
        floor = check.number(block["floor"], path + (i, "floor"), *metric.bounds)
        guards.append(Guard(MetricSpec(name, output, path + (i,)), floor))
    return guards


def _delivery(check: _Validator, doc: _Document, entry: dict, path: tuple, fmt: str, platform: str) -> str | None:
    store = device_catalog.store_for(platform)
    if "delivery" not in entry:
        return next(iter(store[1])) if store is not None else None
    if store is None:
        raise doc.error(path + ("delivery",), f"format {fmt!r} has no store delivery options", at_key=True)
    return check.choice(entry["delivery"], path + ("delivery",), list(store[1]), "delivery")


def _android(check: _Validator, doc: _Document, entry: dict, path: tuple, fmt: str, platform: str) -> dict:
    android = dict(ANDROID_DEFAULTS) if platform == "android" else {}
    if "android" not in entry:
        return android
    if platform != "android":
        raise doc.error(path + ("android",), f"only android targets take this block; format {fmt!r} targets {platform}",
                        at_key=True)
    android.update(check.mapping(entry["android"], path + ("android",), ANDROID_KEYS))
    if "loops" in android:
        check.choice(android["loops"], path + ("android", "loops"), list(ANDROID_LOOPS), "loops")
    for key, pattern, example in (("assets_dir", ASSETS_DIR_PATTERN, "models/vision"),
                                  ("kotlin_package", KOTLIN_PACKAGE_PATTERN, "com.example.models")):
        if key in android:
            check.string(android[key], path + ("android", key))
            if not pattern.match(android[key]):
                raise doc.error(path + ("android", key), f"invalid value {android[key]!r} (for example {example!r})")
    return android


def _min_ios(doc: _Document, entry: dict, path: tuple, fmt: str, platform: str, devices: list[str]) -> int | None:
    if "min_ios" not in entry:
        return None
    if platform != "ios":
        raise doc.error(path + ("min_ios",), f"only ios targets take min_ios; format {fmt!r} targets {platform}",
                        at_key=True)
    value = entry["min_ios"]
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_IOS_RANGE[0] <= value <= MIN_IOS_RANGE[1]:
        raise doc.error(path + ("min_ios",), f"expected an iOS major version from {MIN_IOS_RANGE[0]} to "
                                             f"{MIN_IOS_RANGE[1]}, got {value!r}")
    catalog = device_catalog.catalog()
    for device in devices:
        if catalog[device]["ios"] < value:
            raise doc.error(path + ("min_ios",), f"device {device!r} runs at most iOS {catalog[device]['ios']}; "
                                                 f"min_ios {value} would exclude it")
    return value


def _qat_settings(check: _Validator, doc: _Document, value: Any, path: tuple, fmt: str,
                  data: dict[str, Path]) -> dict | None:
    """`qat: off | auto | always`, or a mapping with `mode` and training settings."""
    if isinstance(value, bool) and value is False:  # YAML reads a bare `off` as false
        return None
    block = {"mode": value} if isinstance(value, str) else check.mapping(value, path, QAT_KEYS)
    settings = dict(QAT_DEFAULTS)
    mode = check.choice(block.get("mode", "auto"), path + (("mode",) if isinstance(value, dict) else ()),
                        ["off", "auto", "always"], "qat mode")
    if mode == "off":
        return None
    if not isinstance(check.registry.backends[fmt], QATBackend):
        raise doc.error(path, f"format {fmt!r} has no quantization-aware training path", at_key=True)
    if "train" not in data and "calibration" not in data:
        # Training on the evaluation set and then judging on it would report a floor it does not hold.
        raise doc.error(path, "quantization-aware training needs data.train or data.calibration to train on; "
                              "data.evaluation only judges the result", at_key=True)
    settings["mode"] = mode
    if "trainable" in block:
        trainable = check.string(block["trainable"], path + ("trainable",))
        if trainable != "all" and not re.match(r"^last:[1-9]\d*$", trainable):
            raise doc.error(path + ("trainable",), f"expected 'all' or 'last:N', got {trainable!r}")
        settings["trainable"] = trainable
    for key, low, high in (("epochs", 1, 10_000), ("max_steps", 1, 10_000_000)):
        if key in block:
            number = block[key]
            if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
                raise doc.error(path + (key,), f"expected a whole number from {low} to {high}, got {number!r}")
            settings[key] = number
    if "learning_rate" in block:
        settings["learning_rate"] = check.number(block["learning_rate"], path + ("learning_rate",), 1e-8, 1.0)
    if "max_time" in block:
        settings["max_time"] = check.duration(block["max_time"], path + ("max_time",))
    if "loss" in block:
        settings["loss"] = check.choice(block["loss"], path + ("loss",), ["distill", "cross_entropy"], "loss")
    return settings
