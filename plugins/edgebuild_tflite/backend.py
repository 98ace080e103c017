"""TFLite backend: litert-torch converts, ai-edge-quantizer compresses, ai-edge-litert runs.

Heavy toolchain imports happen inside methods, so registering the plugin costs nothing.
"""
import collections
import functools
import re
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edgebuild.api import (BackendBase, CompressInput, ModelInterface, NotApplicable, Prediction, Technique,
                           package_version)
from edgebuild.data import padded_batches
from edgebuild.errors import ToolchainError, first_line
from edgebuild.weights import find_copies

from . import metadata
from .compaction import compact_file, is_names_table, restore_names, rolls_steps
from .constants import quantize_constants_file
from .flatbuffer import buffer_data_positions

SIGNATURE = "serving_default"
_LOWERING = re.compile(r"Lowering not found: (\S+)")
_EXECUTING = re.compile(r"target=(torch\.ops\.[\w.]+)")


def unsupported_op(exc: BaseException) -> str | None:
    """The op a converter error names, if it names one."""
    text = str(exc)
    for pattern in (_LOWERING, _EXECUTING):
        match = pattern.search(text)
        if match:
            return match.group(1).removeprefix("torch.ops.")
    return None


def _ordered(names) -> list[str]:
    """args_0, args_1, ..., args_10 in positional order."""
    return sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])


class TFLiteBackend(BackendBase):
    name = "tflite"
    platform = "android"
    extension = ".tflite"
    reference_bytes_per_weight = 4  # candidates start from the float32 conversion
    # One single-threaded interpreter per shard: a sample's outputs do not depend on how many run
    # at once (XNNPACK's own threads do change int4 weight-only outputs, in the last bits).
    shards_predict = True

    def version(self) -> str:
        return (f"litert-torch {package_version('litert-torch')}, ai-edge-quantizer {package_version('ai-edge-quantizer')}, "
                f"ai-edge-litert {package_version('ai-edge-litert')}, {metadata.version()}")

    def runtime(self) -> str:
        return f"ai-edge-litert {package_version('ai-edge-litert')} (XNNPACK, host CPU)"

    def variant(self, target) -> tuple[str, dict]:
        # `android: {loops: unrolled | rolled}` fixes how a recurrent net's steps ship: its own
        # conversion and candidates. Unset, they ship as loops, and a target with a latency budget
        # also gets the `-unrolled` forms (techniques.yaml) to choose from.
        if "loops" in target.android:
            return f"{self.name}-{target.android['loops']}", {"loops": target.android["loops"]}
        return self.name, {}

    def skip_reason(self, technique: Technique, options: dict) -> str | None:
        if technique.faster_form_of and "loops" in options:
            return f"android.loops is {options['loops']}: the steps ship that way only"
        return None

    def convert(self, exported_program: Path, out: Path, options: dict) -> None:
        from .conversion import convert

        try:
            convert(exported_program, out)
        except Exception as exc:
            op = unsupported_op(exc)
            reason = f"litert-torch cannot convert op {op}" if op else f"litert-torch failed: {first_line(exc)}"
            raise ToolchainError(reason, stage="convert", op=op) from exc
        # Every candidate starts from this bundle and takes its metadata along (compress), so the
        # bytes a candidate is measured and evaluated on are the bytes that ship.
        try:
            metadata.write_metadata(out, ModelInterface.from_json(options.get("model")), _input_names(exported_program))
        except metadata.MetadataUnavailable as exc:
            raise ToolchainError(str(exc), stage="convert") from exc
        except Exception as exc:
            raise ToolchainError(f"writing TFLite model metadata failed: {first_line(exc)}", stage="convert") from exc

    def compress(self, technique: Technique, source: CompressInput, out: Path) -> None:
        if technique.faster_form_of and not rolls_steps(source.fp32_bundle):
            raise NotApplicable(f"no steps that ship as a loop: the same bundle as {technique.faster_form_of}")
        roll_loops = source.options.get("loops", "rolled") == "rolled" and not technique.faster_form_of
        if technique.recipe is None:
            out.write_bytes(source.fp32_bundle.read_bytes())
            _compact(out, roll_loops, technique)
            return
        from ai_edge_quantizer import quantizer

        try:
            recipe = resolve_layer_rules(technique.recipe, source.fp32_bundle)
            qt = quantizer.Quantizer(str(source.fp32_bundle))
            qt.load_quantization_recipe(recipe)
            calibration_result = None
            if qt.need_calibration:
                details = self._interpreter(source.fp32_bundle).get_signature_runner(SIGNATURE).get_input_details()
                names = _ordered(details)
                # The converter narrows int64 inputs (token ids) to int32: feed what the model takes.
                samples = [{name: _quantize(part, details[name]) for name, part in zip(names, sample)}
                           for sample in source.calibration or []]
                calibration_result = qt.calibrate({SIGNATURE: samples})
            result = qt.quantize(calibration_result)
            result.export_model(str(out), overwrite=True)
        except NotApplicable:
            raise
        except Exception as exc:
            raise ToolchainError(f"ai-edge-quantizer failed: {first_line(exc)}", stage="compress",
                                 technique=technique.name) from exc
        bits = constant_bits(technique)
        try:
            if bits:
                quantize_constants_file(out, bits)
            metadata.copy_metadata(source.fp32_bundle, out)
        except Exception as exc:
            raise ToolchainError(f"quantizing the float tables the quantizer left failed: {first_line(exc)}",
                                 stage="compress", technique=technique.name) from exc
        _compact(out, roll_loops, technique)

    def _interpreter(self, bundle: Path, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(bundle), num_threads=threads)
        interpreter.allocate_tensors()
        return interpreter

    def predict(self, bundle: Path, inputs: Sequence[np.ndarray], *, threads: int = 1, batch: int = 1,
                exported_program: Path | None = None) -> Prediction:
        """Run every sample through the bundle at its own (exported) batch size; latency is the median invoke."""
        interpreter = self._interpreter(bundle, threads)
        runner = interpreter.get_signature_runner(SIGNATURE)
        in_details = runner.get_input_details()
        out_details = runner.get_output_details()
        in_names = _ordered(in_details)
        out_names = _ordered(out_details)
        batch = int(in_details[in_names[0]]["shape"][0]) or 1
        outputs, timings = {name: [] for name in out_names}, []
        for chunk, rows in padded_batches(tuple(inputs), batch):
            feed = {name: _quantize(part, in_details[name]) for name, part in zip(in_names, chunk)}
            begin = time.perf_counter()
            result = runner(**feed)
            timings.append((time.perf_counter() - begin) * 1000.0)
            for name in out_names:  # every output, by its signature name (the model's output names)
                outputs[name].append(_dequantize(result[name], out_details[name])[:rows])
        # The first invokes pay for allocation and XNNPACK packing; they are not steady-state latency.
        steady = timings[min(3, len(timings) - 1):]
        return Prediction(outputs={name: np.concatenate(parts) for name, parts in outputs.items()},
                          latency_ms=statistics.median(steady),
                          runtime=self.runtime(), details={"batch": batch, "threads": threads, "runs": len(steady)})

    def weights(self, bundle: Path) -> list[dict]:
        return weight_tensors(bundle)

    def weight_values(self, bundle: Path):
        return stored_values(bundle)

    # ---- mixed precision ----------------------------------------------------------------------

    def layers(self, fp32_bundle: Path, options: dict) -> list[dict]:
        return weighted_layers(fp32_bundle)

    def precisions(self, options: dict | None = None) -> dict[str, float]:
        """Precision name -> bits per weight, highest first."""
        return {name: bits for name, (bits, _) in PRECISIONS.items()}

    def default_precisions(self, options: dict | None = None) -> list[str]:
        """What the search tries unless `search.precisions` says otherwise."""
        return [name for name in PRECISIONS if name not in OPT_IN_PRECISIONS]

    def simulated_precisions(self, options: dict | None = None) -> set[str]:
        """Weight-only precisions: the runtime dequantizes the stored weight and computes in float."""
        return {name for name, (_, rule) in PRECISIONS.items()
                if rule["op_config"]["compute_precision"] == "FLOAT" and rule["op_config"]["explicit_dequantize"]}

    # ---- quantization-aware training ----------------------------------------------------------

    def qat_plan(self, technique: Technique) -> dict | None:
        """The weight grid of a symmetric per-channel min/max recipe (weight-only or dynamic); None
        for recipes QAT cannot simulate (static activation ranges, blockwise, float)."""
        def grid_bits(rule: dict) -> int | None:
            weights = rule.get("op_config", {}).get("weight_tensor_config", {})
            if rule.get("algorithm_key") != "min_max_uniform_quantize" or not weights.get("symmetric"):
                return None
            return _integer_channel_bits(rule)

        rules = technique.recipe if isinstance(technique.recipe, list) else []
        if not rules or rules[0].get("operation") != "*" or grid_bits(rules[0]) is None:
            return None
        bits = grid_bits(rules[0])
        plan = {"kind": "weight grid", "bits": bits, "qmin": -(2 ** (bits - 1)), "qmax": 2 ** (bits - 1) - 1}
        for rule in rules[1:]:  # only a depthwise override (int4 recipes store those at int8)
            if rule.get("operation") != "DEPTHWISE_CONV_2D" or grid_bits(rule) is None:
                return None
            plan["depthwise_bits"] = grid_bits(rule)
        return plan

    def train_quantized(self, technique: Technique, plan: dict, module, example: tuple, train, out: Path,
                        work: Path, options: dict) -> None:
        """Train with ai-edge-quantizer's grid simulated (scale = max|w| / qmax per output channel,
        straight-through gradients), then convert and quantize with the technique's own recipe, so
        the trained weights land exactly on the quantizer's grid."""
        import os

        import torch
        from torch.nn.utils import parametrize

        layers = [m for m in module.modules()
                  if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.groups == 1)]
        for layer in layers:
            parametrize.register_parametrization(layer, "weight", _FakeQuant(plan["qmin"], plan["qmax"]))
        if "depthwise_bits" in plan:  # on their own grid; without the override they keep float weights
            half = 2 ** (plan["depthwise_bits"] - 1)
            depthwise = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1
                         and m.groups == m.in_channels]
            for layer in depthwise:
                parametrize.register_parametrization(layer, "weight", _FakeQuant(-half, half - 1))
            layers += depthwise
        train(module, layers)
        for layer in layers:  # bake the grid into the weights
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        program = work / "trained.pt2"
        temporary = work / ".trained.pt2.tmp"
        torch.export.save(torch.export.export(module.eval(), example), str(temporary))
        os.replace(temporary, program)
        fp32 = work / f"fp32{self.extension}"
        self.convert(program, fp32, options)
        self.compress(technique, CompressInput(fp32_bundle=fp32, exported_program=program, calibration=None,
                                               work_dir=work, options=options), out)

    def mixed_technique(self, assignment: dict[str, str], layers: list[dict], name: str) -> Technique:
        return Technique(name=name, backend=self.name, description="mixed precision: " + ", ".join(
            f"{layer['name']} {assignment[layer['name']]}" for layer in layers if layer["name"] in assignment),
            recipe=compile_assignment(assignment, layers))

    def describe(self, bundle: Path) -> dict:
        runner = self._interpreter(bundle).get_signature_runner(SIGNATURE)

        def tensors(details):
            return [{"name": name, "shape": [int(d) for d in details[name]["shape"]],
                     "dtype": np.dtype(details[name]["dtype"]).name,
                     "quantization": {"scale": float(details[name]["quantization"][0]),
                                      "zero_point": int(details[name]["quantization"][1])}
                     if details[name]["quantization"][0] else None}
                    for name in _ordered(details)]

        described = metadata.tensor_interface(bundle)
        return {"signature": SIGNATURE,
                "inputs": [{**t, **described.get(t["name"], {})} for t in tensors(runner.get_input_details())],
                "outputs": [{**t, **described.get(t["name"], {})} for t in tensors(runner.get_output_details())]}


WEIGHTED_OPS = {"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "BATCH_MATMUL",
                "EMBEDDING_LOOKUP", "CONV_3D"}

# Per-layer precisions for the mixed-precision search, highest first: (bits, ai-edge-quantizer rule).
PRECISIONS = {
    "fp16": (16, {"algorithm_key": "float_casting",
                  "op_config": {"weight_tensor_config": {"num_bits": 16, "dtype": "FLOAT"},
                                "compute_precision": "FLOAT", "explicit_dequantize": True}}),
    "int8": (8, {"algorithm_key": "min_max_uniform_quantize",
                 "op_config": {"weight_tensor_config": {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE",
                                                        "dtype": "INT"},
                               "compute_precision": "FLOAT", "explicit_dequantize": True}}),
    # 4 bits plus one float16 scale per 32 weights. Opt-in (search.precisions): for language models.
    "int4-block32": (4.5, {"algorithm_key": "min_max_uniform_quantize",
                           "op_config": {"weight_tensor_config": {"num_bits": 4, "symmetric": True,
                                                                  "granularity": "BLOCKWISE_32", "dtype": "INT"},
                                         "compute_precision": "INTEGER", "explicit_dequantize": False}}),
    "int4": (4, {"algorithm_key": "min_max_uniform_quantize",
                 "op_config": {"weight_tensor_config": {"num_bits": 4, "symmetric": True, "granularity": "CHANNELWISE",
                                                        "dtype": "INT"},
                               "compute_precision": "FLOAT", "explicit_dequantize": True}}),
}


OPT_IN_PRECISIONS = {"int4-block32"}


def weighted_layers(bundle: Path) -> list[dict]:
    """Ops with a constant weight tensor: name, op, scope (what recipe regexes match), parameter count."""
    stat = bundle.stat()
    return [dict(layer) for layer in _weighted_layers(str(bundle), stat.st_mtime_ns, stat.st_size)]


@functools.lru_cache(maxsize=4)
def _weighted_layers(bundle: str, mtime_ns: int, size: int) -> tuple[dict, ...]:
    # Cached by file identity: every candidate and search probe of a variant resolves its recipe
    # against the same fp32 bundle, and reading an LLM's flatbuffer into Python objects is costly.
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as flatbuffer

    model = restore_names(flatbuffer.read_model(bundle))
    subgraph = model.subgraphs[0]
    names = _display_names(model, subgraph)
    layers, loaders = [], []
    for op_name, op in _weighted_ops(model, subgraph):
        weight = subgraph.tensors[op.inputs[1]]
        buffer = model.buffers[weight.buffer]
        if buffer.data is None and not buffer.size:
            continue
        layers.append({"name": names[op.inputs[1]], "op": op_name, "in_features": int(weight.shape[-1]),
                       "scope": flatbuffer.get_op_scope(op, subgraph.tensors),
                       "params": int(np.prod(weight.shape))})
        loaders.append((_loader(weight, buffer.data) if buffer.data is not None else None, weight.buffer))
    # Unique, stable names: two ops may share a module path.
    seen = {}
    for layer in layers:
        count = seen.get(layer["name"], 0)
        seen[layer["name"]] = count + 1
        if count:
            layer["name"] = f"{layer['name']}#{count}"
    return tuple(_merge_copies(layers, loaders))


def _merge_copies(layers: list[dict], loaders: list) -> list[dict]:
    """One weight is one layer to the search, however often it is read or stored.

    Ops reading one buffer (a tied embedding table and lm_head) share it: the quantizer cannot
    give them different precisions, so they are one layer (`shared_with`), its parameters stored
    once. A weight the converter stored twice (a negated or transposed copy) is one layer too
    (`copies`): both are always given the same precision, and both count in its bytes.
    """
    by_name = {layer["name"]: layer for layer in layers}
    first_of_buffer, candidates, merged = {}, [], set()
    for layer, (load, buffer) in zip(layers, loaders):
        if buffer in first_of_buffer:
            kept = by_name[first_of_buffer[buffer]]
            kept.setdefault("shared_with", []).append(layer["name"])
            kept.setdefault("also_scopes", []).append(layer["scope"])
            merged.add(layer["name"])
            continue
        first_of_buffer[buffer] = layer["name"]
        if load is not None:
            candidates.append((layer["name"], layer["params"], load))
    for copy in find_copies(candidates):
        kept, twin = by_name[copy["copy_of"]], by_name[copy["tensor"]]
        kept.setdefault("copies", []).append({"name": twin["name"], "relation": copy["relation"]})
        kept.setdefault("also_scopes", []).extend(_scopes(twin))
        kept["params"] += twin["params"]
        merged.add(twin["name"])
    return [layer for layer in layers if layer["name"] not in merged]


def resolve_layer_rules(recipe: list[dict], fp32_bundle: Path) -> list[dict]:
    """A recipe as ai-edge-quantizer takes it, checked against the model.

    Rules may pick layers by name (`layers: REGEX`, searched in the names reports show) instead
    of by op scope: a model's lm_head scope is its output tensor's name, not 'lm_head'. Each such
    rule becomes one scope rule per matching layer. A rule matching nothing, or blocks that do not
    divide a matched layer's input dimension (the quantizer refuses those outright), make the
    technique not applicable to this model.
    """
    def blockwise(rule: dict) -> int | None:
        granularity = rule.get("op_config", {}).get("weight_tensor_config", {}).get("granularity", "")
        return int(granularity.rsplit("_", 1)[1]) if granularity.startswith("BLOCKWISE_") else None

    if not any("layers" in rule or blockwise(rule) for rule in recipe):
        return recipe  # nothing to check: spare reading the model
    layers = weighted_layers(fp32_bundle)
    resolved = []
    for rule in recipe:
        if "layers" not in rule:
            resolved.append(rule)
            continue
        pattern = re.compile(rule["layers"])
        matched = [layer for layer in layers if pattern.search(layer["name"])]
        if not matched:
            raise NotApplicable(f"no layer of this model matches {rule['layers']!r}")
        body = {key: value for key, value in rule.items() if key != "layers"}
        resolved += [{"regex": "^" + re.escape(scope) + "$", **body} for layer in matched for scope in _scopes(layer)]
    for rule in resolved:
        block = blockwise(rule)
        if not block:
            continue
        uneven = next((layer for layer in layers if layer["op"] in BLOCK_OPS and layer["in_features"] % block
                       and re.search(rule["regex"], layer["scope"])), None)
        if uneven:
            raise NotApplicable(f"blocks of {block} need input dimensions divisible by {block}; "
                                f"{uneven['name']} has {uneven['in_features']}")
    return resolved


def compile_assignment(assignment: dict[str, str], layers: list[dict]) -> list[dict]:
    """One ai-edge-quantizer rule per layer: the assignment as recipe data."""
    rules = []
    for layer in layers:
        precision = assignment.get(layer["name"])
        if precision is None:
            continue
        _, rule = PRECISIONS[precision]
        rules += [{"regex": "^" + re.escape(scope) + "$", "operation": "*", **rule} for scope in _scopes(layer)]
    return rules


def _scopes(layer: dict) -> list[str]:
    """The op scopes a layer's rules match: its own, and those of copies of its weight."""
    return [layer["scope"], *layer.get("also_scopes", [])]


def _weighted_ops(model, subgraph):
    """(op name, op) of each op whose second input is a weight: the layers a recipe can quantize."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as flatbuffer

    for op in subgraph.operators:
        op_name = str(flatbuffer.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode, ""))
        op_name = op_name.rsplit(".", 1)[-1]
        if op_name in WEIGHTED_OPS and len(op.inputs) >= 2 and op.inputs[1] >= 0:
            yield op_name, op


BLOCK_OPS = {"FULLY_CONNECTED", "EMBEDDING_LOOKUP", "BATCH_MATMUL"}  # ops blockwise recipes quantize in blocks
UNNAMED_CONSTANT = re.compile(r"^constant\d*")


def _display_names(model, subgraph) -> dict[int, str]:
    """Tensor index -> module path. The converter leaves some weights unnamed ('constant2', e.g. an
    embedding table); those take the path of the op that reads them, so reports say which layer."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as flatbuffer

    def raw(tensor) -> str:
        return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)

    names = {index: short_tensor_name(raw(tensor)) for index, tensor in enumerate(subgraph.tensors)}
    weighted = [op for _, op in _weighted_ops(model, subgraph)]
    # A fused name lists several module paths ('attn;attn/Linear_q_proj;attn/Linear_k_proj;'); a
    # weight's own module is the path fewest other weights mention (the latest on a tie), so the
    # q, k and v projections are not all called 'attn'.
    paths = {op.inputs[1]: [part for part in raw(subgraph.tensors[op.inputs[1]]).split(";") if part and not part.isdigit()]
             for op in weighted}
    mentions = collections.Counter(path for found in paths.values() for path in set(found))
    for index, found in paths.items():
        if found:
            names[index] = short_tensor_name(min(reversed(found), key=lambda path: mentions[path]))
    for op in weighted:
        index = op.inputs[1]
        match = UNNAMED_CONSTANT.match(names[index])
        if match:
            owner = short_tensor_name(flatbuffer.get_op_scope(op, subgraph.tensors))
            for other, name in names.items():  # its scales ('constant2_scales') follow it
                if name.startswith(match.group(0)) and (name == match.group(0) or name[len(match.group(0))] == "_"):
                    names[other] = owner + name[len(match.group(0)):]
    return names


def short_tensor_name(name: str) -> str:
    """'model.Net/torch.nn.modules.container.Sequential_classifier/torch.nn.modules.linear.Linear_1;1'
    -> 'Sequential_classifier/Linear_1' (the module path the converter encodes)."""
    first = next((part for part in name.split(";") if part), name)
    parts = first.split("/")
    parts = parts[1:] if len(parts) > 1 else parts
    return "/".join(part.rsplit(".", 1)[-1] for part in parts)


def _input_names(exported_program: Path) -> list[str]:
    """The model's input names in argument order (the TFLite signature names them args_0, ...).

    Read from the archive's serialized graph signature, so an LLM's weights are not loaded again
    just for its names; through torch.export.load if the archive is laid out otherwise."""
    import json
    import zipfile

    try:
        with zipfile.ZipFile(exported_program) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/models/model.json"))
            specs = json.loads(archive.read(name))["graph_module"]["signature"]["input_specs"]
        return [spec["user_input"]["arg"]["as_tensor"]["name"] for spec in specs if "user_input" in spec]
    except (OSError, zipfile.BadZipFile, StopIteration, KeyError, TypeError, ValueError):
        import torch

        return list(torch.export.load(str(exported_program)).graph_signature.user_inputs)


def _integer_channel_bits(rule: dict) -> int | None:
    """The bits of a recipe rule that quantizes weights per channel to integers, activations left
    float (weight-only and dynamic rules); else None."""
    config = rule.get("op_config", {})
    weights = config.get("weight_tensor_config", {})
    if (weights.get("dtype") != "INT" or weights.get("granularity") != "CHANNELWISE"
            or "activation_tensor_config" in config):
        return None
    return int(weights["num_bits"])


def constant_bits(technique: Technique) -> int | None:
    """The bits a technique gives float tables the quantizer leaves (constants.py): its weights'
    bits when its base rule, for every op, is a weight-only or dynamic per-channel integer rule of
    8 or 4 bits; else None."""
    rules = technique.recipe if isinstance(technique.recipe, list) else []
    if not rules or rules[0].get("operation") != "*":
        return None
    bits = _integer_channel_bits(rules[0])
    return bits if bits in (4, 8) else None


def _compact(bundle: Path, roll_loops: bool, technique: Technique) -> None:
    try:
        compact_file(bundle, roll_loops)
    except Exception as exc:
        raise ToolchainError(f"compacting the .tflite (fusing slices, rolling steps, names) failed: {first_line(exc)}",
                             stage="compress", technique=technique.name) from exc


def weight_tensors(bundle: Path) -> list[dict]:
    """Every constant tensor stored in the bundle, with the bytes it takes and how it is stored,
    and the model metadata and its packed files (labels), which ship in the same file."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as flatbuffer

    content = bundle.read_bytes()
    model = restore_names(flatbuffer.read_model(content))
    tensors = [{"name": f"metadata: {name}", "dtype": "associated file", "shape": [], "bytes": size}
               for name, size in metadata.associated_files(bundle).items()]
    for entry in model.metadata or []:
        data = model.buffers[entry.buffer].data
        if metadata.is_model_metadata(entry) and data is not None and len(data):
            tensors.append({"name": "metadata: TFLite Model Metadata", "dtype": "metadata", "shape": [],
                            "bytes": len(data)})
        elif is_names_table(entry) and data is not None:
            tensors.append({"name": "metadata: tensor names (compressed)", "dtype": "metadata", "shape": [],
                            "bytes": len(data)})
    # Bytes stored once are counted once: tensors can share a buffer, and buffers their bytes.
    positions, counted = buffer_data_positions(content), set()
    for subgraph in model.subgraphs:
        names = _display_names(model, subgraph)
        for index, tensor in enumerate(subgraph.tensors):
            buffer = model.buffers[tensor.buffer]
            size = len(buffer.data) if buffer.data is not None else int(buffer.size or 0)
            stored_at = positions[tensor.buffer] or ("buffer", tensor.buffer)
            if size == 0 or stored_at in counted:
                continue
            counted.add(stored_at)
            dtype = flatbuffer.TENSOR_CODE_TO_TYPE.get(tensor.type, tensor.type)
            tensors.append({"name": names[index], "dtype": str(getattr(dtype, "name", dtype)).lower(),
                            "shape": [int(d) for d in tensor.shape], "bytes": size})
    return sorted(tensors, key=lambda t: (-t["bytes"], t["name"]))


# TFLite tensor type codes of the weights edgebuild can read back: float32, float16, int8, int4.
_FLOAT_TYPES = {0: "<f4", 1: "<f2"}
_INT8, _INT4 = 9, 17


def stored_values(bundle: Path):
    """(name, element count, load) for each stored weight buffer, once per buffer: what
    `edgebuild.weights.find_copies` compares. `load()` dequantizes int8 and int4 weights with
    their per-channel or blockwise scales (the latter live in a tensor of their own)."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as flatbuffer

    content = bundle.read_bytes()
    model = restore_names(flatbuffer.read_model(content))
    # Tensors can share a buffer, and buffers their bytes (flatbuffer.pack writes equal data once).
    positions = buffer_data_positions(content)
    seen = set()
    for subgraph in model.subgraphs:
        names = _display_names(model, subgraph)
        for index, tensor in enumerate(subgraph.tensors):
            data = model.buffers[tensor.buffer].data
            if data is None or not len(data) or positions[tensor.buffer] in seen:
                continue
            seen.add(positions[tensor.buffer])
            load = _loader(tensor, data, _blockwise_scales(model, subgraph, tensor))
            if load is not None:
                yield names[index], int(np.prod(tensor.shape)), load


def _blockwise_scales(model, subgraph, tensor):
    """A blockwise-quantized tensor's scales ([rows, blocks], in a tensor of their own); else None."""
    details = getattr(tensor.quantization, "details", None)
    index = getattr(details, "scales", None)
    if index is None or index < 0:
        return None
    scales = subgraph.tensors[index]
    data = model.buffers[scales.buffer].data
    if scales.type not in _FLOAT_TYPES or data is None:
        return None
    return np.frombuffer(data, dtype=_FLOAT_TYPES[scales.type]).astype(np.float32).reshape(
        [int(d) for d in scales.shape])


def _loader(tensor, data, block_scales=None):
    shape = [int(d) for d in tensor.shape]
    count = int(np.prod(shape))
    quantization = tensor.quantization
    if tensor.type in _FLOAT_TYPES:
        return lambda: np.frombuffer(data, dtype=_FLOAT_TYPES[tensor.type], count=count).astype(np.float32, copy=False).reshape(shape)
    if tensor.type not in (_INT8, _INT4) or not shape:
        return None
    if block_scales is not None:  # one scale per block of the last dimension, per row
        if len(shape) != 2 or block_scales.shape[0] != shape[0] or shape[1] % block_scales.shape[1]:
            return None
        blocks = block_scales.shape[1]
        return lambda: _dequantized(tensor.type, data, count, [shape[0], blocks, shape[1] // blocks],
                                    block_scales[:, :, None], None).reshape(shape)
    scale = None if quantization is None or quantization.scale is None else np.asarray(quantization.scale, np.float32)
    if scale is None:
        return None
    axis = quantization.quantizedDimension or 0
    if scale.size not in (1, shape[axis]):
        return None
    along = [-1 if d == axis else 1 for d in range(len(shape))]
    zero = np.asarray(quantization.zeroPoint if quantization.zeroPoint is not None else [0], np.float32)
    return lambda: _dequantized(tensor.type, data, count, shape, scale.reshape(along if scale.size > 1 else [1]),
                                zero.reshape(along if zero.size > 1 else [1]))


def _dequantized(kind: int, data, count: int, shape: list[int], scale: np.ndarray, zero: np.ndarray | None):
    """Integer weights as float32, in one array worked in place (an LLM's table is ~100 MB)."""
    if kind == _INT8:
        values = np.frombuffer(data, dtype=np.int8, count=count).astype(np.float32)
    else:  # two per byte, low nibble first, sign-extended
        packed = np.frombuffer(data, dtype=np.uint8)
        nibbles = np.empty(packed.size * 2, dtype=np.int8)
        nibbles[0::2] = packed & 0x0F
        nibbles[1::2] = packed >> 4
        nibbles = nibbles[:count]
        nibbles[nibbles > 7] -= 16
        values = nibbles.astype(np.float32)
        del nibbles
    values = values.reshape(shape)
    if zero is not None and zero.any():
        values -= zero
    values *= scale
    return values


def _FakeQuant(qmin: int, qmax: int):
    import torch

    class FakeQuant(torch.nn.Module):
        """Symmetric per-output-channel integer grid with a straight-through gradient."""

        def forward(self, weight):
            flat = weight.reshape(weight.shape[0], -1)
            scale = (flat.abs().amax(dim=1).clamp_min(1e-9) / qmax).reshape(-1, *[1] * (weight.dim() - 1))
            quantized = torch.clamp(torch.round(weight / scale), qmin, qmax) * scale
            return weight + (quantized - weight).detach()

    return FakeQuant()


def _quantize(array: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype.kind in "iu" and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(array / scale + zero_point), info.min, info.max).astype(dtype)
    return array.astype(dtype, copy=False)


def _dequantize(array: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind in "iu" and scale:
        return (array.astype(np.float32) - zero_point) * scale
    return array.astype(np.float32, copy=False)
