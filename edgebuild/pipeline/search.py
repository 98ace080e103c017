"""Mixed-precision search: per-layer sensitivity, then a strategy plugin picks the smallest
per-layer assignment that meets a target's budgets and floor, using few full evaluations.

Full evaluations build the real bundle and run it in the backend's runtime; they are cached by
content hash, so rerunning a search (or another target's search) reuses them.
"""
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field

from ..api import CompressInput, NotApplicable
from ..fsutil import atomic_output, atomic_write_json, bundle_bytes, bundle_sha256, read_json, remove_path, replace_path
from ..manifest import Target
from .layout import Build

MIXED = "mixed-precision"
SENSITIVITY_SAMPLES = 64
SENSITIVITY_FORMAT = 4       # bump when the table's meaning changes, so old caches are not reused


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def search_runs(build: Build, target: Target) -> bool:
    """Whether this build searches mixed precision for the target (strategy and backend allow it)."""
    strategy = build.registry.strategies[build.manifest.search["strategy"]]
    return getattr(strategy, "runs_search", True) and hasattr(build.registry.backends[target.format], "layers")


@dataclass
class SearchContext:
    """What a strategy works with. Strategies call `evaluate`; everything else is read-only."""

    layers: list[dict]
    precisions: dict[str, int]             # name -> bits, highest first
    sensitivity: dict[str, dict[str, float | None]]  # layer -> precision -> SQNR (dB) with only it lowered; None: unavailable
    layer_bytes: dict[str, dict[str, int | None]]    # layer -> precision -> bytes it takes in the bundle
    base_bytes: int                        # bytes that no assignment changes
    max_evaluations: int
    max_time: float
    evaluate_fn: object = None
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


def sensitivity_table(build: Build, target: Target, layers: list[dict], precisions: dict[str, int]) -> dict:
    """Output SQNR vs fp32 with one layer lowered to one precision, on a calibration subset. Cached."""
    from .stages import read_data

    variant = build.variant(target)
    backend = build.registry.backends[variant.backend]
    sqnr = build.registry.metrics["sqnr"]  # the proxy is the sqnr metric every build registers
    role = "calibration" if build.manifest.calibration else "evaluation"
    fp32_sha = read_json(build.fp32_record(variant.key))["sha256"]
    key = _digest(fp32_sha, bundle_sha256(build.data(role)), list(precisions), layers, backend.version(), SENSITIVITY_SAMPLES,
                  SENSITIVITY_FORMAT)
    cache = build.state / variant.key / "sensitivity.json"
    if cache.is_file():
        stored = read_json(cache)
        if stored.get("key") == key:
            return stored["table"]
    samples = read_data(build, role, need_labels=False)
    inputs = tuple(array[:SENSITIVITY_SAMPLES] for array in samples.inputs)
    fp32 = build.fp32_bundle(variant.key)
    reference = backend.predict(fp32, inputs, threads=1, exported_program=build.exported_program).outputs
    work = build.state / variant.key / "sensitivity"
    work.mkdir(parents=True, exist_ok=True)
    table, stored_bytes, refused = {}, {}, {}
    fp32_size = bundle_bytes(fp32)
    # Bytes per weight in the reference conversion (Core ML's is float16).
    reference_width = getattr(backend, "reference_bytes_per_weight", 4)
    for layer in layers:
        table[layer["name"]], stored_bytes[layer["name"]] = {}, {}
        for precision in precisions:
            technique = backend.mixed_technique({layer["name"]: precision}, layers, "sensitivity")
            bundle = work / f"probe{backend.extension}"
            remove_path(bundle)
            try:
                backend.compress(technique, CompressInput(fp32_bundle=fp32, exported_program=build.exported_program,
                                                          calibration=None, work_dir=work, options=variant.options),
                                 bundle)
            except NotApplicable as exc:  # e.g. blocks that do not divide this layer
                table[layer["name"]][precision] = stored_bytes[layer["name"]][precision] = None
                refused.setdefault(layer["name"], {})[precision] = str(exc)
                continue
            stored = next((t["dtype"] for t in backend.weights(bundle) if t["name"] == layer["name"]), None)
            if stored in ("float32", "float16") and precisions[precision] < (32 if stored == "float32" else 16):
                # The backend stores this op's weight wider than asked: no such precision here.
                table[layer["name"]][precision] = stored_bytes[layer["name"]][precision] = None
                continue
            # What this layer really costs at this precision, scales and zero points included.
            stored_bytes[layer["name"]][precision] = bundle_bytes(bundle) - fp32_size + layer["params"] * reference_width
            outputs = backend.predict(bundle, inputs, threads=1, exported_program=build.exported_program).outputs
            table[layer["name"]][precision] = round(sqnr.compute(outputs, reference, None), 3)
    remove_path(work)
    result = {"db": table, "bytes": stored_bytes, "refused": refused}
    atomic_write_json(cache, {"key": key, "table": result})
    return result


def run_search(build: Build, target: Target) -> None:
    """The search stage for one target: writes `.edgebuild/targets/<t>/search.json` and the chosen bundle."""
    from .stages import candidate_verdict, target_threshold

    settings = build.manifest.search
    record_path = build.search_record(target)
    variant = build.variant(target)
    backend = build.registry.backends[variant.backend]
    strategy = build.registry.strategies[settings["strategy"]]
    offered = backend.precisions(variant.options)
    default = backend.default_precisions() if hasattr(backend, "default_precisions") else list(offered)
    precisions = {p: bits for p, bits in offered.items() if p in settings.get("precisions", default)}
    layers = backend.layers(build.fp32_bundle(variant.key), variant.options)
    if not layers or len(precisions) < 2:
        note = (f"{backend.name} offers {', '.join(precisions) or 'none'} of the precisions asked for; a search "
                f"needs two (it offers {', '.join(offered)})" if len(precisions) < 2
                else "no layer has a choice of precision")
        atomic_write_json(record_path, {"strategy": settings["strategy"], "precisions": list(precisions), "layers": [],
                                        "evaluations": 0, "max_evaluations": settings["max_evaluations"],
                                        "seconds": 0.0, "notes": [note], "evaluated": [], "chosen": None})
        return
    measured = sensitivity_table(build, target, layers, precisions)
    table = measured["db"]
    notes = []
    fp32_bytes = bundle_bytes(build.fp32_bundle(variant.key))
    reference_width = getattr(backend, "reference_bytes_per_weight", 4)
    base = max(0, fp32_bytes - sum(layer["params"] * reference_width for layer in layers))
    threshold = target_threshold(build, target)
    cache_dir = build.state / variant.key / "search"
    fp32_sha = read_json(build.fp32_record(variant.key))["sha256"]
    data_sha = bundle_sha256(build.data("evaluation"))

    def evaluate(assignment: dict[str, str]) -> dict:
        from .stages import evaluate_bundle

        technique = backend.mixed_technique(assignment, layers, MIXED)
        key = _digest(fp32_sha, technique.recipe, data_sha, build.manifest.metrics, backend.version())[:32]
        bundle = cache_dir / f"{key}{backend.extension}"
        cached = cache_dir / f"{key}.json"
        if cached.is_file() and bundle.exists() and read_json(cached).get("sha256") == bundle_sha256(bundle):
            evaluation = read_json(cached)
        else:
            temporary = atomic_output(bundle)
            try:
                backend.compress(technique, CompressInput(fp32_bundle=build.fp32_bundle(variant.key),
                                                          exported_program=build.exported_program, calibration=None,
                                                          work_dir=cache_dir, options=variant.options), temporary)
                replace_path(temporary, bundle)
            finally:
                remove_path(temporary)
            evaluation = evaluate_bundle(build, backend, bundle)
            evaluation["sha256"] = bundle_sha256(bundle)
            atomic_write_json(cached, evaluation)
        verdict = candidate_verdict(build, target, evaluation, threshold)
        return {"bytes": evaluation["bytes"], "download_bytes": evaluation["download_bytes"],
                "metric": evaluation["metric"], "latency_ms": evaluation["latency_ms"],
                "status": "fail" if verdict else "pass", "failed": verdict, "key": key}

    for layer in layers:  # say where the backend stores a weight wider than asked, and so why it is not offered
        for precision, cost in measured["bytes"][layer["name"]].items():
            reason = measured.get("refused", {}).get(layer["name"], {}).get(precision)
            if cost is None and reason:
                notes.append(f"{layer['name']} ({layer['op']}): {precision} is not offered for it: {reason}")
            elif cost is None:
                notes.append(f"{layer['name']} ({layer['op']}): {backend.name} keeps this weight in float when "
                             f"asked {precision}, so {precision} is not offered for it")
    context = SearchContext(layers=layers, precisions=precisions, sensitivity=table, layer_bytes=measured["bytes"],
                            base_bytes=base,
                            max_evaluations=settings["max_evaluations"], max_time=settings["max_time"],
                            evaluate_fn=evaluate, notes=notes)
    chosen = strategy(context)
    record = {
        "strategy": settings["strategy"],
        "precisions": list(precisions),
        "layers": [{**layer, "sensitivity_db": table[layer["name"]], "stored_bytes": measured["bytes"][layer["name"]]}
                   for layer in layers],
        "evaluations": len(context.evaluated),
        "max_evaluations": settings["max_evaluations"],
        "seconds": round(time.monotonic() - context.started, 2),
        "notes": context.notes,
        "evaluated": [{k: v for k, v in e.items() if k != "key"} for e in context.evaluated],
        "chosen": None,
    }
    if chosen is not None:
        point = context.evaluate(chosen)  # already evaluated: returns the cached entry
        record["chosen"] = {
            "assignment": chosen, "bytes": point["bytes"], "metric": point["metric"],
            "decision_log": [{"layer": layer["name"], "params": layer["params"], "precision": chosen[layer["name"]],
                              "sensitivity_db": table[layer["name"]][chosen[layer["name"]]],
                              "bytes_saved": layer["params"] * 4 - measured["bytes"][layer["name"]][chosen[layer["name"]]]}
                             for layer in layers],
        }
        # The chosen bundle leaves the shared cache for the target's own state: select and
        # package read it from there, and a later search cannot change it underneath them.
        source = cache_dir / f"{point['key']}{backend.extension}"
        destination = build.search_bundle(target)
        temporary = atomic_output(destination)
        if source.is_dir():
            shutil.copytree(source, temporary)
        else:
            shutil.copyfile(source, temporary)
        replace_path(temporary, destination)
        record["candidate"] = {"technique": MIXED, "description": backend.mixed_technique(chosen, layers, MIXED).description,
                               "status": "ok", **read_json(cache_dir / f"{point['key']}.json")}
        stored = {}
        for tensor in record["candidate"].get("layers", []):  # largest first: a layer's weight before its bias
            stored.setdefault(tensor["name"], tensor["dtype"])
        for entry in record["chosen"]["decision_log"]:
            entry["stored_as"] = stored.get(entry["layer"], "")
    atomic_write_json(record_path, record)


def search_is_intact(build: Build, target: Target) -> bool:
    try:
        record = read_json(build.search_record(target))
    except (OSError, ValueError):
        return False
    if record.get("chosen") is None:
        return True
    bundle = build.search_bundle(target)
    return bundle.exists() and bundle_sha256(bundle) == record["candidate"]["sha256"]


def pareto_front(points: list[dict], higher_is_better: bool) -> list[dict]:
    """Points no other point beats on both bytes (smaller) and metric."""
    sign = 1 if higher_is_better else -1
    front, best = [], -math.inf
    for point in sorted(points, key=lambda p: (p["bytes"], -sign * p["metric"])):
        if sign * point["metric"] > best:
            front.append(point)
            best = sign * point["metric"]
    return front

