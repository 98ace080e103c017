"""What the graph passes on a recurrent net cost and save (issue #17): the zoo's 20-step GRU and
LSTM (bench/zoo.py), converted by litert-torch, as fp32 and as an int8-weight-only candidate,
each compacted three ways:
- `unfused`: names and shared tables only (the passes off);
- `fused`: slices fused into SPLIT/UNPACK (exact);
- `rolled`: fused, and the steps as one WHILE loop (what ships by default).

For each it prints ops (over all subgraphs), bytes, microseconds per invoke (ai-edge-litert, one
thread, the best of 5 rounds of 500 after 50 warm-up runs, one input) and the largest output
difference against the unfused model. Ratios come from this one run.
Goals: fusion changes no output bit and is no more than 10% slower; the loop saves bytes and is
no slower than the fused steps (weights dequantized inside the body, where the runtime expands a
constant once, not carried through the loop as state).

Run: .venv/bin/python bench/loops.py   (about 1 minute on 2 cores)
"""
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from goals import goal, verdict

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
ROUNDS, RUNS, WARMUP = 5, 500, 50


def microseconds(bundle: Path, sample: np.ndarray) -> tuple[float, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(bundle), num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], sample)
    for _ in range(WARMUP):
        interpreter.invoke()
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(RUNS):
            interpreter.invoke()
        best = min(best, (time.perf_counter() - start) / RUNS * 1e6)
    return best, interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def ops(bundle: Path) -> int:
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(bundle.read_bytes()))
    return sum(len(subgraph.operators) for subgraph in model.subgraphs)


def compacted_three_ways(source: Path, compaction) -> dict[str, Path]:
    bundles = {}
    for graph in ("unfused", "fused", "rolled"):
        bundles[graph] = source.with_name(f"{source.stem}-{graph}.tflite")
        shutil.copy(source, bundles[graph])
        fuse = compaction.fuse
        if graph == "unfused":
            compaction.fuse = lambda model: 0
        try:
            compaction.compact_file(bundles[graph], roll_loops=graph == "rolled")
        finally:
            compaction.fuse = fuse
    return bundles


def main() -> None:
    import torch

    import zoo
    from edgebuild_tflite import compaction
    from edgebuild_tflite.backend import TFLiteBackend

    from edgebuild.api import CompressInput
    from edgebuild.plugins import default_registry
    from edgebuild_tflite import backend as tflite

    [int8] = [t for t in default_registry().techniques_for("tflite") if t.name == "int8-weight-only"]
    print(f"{'model':<6}{'technique':<18}{'graph':<10}{'ops':>6}{'bytes':>10}{'us/invoke':>11}{'max diff':>11}")
    with tempfile.TemporaryDirectory() as temporary:
        for kind in ("gru", "lstm"):
            folder = Path(temporary) / kind
            folder.mkdir()
            module, example = getattr(zoo, f"build_{kind}")()
            torch.export.save(torch.export.export(module, example), str(folder / "model.pt2"))
            TFLiteBackend().convert(folder / "model.pt2", folder / "fp32.tflite", {})
            # The int8 candidate as ai-edge-quantizer writes it, before any compaction.
            compact_file, tflite.compact_file = tflite.compact_file, lambda bundle, roll_loops=True: None
            try:
                TFLiteBackend().compress(int8, CompressInput(
                    fp32_bundle=folder / "fp32.tflite", exported_program=folder / "model.pt2", calibration=None,
                    work_dir=folder, options={}), folder / "int8.tflite")
            finally:
                tflite.compact_file = compact_file
            sample = np.random.default_rng(0).standard_normal(example[0].shape).astype(np.float32)
            for technique, source in (("fp32", folder / "fp32.tflite"), ("int8-weight-only", folder / "int8.tflite")):
                bundles = compacted_three_ways(source, compaction)
                measured = {graph: microseconds(bundle, sample) for graph, bundle in bundles.items()}
                reference = measured["unfused"][1]
                for graph, bundle in bundles.items():
                    speed, output = measured[graph]
                    print(f"{kind:<6}{technique:<18}{graph:<10}{ops(bundle):>6}{bundle.stat().st_size:>10,}"
                          f"{speed:>11.1f}{float(np.max(np.abs(output - reference))):>11.2e}")
                size = {graph: bundle.stat().st_size for graph, bundle in bundles.items()}
                fused_speed = measured["fused"][0] / measured["unfused"][0]
                goal(f"{kind} {technique}: fused output equal to unfused bit for bit, {fused_speed:.2f}x its time "
                     "(goal <= 1.10)", np.array_equal(measured["fused"][1], reference) and fused_speed <= 1.10)
                rolled_speed = measured["rolled"][0] / measured["fused"][0]
                goal(f"{kind} {technique}: rolled {size['rolled']:,} B vs fused {size['fused']:,} B, "
                     f"{rolled_speed:.2f}x its time (goal: fewer bytes, <= 1.00x)",
                     size["rolled"] < size["fused"] and rolled_speed <= 1.0)
    verdict()


if __name__ == "__main__":
    main()
