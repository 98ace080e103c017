"""Accuracy runs on every core: wall time of one evaluation with --jobs 1 vs every core, same run.

The ResNet-style net from bench/zoo.py (1.6M parameters, 64x64 input) is converted to TFLite
(fp32 and int4 weight-only), then 128 samples are evaluated through
`edgebuild.pipeline.evaluation.predict_samples` with 1 shard and with one shard per core. Prints
both wall times, the speed-up, and whether every output is bit-identical (it must be).

Run: .venv/bin/python bench/eval_jobs.py   (about a minute; on an otherwise idle machine)
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from goals import goal, verdict

BENCH = Path(__file__).resolve().parent
SAMPLES = 128


def main() -> None:
    import torch

    from edgebuild.api import CompressInput
    from edgebuild.pipeline.evaluation import predict_samples
    from edgebuild_tflite.backend import TFLiteBackend

    sys.path.insert(0, str(BENCH))
    import zoo

    cores = len(os.sched_getaffinity(0))
    backend = TFLiteBackend()
    inputs = (np.random.default_rng(0).random((SAMPLES, 3, 64, 64), dtype=np.float32),)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        module, example = zoo.build_resnet()
        torch.export.save(torch.export.export(module, example), str(work / "resnet.pt2"))
        backend.convert(work / "resnet.pt2", work / "fp32.tflite", {})
        int4 = next(t for t in backend_techniques() if t.name == "int4-weight-only")
        backend.compress(int4, CompressInput(fp32_bundle=work / "fp32.tflite", exported_program=work / "resnet.pt2",
                                             calibration=None, work_dir=work, options={}), work / "int4.tflite")
        print(f"cores: {cores}; {SAMPLES} samples of 3x64x64 through the ResNet-style net (1.6M parameters)")
        for name in ("fp32", "int4"):
            bundle = work / f"{name}.tflite"
            timings, outputs = {}, {}
            for workers in (1, cores):
                start = time.perf_counter()
                outputs[workers] = predict_samples(backend, bundle, inputs, batch=1, exported_program=None,
                                                   workers=workers).outputs
                timings[workers] = time.perf_counter() - start
            same = all(np.array_equal(outputs[1][key], outputs[cores][key]) for key in outputs[1])
            print(f"{name}: --jobs 1 {timings[1]:.2f} s, --jobs {cores} {timings[cores]:.2f} s, "
                  f"speed-up {timings[1] / timings[cores]:.2f}x")
            goal(f"{name}: outputs bit-identical for --jobs 1 and {cores}", same)
    verdict()


def backend_techniques():
    from edgebuild.plugins import default_registry

    return default_registry().techniques_for("tflite")


if __name__ == "__main__":
    main()
