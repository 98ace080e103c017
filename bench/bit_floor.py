"""Bundle bytes against the bit floor, over a zoo of common mobile architectures (bench/zoo.py).

Each model is built by edgebuild itself (a real build: export, graph rewrites, litert-torch,
ai-edge-quantizer, ai-edge-litert) with the uniform techniques below and a size budget that needs
mixed precision. For every bundle it prints bytes / floor, where floor = Σ parameters × bits ÷ 8:
- a BatchNorm counts as the bias it folds into (its scale folds into the convolution's weights);
- a tied weight counts once;
- biases count at 32 bits in every row: TFLite stores a bias as float32 beside a float or
  dequantized weight and as int32 beside an int8 one (int64 beside int16); no kernel reads a bias
  of fewer bits ("where the runtime stores that layer at those bits");
- int4 rows count depthwise convolutions at 8 bits: ai-edge-quantizer refuses int4 for them, and
  the runtime stores them at 8 at best ("where the runtime stores that layer at those bits");
- the mixed-precision row counts each searched layer at the bits it was given, other parameters
  (biases, slopes) at 32.
`excess` is bytes − floor, split into `qparams` (the float32 scale per channel and the int64 zero
points the TFLite format requires of a per-channel quantized tensor; edgebuild stores the all-zero
zero-point vector once per channel count) and `rest`
(everything else: biases and constants no recipe quantizes, per-op and per-tensor tables, metadata).
The goal, judged on the int8 and int4 rows:
bytes ≤ 1.10 × floor + 16 KiB. Rows for fp32, blockwise int4 (4 bits plus a float16 scale per 32
weights) and the mixed assignment are printed, not judged. The MTCNN-style net is also built with
`model.rewrites: {prelu-as-select: false}`, the "before" of issue #17.

Run: .venv/bin/python bench/bit_floor.py [--previous-floor] [MODEL ...]   (1-8 minutes on 2 cores, by what
the cache holds)
"""
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from goals import goal, verdict

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TECHNIQUES = {"fp32": 32, "int8-weight-only": 8, "int8-dynamic": 8, "int4-weight-only": 4, "int4-blockwise32": 4}
JUDGED = {"int8-weight-only", "int8-dynamic", "int4-weight-only"}
PRECISION_BITS = {"fp16": 16, "int8": 8, "int4": 4}
SLACK = 16 * 1024
# `--previous-floor`: judge on the floor before issue #17's third stop (biases at the technique's
# bits, BatchNorm left out), to compare with that stop's figures.
PREVIOUS_FLOOR = "--previous-floor" in sys.argv
# name -> (model entry, rewrites switched off)
MODELS = {
    "mobilenetv2": ("zoo.py:build_mobilenetv2", False),
    "mobilenetv2-full": ("zoo.py:build_mobilenetv2_full", False),
    "resnet": ("zoo.py:build_resnet", False),
    "mtcnn": ("zoo.py:build_mtcnn", False),
    "mtcnn-no-rewrite": ("zoo.py:build_mtcnn", True),
    "tinylm": ("zoo.py:build_tinylm", False),
    "lstm": ("zoo.py:build_lstm", False),
    "gru": ("zoo.py:build_gru", False),
    "bigru-tagger": ("zoo.py:build_bigru_tagger", False),
    "gru-spotter": ("zoo.py:build_gru_spotter", False),
    "digits": ("examples/digits/model.py:build", False),
}


def _load(entry: str):
    """The model and example inputs an entry builds, in this process (to count its parameters)."""
    import importlib.util

    file, function = entry.split(":")
    path = BENCH / file if file == "zoo.py" else REPO / file
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function)()


def parameter_counts(model) -> tuple[int, int, int, int]:
    """(parameters the floor counts, of which in depthwise convolutions, of which biases, of which
    biases a BatchNorm folds into)."""
    from torch import nn

    seen, counted, depthwise, biases, folded = set(), 0, 0, 0, 0
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            # It folds into the convolution before it: its scale into the weights, its shift into
            # that convolution's bias (one per channel).
            counted += module.num_features
            biases += module.num_features
            folded += module.num_features
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            counted += parameter.numel()
            # The converter makes a depthwise op of grouped convolutions and of single-channel ones.
            if isinstance(module, nn.Conv2d) and (module.groups == module.in_channels) and parameter is module.weight:
                depthwise += parameter.numel()
            # Linear, Conv and LSTM/GRU biases (bias, bias_ih_l0, bias_hh_l0, ...).
            if name == "bias" and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) or name.startswith("bias_"):
                biases += parameter.numel()
    return counted, depthwise, biases, folded


def build(name: str, entry: str, rewrites_off: bool, workdir: Path) -> dict:
    model, example = _load(entry)
    counted, depthwise, biases, folded = parameter_counts(model)
    project = workdir / name
    project.mkdir()
    shutil.copy(BENCH / "zoo.py", project / "zoo.py")
    if not entry.startswith("zoo.py"):
        shutil.copytree(REPO / "examples" / "digits", project / "examples" / "digits",
                        ignore=shutil.ignore_patterns("__pycache__"))
    rng = np.random.default_rng(0)
    sample = example[0].numpy()
    inputs = (rng.integers(0, 1000, (16, *sample.shape[1:])).astype(sample.dtype) if sample.dtype.kind == "i"
              else rng.random((16, *sample.shape[1:]), dtype=np.float32))
    np.savez(project / "eval.npz", x=inputs)
    model_entry = {"name": name.replace("-", "_"), "source": "python", "entry": entry}
    if rewrites_off:
        model_entry["rewrites"] = {"prelu-as-select": False}
    manifest = {
        "version": 1, "model": model_entry, "data": {"evaluation": "eval.npz", "calibration": "eval.npz"},
        "metric": "sqnr",
        # A budget at the int8 floor: mixed precision has to put some layers below 8 bits.
        "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"],
                     "budget": {"size": f"{counted}B"}, "accuracy": {"floor": 10}}],
        "search": {"techniques": list(TECHNIQUES)}, "reports": ["json"],
    }
    (project / "edgebuild.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "edgebuild", "build"], cwd=project, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.exit(f"{name}: build failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads((project / "dist" / "report.json").read_text())
    return {"report": report["targets"][0], "counted": counted, "depthwise": depthwise, "biases": biases,
            "folded": folded,
            "rewrites": [r["name"] for r in report["model"].get("rewrites", []) if r["changed"]],
            "candidates": project / ".edgebuild" / "tflite" / "candidates"}


def quantization_parameter_bytes(bundle: Path) -> int:
    """Bytes of quantization parameters as stored: the float32 scales (and min/max where present)
    of each quantized tensor and its int64 zero points, which the TFLite schema and runtime require
    per channel (one zero point for many scales is refused). A vector the file stores once for
    several tensors (the all-zero zero points of one channel count) counts once."""
    from ai_edge_litert import schema_py_generated as schema

    data = bundle.read_bytes()
    model, stored = schema.Model.GetRootAs(data, 0), {}
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for t in range(subgraph.TensorsLength()):
            quantization = subgraph.Tensors(t).Quantization()
            if quantization is None:
                continue
            table = quantization._tab
            # min, max, scale (4-byte elements) and zero_point (8-byte): fields 0-3.
            for field, element in ((4, 4), (6, 4), (8, 4), (10, 8)):
                offset = table.Offset(field)
                if offset:
                    stored[table.Vector(offset)] = 4 + element * table.VectorLen(offset)
    return sum(stored.values())


def floor_bytes(technique: str, counted: int, depthwise: int, biases: int, folded: int) -> float:
    bits = TECHNIQUES[technique]
    if PREVIOUS_FLOOR:  # biases at the technique's bits, BatchNorm left out
        return ((counted - folded - depthwise) * bits + depthwise * max(bits, 8)) / 8
    weights = counted - depthwise - biases
    return (weights * bits + depthwise * max(bits, 8) + biases * 32) / 8


def mixed_floor(target: dict, counted: int) -> float | None:
    search = target.get("search") or {}
    chosen = search.get("chosen")
    if not chosen:
        return None
    # A layer merged with copies of its weight counts its parameters once: the floor is the model's.
    layers = {layer["name"]: layer["params"] // (1 + len(layer.get("copies", []))) for layer in search["layers"]}
    assigned = sum(layers[name] * PRECISION_BITS[precision] / 8 for name, precision in chosen["assignment"].items())
    return assigned + (counted - sum(layers.values())) * 4


def main() -> None:
    names = [arg for arg in sys.argv[1:] if not arg.startswith("--")] or list(MODELS)
    print(f"{'model':<18}{'technique':<20}{'bytes':>12}{'floor':>12}{'ratio':>7}{'excess':>10}{'qparams':>9}{'rest':>10}"
          "  copies / notes")
    with tempfile.TemporaryDirectory() as temporary:
        for name in names:
            entry, rewrites_off = MODELS[name]
            result = build(name, entry, rewrites_off, Path(temporary))
            target, counted, depthwise, biases, folded = (
                result[key] for key in ("report", "counted", "depthwise", "biases", "folded"))
            by_name = {c["technique"]: c for c in target["candidates"]}
            for technique in [*TECHNIQUES, "mixed-precision"]:
                candidate = by_name.get(technique)
                if not candidate or "bytes" not in candidate:
                    why = ((candidate.get("reason") or candidate["status"]) if candidate
                           else "not searched: a uniform technique met the budget" if target["status"] == "pass"
                           else "not built")
                    print(f"{name:<18}{technique:<20}{'—':>12}  {why}")
                    continue
                floor = (mixed_floor(target, counted) if technique == "mixed-precision"
                         else floor_bytes(technique, counted, depthwise, biases, folded))
                if floor is None:
                    continue
                size = candidate["bytes"]
                copies = "; ".join(f"{c['copy_of']}={c['relation']}({c['tensor']})" for c in candidate.get("copies", []))
                file = result["candidates"] / f"{technique}.tflite"
                qparams = quantization_parameter_bytes(file) if file.is_file() else None
                split = (f"{qparams:>9,}{round(size - floor - qparams):>10,}" if qparams is not None else f"{'—':>9}{'—':>10}")
                line = f"{name:<18}{technique:<20}{size:>12,}{round(floor):>12,}{size / floor:>7.2f}{round(size - floor):>10,}{split}  {copies}"
                if technique in JUDGED and not name.endswith("no-rewrite"):
                    goal(f"{line} (goal <= 1.10 x floor + 16 KiB)", size <= 1.10 * floor + SLACK)
                else:
                    print(line)
            if result["rewrites"]:
                print(f"{name:<18}graph rewrites: {', '.join(result['rewrites'])}")
    verdict()


if __name__ == "__main__":
    main()
