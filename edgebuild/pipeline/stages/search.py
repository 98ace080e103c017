"""Mixed-precision search: per-layer sensitivity, then a strategy plugin picks the smallest
per-layer assignment that meets a target's budgets and floor, using few full evaluations.

Full evaluations build the real bundle and run it in the backend's runtime; they are cached by
content hash (and the code that produced them), so rerunning a search, or another target's, reuses them.
"""
import math
import time

import numpy as np

from ...api import CompressInput, MixedPrecisionBackend, NotApplicable, SearchContext, SimulatedSensitivityBackend
from ...data import data_sha256
from ...fsutil import (atomic_output, atomic_write_json, bundle_bytes, bundle_sha256, copy_bundle, read_json,
                       remove_path, replace_path)
from ...manifest import Target
from ...policy import judged
from ..evaluation import (digest, evaluate_bundle, example_batch, jobs, limits, named_outputs, output_specs,
                          predict_samples, read_data, variant_evaluation_inputs)
from ..layout import Build
from ..machine import cores
from ..simulation import ProgramSimulator, match_weight

MIXED = "mixed-precision"
SENSITIVITY_SAMPLES = 64
SIMULATED = "torch simulation (stored weights, float32)"
# A precision whose stored weight is this much closer to fp32 than a probed precision's (weight
# error energy, 20 dB) is estimated from that probe instead of probed: output noise grows with the
# weight error's energy to first order. The estimate is optimistic (on the digits CNN, int8 from
# int4 by up to 2.5 dB, fp16 by up to 5.7 dB; a 4-bit grid's error is partly the weight itself,
# which the next layers pass on less than random noise), but a noise 20 dB under the probed one
# changes the cost of lowering that layer to the probed precision by about 1%: it only orders the
# chain's first, cheapest moves.
FIRST_ORDER_GAP = 0.01
# A compressed weight is matched to the layer whose fp32 values it is nearest to, within this
# relative distance (int4 per channel on uniform random weights: about 0.07).
STORED_MATCH_ERROR = 0.5
PROBE_BYTES = 1 << 30    # the probes' weights held for one pass over the samples
SENSITIVITY_FORMAT = 7       # bump when the table's meaning changes, so old caches are not reused


def sensitivity_key(build: Build, target: Target, layers: list[dict], precisions: dict, role: str) -> str:
    """What the sensitivity table depends on: the fp32 bundle, the data, the grid, the toolchain
    and the code of edgebuild, the backend and the sqnr metric."""
    variant = build.variant(target)
    backend = build.backend(target)
    return digest(read_json(build.fp32_record(variant.key))["sha256"], data_sha256(build.data(role)),
                   list(precisions), layers, backend.version(), SENSITIVITY_SAMPLES, SENSITIVITY_FORMAT,
                   _simulated_precisions(build, backend, variant.options, precisions),
                   output_specs(build),
                   build.code(("backend", backend.name), ("metric", "sqnr")))


def _probe(backend: MixedPrecisionBackend, technique, source: CompressInput, bundle) -> None:
    remove_path(bundle)
    backend.compress(technique, source, bundle)


def sensitivity_table(build: Build, target: Target, layers: list[dict], precisions: dict[str, float]) -> dict:
    """Output SQNR vs fp32 with one layer lowered to one precision, on a calibration subset; how
    each entry was measured; what each layer costs at each precision. Cached."""
    variant = build.variant(target)
    backend = build.backend(target)
    sqnr = build.registry.metrics["sqnr"]  # the proxy is the sqnr metric every build registers
    role = "calibration" if build.manifest.calibration else "evaluation"
    key = sensitivity_key(build, target, layers, precisions, role)
    cache = build.sensitivity_cache(variant.key)
    if cache.is_file() and read_json(cache).get("key") == key:
        return read_json(cache)["table"]
    samples = read_data(build, role, need_labels=False)
    inputs = samples.head(SENSITIVITY_SAMPLES)
    fp32 = build.fp32_bundle(variant.key)
    specs = output_specs(build)
    work = build.state / variant.key / "sensitivity"
    work.mkdir(parents=True, exist_ok=True)
    source = CompressInput(fp32_bundle=fp32, exported_program=build.exported_program, calibration=None,
                           work_dir=work, options=variant.options)
    table = {layer["name"]: {precision: None for precision in precisions} for layer in layers}
    stored_bytes = {layer["name"]: {precision: None for precision in precisions} for layer in layers}
    measured_by = {layer["name"]: {} for layer in layers}
    refused = {}
    fp32_size = _reference_bytes(build, backend, source, work)
    simulated = _simulated_precisions(build, backend, variant.options, precisions)
    if simulated:
        _simulate(build, backend, layers, precisions, simulated, inputs, source, work, table, stored_bytes,
                  measured_by, fp32_size, first_order=build.manifest.search.get("sensitivity", "auto") == "auto")

    def run(bundle) -> dict:
        with cores(jobs()) as workers:
            prediction = predict_samples(backend, bundle, inputs, batch=example_batch(build),
                                         exported_program=build.exported_program, workers=workers)
        return named_outputs(prediction.outputs, specs, prediction.runtime)

    def db(outputs: dict) -> float:  # the worst output's SQNR: no layer may wreck any output
        return min(sqnr.compute(outputs[name], reference[name], None) for name in reference)

    reference = None
    for layer in layers:
        name = layer["name"]
        for precision in precisions:
            if precision in measured_by[name]:
                continue
            if reference is None:
                reference = run(fp32)
            bundle = work / f"probe{backend.extension}"
            try:
                _probe(backend, backend.mixed_technique({name: precision}, layers, "sensitivity"), source, bundle)
            except NotApplicable as exc:  # e.g. blocks that do not divide this layer
                refused.setdefault(name, {})[precision] = str(exc)
                continue
            if _stored_wider(backend.weights(bundle), layer, precisions[precision]):
                continue  # the backend stores this op's weight wider than asked: no such precision here
            # What this layer really costs at this precision, scales and zero points included.
            stored_bytes[name][precision] = (bundle_bytes(bundle) - fp32_size
                                             + layer["params"] * backend.reference_bytes_per_weight)
            table[name][precision] = round(db(run(bundle)), 3)
            measured_by[name][precision] = backend.runtime()
    remove_path(work)
    result = {"db": table, "bytes": stored_bytes, "refused": refused, "measured_by": measured_by,
              "reference_bytes": fp32_size}
    atomic_write_json(cache, {"key": key, "table": result})
    return result


def _reference_bytes(build: Build, backend, source: CompressInput, work) -> int:
    """What this variant's unquantized candidate weighs: the backend's `fp32` technique applied to
    the conversion, which a backend may rewrite (the TFLite backend moves tensor names out and
    rolls an unrolled RNN's steps into a loop: a 100-step GRU's bundle shrinks by half). Layer
    costs are measured against it, so what compaction saves is not booked to a layer: against
    the raw conversion a GRU layer cost -104 KB. Without an `fp32` technique, the conversion."""
    fp32 = next((t for t in build.registry.techniques_for(backend.name) if t.name == "fp32"), None)
    if fp32 is None:
        return bundle_bytes(source.fp32_bundle)
    reference = work / f"reference{backend.extension}"
    _probe(backend, fp32, source, reference)
    size = bundle_bytes(reference)
    remove_path(reference)
    return size


def _simulated_precisions(build: Build, backend, options: dict, precisions: dict) -> list[str]:
    """The precisions asked for that the backend computes in float on its stored weights, unless
    the manifest asks for every probe in the runtime (`search.sensitivity: runtime`)."""
    if build.manifest.search.get("sensitivity") == "runtime" or not isinstance(backend, SimulatedSensitivityBackend):
        return []
    return [precision for precision in precisions if precision in backend.simulated_precisions(options)]


def _stored_wider(tensors: list[dict], layer: dict, bits: float) -> bool:
    """The bundle keeps this layer's weight in a float wider than the precision asked for."""
    stored = _stored_dtype(tensors, layer)
    return stored in ("float32", "float16") and bits < (32 if stored == "float32" else 16)


def _values_by_layer(values, layers: list[dict]) -> dict:
    """Layer name -> a function loading its stored values, for layers whose name and size pick
    exactly one stored buffer (a layer stored twice is left to the runtime: its copies are
    quantized apart)."""
    found = {}
    for name, size, load in values:
        found.setdefault((name, size), []).append(load)
    loads = {}
    for layer in layers:
        if layer.get("copies"):
            continue
        entries = found.get((layer["name"], layer["params"]), [])
        if len(entries) == 1:
            loads[layer["name"]] = entries[0]
    return loads


def _stored_by_layer(values, layers: list[dict], fp32_loads: dict) -> dict[str, tuple[str, object]]:
    """Layer name -> (stored tensor name, load) in a compressed bundle. Matched by value, not name:
    a converter may name a quantized tensor after another op (a folded BatchNorm's), so each
    stored weight goes to the layer of its size and shape whose fp32 values it is nearest to."""
    by_size = {}
    for layer in layers:
        if layer["name"] in fp32_loads:
            by_size.setdefault(layer["params"], []).append(layer["name"])
    found = {}
    for stored_name, size, load in values:
        candidates = [name for name in by_size.get(size, []) if name not in found]
        if not candidates:
            continue
        stored = load()
        best, error = None, STORED_MATCH_ERROR
        for name in candidates:
            reference = fp32_loads[name]()
            if reference.shape == stored.shape:
                distance = float(np.linalg.norm(stored - reference) / max(float(np.linalg.norm(reference)), 1e-30))
                if distance < error:
                    best, error = name, distance
        if best is not None:
            found[best] = (stored_name, load)
    return found


def _layer_costs(backend, tensors: list[dict], stored: dict[str, dict], offered: list[str], bundle_size: int,
                 fp32_size: int) -> dict:
    """What each layer of a uniform bundle costs at its precision: its weight tensor's bytes plus an
    equal share of what else the bundle grew by. That growth is per quantized tensor more than per
    weight (a dequantize op, the tensor's entry and name, its scales): on the digits CNN an equal
    share is at most 430 B off a conversion per probe and picks the same assignment; a share by
    parameters made a 144-weight layer look 475 B cheaper than it is and picked a larger one.
    `stored` maps each layer to itself under the name its weight has in this bundle."""
    weight = {name: sum(t["bytes"] for t in tensors
                        if t["name"] == layer["name"] and math.prod(t["shape"]) == layer["params"])
              for name, layer in stored.items()}
    rest = bundle_size - fp32_size - sum(weight[name] - layer["params"] * backend.reference_bytes_per_weight
                                         for name, layer in stored.items())
    return {name: weight[name] + rest / max(1, len(offered)) for name in offered}


def _simulate(build: Build, backend, layers: list[dict], precisions: dict[str, float], simulated: list[str],
              inputs: tuple, source: CompressInput, work, table: dict, stored_bytes: dict, measured_by: dict,
              fp32_size: int, first_order: bool) -> None:
    """Fill the table for every layer whose fp32 weight is a program parameter (up to layout and
    a folded per-channel scale) at every simulated precision: one uniform bundle per precision
    gives each layer's exact stored values and its bytes; torch runs the probes, all cores.
    With `first_order`, the fewest-bits precision is probed and a precision whose weight error is
    FIRST_ORDER_GAP of that one's or less is estimated from it."""
    simulator = ProgramSimulator(build.exported_program, inputs, example_batch(build))
    parameters = simulator.parameter_values()
    fp32_loads = _values_by_layer(backend.weight_values(source.fp32_bundle), layers)
    maps = {}
    for name, load in fp32_loads.items():
        found = match_weight(load(), parameters)
        if found is not None:
            maps[name] = found
    del parameters
    if not maps:
        return
    mapped = [layer for layer in layers if layer["name"] in maps]
    probes, probed = [], []
    # Weight error energy per (layer, precision); each layer's fewest-bits probe; what to estimate.
    errors, probed_at, estimated = {}, {}, []

    def run_probes():  # one fp32 pass per batch serves every probe held
        if not probes:
            return
        with cores(jobs()) as workers:
            signal, noise = simulator.noise(probes, workers)
        for (name, precision), energies in zip(probed, noise):
            table[name][precision] = round(min(_db(s, n) for s, n in zip(signal, energies)), 3)
            measured_by[name][precision] = SIMULATED
        probes.clear()
        probed.clear()

    for precision in sorted(simulated, key=lambda name: precisions[name]):  # fewest bits first
        bundle = work / f"uniform-{precision}{backend.extension}"
        try:
            _probe(backend, backend.mixed_technique({layer["name"]: precision for layer in mapped}, layers,
                                                    "sensitivity"), source, bundle)
        except NotApplicable:
            continue  # a layer it does not fit: every layer is probed at this precision in the runtime
        tensors = backend.weights(bundle)
        found = _stored_by_layer(backend.weight_values(bundle), mapped, fp32_loads)
        renamed = {layer["name"]: {**layer, "name": found[layer["name"]][0]} for layer in mapped
                   if layer["name"] in found}
        offered = [name for name, layer in renamed.items()
                   if not _stored_wider(tensors, layer, precisions[precision])]
        costs = _layer_costs(backend, tensors, renamed, offered, bundle_bytes(bundle), fp32_size)
        # Each precision's probes hold one model's worth of float32 weights: an LLM's are run
        # before the next precision's are read.
        held = sum(value.nbytes for _, value in probes)
        if probes and held + 4 * sum(layer["params"] for layer in mapped) > PROBE_BYTES:
            run_probes()
        for name in renamed:
            if name not in costs:
                measured_by[name][precision] = "not offered: stored wider than asked"
                continue
            stored_bytes[name][precision] = round(costs[name])
            value = maps[name].to_parameter(found[name][1]())
            error = float(np.sum((value.astype(np.float64) - simulator.parameter_value(maps[name].parameter)) ** 2))
            errors[name, precision] = error
            basis = probed_at.get(name) if first_order else None
            if basis is not None and error <= FIRST_ORDER_GAP * errors[name, basis]:
                estimated.append((name, precision, basis))
                continue
            probes.append((maps[name].parameter, value))
            probed.append((name, precision))
            probed_at.setdefault(name, precision)
        del found
        remove_path(bundle)
    run_probes()
    for name, precision, basis in estimated:
        error, probed_error = errors[name, precision], errors[name, basis]
        gain = 200.0 if error == 0.0 else 10.0 * math.log10(probed_error / error)
        table[name][precision] = round(min(200.0, table[name][basis] + gain), 3)
        measured_by[name][precision] = (f"first-order estimate from the {basis} probe "
                                        f"(weight error {_db(probed_error, error):.1f} dB below it)")


def _db(signal: float, noise: float) -> float:
    """The sqnr metric's ratio from its two sums (200 dB for identical outputs, as it caps)."""
    if noise == 0.0:
        return 200.0
    return float(min(200.0, 10.0 * math.log10(max(signal, 1e-30) / noise)))


def _grid(build: Build, target: Target) -> tuple[list[dict], dict[str, float], dict[str, float]]:
    """(layers, precisions asked for and offered, every precision the backend offers)."""
    variant = build.variant(target)
    backend = build.backend(target)
    offered = backend.precisions(variant.options)
    asked = build.manifest.search.get("precisions", backend.default_precisions(variant.options))
    precisions = {p: bits for p, bits in offered.items() if p in asked}
    return backend.layers(build.fp32_bundle(variant.key), variant.options), precisions, offered


def _stored_dtype(tensors: list[dict], layer: dict) -> str | None:
    """How a probe stores a layer's weight: the tensor of its name and size (its bias shares the
    name; a layer merged with a stored copy of its weight counts both copies' parameters)."""
    sizes = {layer["params"], layer["params"] // (1 + len(layer.get("copies", [])))}
    return next((t["dtype"] for t in tensors if t["name"] == layer["name"] and math.prod(t["shape"]) in sizes), None)


def _not_offered_notes(backend, layers: list[dict], measured: dict) -> list[str]:
    """Where the backend stores a weight wider than asked, or refuses a precision, and so why it is not offered."""
    notes = []
    for layer in layers:
        for precision, cost in measured["bytes"][layer["name"]].items():
            reason = measured.get("refused", {}).get(layer["name"], {}).get(precision)
            if cost is None and reason:
                notes.append(f"{layer['name']} ({layer['op']}): {precision} is not offered for it: {reason}")
            elif cost is None:
                notes.append(f"{layer['name']} ({layer['op']}): {backend.name} keeps this weight in float when "
                             f"asked {precision}, so {precision} is not offered for it")
    return notes + _one_weight_notes(layers)


def _one_weight_notes(layers: list[dict]) -> list[str]:
    """Layers the backend merged because they read, or store a copy of, one weight."""
    notes = []
    for layer in layers:
        if layer.get("shared_with"):
            notes.append(f"{layer['name']} shares its weight with {_listed(layer['shared_with'])} (stored once): "
                         f"searched as one layer")
        for copy in layer.get("copies", []):
            notes.append(f"{layer['name']} is stored twice ({copy['name']} holds a {copy['relation']} copy): "
                         f"searched as one layer, both copies at one precision")
    return notes


def _listed(names: list[str], shown: int = 4) -> str:
    """Names for one line of a report: an unrolled 100-step GRU shares one weight among 99 ops."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{len(names)} ops ({', '.join(names[:shown - 1])}, …, {names[-1]})"


def evaluation_inputs(build: Build, target: Target) -> tuple:
    """What every full evaluation of a target's search depends on besides its recipe (its
    variant's `variant_evaluation_inputs`). Hashed once per search, not once per evaluation."""
    return variant_evaluation_inputs(build, build.variant(target).key)


def evaluation_key(inputs: tuple, recipe) -> str:
    """One mixed assignment's evaluation: its recipe with `evaluation_inputs`."""
    return digest(*inputs, recipe)[:32]


def _evaluator(build: Build, target: Target, layers: list[dict]):
    """A function building and running one assignment for real, cached by content and code."""
    variant = build.variant(target)
    backend = build.backend(target)
    target_limits = limits(build, target)
    cache_dir = build.search_cache(variant.key)
    inputs = evaluation_inputs(build, target)

    def evaluate(assignment: dict[str, str]) -> dict:
        technique = backend.mixed_technique(assignment, layers, MIXED)
        key = evaluation_key(inputs, technique.recipe)
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
            evaluation = {**evaluate_bundle(build, backend, bundle), "sha256": bundle_sha256(bundle)}
            atomic_write_json(cached, evaluation)
        point = judged({"technique": MIXED, **evaluation}, target_limits)
        return {"bytes": point["bytes"], "download_bytes": point["download_bytes"], "metric": point["metric"],
                "latency_ms": point["latency_ms"], "status": point["status"], "failed": point["failed"], "key": key}

    return evaluate


def _chosen(build: Build, target: Target, context: SearchContext, chosen: dict, measured: dict) -> dict:
    """The record of the chosen assignment, its bundle moved out of the shared cache into the target's state."""
    backend = build.backend(target)
    point = context.evaluate(chosen)  # already evaluated: returns the cached entry
    table = measured["db"]
    record = {
        "assignment": chosen, "bytes": point["bytes"], "metric": point["metric"],
        "decision_log": [{"layer": layer["name"], "params": layer["params"], "precision": chosen[layer["name"]],
                          "sensitivity_db": table[layer["name"]][chosen[layer["name"]]],
                          "bytes_saved": layer["params"] * 4 - measured["bytes"][layer["name"]][chosen[layer["name"]]]}
                         for layer in context.layers],
    }
    # Select and package read the chosen bundle from the target's own state: a later search
    # cannot change it underneath them.
    cache_dir = build.search_cache(build.variant(target).key)
    source = cache_dir / f"{point['key']}{backend.extension}"
    destination = build.search_bundle(target)
    temporary = atomic_output(destination)
    copy_bundle(source, temporary)
    replace_path(temporary, destination)
    candidate = {"technique": MIXED, "description": backend.mixed_technique(chosen, context.layers, MIXED).description,
                 "status": "ok", **read_json(cache_dir / f"{point['key']}.json")}
    stored = {}
    for tensor in candidate.get("layers", []):  # largest first: a layer's weight before its bias
        stored.setdefault(tensor["name"], tensor["dtype"])
    for entry in record["decision_log"]:
        entry["stored_as"] = stored.get(entry["layer"], "")
    return {"chosen": record, "candidate": candidate}


def run_search(build: Build, target: Target) -> None:
    """The search stage for one target: writes `.edgebuild/targets/<t>/search.json` and the chosen bundle."""
    settings = build.manifest.search
    backend = build.backend(target)
    layers, precisions, offered = _grid(build, target)
    record = {"strategy": settings["strategy"], "precisions": list(precisions), "layers": [], "evaluations": 0,
              "max_evaluations": settings["max_evaluations"], "seconds": 0.0, "notes": [], "evaluated": [],
              "chosen": None}
    if not layers or len(precisions) < 2:
        record["notes"] = [f"{backend.name} offers {', '.join(precisions) or 'none'} of the precisions asked for; a "
                           f"search needs two (it offers {', '.join(offered)})" if len(precisions) < 2
                           else "no layer has a choice of precision"]
        atomic_write_json(build.search_record(target), record)
        return
    measured = sensitivity_table(build, target, layers, precisions)
    base = max(0, measured["reference_bytes"]
               - sum(layer["params"] * backend.reference_bytes_per_weight for layer in layers))
    context = SearchContext(layers=layers, precisions=precisions, sensitivity=measured["db"],
                            layer_bytes=measured["bytes"], base_bytes=base,
                            max_evaluations=settings["max_evaluations"], max_time=settings["max_time"],
                            higher_is_better=build.gate_metric.higher_is_better,
                            evaluate_fn=_evaluator(build, target, layers),
                            notes=_not_offered_notes(backend, layers, measured))
    chosen = build.registry.strategies[settings["strategy"]].search(context)
    record.update({
        "layers": [{**layer, "sensitivity_db": measured["db"][layer["name"]],
                    "measured_by": measured["measured_by"][layer["name"]],
                    "stored_bytes": measured["bytes"][layer["name"]]} for layer in layers],
        "evaluations": len(context.evaluated),
        "seconds": round(time.monotonic() - context.started, 2),
        "notes": context.notes,
        "evaluated": [{k: v for k, v in e.items() if k != "key"} for e in context.evaluated],
    })
    if chosen is not None:
        record.update(_chosen(build, target, context, chosen, measured))
    atomic_write_json(build.search_record(target), record)


def search_is_intact(build: Build, target: Target) -> bool:
    try:
        record = read_json(build.search_record(target))
    except (OSError, ValueError):
        return False
    if record.get("chosen") is None:
        return True
    bundle = build.search_bundle(target)
    return bundle.exists() and bundle_sha256(bundle) == record["candidate"]["sha256"]

