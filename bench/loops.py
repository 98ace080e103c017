"""What the graph passes on a recurrent net cost and save (issue #17): the zoo's 20-step GRU and
LSTM classifiers, its 20-step bidirectional GRU tagger and its 100-frame GRU keyword spotter (a
label every step; bench/zoo.py), converted by litert-torch, as fp32 and as an int8-weight-only
candidate, each compacted three ways:
- `unfused`: names and shared tables only (the passes off);
- `fused`: slices fused into SPLIT/UNPACK (exact);
- `rolled`: fused, and the steps as one WHILE loop (what ships by default).

For each it prints ops (over all subgraphs), bytes, microseconds per invoke (ai-edge-litert, one
thread, the best of 5 rounds of 500 after 50 warm-up runs, the rounds taking turns over the three
graphs; one input) and the largest output
difference against the unfused model. Ratios come from this one run.
Goals: fusion changes no output bit and is no more than 10% slower; the loop saves bytes and,
in a classifier, is no slower than the fused steps (weights dequantized inside the body, where the
runtime expands a constant once, not carried through the loop as state). The taggers' loops write
every step into a block that is loop state, copied on every step: for them the goal is the other
way round, the unrolled steps (what `<technique>-unrolled` ships under a latency budget) faster.

Run: .venv/bin/python bench/loops.py   (about 2 minutes on 2 cores)
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


def microseconds(bundles: dict[str, Path], sample: np.ndarray) -> dict[str, tuple[float, np.ndarray]]:
    """graph -> (best µs per invoke, output). The rounds take turns over the graphs, so a slow
    spell of the machine falls on all of them alike."""
    from ai_edge_litert.interpreter import Interpreter

    interpreters = {}
    for graph, bundle in bundles.items():
        interpreters[graph] = Interpreter(model_path=str(bundle), num_threads=1)
        interpreters[graph].allocate_tensors()
        interpreters[graph].set_tensor(interpreters[graph].get_input_details()[0]["index"], sample)
        for _ in range(WARMUP):
            interpreters[graph].invoke()
    best = dict.fromkeys(bundles, float("inf"))
    for _ in range(ROUNDS):
        for graph, interpreter in interpreters.items():
            start = time.perf_counter()
            for _ in range(RUNS):
                interpreter.invoke()
            best[graph] = min(best[graph], (time.perf_counter() - start) / RUNS * 1e6)
    return {graph: (best[graph], interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy())
            for graph, interpreter in interpreters.items()}


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
    print(f"{'model':<13}{'technique':<18}{'graph':<10}{'ops':>6}{'bytes':>10}{'us/invoke':>11}{'max diff':>11}")
    with tempfile.TemporaryDirectory() as temporary:
        for kind in ("gru", "lstm", "bigru_tagger", "gru_spotter"):
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
                measured = microseconds(bundles, sample)
                reference = measured["unfused"][1]
                for graph, bundle in bundles.items():
                    speed, output = measured[graph]
                    print(f"{kind:<13}{technique:<18}{graph:<10}{ops(bundle):>6}{bundle.stat().st_size:>10,}"
                          f"{speed:>11.1f}{float(np.max(np.abs(output - reference))):>11.2e}")
                size = {graph: bundle.stat().st_size for graph, bundle in bundles.items()}
                fused_speed = measured["fused"][0] / measured["unfused"][0]
                goal(f"{kind} {technique}: fused output equal to unfused bit for bit, {fused_speed:.2f}x its time "
                     "(goal <= 1.10)", np.array_equal(measured["fused"][1], reference) and fused_speed <= 1.10)
                rolled_speed = measured["rolled"][0] / measured["fused"][0]
                timed = kind in ("gru", "lstm")  # the classifiers
                goal(f"{kind} {technique}: rolled {size['rolled']:,} B vs fused {size['fused']:,} B, "
                     f"{rolled_speed:.2f}x its time (goal: fewer bytes{', <= 1.00x' if timed else ''})",
                     size["rolled"] < size["fused"] and (rolled_speed <= 1.0 or not timed)
                     and np.allclose(measured["rolled"][1], reference, rtol=1e-5, atol=1e-6))
                if not timed:  # what `<technique>-unrolled` offers a tagger's latency budget
                    goal(f"{kind} {technique}: the unrolled steps take {1 / rolled_speed:.2f}x the loop's time "
                         "(goal < 1.00: the faster form is faster)", rolled_speed > 1.0)
    verdict()


if __name__ == "__main__":
    main()
