"""Core ML backend: coremltools converts torch.export programs to ML Programs and compresses them.

On Linux, Core ML cannot run a model. Candidates are then evaluated by a *weights-exact torch
simulation*: the exported PyTorch program with every parameter replaced by the value the bundle
stores (decompressed exactly as the runtime materialises it). Activations run in float32, so
float16 compute and activation quantization are not simulated; reports say so.
"""
import functools
import gc
import json
import re
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from edgebuild import devices
from edgebuild.api import (BackendBase, CompressInput, ModelInterface, NotApplicable, Prediction, Technique,
                           package_version)
from edgebuild.data import run_torch_module
from edgebuild.errors import ToolchainError, first_line
from edgebuild.fsutil import copy_bundle
from edgebuild.outputs import positional_outputs

from .ops import lean_conversion_memory, register_missing_ops

MODEL_FILE = Path("Data") / "com.apple.CoreML" / "model.mlmodel"
DEBUG_FILES = ("executorch_debug_handle_mapping.json",)  # conversion debug data, never read at run time
VOLATILE_METADATA = ("com.github.apple.coremltools.conversion_date",)
SIMULATION = "weights-exact torch simulation"
_OP_PATTERNS = (re.compile(r"convert function for op '([^']+)' not implemented"),
                re.compile(r"Unsupported fx node (\S+)"),
                re.compile(r"op '([^']+)' is not supported"),
                re.compile(r"Unsupported op[^:]*: '?([\w.:]+)"))


def unsupported_op(exc: BaseException) -> str | None:
    for pattern in _OP_PATTERNS:
        match = pattern.search(str(exc))
        if match:
            return match.group(1).strip(".,")
    return None


def can_predict() -> bool:
    """Core ML prediction exists on macOS only."""
    return sys.platform == "darwin"


def _deployment_target(min_ios: int):
    import coremltools as ct

    return getattr(ct.target, f"iOS{min_ios}")


LABELS_KEY = "edgebuild.labels."   # user-defined metadata: labels of an output that is not the classifier's
CLASS_LABEL = "classLabel"   # Core ML's (and Xcode's, Vision's) name for a classifier's predicted label


def interface_arguments(interface: ModelInterface, input_names: list[str], example, output_names: list[str] | None):
    """ct.convert's `inputs` (image inputs with the manifest's scale and bias; None when no input is
    an image) and `classifier_config` (the first labelled output; None without labels).

    Core ML scales an image by one value for every channel and adds a bias per channel:
    (pixel - mean) / std becomes scale = 1 / std, bias = -mean / std.
    """
    import coremltools as ct

    inputs = None
    if interface.images:
        inputs = []
        for name, tensor in zip(input_names, example):
            image = interface.images.get(name)
            if image is None:
                inputs.append(ct.TensorType(name=name, shape=tuple(tensor.shape)))
                continue
            channels = image.channels(tuple(tensor.shape))
            if len(set(image.std)) > 1:
                raise ToolchainError(f"model.inputs.{name}.std: a Core ML image input scales every channel by one "
                                     f"value; std {list(image.std)} differs per channel", stage="convert")
            if tuple(image.range) != (0.0, 255.0):
                raise ToolchainError(f"model.inputs.{name}.range: Core ML image inputs are 8-bit pixels, [0, 255]; "
                                     f"got {list(image.range)}", stage="convert")
            mean, _ = image.per_channel(channels)
            inputs.append(ct.ImageType(name=name, shape=tuple(tensor.shape), scale=1.0 / image.std[0],
                                       bias=[-m / image.std[0] for m in mean],
                                       color_layout=ct.colorlayout.GRAYSCALE if channels == 1 else ct.colorlayout.RGB,
                                       channel_first=image.layout == "NCHW"))
    labels = interface.labels_by_output(output_names or ["output_0"])
    classifier = None
    if labels:
        output, classes = next(iter(labels.items()))
        classifier = ct.ClassifierConfig(list(classes), predicted_feature_name=CLASS_LABEL,
                                         predicted_probabilities_output=output if output_names else None)
    return inputs, classifier


def _convert_with_interface(source, classifier, **settings):
    """ct.convert to an ML Program, as a classifier when `classifier` is given.

    coremltools 9 cannot make a classifier of a conversion whose outputs are declared (a
    torch.export program always declares them): its exporter indexes the declared output types by
    the classifier's outputs, one more, and raises IndexError. So a classifier is converted to MIL
    first, its declared output types are dropped, and the MIL program is made a classifier.
    """
    import coremltools as ct

    if classifier is None:
        return ct.convert(source, convert_to="mlprogram", skip_model_load=True, **settings)
    program = ct.convert(source, convert_to="milinternal", **settings)
    program.functions["main"].set_output_types(None)
    kept = {key: settings[key] for key in ("minimum_deployment_target", "compute_precision") if key in settings}
    model = ct.convert(program, convert_to="mlprogram", skip_model_load=True, classifier_config=classifier, **kept)
    if classifier.predicted_probabilities_output is None:
        return model
    # The scores replace the output they are computed from; named `<label>_probs` by coremltools,
    # they take that output's name back, which the other backends and the evaluation know it by.
    spec = model.get_spec()
    ct.utils.rename_feature(spec, f"{CLASS_LABEL}_probs", classifier.predicted_probabilities_output)
    return ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True)


class CoreMLBackend(BackendBase):
    name = "coreml"
    platform = "ios"
    extension = ".mlpackage"
    reference_bytes_per_weight = 2  # the conversion every candidate starts from is float16

    def version(self) -> str:
        return f"coremltools {package_version('coremltools')}, torch {package_version('torch')}, scikit-learn {package_version('scikit-learn')}"

    def variant(self, target) -> tuple[str, dict]:
        catalog = devices.catalog()
        min_ios = target.min_ios or min(catalog[d]["ios"] for d in target.devices)
        return f"coreml-ios{min_ios}", {"min_ios": min_ios}

    def skip_reason(self, technique: Technique, options: dict) -> str | None:
        required = technique.recipe["requires_ios"]
        if required > options["min_ios"]:
            return f"requires iOS {required}, target min is iOS {options['min_ios']}"
        if technique.recipe.get("needs_prediction") and not can_predict():
            return "calibrating activations runs Core ML prediction, which exists on macOS only"
        return None

    # ---- convert / compress ----------------------------------------------------------------------

    def _convert(self, exported_program: Path, out: Path, options: dict, precision: str) -> None:
        import coremltools as ct
        import torch

        register_missing_ops()
        lean_conversion_memory()
        program = torch.export.load(str(exported_program))
        try:
            # The default decomposition table also lowers ops Core ML lacks (e.g. per-channel PReLU).
            # Linear stays whole: Core ML has it, and its weight keeps the torch parameter's name
            # and layout, which the weights-exact simulation maps back by name.
            table = torch.export.default_decompositions()
            table.pop(torch.ops.aten.linear.default, None)
            program = program.run_decompositions(table)
            # A model with named outputs returns {name: tensor}: Core ML's outputs take those names.
            spec = program.call_spec.out_spec
            names = list(spec.context) if spec is not None and spec.type is dict else None
            args, _ = program.example_inputs
            inputs, classifier = interface_arguments(ModelInterface.from_json(options.get("model")),
                                                     list(program.graph_signature.user_inputs), args, names)
            model = _convert_with_interface(program, classifier, minimum_deployment_target=_deployment_target(
                options["min_ios"]), compute_precision=getattr(ct.precision, precision), inputs=inputs,
                outputs=[ct.TensorType(name=name) for name in names] if names else None)
        except ToolchainError:
            raise
        except Exception as exc:
            op = unsupported_op(exc)
            reason = f"coremltools cannot convert op {op}" if op else f"coremltools failed: {first_line(exc)}"
            raise ToolchainError(reason, stage="convert", op=op) from exc
        model.save(str(out))
        normalize_package(out, options.get("model", {}))

    def convert(self, exported_program: Path, out: Path, options: dict) -> None:
        self._convert(exported_program, out, options, "FLOAT16")

    def compress(self, technique: Technique, source: CompressInput, out: Path) -> None:
        settings = technique.recipe["compress"]
        if settings is None:
            copy_bundle(source.fp32_bundle, out)
            return
        if settings["kind"] == "float32":
            self._convert(source.exported_program, out, source.options, "FLOAT32")
            return
        import coremltools as ct

        lean_conversion_memory()
        _fresh_op_names()
        base = ct.models.MLModel(str(source.fp32_bundle), skip_model_load=True)
        try:
            # Compress the model's weights (its parameters), never other constants such as an
            # attention mask full of -inf.
            layers = self.layers(source.fp32_bundle, source.options)
            model = COMPRESSIONS[settings["kind"]](base, settings, layers, source)
        except NotApplicable:
            raise
        except Exception as exc:
            raise ToolchainError(f"coremltools.optimize failed: {first_line(exc)}", stage="compress",
                                 technique=technique.name) from exc
        model.save(str(out))
        normalize_package(out, None)

    # ---- mixed precision --------------------------------------------------------------------------

    def layers(self, fp32_bundle: Path, options: dict) -> list[dict]:
        """Weight tensors (2-D and up) of the float16 conversion; `scope` is the const op palettization targets."""
        layers = []
        for op in _weight_ops(fp32_bundle):
            value = op.outputs[0].val if op.op_type == "const" else None
            # Parameters only ("p_" + torch name): masks and other constants stay as they are.
            if (isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.ndim >= 2
                    and op.name.startswith("p_") and np.isfinite(value).all()):
                layers.append({"name": _parameter_key(op.name), "op": "const", "scope": op.name,
                               "params": int(value.size), "in_features": int(value.shape[1])})
        return layers

    def precisions(self, options: dict | None = None) -> dict[str, int]:
        """Float16, then k-means palettization by falling bits; 3-bit needs iOS 18."""
        choices = {"fp16": 16, "pal8": 8, "pal6": 6, "pal4": 4, "pal3": 3, "pal2": 2}
        if options is not None and options.get("min_ios", 18) < 18:
            del choices["pal3"]
        return choices

    def default_precisions(self, options: dict | None = None) -> list[str]:
        return list(self.precisions(options))

    def mixed_technique(self, assignment: dict[str, str], layers: list[dict], name: str) -> Technique:
        bits = self.precisions()
        ops = {layer["scope"]: bits[assignment[layer["name"]]] for layer in layers
               if assignment.get(layer["name"], "fp16") != "fp16"}
        return Technique(name=name, backend=self.name, description="mixed precision: " + ", ".join(
            f"{layer['name']} {assignment[layer['name']]}" for layer in layers if layer["name"] in assignment),
            recipe={"requires_ios": 16, "compress": {"kind": "mixed", "ops": dict(sorted(ops.items()))},
                    "needs_prediction": False})

    # ---- quantization-aware training --------------------------------------------------------------

    def qat_plan(self, technique: Technique) -> dict | None:
        """Per-tensor k-means palettization is trained with coremltools' DKMPalettizer."""
        settings = technique.recipe.get("compress") or {}
        if settings.get("kind") == "palettize" and settings.get("granularity") == "per_tensor":
            return {"kind": "dkm palettization", "bits": settings["nbits"]}
        return None

    def train_quantized(self, technique: Technique, plan: dict, module, example: tuple, train, out: Path,
                        work: Path, options: dict) -> None:
        """DKMPalettizer (differentiable k-means) during training; the finalized model goes through
        torch.jit.trace into coremltools, which keeps its lookup tables."""
        import coremltools as ct
        import torch
        from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig

        config = DKMPalettizerConfig.from_dict({"global_config": {"n_bits": plan["bits"], "weight_threshold": 0}})
        palettizer = DKMPalettizer(module, config)
        prepared = palettizer.prepare()
        layers = [m for m in prepared.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        train(prepared, layers, palettizer.step)
        finalized = palettizer.finalize(prepared).eval()
        with torch.no_grad():
            result = finalized(*example)
        names = list(result) if isinstance(result, dict) else None
        input_names = _input_names(finalized)
        images, classifier = interface_arguments(ModelInterface.from_json(options.get("model")), input_names,
                                                 example, names)
        inputs = images or [ct.TensorType(name=name, shape=tuple(tensor.shape))
                            for name, tensor in zip(input_names, example)]
        if names:  # torch.jit.trace takes tuples: the names come back through ct.convert's outputs
            positional_outputs(finalized)
        traced = torch.jit.trace(finalized, example)
        try:
            model = _convert_with_interface(traced, classifier, inputs=inputs,
                                            minimum_deployment_target=_deployment_target(options["min_ios"]),
                                            outputs=[ct.TensorType(name=name) for name in names] if names else None)
        except Exception as exc:
            raise ToolchainError(f"coremltools failed on the trained model: {first_line(exc)}", stage="qat",
                                 technique=technique.name, op=unsupported_op(exc)) from exc
        model.save(str(out))
        normalize_package(out, options.get("model", {}))

    # ---- evaluate ----------------------------------------------------------------------------------

    def runtime(self) -> str:
        if can_predict():
            return f"Core ML {package_version('coremltools')} MLModel.predict (macOS host)"
        return f"{SIMULATION} (coremltools {package_version('coremltools')} decompressed weights, float32 activations)"

    def predict(self, bundle: Path, inputs: Sequence[np.ndarray], *, threads: int = 1, batch: int = 1,
                exported_program: Path | None = None) -> Prediction:
        if can_predict():
            return self._predict_core_ml(bundle, inputs)
        module, missing = simulated_module(bundle, exported_program)
        outputs = run_torch_module(module, tuple(inputs), batch)
        # The fx module sits in reference cycles: free its float32 weights now, not at some later
        # collection while the next step (reading the bundle's weights) holds memory of its own.
        del module
        gc.collect()
        details = {"simulated": True, "activations": "float32", "unmapped_parameters": missing}
        runtime = self.runtime()
        if missing:  # say plainly that this evaluation is not weights-exact
            runtime = (f"torch simulation, NOT weights-exact: {len(missing)} parameter(s) not found in the bundle "
                       f"kept their float32 values ({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''})")
        # Host latency of a simulation says nothing about a phone: not reported.
        return Prediction(outputs=outputs, latency_ms=None, runtime=runtime, details=details, deterministic=True,
                          latency_note="Core ML runs models on macOS only; this host evaluated a torch simulation")

    def _predict_core_ml(self, bundle: Path, inputs: Sequence[np.ndarray]) -> Prediction:
        import coremltools as ct

        model = ct.models.MLModel(str(bundle))
        spec = model.get_spec().description
        in_names = [i.name for i in spec.input]
        described = self.describe(bundle)
        images = {f["name"]: f for f in described["inputs"] if f["kind"] == "image"}
        classifier = described.get("classifier")
        # A classifier's scores come back as {label: score}; they are the model's output it replaced,
        # in label order. Its predicted label is derived from them, not another output to evaluate.
        outputs = {o.name: [] for o in spec.output if o.type.WhichOneof("Type") == "multiArrayType"}
        if classifier:
            outputs[classifier["scores_output"]] = []
        timings = []
        for i in range(len(inputs[0])):
            feed = {name: _image_feed(array[i], images[name]) if name in images else array[i:i + 1]
                    for name, array in zip(in_names, inputs)}
            begin = time.perf_counter()
            result = model.predict(feed)
            timings.append((time.perf_counter() - begin) * 1000.0)
            for name, rows in outputs.items():  # every output, by Core ML's (the model's) output name
                value = result[name]
                if isinstance(value, dict):
                    rows.append(np.asarray([value[label] for label in classifier["labels"]], dtype=np.float32))
                else:
                    rows.append(np.asarray(value, dtype=np.float32)[0])
        steady = timings[min(3, len(timings) - 1):]
        return Prediction(outputs={name: np.stack(rows) for name, rows in outputs.items()},
                          latency_ms=statistics.median(steady), runtime=self.runtime(),
                          details={"simulated": False, "runs": len(steady)})

    def describe(self, bundle: Path) -> dict:
        """Inputs and outputs as the spec declares them (tensors, images with their preprocessing,
        a classifier's label and scores) and, for a classifier, its class labels."""
        from coremltools.proto import Model_pb2

        spec = Model_pb2.Model()
        spec.ParseFromString((bundle / MODEL_FILE).read_bytes())
        program = _program(bundle) if any(f.type.WhichOneof("Type") == "imageType" for f in spec.description.input) \
            or spec.description.predictedFeatureName else None

        def feature(f) -> dict:
            kind = f.type.WhichOneof("Type")
            if kind == "imageType":
                image = f.type.imageType
                return {"name": f.name, "kind": "image", "shape": [int(image.height), int(image.width)],
                        "dtype": Model_pb2.ImageFeatureType.ColorSpace.Name(image.colorSpace).lower(),
                        **_image_preprocessing(program, f.name)}
            if kind == "dictionaryType":
                return {"name": f.name, "kind": "dictionary", "shape": [], "dtype": "[String: Double]"}
            if kind == "stringType":
                return {"name": f.name, "kind": "string", "shape": [], "dtype": "String"}
            array = f.type.multiArrayType
            labels = spec.description.metadata.userDefined.get(LABELS_KEY + f.name)
            return {"name": f.name, "kind": "tensor", "shape": [int(d) for d in array.shape],
                    "dtype": Model_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType).lower(),
                    **({"labels": json.loads(labels)} if labels else {})}

        result = {"inputs": [feature(f) for f in spec.description.input],
                  "outputs": [feature(f) for f in spec.description.output],
                  "specification_version": spec.specificationVersion}
        if spec.description.predictedFeatureName:
            result["classifier"] = {"label_output": spec.description.predictedFeatureName,
                                    "scores_output": spec.description.predictedProbabilitiesName,
                                    "labels": _class_labels(program)}
        return result

    def weights(self, bundle: Path) -> list[dict]:
        """Stored weight tensors with the bytes each takes in weight.bin and how it is compressed."""
        rows = []
        for op in _weight_ops(bundle):
            arrays = [v.val for v in op.inputs.values() if isinstance(getattr(v, "val", None), np.ndarray)]
            stored = sum(a.nbytes for a in arrays)
            if op.op_type == "const":
                value = op.outputs[0].val
                if not isinstance(value, np.ndarray) or value.size < 2 or value.dtype.kind != "f":
                    continue
                stored, kind, shape = value.nbytes, str(value.dtype), list(value.shape)
            else:
                kind, shape = _compression_kind(op), [int(d) for d in op.outputs[0].shape]
            rows.append({"name": _parameter_key(op.name), "dtype": kind, "shape": shape, "bytes": int(stored)})
        return sorted(rows, key=lambda r: (-r["bytes"], r["name"]))


    def weight_values(self, bundle: Path):
        """Each stored weight, decompressed as Core ML materialises it, one at a time when asked."""
        for op in _weight_ops(bundle):
            output = op.outputs[0]
            if not output.shape or (op.op_type == "const" and not (
                    isinstance(output.val, np.ndarray) and output.val.dtype.kind == "f")):
                continue
            yield _parameter_key(op.name), int(np.prod(output.shape)), functools.partial(_materialized, op)


def _image_feed(sample: np.ndarray, image: dict):
    """The 8-bit image whose preprocessing (pixel * scale + bias) gives `sample` back, for Core ML
    prediction on macOS; pixels are rounded, so data that are not whole pixels come back rounded."""
    from PIL import Image

    bias = np.asarray(image["bias"], dtype=np.float32)
    channels_first = sample.shape[0] in (1, 3) and sample.shape[-1] not in (1, 3)
    pixels = sample if not channels_first else np.moveaxis(sample, 0, -1)
    pixels = np.clip(np.rint((pixels - bias) / image["scale"]), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, "L" if pixels.shape[-1] == 1 else "RGB")


def _image_preprocessing(program, name: str) -> dict:
    """The scale and bias Core ML applies to an image input before the model (ops coremltools
    inserts as `<input>__scaled__` and `<input>__biased__`)."""
    found = {"scale": 1.0, "bias": [0.0]}
    for op in program.functions["main"].operations:
        if op.name == f"{name}__scaled__":
            found["scale"] = float(np.asarray(op.inputs["y"].val).reshape(-1)[0])
        elif op.name == f"{name}__biased__":
            found["bias"] = [float(v) for v in np.asarray(op.inputs["y"].val).reshape(-1)]
    return found


def _class_labels(program) -> list[str]:
    """A classifier's class labels, from its `classify` op."""
    for op in program.functions["main"].operations:
        if op.op_type == "classify":
            return [str(label) for label in op.inputs["classes"].val]
    return []


def _stored_value(op):
    """A weight as Core ML materialises it at load time (a constexpr op decompressed)."""
    return op.outputs[0].val if op.op_type == "const" else op.materialized_val_inference()


def _materialized(op) -> np.ndarray:
    return np.asarray(_stored_value(op), dtype=np.float32)


def _fresh_op_names() -> None:
    """Number the ops coremltools adds from zero, as ct.convert does: its counters are per
    process, so the names a compression or a load gives (and the report shows) would otherwise
    depend on what else the process did before (another stage, in a build that runs stages at once)."""
    from coremltools.converters.mil.mil import Builder, Block

    Builder.name_count.clear()
    Block.counter = 0


# ---- compressions, one small function per recipe kind (techniques.yaml's `compress.kind`) -------

def _palettize(base, settings: dict, layers: list[dict], source: CompressInput):
    import coremltools.optimize.coreml as optimize

    config = optimize.OpPalettizerConfig(mode="kmeans", nbits=settings["nbits"], granularity=settings["granularity"],
                                         group_size=settings.get("group_size", 32), weight_threshold=0)
    return optimize.palettize_weights(base, optimize.OptimizationConfig(
        op_name_configs={layer["scope"]: config for layer in layers}))


def _linear_config(fields: dict):
    import coremltools.optimize.coreml as optimize

    return optimize.OpLinearQuantizerConfig(mode=fields["mode"], dtype=fields["dtype"],
                                            granularity=fields["granularity"],
                                            block_size=fields.get("block_size", 32), weight_threshold=0)


def _linear(base, settings: dict, layers: list[dict], source: CompressInput):
    import coremltools.optimize.coreml as optimize

    block = settings.get("block_size", 32) if settings["granularity"] == "per_block" else None
    uneven = [layer for layer in layers if block and layer["in_features"] % block]
    # coremltools leaves such weights in float16 (the report lists each weight's dtype);
    # when they are most of the model, the technique would not be what its name says.
    if uneven and 2 * sum(l["params"] for l in uneven) > sum(l["params"] for l in layers):
        raise NotApplicable(f"blocks of {block} need input dimensions divisible by {block}; "
                            f"{len(uneven)} of {len(layers)} weights, most of the parameters, "
                            f"are not (e.g. {uneven[0]['name']}: {uneven[0]['in_features']})")
    per_op = {layer["scope"]: _linear_config(settings) for layer in layers}
    # `overrides` pick layers by name (e.g. embeddings and lm_head kept at int8).
    for override in settings.get("overrides", []):
        pattern = re.compile(override["layers"])
        matched = [layer["scope"] for layer in layers if pattern.search(layer["name"])]
        if not matched:
            raise NotApplicable(f"no layer of this model matches {override['layers']!r}")
        fields = {**settings, **{k: v for k, v in override.items() if k != "layers"}}
        per_op.update({name: _linear_config(fields) for name in matched})
    return optimize.linear_quantize_weights(base, optimize.OptimizationConfig(op_name_configs=per_op))


def _mixed(base, settings: dict, layers: list[dict], source: CompressInput):
    import coremltools.optimize.coreml as optimize

    if not settings["ops"]:
        return base
    per_op = {op: optimize.OpPalettizerConfig(mode="kmeans", nbits=bits, granularity="per_tensor", weight_threshold=0)
              for op, bits in settings["ops"].items()}
    return optimize.palettize_weights(base, optimize.OptimizationConfig(op_name_configs=per_op))


def _w8a8(base, settings: dict, layers: list[dict], source: CompressInput):
    import coremltools.optimize.coreml as optimize

    activation = optimize.experimental.OpActivationLinearQuantizerConfig(mode="linear_symmetric")
    names = [i.name for i in base.get_spec().description.input]
    samples = [dict(zip(names, sample)) for sample in source.calibration or []]
    model = optimize.experimental.linear_quantize_activations(
        base, optimize.OptimizationConfig(global_config=activation), sample_data=samples)
    weights = optimize.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=0)
    return optimize.linear_quantize_weights(model, optimize.OptimizationConfig(global_config=weights))


COMPRESSIONS = {"palettize": _palettize, "linear": _linear, "mixed": _mixed, "w8a8": _w8a8}


# ---- package normalisation ---------------------------------------------------------------------

def normalize_package(package: Path, model: dict | None) -> None:
    """Make an .mlpackage byte-identical across builds and carry the manifest's metadata.

    coremltools names package items with random UUIDs and stamps the conversion date; both are
    replaced by values derived from the content.
    """
    from coremltools.proto import Model_pb2

    for name in DEBUG_FILES:
        (package / name).unlink(missing_ok=True)
    spec_path = package / MODEL_FILE
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    for key in VOLATILE_METADATA:
        if key in spec.description.metadata.userDefined:
            del spec.description.metadata.userDefined[key]
    if model is not None:
        describe_interface(spec, ModelInterface.from_json(model))
    spec_path.write_bytes(spec.SerializeToString(deterministic=True))

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    renamed = {}
    entries = {}
    for identifier, entry in manifest["itemInfoEntries"].items():
        stable = str(uuid.uuid5(uuid.NAMESPACE_URL, "edgebuild:" + entry["path"])).upper()
        renamed[identifier] = stable
        entries[stable] = entry
    manifest["itemInfoEntries"] = dict(sorted(entries.items()))
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n", encoding="utf-8")


def describe_interface(spec, interface: ModelInterface) -> None:
    """The model's description, author, licence and version, and a line per input and output, as
    Xcode shows them; labels of outputs that are not the classifier's go to user-defined metadata."""
    from coremltools.proto import Model_pb2

    metadata = spec.description.metadata
    metadata.shortDescription = interface.description or interface.name
    metadata.versionString = interface.version
    metadata.author = interface.author or "edgebuild"
    metadata.license = interface.license
    outputs = [feature.name for feature in spec.description.output
               if feature.name != spec.description.predictedProbabilitiesName]
    for name, labels in interface.labels_by_output(outputs).items():
        metadata.userDefined[f"{LABELS_KEY}{name}"] = json.dumps(list(labels))
    for feature in list(spec.description.input) + list(spec.description.output):
        kind = feature.type.WhichOneof("Type")
        if kind == "imageType":
            image = interface.images.get(feature.name)
            colour = Model_pb2.ImageFeatureType.ColorSpace.Name(feature.type.imageType.colorSpace).lower()
            feature.shortDescription = (f"{colour} image, {feature.type.imageType.width}x"
                                        f"{feature.type.imageType.height}" + (f"; the model sees (pixel - "
                                        f"{list(image.mean)}) / {list(image.std)}" if image else ""))
        elif kind == "dictionaryType":
            feature.shortDescription = "score of each class label"
        elif kind == "stringType":
            feature.shortDescription = "the class label with the highest score"
        else:
            array = feature.type.multiArrayType
            dtype = Model_pb2.ArrayFeatureType.ArrayDataType.Name(array.dataType).lower()
            feature.shortDescription = f"{dtype} tensor of shape {list(array.shape)}"


# ---- weights-exact simulation ------------------------------------------------------------------

def _program(bundle: Path):
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(bundle), skip_model_load=True)
    spec = model.get_spec()
    _fresh_op_names()  # loading names the inline constants it creates (a palette's table) by counter
    return load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)


def _weight_ops(bundle: Path) -> list:
    from coremltools.converters.mil.mil.var import ListVar

    program = _program(bundle)
    # A classifier's class labels are a list constant: not a weight.
    return [op for function in program.functions.values() for op in function.operations
            if (op.op_type == "const" or op.op_type.startswith("constexpr_")) and not isinstance(op.outputs[0], ListVar)]


_SUFFIXES = ("_to_fp16", "_to_fp32", "_cast_fp16", "_palettized", "_quantized", "_affine_quantized", "_dequantized")


def _parameter_key(op_name: str) -> str:
    """'p_features_0_weight_to_fp16_palettized' -> 'features_0_weight'."""
    name = op_name.removeprefix("p_")
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name, changed = name[: -len(suffix)], True
    return name


def _compression_kind(op) -> str:
    if op.op_type == "constexpr_lut_to_dense":
        bits = int(np.log2(op.inputs["lut"].val.shape[-2] if op.inputs["lut"].val.ndim > 1 else op.inputs["lut"].val.size))
        return f"palettized {bits}-bit"
    if op.op_type in ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"):
        from coremltools.converters.mil.mil import types

        data = op.inputs.get("quantized_data") or op.inputs.get("data")
        if data is None:
            return op.op_type
        # The MIL type, not numpy's: int4 values are held in int8 arrays.
        kind = f"linear {types.builtin_to_string(data.dtype)}"
        scale = op.inputs.get("scale")
        if scale is not None and len(scale.shape) == len(data.shape) and scale.shape[-1] > 1:
            kind += f" block{data.shape[-1] // scale.shape[-1]}"
        return kind
    return op.op_type


def _input_names(module) -> list[str]:
    """Argument names of a module's forward: the Core ML input names torch.export would give."""
    import inspect

    return [name for name in inspect.signature(module.forward).parameters if name != "self"]


def simulated_module(bundle: Path, exported_program: Path):
    """The exported program's module with each parameter set to the bundle's stored value.

    Returns (module, names of parameters the bundle does not store under a matching name/shape).
    """
    import torch
    from coremltools.converters.mil.mil import types

    module = torch.export.load(str(exported_program)).module()
    # Parameters only: buffers (e.g. rotary frequencies) are never compressed.
    parameters = {name.replace(".", "_"): (name, tensor) for name, tensor in module.named_parameters()}
    copied, unfit, float32 = set(), set(), False
    with torch.no_grad():
        # One weight at a time, decompressed as Core ML materialises it at load time: an LLM's
        # decompressed weights never sit in memory all at once (bench/llm_scale.py).
        for op in _weight_ops(bundle):
            output = op.outputs[0]
            if output.dtype == types.fp32 and output.shape and int(np.prod(output.shape)) > 1:
                float32 = True
            key = _parameter_key(op.name)
            if key not in parameters or key in copied:
                continue
            value = _stored_value(op)
            _, tensor = parameters[key]
            if not (isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size > 1):
                continue
            if tuple(value.shape) == tuple(tensor.shape):
                tensor.copy_(torch.from_numpy(np.ascontiguousarray(value)))  # copy_ widens float16 in place
                copied.add(key)
            else:
                unfit.add(key)  # stored under its name but in another shape: not simulated exactly
            del value
        # Vectors (norm scales, biases) are never compressed here; Core ML may fold them into other
        # constants under other names. Stored at the bundle's float width, they are simulated exactly.
        width = torch.float32 if float32 else torch.float16
        missing = []
        for key, (name, tensor) in parameters.items():
            if key in copied:
                continue
            if tensor.dim() <= 1 and key not in unfit:
                tensor.copy_(tensor.to(width))
            else:
                missing.append(name)
    return module, missing
