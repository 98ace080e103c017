"""Quantization-aware training vs post-training quantization at the same bytes.

On the outliers example at a 28 KB budget, post-training int4 misses the floor; prints fp32, PTQ
and QAT metric and bytes, and the share of the PTQ drop that QAT recovered (goal >= 50%).

Run: .venv/bin/python bench/qat.py
"""
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    with tempfile.TemporaryDirectory() as temporary:
        project = Path(temporary)
        shutil.copytree(REPO / "examples" / "outliers", project / "examples" / "outliers",
                        ignore=shutil.ignore_patterns("__pycache__"))
        (project / "edgebuild.yaml").write_text(yaml.safe_dump({
            "version": 1, "model": {"name": "outliers", "source": "python", "entry": "examples/outliers/model.py:build"},
            "data": {"calibration": "examples/outliers/calib.npz", "evaluation": "examples/outliers/eval.npz",
                     "train": "examples/outliers/train.npz"},
            "metric": "agreement", "reports": ["json"],
            "targets": [{"name": "android", "format": "tflite", "devices": ["pixel-8"], "budget": {"size": "28KB"},
                         "accuracy": {"floor": 0.5}, "qat": "auto"}],
        }, sort_keys=False))
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "edgebuild", "build"], cwd=project, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if result.returncode not in (0, 1):
            sys.exit(result.stderr)
        target = json.loads((project / "dist" / "report.json").read_text())["targets"][0]
    ptq = next(c for c in target["candidates"] if c["technique"] == target["qat"]["trained_for"])
    qat = next(c for c in target["candidates"] if c["technique"].startswith("qat-"))
    fp32 = next(c for c in target["candidates"] if c["technique"] == "fp32")
    baseline = target["baseline"]["metric"]
    recovered = (qat["metric"] - ptq["metric"]) / (baseline - ptq["metric"])
    print(f"fp32:             agreement {fp32['metric']:.4f}  {fp32['bytes']:>7} B")
    print(f"PTQ {ptq['technique']}: agreement {ptq['metric']:.4f}  {ptq['bytes']:>7} B")
    print(f"QAT {qat['technique']}: agreement {qat['metric']:.4f}  {qat['bytes']:>7} B  "
          f"({target['qat']['training']['steps']} steps, {target['qat']['training']['seconds']} s)")
    print(f"share of the PTQ drop recovered by QAT: {recovered:.1%} (goal >= 50%), at equal bytes: "
          f"{'yes' if qat['bytes'] == ptq['bytes'] else 'no'}")
    print(f"whole build: {elapsed:.1f} s, floor {target['accuracy']['threshold']}, chosen {target['chosen']['technique']}")


if __name__ == "__main__":
    main()
